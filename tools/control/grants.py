"""Operator grants: proof that an operator, not the device, chose a device's desired firmware.

A device may publish on `state/<id>/update` (its reports), so the broker cannot tell a desired
firmware an operator set from one the device wrote into its own shadow. Operator tools sign
what they target: `desired.firmware.grant` = "<issued>.<mac>", with mac = keyed BLAKE2b (grant
key, the device id, the image's sha256, size and version, the auth mode, allow_downgrade and
`issued`). The grant key lives in the site (`grant.key`, mode 0600), beside the store key; the
operator tools, the replica and the renewer read it, and devices never see it.

- The replica refuses (403) an update that leaves a device's desired firmware without a valid
  grant for that device, or with a grant older than the newest it has accepted for it (a
  device replaying an earlier targeting of its own, even after removing the desired firmware).
- The renewer signs a URL and issues a download token only for a granted desired firmware,
  so a shadow edited in the database gains nothing either.
- `status` and rollouts show a desired firmware without a valid grant as such.

The URL is not covered: it changes on every renewal and grants nothing by itself (the store
wants a signature or a token bound to the device and the image).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time

import orjson

from firmware import contract

FIELD = contract.GRANT
# The replica keeps, in each shadow document but outside its state, when the newest grant it
# accepted for that device was issued: an older one is refused from then on.
GRANTED = "granted"


class GrantError(Exception):
    """Why a desired firmware is not granted; the message is safe to return to the client."""


def _mac(key: bytes, device: str, fw: dict, issued: int) -> str:
    # JSON keeps types apart: a size of "300" is not the size 300 that was granted. orjson
    # takes a tenth of the standard encoder's time (the replica checks every desired write);
    # what it cannot encode (integers beyond 64 bits) takes the standard one, on both sides.
    fields = ["GRANT1", device, fw.get("sha256"), fw.get("size"), fw.get("version"), fw.get("auth"),
              fw.get("allow_downgrade") is True, issued]
    try:
        msg = orjson.dumps(fields)
    except orjson.JSONEncodeError:
        msg = json.dumps(fields).encode()
    return hashlib.blake2b(msg, key=key, digest_size=32).hexdigest()  # BLAKE2's keyed mode: a MAC


def make(key: bytes, device: str, fw: dict, issued: int | None = None) -> str:
    """The grant for `device` to install the desired firmware `fw` (its sha256, size, version,
    auth and allow_downgrade, whatever its URL)."""
    issued = int(time.time()) if issued is None else issued
    return f"{issued}.{_mac(key, device, fw, issued)}"


def granted(key: bytes, device: str, fw: dict) -> dict:
    """`fw` with its grant, made now."""
    return dict(fw, **{FIELD: make(key, device, fw)})


def check(key: bytes, device: str, fw: dict) -> int:
    """The time the grant on `fw` was issued; GrantError if it has none valid for `device`."""
    grant = fw.get(FIELD) if isinstance(fw, dict) else None
    if not isinstance(grant, str):
        raise GrantError("desired firmware carries no operator grant")
    issued, _, mac = grant.partition(".")
    # ASCII only: str.isdigit() takes "²", which int() refuses; compare_digest refuses "é".
    if not (issued.isascii() and issued.isdigit() and len(issued) <= 12 and mac.isascii() and len(mac) == 64) \
            or not hmac.compare_digest(mac, _mac(key, device, fw, int(issued))):
        raise GrantError("desired firmware's operator grant does not match it or this device")
    return int(issued)


def issued(key: bytes, device: str, fw) -> int | None:
    """When the valid grant on `fw` was issued; None if it has none."""
    try:
        return check(key, device, fw)
    except GrantError:
        return None
