"""Secret files (keys, passwords, hashes): made with their final mode, replaced in one step."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_private(path: Path, data: str | bytes, owner: tuple[int, int] | None = None) -> None:
    """Replace `path` at once with a file only its owner can read. The new file is created
    0600 (mkstemp) before a byte is written, so no other user can open it, even for a moment;
    `owner` (uid, gid) is given to it through its descriptor, before it takes the name."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data if isinstance(data, bytes) else data.encode())
            if owner is not None:
                os.fchown(f.fileno(), *owner)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
