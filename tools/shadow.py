"""Shadow documents as pure functions: validate a request, merge it, compute the delta.

Semantics follow AWS IoT Device Shadow: `state.desired` / `state.reported` merge recursively,
`null` deletes a key, every leaf carries a metadata timestamp, `version` grows by one per
accepted update, an update that names a `version` must match the current one (409), and the
delta holds the desired leaves that differ from reported. No I/O here: replica.py stores and
publishes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson

from firmware import contract

SECTIONS = ("desired", "reported")

# Documents and answers as they are stored and sent: JSON without spaces, UTF-8. orjson
# encodes the replica's messages in a tenth of the time the standard library takes (which
# was a fifth of the replica's CPU); what it cannot encode (integers beyond 64 bits) goes
# through the standard encoder, escaped ASCII, as all of it did before 2026-11-27.
_ascii = json.JSONEncoder(separators=(",", ":")).encode


def compact_bytes(obj) -> bytes:
    try:
        return orjson.dumps(obj)
    except orjson.JSONEncodeError:
        return _ascii(obj).encode()


def compact(obj) -> str:
    return compact_bytes(obj).decode()


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    # 1e400 is valid JSON, but Python reads it as infinity, which no JSON can hold: orjson
    # would store it as null (deleting the key on the next merge), json as "Infinity".
    f = float(text)
    if f - f != 0:
        raise ValueError(f"the number {text} does not fit a double")
    return f


@dataclass
class ShadowError(Exception):
    code: int
    message: str
    client_token: str | None = None

    def payload(self) -> dict:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.client_token is not None:
            out["clientToken"] = self.client_token
        return out


def empty_document() -> dict:
    return {"state": {}, "metadata": {}, "version": 0, "timestamp": 0}


def _too_deep(v: Any, limit: int) -> bool:
    """Whether objects and arrays nest in `v` more than `limit` levels (stops at the first)."""
    if isinstance(v, dict):
        v = v.values()
    elif not isinstance(v, list):
        return False
    if limit == 0:
        return True
    for x in v:
        if _too_deep(x, limit - 1):
            return True
    return False


def _merge(base: dict, patch: dict) -> dict:
    out = dict(base)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        elif isinstance(v, dict):
            out[k] = _merge({}, v)  # drops nulls inside a new object
        else:
            out[k] = v
    return out


def _stamp(meta: dict, patch: dict, ts: int) -> dict:
    """Metadata mirrors the state tree with {"timestamp": ts} at each updated leaf."""
    out = dict(meta)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict):
            out[k] = _stamp(out.get(k) if isinstance(out.get(k), dict) and "timestamp" not in out[k] else {}, v, ts)
        else:
            out[k] = {"timestamp": ts}
    return out


def delta(desired: dict, reported: dict) -> dict:
    """Desired leaves whose value differs from reported (objects compared key by key)."""
    out = {}
    for k, want in desired.items():
        have = reported.get(k)
        if isinstance(want, dict) and isinstance(have, dict):
            d = delta(want, have)
            if d:
                out[k] = d
        elif want != have:
            out[k] = want
    return out


def parse_request(payload: bytes) -> dict:
    """Decode an update request; raises ShadowError(400/413) with the reason."""
    if len(payload) > 2 * contract.MAX_DOCUMENT:
        raise ShadowError(contract.R_TOO_LARGE, "payload too large")
    try:
        req = json.loads(payload, parse_constant=_no_constant, parse_float=_finite)  # NaN, Infinity: not JSON
    except (UnicodeDecodeError, ValueError) as e:
        raise ShadowError(contract.R_BAD_REQUEST, f"payload is not valid JSON: {e}") from None
    except RecursionError:  # thousands of nested brackets fit in the size limit
        raise ShadowError(contract.R_BAD_REQUEST, f"payload is nested deeper than {contract.MAX_DEPTH}") from None
    if not isinstance(req, dict):
        raise ShadowError(contract.R_BAD_REQUEST, "payload must be a JSON object")
    token = req.get("clientToken")
    if token is not None and (not isinstance(token, str) or len(token.encode()) > contract.MAX_CLIENT_TOKEN):
        raise ShadowError(contract.R_BAD_REQUEST, "clientToken must be a string of at most 64 bytes")
    return req


def apply_update(doc: dict | None, req: dict, now: int) -> tuple[dict, dict, dict | None]:
    """Apply an update request to a document.

    Returns (new document, accepted message, delta message or None).
    Raises ShadowError: 400 malformed, 409 version conflict, 413 too large.
    """
    token = req.get("clientToken")
    doc = doc or empty_document()
    state = req.get("state")
    if not isinstance(state, dict) or not state:
        raise ShadowError(contract.R_BAD_REQUEST, "state must be a non-empty object", token)
    unknown = set(state) - set(SECTIONS)
    if unknown:
        raise ShadowError(contract.R_BAD_REQUEST, f"unknown state section(s): {sorted(unknown)}", token)
    for section, patch in state.items():
        if patch is not None and not isinstance(patch, dict):
            raise ShadowError(contract.R_BAD_REQUEST, f"state.{section} must be an object or null", token)
        if patch is not None and _too_deep(patch, contract.MAX_DEPTH):
            raise ShadowError(contract.R_BAD_REQUEST, f"state.{section} is nested deeper than {contract.MAX_DEPTH}", token)
    if "version" in req:
        v = req["version"]
        if not isinstance(v, int) or isinstance(v, bool):
            raise ShadowError(contract.R_BAD_REQUEST, "version must be an integer", token)
        if v != doc["version"]:
            raise ShadowError(contract.R_CONFLICT, "Version conflict", token)

    new_state, new_meta = dict(doc["state"]), dict(doc["metadata"])
    for section, patch in state.items():
        if patch is None:
            new_state.pop(section, None)
            new_meta.pop(section, None)
            continue
        new_state[section] = _merge(new_state.get(section, {}), patch)
        new_meta[section] = _stamp(new_meta.get(section, {}), patch, now)
        if not new_state[section]:
            new_state.pop(section)
            new_meta.pop(section, None)
    text = compact_bytes(new_state)
    size = len(text) if text.isascii() else len(_ascii(new_state))  # counted escaped, as always
    if size > contract.MAX_DOCUMENT:
        raise ShadowError(contract.R_TOO_LARGE, f"document would be {size} bytes; the limit is {contract.MAX_DOCUMENT}", token)

    new = {"state": new_state, "metadata": new_meta, "version": doc["version"] + 1, "timestamp": now}
    accepted = {
        "state": state,
        "metadata": {s: _stamp({}, p, now) for s, p in state.items() if isinstance(p, dict)},
        "version": new["version"],
        "timestamp": now,
    }
    if token is not None:
        accepted["clientToken"] = token
    return new, accepted, delta_message(new)


def delta_message(doc: dict) -> dict | None:
    d = delta(doc["state"].get("desired", {}), doc["state"].get("reported", {}))
    if not d:
        return None
    return {"state": d, "version": doc["version"], "timestamp": doc["timestamp"]}


def documents_message(previous: dict | None, current: dict, token: str | None) -> dict:
    """`update/documents`: the whole document before and after one accepted update (as AWS IoT
    publishes it); `previous` is null when the update created the shadow."""
    def snap(d):
        return {"state": d["state"], "metadata": d["metadata"], "version": d["version"]}

    out = {"previous": snap(previous) if previous else None, "current": snap(current),
           "timestamp": current["timestamp"]}
    if token is not None:
        out["clientToken"] = token
    return out


def get_response(doc: dict, token: str | None) -> dict:
    state = dict(doc["state"])
    d = delta(state.get("desired", {}), state.get("reported", {}))
    if d:
        state["delta"] = d
    out = {"state": state, "metadata": doc["metadata"], "version": doc["version"], "timestamp": doc["timestamp"]}
    if token is not None:
        out["clientToken"] = token
    return out
