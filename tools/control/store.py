"""The HTTPS firmware store: serves released images to the one device each URL names.

`/fw/<sha256>.bin` is the image; `/fw/<sha256>.sig?version=V` the signature bundle of release V
of that image (firmware/bundle.py url), under the same authorization as the image (a URL
pre-signed for the image serves both); 404 for a release that is not signed.

Every request needs either (1) a valid pre-signed URL (tools.control.presign: artifact, device, expiry,
HMAC) and the device's own credential (HTTP Basic, the same one it uses for MQTT) for the device
the URL was issued to, or (2) a temporary credential (`Authorization: Bearer`, tools.control.presign
tokens) for exactly this artifact, issued to a device that is not revoked. Anything else is 403
with the reason, and logged. Range requests get
206 (aiohttp's FileResponse), so devices can resume.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import ssl

from aiohttp import web

from tools.control import presign
from tools.site.credentials import Credentials
from tools.site.releases import Registry

log = logging.getLogger("store")

_ARTIFACT = re.compile(r"^[0-9a-f]{64}\.(bin|sig)$")
# Bytes read from the file per write: what each download in flight holds (aiohttp's default
# is 256 KiB; thousands of boards may be downloading at once).
_CHUNK = 64 * 1024


class _ImageResponse(web.FileResponse):
    """FileResponse (Range, 206, 416) that copies the file with aiohttp's own loop, as
    AIOHTTP_NOSENDFILE would. Over TLS, asyncio's loop.sendfile falls back to a copy loop of
    its own, and when a device hangs up mid-body (boards do: Wi-Fi, power, a newer image)
    its clean-up fails inside asyncio (Python 3.11: AttributeError in sslproto), which
    aiohttp logs as an unhandled exception on every such download."""

    async def _sendfile(self, request, fobj, offset, count):
        writer = await web.StreamResponse.prepare(self, request)
        return await self._sendfile_fallback(writer, fobj, offset, count)


def _deny(request: web.Request, reason: str, status: int = 403) -> web.Response:
    log.warning("%s %s from %s: %d %s", request.method, request.path, request.remote, status, reason)
    return web.json_response({"error": reason}, status=status)


def _basic_auth(header: str | None) -> tuple[str, str] | None:
    if not header or not header.startswith("Basic "):
        return None
    try:
        user, sep, pw = base64.b64decode(header[6:], validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (user, pw) if sep else None


def make_app(registry: Registry, key: bytes, creds: Credentials) -> web.Application:
    async def artifact(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if not _ARTIFACT.match(name):
            return _deny(request, "no such artifact", 404)
        sha = name[:-4]
        header = request.headers.get("Authorization") or ""
        if header.startswith("Bearer "):  # a temporary credential for this one artifact
            try:
                device = presign.verify_token(key, header[7:].strip(), sha)
            except presign.PresignError as e:
                return _deny(request, str(e))
            if not creds.known(device):
                return _deny(request, "device revoked")
        else:
            try:
                device = presign.verify(key, presign.artifact_path(sha), dict(request.query))
            except presign.PresignError as e:
                return _deny(request, str(e))
            auth = _basic_auth(header)
            if auth is None:
                return _deny(request, "device credential required")
            if auth[0] != device:
                return _deny(request, "URL was issued to another device")
            if not await asyncio.to_thread(creds.verify, auth[0], auth[1]):
                return _deny(request, "bad device credential")
        if name.endswith(".sig"):
            rel = registry.get(request.query.get("version", ""))
            if rel is None or rel.sha256 != sha or rel.signature is None:
                return _deny(request, "no signature for this release", 404)
            return web.json_response(rel.signature)
        path = registry.path_of(sha)
        if not path.is_file():
            return _deny(request, "no such artifact", 404)
        log.info("serving %s to %s (Range: %s)", name[:12], device, request.headers.get("Range", "-"))
        return _ImageResponse(path, chunk_size=_CHUNK, headers={"Content-Type": "application/octet-stream"})

    app = web.Application()
    app.router.add_get("/fw/{name}", artifact)
    return app


async def start_store(host: str, port: int, app: web.Application, ssl_context: ssl.SSLContext) -> tuple[web.AppRunner, int]:
    """Serve `app` over TLS; returns (runner, bound port). Stop with `await runner.cleanup()`."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    await site.start()
    bound = runner.addresses[0][1]
    return runner, bound
