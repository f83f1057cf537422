"""A benchmark's site: new (so it installs signed releases only), trusting one fresh release
key, and releases signed with that key: the path every update takes by default."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import rsa

from tools.espidf.onflash import SLOT_SIZE
from tools.site import Site
from tools.site.releases import Release
from tools.site.signing import release_bundle


class SignedSite:
    def __init__(self, root: Path):
        self.site = Site(root)
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
        self.site.trust.add(self.key.public_key())

    def release(self, image: bytes, version: str, slot_size: int = SLOT_SIZE) -> Release:
        return self.site.releases.add(image, version, slot_size, signature=release_bundle(self.key, image, version))
