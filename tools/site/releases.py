"""The release registry: immutable, validated app images named by their SHA-256."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tools.espidf.onflash import SLOT_SIZE


class ReleaseError(Exception):
    pass


@dataclass(frozen=True)
class Release:
    version: str
    sha256: str
    size: int
    date: str


class Registry:
    """`<dir>/<sha256>.bin` plus `<dir>/index.json` ({version: release})."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)

    def path_of(self, sha256: str) -> Path:
        return self.dir / f"{sha256}.bin"

    def _index(self) -> dict[str, dict]:
        try:
            return json.loads((self.dir / "index.json").read_text())
        except FileNotFoundError:
            return {}

    def list(self) -> list[Release]:
        return [Release(**r) for r in sorted(self._index().values(), key=lambda r: r["date"])]

    def get(self, version: str) -> Release | None:
        r = self._index().get(version)
        return Release(**r) if r else None

    def by_sha256(self, sha256: str | None) -> Release | None:
        for r in self._index().values():
            if r["sha256"] == sha256:
                return Release(**r)
        return None

    def add(self, data: bytes, version: str, slot_size: int = SLOT_SIZE) -> Release:
        """Validate and register an image. Raises ImageError (bad image) or ReleaseError."""
        from tools.espidf.images import check_app_image  # esptool: only for adding a release

        if not version or len(version) > 32 or "/" in version:
            raise ReleaseError("version must be 1-32 characters without '/'")
        report = check_app_image(data, slot_size)
        index = self._index()
        old = index.get(version)
        if old:
            if old["sha256"] == report.sha256:
                return Release(**old)
            raise ReleaseError(f"release {version} exists with another image; releases are immutable")
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.path_of(report.sha256)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.chmod(tmp, 0o444)
        tmp.replace(path)
        rel = Release(version, report.sha256, report.size, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        index[version] = asdict(rel)
        itmp = self.dir / "index.tmp"
        itmp.write_text(json.dumps(index, indent=1, sort_keys=True))
        itmp.replace(self.dir / "index.json")
        return rel
