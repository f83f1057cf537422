"""Signed releases on the host: keys, manifests, signatures, and the site's trust list.

A release signature (docs/signing.md) is RSASSA-PSS (SHA-256, MGF1-SHA-256, 32-byte salt) by
an RSA-3072 key of exponent 65537 over a release manifest (manifest_text): the scheme and
the keys of ESP32 Secure Boot V2, so a key from `espsecure generate-signing-key --version 2
--scheme rsa3072` serves as well as one from `keygen`, and a key's digest here is the one
`espsecure digest-sbv2-public-key` writes. The bundle that travels with a release (kept by
the registry, served by the store beside the image) is {"manifest", "sig", "key"}
(firmware/release.py check_bundle: the device's checks, which verify() shares).

Signing needs only the private key or an external signer, never the site: `sign` runs on an
offline machine. The site keeps public keys only (signing.json): which keys new devices are
provisioned to trust, and whether `release` refuses unsigned images.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shlex
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from firmware import contract
from firmware import release
from firmware.release import check_bundle, check_manifest

PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
E = 65537  # the exponent espsecure makes; the device refuses any other (firmware/rsapss.py)
SIGNER_TIMEOUT_S = 120  # an HSM may wait for a PIN or a touch


class SigningError(Exception):
    """A key, signature or manifest that cannot be used; `code` is the device's error code
    for the same fault (contract.E_*), where there is one."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code


# -- keys -------------------------------------------------------------------------------------

def generate_key(path: Path) -> str:
    """A new RSA-3072 signing key (PEM, mode 0600) at `path`, which must not exist; returns
    its digest (hex)."""
    path = Path(path)
    key = rsa.generate_private_key(public_exponent=E, key_size=8 * release.RSA_BYTES)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    try:  # made 0600 and only if nothing has that name (O_EXCL): a key is never overwritten
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise SigningError(f"{path} exists; a signing key is never overwritten") from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return key_digest(key.public_key())


def _check_rsa(pub, where: str):
    if not isinstance(pub, rsa.RSAPublicKey):
        raise SigningError(f"{where}: not an RSA key")
    nums = pub.public_numbers()
    if pub.key_size != 8 * release.RSA_BYTES or nums.e != E:
        raise SigningError(f"{where}: an RSA-{pub.key_size} key of exponent {nums.e}; "
                           f"release keys are RSA-3072 with exponent 65537")
    return pub


def load_private(path: Path) -> rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as e:
        raise SigningError(f"{path}: {e.strerror}") from None
    except (ValueError, TypeError) as e:
        raise SigningError(f"{path}: not an unencrypted PEM private key ({e})") from None
    _check_rsa(key.public_key(), str(path))
    return key


def load_public(path: Path) -> rsa.RSAPublicKey:
    """The public key in a PEM file holding a public or a private key."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise SigningError(f"{path}: {e.strerror}") from None
    if b"PRIVATE KEY" in data:
        return load_private(path).public_key()
    try:
        pub = serialization.load_pem_public_key(data)
    except ValueError as e:
        raise SigningError(f"{path}: not a PEM public key ({e})") from None
    return _check_rsa(pub, str(path))


def public_pem(pub: rsa.RSAPublicKey) -> str:
    return pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def key_block(pub: rsa.RSAPublicKey) -> bytes:
    """The Secure Boot V2 public-key block: n, e, R^2 mod n (R = 2^3072), -1/n mod 2^32."""
    n, e = pub.public_numbers().n, pub.public_numbers().e
    nb = release.RSA_BYTES
    rinv = pow(2, 2 * 8 * nb, n)
    m = -pow(n, -1, 1 << 32) & 0xFFFFFFFF
    return struct.pack(f"<{nb}sI{nb}sI", n.to_bytes(nb, "little"), e, rinv.to_bytes(nb, "little"), m)


def key_digest(pub: rsa.RSAPublicKey) -> str:
    return hashlib.sha256(key_block(pub)).hexdigest()


def _key_from_block(block: bytes) -> rsa.RSAPublicKey:
    nb = release.RSA_BYTES
    if len(block) != release.KEY_BLOCK:
        raise SigningError("key: not a public-key block", contract.E_BAD_SIGNATURE)
    n = int.from_bytes(block[:nb], "little")
    e = int.from_bytes(block[nb:nb + 4], "little")
    pub = rsa.RSAPublicNumbers(e, n).public_key() if n > 1 and e > 1 else None
    if pub is None or pub.key_size != 8 * nb or e != E or not n & 1:
        raise SigningError("key: not an RSA-3072 key of exponent 65537", contract.E_BAD_SIGNATURE)
    if key_block(pub) != block:
        raise SigningError("key: its block's R^2 or n' do not belong to its n", contract.E_BAD_SIGNATURE)
    return pub


# -- signing and checking ------------------------------------------------------------------

def manifest_text(version: str, sha256: str, size: int, secure_version: int, trust: list[str] | None = None,
                  chip: str = release.CHIP) -> str:
    """The text a release signature covers: the manifest's fields as JSON, keys sorted, no
    spaces, one text for one release. Checked as the device checks it (firmware/release.py)."""
    m = {"format": release.MANIFEST_FORMAT, "chip": chip, "version": version, "sha256": sha256, "size": size,
         "secure_version": secure_version}
    if trust is not None:
        m["trust"] = list(trust)
    check_manifest(m)
    return json.dumps(m, sort_keys=True, separators=(",", ":"))


def sign(manifest: str, key: rsa.RSAPrivateKey | None = None, signer: str | None = None,
         pub: rsa.RSAPublicKey | None = None) -> dict:
    """The signature bundle of `manifest`, made with the private `key`, or by the external
    command `signer` (with its public key `pub`): run without a shell, it gets the manifest's
    SHA-256 (32 bytes) on stdin and must write the 384-byte PSS signature (raw or base64) on
    stdout, as `openssl pkeyutl -sign` with PSS options or an HSM/KMS client would. The
    signature is checked before it is returned."""
    digest = hashlib.sha256(manifest.encode()).digest()
    if key is not None:
        pub = key.public_key()
        sig = key.sign(digest, PSS, utils.Prehashed(hashes.SHA256()))
    else:
        if signer is None or pub is None:
            raise SigningError("sign with a private key, or with an external signer and its public key")
        sig = _external(signer, digest)
    bundle = {"manifest": manifest, "sig": base64.b64encode(sig).decode(),
              "key": base64.b64encode(key_block(pub)).decode()}
    verify(bundle)
    return bundle


def release_bundle(key: rsa.RSAPrivateKey, image: bytes, version: str, secure_version: int = 0,
                   trust: list[str] | None = None) -> dict:
    """The bundle for an image, signed with `key` (the demo, benchmarks and tests sign this
    way; `sign` adds the image check and the external signer)."""
    manifest = manifest_text(version, hashlib.sha256(image).hexdigest(), len(image), secure_version, trust)
    return sign(manifest, key)


def _external(signer: str, digest: bytes) -> bytes:
    try:
        argv = shlex.split(signer)
    except ValueError as e:
        raise SigningError(f"signer {signer!r}: {e}") from None
    if not argv:
        raise SigningError("signer: no command given")
    try:
        proc = subprocess.run(argv, input=digest, capture_output=True, timeout=SIGNER_TIMEOUT_S)
    except (OSError, ValueError) as e:
        raise SigningError(f"signer {argv[0]}: {e}") from None
    except subprocess.TimeoutExpired:
        raise SigningError(f"signer {argv[0]}: no signature within {SIGNER_TIMEOUT_S} s") from None
    if proc.returncode:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise SigningError(f"signer {argv[0]} exited {proc.returncode}: {err[-1] if err else ''}")
    out = proc.stdout
    if len(out) != release.RSA_BYTES:
        try:
            out = base64.b64decode(out.strip(), validate=True)
        except ValueError:
            out = b""
    if len(out) != release.RSA_BYTES:
        raise SigningError(f"signer {argv[0]}: wrote {len(proc.stdout)} bytes, not a "
                           f"{release.RSA_BYTES}-byte signature (raw or base64)")
    return out


@dataclass(frozen=True)
class Verified:
    manifest: dict
    signer: str  # key digest, hex

    @property
    def signer_id(self) -> str:
        return self.signer[:contract.SIGNER_CHARS]


def verify(bundle: object, trusted: list[str] | None = None) -> Verified:
    """What the device checks before it erases anything, with `cryptography`: the bundle's
    shape, the signature under the key it carries, the manifest's fields and (given
    `trusted`) the key's digest. Raises SigningError with the device's code."""
    try:
        b = check_bundle(bundle)
    except ValueError as e:
        raise SigningError(str(e), contract.E_BAD_SIGNATURE) from None
    try:
        block = base64.b64decode(b["key"], validate=True)
        sig = base64.b64decode(b["sig"], validate=True)
    except ValueError:
        raise SigningError("signature: sig or key is not base64", contract.E_BAD_SIGNATURE) from None
    digest = hashlib.sha256(block).hexdigest()
    if trusted is not None and digest not in trusted:
        raise SigningError(f"signed by key {digest[:contract.SIGNER_CHARS]}, which is not trusted",
                           contract.E_UNTRUSTED_KEY)
    pub = _key_from_block(block)
    text = b["manifest"].encode()
    try:
        pub.verify(sig, hashlib.sha256(text).digest(), PSS, utils.Prehashed(hashes.SHA256()))
    except InvalidSignature:
        raise SigningError("the signature does not verify", contract.E_BAD_SIGNATURE) from None
    try:
        manifest = check_manifest(json.loads(text))
    except ValueError as e:
        raise SigningError(str(e), contract.E_MANIFEST) from None
    return Verified(manifest, digest)


def check_matches(v: Verified, sha256: str, size: int, version: str | None) -> None:
    why = release.mismatch(v.manifest, {"sha256": sha256, "size": size, "version": version})
    if why:
        raise SigningError(why, contract.E_MANIFEST)


def parse_bundle(data: bytes) -> dict:
    """A signature bundle's JSON (what `sign` writes); checked whole by `verify`."""
    try:
        bundle = json.loads(data)
    except ValueError as e:
        raise SigningError(f"not a signature bundle (JSON: {e})") from None
    if not isinstance(bundle, dict):
        raise SigningError("not a signature bundle (a JSON object with manifest, sig and key)")
    return bundle


def signer_of(bundle: dict) -> str:
    """The key id (the first hex digits of its digest) of the key a bundle carries."""
    try:
        return hashlib.sha256(base64.b64decode(bundle["key"], validate=True)).hexdigest()[:contract.SIGNER_CHARS]
    except (KeyError, TypeError, ValueError):
        return "(bad key)"


# -- the site's trust list -------------------------------------------------------------------

class Trust:
    """`<site>/signing.json`: {"required": bool, "keys": {digest: public PEM}}. A site made
    before signed releases has no file: releases may be unsigned, and commands say so."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"required": False, "keys": {}}
        except ValueError as e:
            raise SigningError(f"{self.path}: not JSON ({e})") from None
        if not isinstance(data, dict) or not isinstance(data.get("required"), bool) \
                or not isinstance(data.get("keys"), dict):
            raise SigningError(f"{self.path}: must hold {{\"required\": bool, \"keys\": {{digest: PEM}}}}")
        return data

    def _write(self, data: dict) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(self.path)

    @property
    def required(self) -> bool:
        return self._read()["required"]

    def keys(self) -> list[str]:
        """Trusted key digests (hex), in the order they were added."""
        return list(self._read()["keys"])

    def require(self, on: bool) -> None:
        data = self._read()
        data["required"] = on
        self._write(data)

    def add(self, pub: rsa.RSAPublicKey) -> str:
        data = self._read()
        digest = key_digest(pub)
        if digest not in data["keys"] and len(data["keys"]) >= contract.MAX_TRUSTED_KEYS:
            raise SigningError(f"a site trusts at most {contract.MAX_TRUSTED_KEYS} keys (a device holds "
                               f"{contract.MAX_TRUSTED_KEYS} digests): remove one first")
        data["keys"][digest] = public_pem(pub)
        self._write(data)
        return digest

    def remove(self, digest: str) -> None:
        data = self._read()
        found = [d for d in data["keys"] if d.startswith(digest.lower())] if digest else []
        if len(found) != 1:
            raise SigningError(f"{digest!r}: matches {len(found)} trusted keys, not one")
        del data["keys"][found[0]]
        self._write(data)
