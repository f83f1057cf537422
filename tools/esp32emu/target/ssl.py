# ssl.py Emulated `ssl` for the ESP32: micropython-lib's ssl API over the built-in `tls`, with
# the chip's memory budget for TLS connections.
#
# On an ESP32 without PSRAM each TLS connection takes ~20 KiB of the ESP-IDF heap (16 KiB in,
# 4 KiB out, MicroPython #6065) plus a handshake peak; beyond what the board holds,
# wrap_socket fails with OSError(ENOMEM) and gc.collect() does not help (#5355, #12790).
# The budget (ESP32EMU_TLS_BUDGET, default 2) counts connections whose socket is still open:
# closing the TLS socket closes it; a socket never closed keeps its slot, as leaked memory
# would on the chip.
# setblocking(True) waits forever afterwards, as on the chip: the ESP32 port's socket makes it
# settimeout(None) (ports/esp32/modsocket.c), while the unix port's keeps the timeout it had.
# umqtt.simple calls it in wait_msg(), so on a board it ends every deadline set before.

import os

import tls
from _emuhw import HEAP_PROBE, heap_probe
from tls import (  # noqa: F401 - re-exported API
    CERT_NONE,
    CERT_OPTIONAL,
    CERT_REQUIRED,
    MBEDTLS_VERSION,
    PROTOCOL_TLS_CLIENT,
    PROTOCOL_TLS_SERVER,
)

_ENOMEM = 12
_BUDGET = int(os.getenv("ESP32EMU_TLS_BUDGET") or "2")
_CLOCK_SET_AFTER = 1577836800  # the first second of 2020: before this the board's clock was never set
_live = []  # [id(TLS socket), raw socket] of open TLS connections; ids keep nothing alive


def open_connections():
    for pair in list(_live):
        if pair[1].fileno() < 0:
            _live.remove(pair)
    return len(_live)


def native(obj):
    """The MicroPython TLS socket behind one of ours (for select.py), else `obj`."""
    return obj._s if isinstance(obj, SSLSocket) else obj


def raw_socket(obj):
    """The socket under a TLS socket this module wrapped (for select.py), or None. Keyed by
    id(): holding the TLS socket would keep its SSLContext (~3 KiB of GC heap) alive after
    close, and the firmware needs that room for its next connection."""
    key = id(obj)
    for pair in _live:
        if pair[0] == key:
            return pair[1]
    return None


class SSLSocket:
    """The TLS socket wrap_socket returns: MicroPython's, but for setblocking (above)."""

    def __init__(self, s, raw):
        self._s = s
        self._raw = raw

    def setblocking(self, flag):
        self._s.setblocking(flag)
        if flag:
            self._raw.settimeout(None)  # the chip's setblocking(True): no deadline any more

    # The stream calls the firmware makes, passed on without allocating (the download loop
    # is proven allocation-free under heap_lock).
    def read(self, n=-1):
        return self._s.read() if n < 0 else self._s.read(n)

    def readinto(self, buf, n=None):
        return self._s.readinto(buf) if n is None else self._s.readinto(buf, n)

    def readline(self, n=-1):
        return self._s.readline() if n < 0 else self._s.readline(n)

    def write(self, buf, a=None, b=None):
        if a is None:
            return self._s.write(buf)
        return self._s.write(buf, a) if b is None else self._s.write(buf, a, b)

    def close(self):
        self._s.close()

    def __getattr__(self, name):  # recv, send, getpeercert, cipher, ...
        return getattr(self._s, name)


class SSLContext:
    def __init__(self, *args):
        self._ctx = tls.SSLContext(*args)
        self._ctx.verify_mode = CERT_NONE  # MicroPython's default, unlike CPython's

    @property
    def verify_mode(self):
        return self._ctx.verify_mode

    @verify_mode.setter
    def verify_mode(self, mode):
        self._ctx.verify_mode = mode

    def load_cert_chain(self, certfile, keyfile):
        self._ctx.load_cert_chain(_data(certfile), _data(keyfile))

    def load_verify_locations(self, cafile=None, cadata=None):
        self._ctx.load_verify_locations(_data(cafile) if cafile else cadata)

    def wrap_socket(self, sock, server_side=False, do_handshake_on_connect=True, server_hostname=None):
        if open_connections() >= _BUDGET:
            raise OSError(_ENOMEM)
        import time  # the board's RTC (time.py), which mbedTLS checks certificates against

        if self._ctx.verify_mode == CERT_REQUIRED and time.time() < _CLOCK_SET_AFTER:
            # With the clock at 2000-01-01 every certificate is "not yet valid"; the unix
            # port's mbedTLS reads the host clock, so the emulator says it here.
            raise ValueError("\nThe certificate validity starts in the future\n")
        s = SSLSocket(self._ctx.wrap_socket(sock, server_side=server_side,
                                            do_handshake_on_connect=do_handshake_on_connect,
                                            server_hostname=server_hostname), sock)
        for pair in _live:
            if pair[0] == id(s):
                _live.remove(pair)  # that address was a TLS socket which is gone now
                break
        _live.append([id(s), sock])
        if HEAP_PROBE:
            heap_probe()  # a sample with the session open, right after the handshake
        return s


def _data(x):
    if isinstance(x, str):
        with open(x, "rb") as f:
            return f.read()
    return x


def wrap_socket(sock, server_side=False, key=None, cert=None, cert_reqs=CERT_NONE, cadata=None,
                server_hostname=None, do_handshake=True):
    ctx = SSLContext(PROTOCOL_TLS_SERVER if server_side else PROTOCOL_TLS_CLIENT)
    if cert or key:
        ctx.load_cert_chain(cert, key)
    if cadata:
        ctx.load_verify_locations(cadata=cadata)
    ctx.verify_mode = cert_reqs
    return ctx.wrap_socket(sock, server_side=server_side, do_handshake_on_connect=do_handshake,
                           server_hostname=server_hostname)
