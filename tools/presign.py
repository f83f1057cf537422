"""Pre-signed, expiring, device-bound download URLs for the firmware store.

A URL names one artifact by its SHA-256 and carries `device`, `expires` (unix seconds) and
`sig` = HMAC-SHA256(store key, "GET\\n<path>\\n<device>\\n<expires>"). Changing any of them
breaks the signature; the store also requires the request to prove it comes from `device`.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from urllib.parse import urlencode

DEFAULT_TTL = 15 * 60
MAX_TTL = 60 * 60


class PresignError(Exception):
    """Why a URL is refused; the message is safe to return to the client."""


def _mac(key: bytes, path: str, device: str, expires: int) -> str:
    msg = f"GET\n{path}\n{device}\n{expires}".encode()
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def artifact_path(sha256: str) -> str:
    return f"/fw/{sha256}.bin"


def sign(key: bytes, base_url: str, sha256: str, device: str, ttl: int = DEFAULT_TTL, now: float | None = None) -> str:
    """A URL for `device` to GET the artifact `sha256` until now + ttl (at most MAX_TTL)."""
    if not 0 < ttl <= MAX_TTL:
        raise ValueError(f"ttl must be 1..{MAX_TTL} seconds")
    expires = int(now if now is not None else time.time()) + ttl
    path = artifact_path(sha256)
    q = urlencode({"device": device, "expires": expires, "sig": _mac(key, path, device, expires)})
    return f"{base_url.rstrip('/')}{path}?{q}"


def verify(key: bytes, path: str, query: dict[str, str], now: float | None = None) -> str:
    """Check a request's path and query; returns the device id it was issued to."""
    device, expires, sig = query.get("device"), query.get("expires"), query.get("sig")
    if not device or not expires or not sig:
        raise PresignError("not a pre-signed URL")
    try:
        exp = int(expires)
    except ValueError:
        raise PresignError("bad expiry") from None
    if not hmac.compare_digest(sig, _mac(key, path, device, exp)):
        raise PresignError("signature does not match")
    now = now if now is not None else time.time()
    if now > exp:
        raise PresignError("URL expired")
    if exp - now > MAX_TTL:
        raise PresignError("URL lifetime exceeds the store's limit")
    return device
