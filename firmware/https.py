# https.py A small HTTPS/1.1 GET for firmware: verified TLS, one request write, streamed body.
#
# Not micropython-lib `requests`: it forces CERT_NONE (micropython-lib#838) and buffers
# bodies. Here the caller passes an SSLContext with CERT_REQUIRED and the project CA
# (trust.py), the
# request goes out in one write (MicroPython's TLS sends each write as a record; Nagle would
# stall the next one), and the body is a stream the caller reads block by block.

import socket

from firmware import contract
from firmware.ota import UpdateError

_MAX_HEADERS = 32
_MAX_LINE = 1024


class Response:
    def __init__(self, sock, status, headers):
        self.stream = sock
        self.status = status
        self.headers = headers
        cl = headers.get("content-length")
        self.length = int(cl) if cl is not None and cl.isdigit() else None

    def close(self):
        self.stream.close()


def _line(s):
    line = s.readline(_MAX_LINE)
    if not line.endswith(b"\n"):
        raise OSError(5, "HTTP header line too long or connection closed")
    return line


def get(ctx, url, headers=None, timeout_s=15, server_hostname=None):
    """GET `url`; returns a Response whose body is read from .stream. Close it when done.

    Raises OSError for network, TLS (as ValueError from ssl) and protocol failures.
    """
    host, port, path = contract.split_url(url)
    ai = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)[0]
    raw = socket.socket(ai[0], socket.SOCK_STREAM)
    sock = raw
    try:
        raw.settimeout(timeout_s)  # SSLSocket has no settimeout: set it on the raw socket
        try:
            raw.setsockopt(6, 1, 1)  # IPPROTO_TCP, TCP_NODELAY
        except OSError:
            pass
        raw.connect(ai[-1])
        sock = ctx.wrap_socket(raw, server_hostname=server_hostname or host)
        req = "GET %s HTTP/1.1\r\nHost: %s%s\r\n" % (path, host, "" if port == 443 else ":%d" % port)
        for k in headers or ():
            req += "%s: %s\r\n" % (k, headers[k])
        sock.write((req + "Connection: close\r\n\r\n").encode())
        status_line = _line(sock).split(None, 2)
        if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1."):
            raise OSError(5, "not an HTTP response")
        status = int(status_line[1])
        hdrs = {}
        for _ in range(_MAX_HEADERS + 1):
            line = _line(sock)
            if line in (b"\r\n", b"\n"):
                break
            k, _, v = line.decode().partition(":")
            hdrs[k.strip().lower()] = v.strip()
        else:
            raise OSError(5, "too many HTTP headers")
        if hdrs.get("transfer-encoding", "identity").lower() != "identity":
            raise OSError(5, "chunked transfer encoding is not supported for images")
        return Response(sock, status, hdrs)
    except BaseException:
        sock.close()
        raise


def refusal(resp):
    """An UpdateError for a refused request, with a code that says what to do next."""
    status = resp.status
    if status == 403:
        try:
            reason = resp.stream.read(120)
        except OSError:
            reason = b""
        if b"expired" in reason:
            return UpdateError(contract.E_URL_EXPIRED, "pre-signed URL expired")
        return UpdateError(contract.E_FORBIDDEN, reason.decode())
    if status == 404:
        return UpdateError(contract.E_NOT_FOUND, "no such artifact")
    return UpdateError(contract.E_HTTP, str(status))

