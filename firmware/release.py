# release.py Signed releases on the device: which keys it trusts, its security counter, and the
# check of a desired firmware's signature before anything is erased (docs/signing.md).
#
# Trust starts with config.json's trusted_keys (written at provisioning, as eFuses hold key
# digests) and then lives in signing.json: {"keys": [digest hex, ...], "secure_version": n},
# replaced when an image whose manifest names a new trust list, or a higher counter, is
# confirmed (trial.confirm), as ESP-IDF raises the secure_version eFuse in
# esp_ota_mark_app_valid_cancel_rollback. A signing.json that cannot be read refuses every
# release (fail closed): losing it must not widen what the device accepts.
#
# Loaded only to check or confirm a release, then dropped (agent.py).

import binascii
import hashlib
import json
import os

from firmware import contract, rsapss
from firmware import ota
from firmware.ota import UpdateError

PATH = "signing.json"
_MAX_BYTES = 1024


def load(cfg, path=PATH):
    """(trusted key digests as hex, security counter). Raises UpdateError(untrusted_key) if
    the trust file is there but damaged."""
    try:
        f = open(path)
    except OSError:
        return list(cfg["trusted_keys"]), 0  # as provisioned
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
    except (ValueError, TypeError, KeyError):
        raise UpdateError(contract.E_UNTRUSTED_KEY, PATH + " is damaged: no release is trusted")
    return keys, counter


def check(cfg, fw):
    """Whether the desired firmware `fw` (contract.check_firmware) is a release this device
    may install: signed by a trusted key, matching its manifest, not below the counter.
    Returns what the device keeps of it: fw without the signature bundle, plus signer,
    secure_version and (if the manifest names one) trust. Raises UpdateError."""
    keys, counter = load(cfg)
    bundle = fw.get(contract.SIGNATURE)
    if bundle is None:
        raise UpdateError(contract.E_UNSIGNED, "this device installs signed releases only")
    try:
        block = binascii.a2b_base64(bundle["key"])
        sig = binascii.a2b_base64(bundle["sig"])
    except ValueError:
        raise UpdateError(contract.E_BAD_SIGNATURE, "signature or key is not base64")
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
        m = contract.check_manifest(json.loads(text))
    except ValueError as err:
        raise UpdateError(contract.E_MANIFEST, str(err))
    for k in ("sha256", "size", "version"):
        if m[k] != fw[k]:
            raise UpdateError(contract.E_MANIFEST, "%s differs from the signed manifest" % k)
    if m["chip"] != contract.CHIP:
        raise UpdateError(contract.E_MANIFEST, "signed for %s, not %s" % (m["chip"], contract.CHIP))
    if m["secure_version"] < counter:
        raise UpdateError(contract.E_ROLLBACK, "secure_version %d is below this device's %d"
                          % (m["secure_version"], counter))
    out = ota.record(fw)
    out["signer"] = digest[:contract.SIGNER_CHARS]
    out["secure_version"] = m["secure_version"]
    if "trust" in m:
        out["trust"] = m["trust"]
    return out


def commit(cfg, target, path=PATH):
    """After the image `target` (a check() record) is confirmed: raise the counter to its
    secure_version and take its trust list, if it names one. Atomic (temp file, rename)."""
    keys, counter = load(cfg, path)
    new_keys = target.get("trust", keys)
    new_counter = max(counter, target.get("secure_version", 0))
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
