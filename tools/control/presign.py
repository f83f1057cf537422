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


def _expiry(ttl: int, now: float | None) -> int:
    if not 0 < ttl <= MAX_TTL:
        raise ValueError(f"ttl must be 1..{MAX_TTL} seconds")
    return int(now if now is not None else time.time()) + ttl


def _check_expiry(expires: int, now: float | None, what: str) -> None:
    now = now if now is not None else time.time()
    if now > expires:
        raise PresignError(f"{what} expired")
    if expires - now > MAX_TTL:
        raise PresignError(f"{what} lifetime exceeds the store's limit")


def sign(key: bytes, base_url: str, sha256: str, device: str, ttl: int = DEFAULT_TTL, now: float | None = None) -> str:
    """A URL for `device` to GET the artifact `sha256` until now + ttl (at most MAX_TTL)."""
    expires = _expiry(ttl, now)
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
    _check_expiry(exp, now, "URL")
    return device


# -- temporary credentials (the seed's second option) -----------------------------------------
# A bearer token `<device>.<sha256>.<expires>.<mac>` with mac = HMAC-SHA256(store key,
# "TOKEN\n<device>\n<sha256>\n<expires>"): one device, one artifact, a short life. Devices
# get it over MQTT (state/<id>/credentials/get), so the store needs no per-device URL.


def _token_mac(key: bytes, device: str, sha256: str, expires: int) -> str:
    return hmac.new(key, f"TOKEN\n{device}\n{sha256}\n{expires}".encode(), hashlib.sha256).hexdigest()


def issue_token(key: bytes, device: str, sha256: str, ttl: int = DEFAULT_TTL, now: float | None = None) -> tuple[str, int]:
    """(token, expires) letting `device` GET artifact `sha256` until now + ttl."""
    expires = _expiry(ttl, now)
    return f"{device}.{sha256}.{expires}.{_token_mac(key, device, sha256, expires)}", expires


def verify_token(key: bytes, token: str, sha256: str, now: float | None = None) -> str:
    """Check a bearer token for artifact `sha256`; returns the device it was issued to."""
    parts = token.rsplit(".", 3)  # device ids may contain dots; the rest never does
    if len(parts) != 4 or not parts[2].isdigit():
        raise PresignError("not a download token")
    device, sha, expires, mac = parts[0], parts[1], int(parts[2]), parts[3]
    if not hmac.compare_digest(mac, _token_mac(key, device, sha, expires)):
        raise PresignError("token signature does not match")
    if sha != sha256:
        raise PresignError("token is for another artifact")
    _check_expiry(expires, now, "token")
    return device
