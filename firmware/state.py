# state.py Update state that survives resets, written atomically (temp file, then rename).
#
# Fields: phase (contract ST_*), target (desired firmware being installed), slot (label of
# the slot it goes into), error (contract E_*), attempts (tries at this target), images
# ({slot label: {version, sha256, size, url}} for images whose identity we know).

import json
import os

PATH = "ota.json"


def _fresh():
    return {"phase": "idle", "target": None, "slot": None, "error": None, "attempts": 0,
            "images": {}}


def load(path=PATH):
    try:
        with open(path) as f:
            st = json.load(f)
    except (OSError, ValueError):
        return _fresh()
    if not isinstance(st, dict):
        return _fresh()
    fresh = _fresh()
    for k in fresh:
        if k not in st or not isinstance(st[k], type(fresh[k])) and fresh[k] is not None:
            st[k] = fresh[k]
    return st


def save(st, path=PATH):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(st, f)
    os.rename(tmp, path)  # atomic on LittleFS and POSIX: old or new, never half
