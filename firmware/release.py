# release.py Signed releases on the device: which keys it trusts, its security counter, and the
# check of a desired firmware's signature before anything is erased (docs/signing.md).
#
# Trust starts with config.json's trusted_keys (written at provisioning, as eFuses hold key
# digests) and then lives in signing.json: {"keys": [digest hex, ...], "secure_version": n},
# replaced when an image whose manifest names a new trust list, or a higher counter, is
# confirmed (trial.confirm). A signing.json that cannot be read refuses every release (fail
# closed): losing it must not widen what the device accepts.
#
# Loaded only to check a release (install.py, once the bundle is fetched and its connection
# closed) or to confirm one (trial.py), then dropped.

import binascii
import hashlib
import json
import os

from firmware import contract, rsapss
from firmware.ota import UpdateError

PATH = "signing.json"
_MAX_BYTES = 1024

# The signed-release format (docs/signing.md), for this device and the host's signing tools.
# The store serves a bundle beside each signed image (bundle.url): {"manifest":
# <the signed text>, "sig": <base64 signature>, "key": <base64 public-key block>}. The
# manifest is a JSON object naming one image (format, chip, version, sha256, size,
# secure_version, optionally trust: check_manifest); the signature is RSASSA-PSS (SHA-256,
# MGF1-SHA-256, 32-byte salt) over its UTF-8 bytes, as ESP32 Secure Boot V2 signs an image
# digest; the key block is Secure Boot V2's public key (rsapss.py), whose SHA-256
# `espsecure digest-sbv2-public-key` prints: the digest a device trusts.
MANIFEST_FORMAT = "fleet-ota-release-1"
CHIP = "esp32"  # the chip a manifest must name (image header chip id 0)
RSA_BYTES = rsapss.N_BYTES  # RSA-3072
KEY_BLOCK = 2 * RSA_BYTES + 8
MAX_MANIFEST = 1024
MAX_SECURE_VERSION = 65535


def load(cfg, path=PATH):
    """(trusted key digests as hex, security counter). Raises UpdateError(untrusted_key) if
    the trust file is there but cannot be read."""
    try:
        f = open(path)
    except OSError as e:
        if e.args and e.args[0] == 2:  # ENOENT: no signed release confirmed yet
            return list(cfg["trusted_keys"]), 0  # as provisioned
        raise UpdateError(contract.E_UNTRUSTED_KEY, PATH + ": %r: no release is trusted" % e)
    try:
        with f:
            st = json.loads(f.read(_MAX_BYTES))
        keys, counter = st["keys"], st["secure_version"]
        if not isinstance(keys, list) or not 0 < len(keys) <= contract.MAX_TRUSTED_KEYS \
                or not isinstance(counter, int) or counter < 0:
            raise ValueError()
        for k in keys:
            if not contract.is_sha256_hex(k):
                raise ValueError()
    except (OSError, ValueError, TypeError, KeyError):
        raise UpdateError(contract.E_UNTRUSTED_KEY, PATH + " is damaged: no release is trusted")
    return keys, counter


def check(cfg, fw, body):
    """Whether the desired firmware `fw` (contract.check_firmware) is a release this device
    may install, given `body`, the signature bundle the store served for it (None: it has
    none): signed by a trusted key, matching its manifest, not below the counter. Returns
    the seal kept with the target until it is confirmed: {signer, secure_version, trust?}.
    Raises UpdateError."""
    keys, counter = load(cfg)
    if body is None:
        raise UpdateError(contract.E_UNSIGNED, "no signature for %s in the store" % fw["version"])
    try:
        bundle = check_bundle(json.loads(body))
        block = binascii.a2b_base64(bundle["key"])
        sig = binascii.a2b_base64(bundle["sig"])
    except ValueError as err:  # (binascii.Error is one; so is a UnicodeError)
        raise UpdateError(contract.E_BAD_SIGNATURE, "bundle: " + str(err))
    body = None
    digest = binascii.hexlify(rsapss.key_digest(block)).decode()
    if digest not in keys:
        raise UpdateError(contract.E_UNTRUSTED_KEY, "key " + digest[:contract.SIGNER_CHARS] + " is not trusted")
    try:
        n, e = rsapss.key_of(block)
    except ValueError as err:
        raise UpdateError(contract.E_BAD_SIGNATURE, "key: " + str(err))
    block = None
    text = bundle["manifest"].encode()
    if not rsapss.verify(n, e, sig, hashlib.sha256(text).digest()):
        raise UpdateError(contract.E_BAD_SIGNATURE, "the signature does not verify")
    try:
        m = check_manifest(json.loads(text))
    except ValueError as err:
        raise UpdateError(contract.E_MANIFEST, str(err))
    why = mismatch(m, fw)
    if why:
        raise UpdateError(contract.E_MANIFEST, why)
    if m["secure_version"] < counter:
        raise UpdateError(contract.E_ROLLBACK, "secure_version %d is below this device's %d"
                          % (m["secure_version"], counter))
    seal = {"signer": digest[:contract.SIGNER_CHARS], "secure_version": m["secure_version"]}
    if "trust" in m and m["trust"] != keys:
        # A trust change must raise the counter: else an older release at the same counter,
        # still validly signed, could bring back the keys a later one revoked.
        if m["secure_version"] <= counter:
            raise UpdateError(contract.E_ROLLBACK, "a new trust list needs a secure_version above %d" % counter)
        seal["trust"] = m["trust"]
    return seal


def commit(cfg, seal, path=PATH):
    """After an image with this seal (check()) is confirmed: raise the counter to its
    secure_version and take its trust list, if it names one, as ESP-IDF raises the
    secure_version eFuse in esp_ota_mark_app_valid_cancel_rollback. Atomic (temp file,
    rename)."""
    keys, counter = load(cfg, path)
    new_counter = max(counter, seal["secure_version"])
    # (check() gives a trust list only with a higher counter; a reset since then may have
    # confirmed another release: the list still takes effect only above the counter.)
    new_keys = seal["trust"] if "trust" in seal and seal["secure_version"] > counter else keys
    if new_keys == keys and new_counter == counter and _exists(path):
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps({"keys": new_keys, "secure_version": new_counter}))
    os.rename(tmp, path)


def _exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def check_manifest(m):
    """A parsed manifest (contract.MANIFEST_FIELDS, optional trust), checked: the one check of
    its fields, for the device and the host (tools/site/signing.py). Raises ValueError."""
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise ValueError("manifest: not a %s manifest" % MANIFEST_FORMAT)
    for k in ("chip", "version"):
        if not isinstance(m.get(k), str) or not 0 < len(m[k]) <= contract.MAX_VERSION:
            raise ValueError("manifest.%s: must be a short string" % k)
    if not contract.is_sha256_hex(m.get("sha256")):
        raise ValueError("manifest.sha256: must be 64 lowercase hex digits")
    for k, top in (("size", contract.MAX_IMAGE_SIZE), ("secure_version", MAX_SECURE_VERSION)):
        v = m.get(k)
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= top:
            raise ValueError("manifest.%s: must be an integer from 0 to %d" % (k, top))
    trust = m.get("trust")
    if trust is not None:
        if not isinstance(trust, list) or not 0 < len(trust) <= contract.MAX_TRUSTED_KEYS:
            raise ValueError("manifest.trust: must list 1 to %d key digests" % contract.MAX_TRUSTED_KEYS)
        for d in trust:
            if not contract.is_sha256_hex(d):
                raise ValueError("manifest.trust: each key digest is 64 lowercase hex digits")
    return m


def mismatch(m, image):
    """Why the checked manifest `m` does not name `image` ({sha256, size, version}; a field
    that is None is not compared), or None: the device's check and the host's `release`."""
    for k in ("sha256", "size", "version"):
        want = image.get(k)
        if want is not None and m[k] != want:
            return "the signed manifest's %s is %r, the image's %r" % (k, m[k], want)
    if m["chip"] != CHIP:
        return "signed for %s, not %s" % (m["chip"], CHIP)
    return None


def check_bundle(b):
    """The shape of a signature bundle: {manifest, sig, key} strings of the right lengths
    (whether it verifies: check()). Raises ValueError."""
    if not isinstance(b, dict):
        raise ValueError("signature: must be an object")
    for k, lo, hi in (("manifest", 1, MAX_MANIFEST), ("sig", _b64(RSA_BYTES), 0),
                      ("key", _b64(KEY_BLOCK), 0)):
        v = b.get(k)
        if not isinstance(v, str) or not lo <= len(v) <= (hi or lo):
            raise ValueError("signature.%s: must be a string of %d%s characters" % (k, lo, " to %d" % hi if hi else ""))
    return b


def _b64(n):
    return (n + 2) // 3 * 4
