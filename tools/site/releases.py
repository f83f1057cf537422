"""The release registry: immutable, validated app images named by their SHA-256."""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tools.espidf.onflash import SLOT_SIZE
from tools.site.signing import SigningError, Trust, Verified, check_matches, parse_bundle, signer_of, verify


class ReleaseError(Exception):
    pass


def _write_replacing(path: Path, data: bytes, mode: int) -> None:
    """Write a file whole under a name of its own, then rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class Release:
    version: str
    sha256: str
    size: int
    date: str
    signature: dict | None = None  # the bundle (tools.site.signing) for a signed release

    @property
    def signer(self) -> str | None:
        """Key id of the signer; None if unsigned."""
        return signer_of(self.signature) if self.signature else None

    @property
    def secure_version(self) -> int | None:
        return json.loads(self.signature["manifest"])["secure_version"] if self.signature else None


def check_version(version: str | None) -> None:
    """A release version: 1-32 characters (as a device takes them), no '/'."""
    if not version or len(version) > 32 or "/" in version:
        raise ReleaseError("version must be 1-32 characters without '/'")


class Registry:
    """`<dir>/<sha256>.bin` plus `<dir>/index.json` ({version: release}). With a `trust`
    list, a signed release must be signed by one of its keys, and an unsigned one is refused
    if the trust list requires signing."""

    def __init__(self, directory: Path, trust: Trust | None = None):
        self.dir = Path(directory)
        self.trust = trust

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

    def add(self, data: bytes, version: str | None = None, slot_size: int = SLOT_SIZE,
            signature: dict | None = None) -> Release:
        """Validate and register an image, signed with the bundle `signature` (its manifest
        names the version when `version` is None). Raises ImageError (bad image),
        SigningError (bad signature) or ReleaseError."""
        from tools.espidf.images import check_app_image  # esptool: only for adding a release

        report = check_app_image(data, slot_size)
        if signature is not None:
            verified = self._check_signature(signature)
            version = version or verified.manifest["version"]
            check_matches(verified, report.sha256, report.size, version)
        elif self.trust is not None and self.trust.required:
            raise ReleaseError("unsigned: this site installs signed releases only; sign the image where the key "
                               "is (`fleet-ota sign`), then `release IMAGE --signature BUNDLE`")
        check_version(version)
        self.dir.mkdir(parents=True, exist_ok=True)
        # One writer at a time (the CLI, the dashboard's uploads): the index is read, changed
        # and written whole, and a second writer would lose the first one's release.
        with open(self.dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            index = self._index()
            old = index.get(version)
            if old:
                if old["sha256"] == report.sha256 and old.get("signature") == signature:
                    return Release(**old)
                raise ReleaseError(f"release {version} exists with another image or signature; releases are immutable")
            path = self.path_of(report.sha256)
            _write_replacing(path, data, 0o444)
            rel = Release(version, report.sha256, report.size, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                          signature)
            index[version] = asdict(rel)
            _write_replacing(self.dir / "index.json", json.dumps(index, indent=1, sort_keys=True).encode(), 0o644)
            return rel

    def add_files(self, image: bytes, bundle: bytes | None = None, version: str | None = None,
                  image_name: str = "image", bundle_name: str = "signature") -> Release:
        """`add` for an image and a signature bundle as files (`release`, the dashboard's
        upload): every refusal is one ReleaseError line naming the file at fault and, where
        there is one, the device's code for the same fault."""
        from tools.espidf.images import ImageError

        try:
            signature = parse_bundle(bundle) if bundle is not None else None
            return self.add(image, version, signature=signature)
        except ImageError as e:
            raise ReleaseError(f"{image_name}: {e.code}: {e}") from None
        except SigningError as e:
            raise ReleaseError(f"{bundle_name}: {e.code + ': ' if e.code else ''}{e}") from None

    def _check_signature(self, signature: dict) -> Verified:
        trusted = self.trust.keys() if self.trust is not None else []
        if not trusted:
            raise ReleaseError("signed, but this site trusts no key: add the public key with `fleet-ota trust add`")
        verified = verify(signature, trusted)
        unknown = [d[:16] for d in verified.manifest.get("trust") or () if d not in trusted]
        if unknown:  # a typo here, once confirmed, would leave the fleet trusting no key it can use
            raise ReleaseError(f"the manifest's trust list names keys this site does not trust ({', '.join(unknown)}): "
                               "add their public halves with `fleet-ota trust add` first")
        return verified
