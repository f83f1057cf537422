# state.py Update state that survives resets, written atomically (temp file, then rename).
#
# Fields: phase (phases.py), target (desired firmware being installed), slot (label of the
# slot it goes into), written (bytes of it safely in flash, a multiple of 4096), error
# (contract E_*), attempts (failed tries at this target that made no progress), fetched
# (bytes downloaded for this target, all tries), images ({slot label: {version, sha256, size,
# url}} for images whose identity we know), signers ({slot label: [key id, secure_version]}
# for signed images), verified (the target's checked signature, release.check, or None).

import json
import os

PATH = "ota.json"
# Far above what save() writes (a target and two slots' images with the longest URLs take
# ~4 KiB): a file this long is damaged, and reading it whole must not exhaust the heap.
_MAX_BYTES = 8192


def fresh():
    """Nothing in progress, no image known (provisioning adds the factory image to images)."""
    return {"phase": "idle", "target": None, "slot": None, "written": 0, "error": None,
            "attempts": 0, "fetched": 0, "images": {}, "signers": {}, "verified": None}


def load(path=PATH):
    try:
        with open(path) as f:
            st = json.loads(f.read(_MAX_BYTES))  # json.load(f) reads a byte at a time
    except (OSError, ValueError):
        return fresh()
    new = fresh()
    if not isinstance(st, dict):
        return new
    # Keep only well-typed fields; anything else falls back to the fresh value.
    for k, ok in (("phase", str), ("attempts", int), ("written", int), ("fetched", int),
                  ("images", dict), ("signers", dict)):
        if not isinstance(st.get(k), ok):
            st[k] = new[k]
    for k in ("target", "slot", "error", "verified"):
        if k not in st:
            st[k] = None
    for k in ("target", "verified"):
        if st[k] is not None and not isinstance(st[k], dict):
            st[k] = None
    return st


def save(st, path=PATH):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(st))  # one write: json.dump(st, f) makes one per token
    os.rename(tmp, path)  # atomic on LittleFS and POSIX: old or new, never half
