"""Shadow documents as pure functions: validate a request, merge it, compute the delta.

Semantics follow AWS IoT Device Shadow (docs/shadow.md lists the rules and the few places we
differ): `state.desired` / `state.reported` merge recursively, `null` deletes a key, arrays
are values (replaced whole, never holding null), every leaf carries a metadata timestamp,
`version` grows by one per accepted update, an update that names a `version` must match the
current one (409), the delta holds the desired leaves that differ from reported, with their
metadata. Error messages are AWS's. No I/O here: replica.py stores and publishes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson

from firmware import contract

SECTIONS = (contract.DESIRED, contract.REPORTED)
_TOO_DEEP = f"JSON contains too many levels of nesting; maximum is {contract.MAX_DEPTH}"

# Documents and answers as they are stored and sent: JSON without spaces, UTF-8, by orjson
# (a tenth of the standard encoder's time); what it cannot encode (integers beyond 64 bits)
# goes through the standard encoder, as escaped ASCII.
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


# NaN and Infinity are not JSON; one decoder for all (json.loads makes one per call when it
# is given options).
_DECODE = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite).decode


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


def _tree_error(patch: dict) -> str | None:
    """What AWS refuses in a section's tree, in one walk: objects and arrays nested more than
    MAX_DEPTH levels, and null inside an array. None if neither."""
    stack = [(patch, contract.MAX_DEPTH)]
    while stack:
        v, limit = stack.pop()
        items = v.values() if isinstance(v, dict) else v
        if limit == 0:
            return _TOO_DEEP
        for x in items:
            if x is None:
                if items is v:  # in an array
                    return "Invalid JSON: arrays cannot contain null"
            elif isinstance(x, (dict, list)):
                stack.append((x, limit - 1))
    return None


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


def _is_stamp(m: dict) -> bool:
    """A leaf's metadata, {"timestamp": <int>}; an object's metadata may have a key named
    "timestamp" too (for a state key of that name), whose value is then a dict."""
    return isinstance(m.get("timestamp"), int)


def _stamp(meta: dict, patch: dict, ts: int) -> dict:
    """Metadata mirrors the state tree with {"timestamp": ts} at each updated leaf."""
    out = dict(meta)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict):
            old = out.get(k)
            out[k] = _stamp(old if isinstance(old, dict) and not _is_stamp(old) else {}, v, ts)
        else:
            out[k] = {"timestamp": ts}
    return out


def _request_stamps(patch: Any, ts: int) -> dict:
    """`update/accepted`'s metadata: a stamp at every leaf the request set, a null (a
    deletion) included, as AWS's example shows it."""
    if not isinstance(patch, dict):
        return {"timestamp": ts}
    return {k: _request_stamps(v, ts) for k, v in patch.items()}


def _equal(a: Any, b: Any) -> bool:
    """JSON equality. Python's == has True == 1 and False == 0; JSON's true is not 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a == b


def delta(desired: dict, reported: dict, skip=contract.NOT_REPORTED) -> dict:
    """Desired leaves whose value differs from reported (objects compared key by key), except
    those at the paths in `skip` (a device never reports them: the firmware's grant)."""
    out = {}
    for k, want in desired.items():
        have = reported.get(k)
        if (k,) in skip:
            continue
        if isinstance(want, dict):
            inner = tuple(p[1:] for p in skip if len(p) > 1 and p[0] == k)
            if isinstance(have, dict) or inner:
                d = delta(want, have if isinstance(have, dict) else {}, inner)
                if d or not isinstance(have, dict):
                    out[k] = d
            elif not _equal(want, have):
                out[k] = want
        elif not _equal(want, have):
            out[k] = want
    return out


def parse_request(payload: bytes) -> dict:
    """Decode an update request; raises ShadowError(400/413/415) with the reason."""
    if len(payload) > 2 * contract.MAX_DOCUMENT:
        raise ShadowError(contract.R_TOO_LARGE, "The payload exceeds the maximum size allowed")
    try:
        # UTF-8 only: json.loads would take UTF-16 and UTF-32 bytes as well, guessing.
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise ShadowError(contract.R_UNSUPPORTED_ENCODING,
                          "Unsupported documented encoding; supported encoding is UTF-8") from None
    try:
        req = _DECODE(text)
    except ValueError as e:
        raise ShadowError(contract.R_BAD_REQUEST, f"Invalid JSON: {e}") from None
    except RecursionError:  # thousands of nested brackets fit in the size limit
        raise ShadowError(contract.R_BAD_REQUEST, _TOO_DEEP) from None
    if not isinstance(req, dict):
        raise ShadowError(contract.R_BAD_REQUEST, "Invalid JSON")
    token = req.get("clientToken")
    if token is not None and (not isinstance(token, str) or len(token.encode()) > contract.MAX_CLIENT_TOKEN):
        raise ShadowError(contract.R_BAD_REQUEST, "Invalid clientToken")
    return req


def apply_update(doc: dict | None, req: dict, now: int) -> tuple[dict, dict, dict | None]:
    """Apply an update request to a document.

    Returns (new document, accepted message, delta message or None: a delta only when the
    request set desired).
    Raises ShadowError: 400 malformed, 409 version conflict, 413 too large.
    """
    token = req.get("clientToken")
    doc = doc or empty_document()
    if "state" not in req:
        raise ShadowError(contract.R_BAD_REQUEST, "Missing required node: state", token)
    state = req["state"]
    if state is not None and (not isinstance(state, dict) or not state):
        raise ShadowError(contract.R_BAD_REQUEST, "State node must be an object", token)
    for section in state or {}:
        if section not in SECTIONS:
            raise ShadowError(contract.R_BAD_REQUEST, f"State contains an invalid node: '{section}'", token)
    for section, patch in (state or {}).items():
        if patch is not None and not isinstance(patch, dict):
            raise ShadowError(contract.R_BAD_REQUEST, f"{section.capitalize()} node must be an object", token)
        error = _tree_error(patch) if patch is not None else None
        if error is not None:
            raise ShadowError(contract.R_BAD_REQUEST, error, token)
    if "version" in req:
        v = req["version"]
        if not isinstance(v, int) or isinstance(v, bool):
            raise ShadowError(contract.R_BAD_REQUEST, "Invalid version", token)
        if v != doc["version"]:
            raise ShadowError(contract.R_CONFLICT, "Version conflict", token)

    # `"state": null` empties the document (its version goes on).
    new_state, new_meta = (dict(doc["state"]), dict(doc["metadata"])) if state is not None else ({}, {})
    for section, patch in (state or {}).items():
        if patch is None:
            new_state.pop(section, None)
            new_meta.pop(section, None)
            continue
        new_state[section] = _merge(new_state.get(section, {}), patch)
        new_meta[section] = _stamp(new_meta.get(section, {}), patch, now)
        if not new_state[section]:
            new_state.pop(section)
            new_meta.pop(section, None)
    if len(compact_bytes(new_state)) > contract.MAX_DOCUMENT:
        raise ShadowError(contract.R_TOO_LARGE, "The payload exceeds the maximum size allowed", token)

    new = {"state": new_state, "metadata": new_meta, "version": doc["version"] + 1, "timestamp": now}
    accepted = {
        "state": state,
        "metadata": {s: _request_stamps(p, now) for s, p in (state or {}).items()},
        "version": new["version"],
        "timestamp": now,
    }
    if token is not None:
        accepted["clientToken"] = token
    # The delta goes out when desired changed and differs from reported, as AWS sends it: a
    # device's own reports (progress, every few seconds) do not bring it back each time.
    return new, accepted, delta_message(new, token) if state and contract.DESIRED in state else None


def delta_message(doc: dict, token: str | None = None) -> dict | None:
    """`update/delta`: the desired leaves that differ from reported, their metadata, and the
    clientToken of the request that made the document so."""
    desired = doc["state"].get(contract.DESIRED, {})
    d = delta(desired, doc["state"].get(contract.REPORTED, {}))
    if not d:
        return None
    out = {"state": d, "metadata": _metadata_of(d, doc["metadata"].get(contract.DESIRED, {})),
           "version": doc["version"], "timestamp": doc["timestamp"]}
    if token is not None:
        out["clientToken"] = token
    return out


def _metadata_of(tree: dict, meta: dict) -> dict:
    """The metadata of exactly the leaves of `tree` (a part of the section `meta` stamps)."""
    out = {}
    for k, v in tree.items():
        m = meta.get(k)
        if isinstance(v, dict) and isinstance(m, dict) and not _is_stamp(m):
            out[k] = _metadata_of(v, m)
        elif m is not None:
            out[k] = m
    return out


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


def get_response(doc: dict, token: str | None, now: int) -> dict:
    """`get/accepted`: the whole document with its delta; `timestamp` is when it was answered."""
    state = dict(doc["state"])
    d = delta(state.get(contract.DESIRED, {}), state.get(contract.REPORTED, {}))
    if d:
        state[contract.DELTA] = d
    out = {"state": state, "metadata": doc["metadata"], "version": doc["version"], "timestamp": now}
    if token is not None:
        out["clientToken"] = token
    return out
