"""Signed releases end to end: a compromised server cannot install firmware.

The attacker holds the whole server: the replica's database, the store's files (images and
the signatures served beside them), the grant and store keys, the operator's password. Every
desired firmware below reaches the emulated board through the real replica (with a valid
grant where the replica asks for one); the board fetches the signature the store serves and
refuses each with its code before anything is written to flash, and keeps running what it
ran. The good paths (a signed update, a rollback at the same security counter, a key rotation
followed by an update signed with the new key) work on the same boards.
"""

import base64
import hashlib
import json

from conftest import release, signing_key, wait_reported
from firmware import contract
from tools.control import grants, presign
from tools.control.shadowstore import open_store
from tools.esp32emu.flashinfo import flash_info
from tools.espidf.images import build_app_image
from tools.operator import client as op
from tools.site.releases import Release
from tools.site.signing import key_digest, release_bundle

DEV = "esp32-signed"
OTADATA = slice(0xD000, 0xF000)
OTA_1 = 0x190000


def _send(services, site, device, rel, **over):
    """Desire release `rel` the way a compromised server can: through the replica, with a
    grant made with the server's own grant key. Every optional field is sent, null where
    unset: desired objects merge with what is stored."""
    fw = {"url": presign.sign(site.store_key, site.endpoints().store_url, rel.sha256, device),
          "version": rel.version, "sha256": rel.sha256, "size": rel.size, "allow_downgrade": None, "auth": None}
    fw.update(over)
    fw = grants.granted(site.grant_key, device, fw)
    outcome, answer = services.call(op.request(site, device, contract.UPDATE,
                                               contract.firmware_update(contract.DESIRED, fw)))
    assert outcome == "accepted", answer


def _forge(site, image: bytes, version: str, signature: dict | None) -> Release:
    """What the server's owner can put in the store: any image, any signature beside it."""
    rel = Release(version, hashlib.sha256(image).hexdigest(), len(image), "now", signature)
    path = site.releases.path_of(rel.sha256)
    if not path.exists():
        path.write_bytes(image)
    index = site.releases.dir / "index.json"
    entries = json.loads(index.read_text())
    entries[version] = rel.__dict__
    index.write_text(json.dumps(entries))
    return rel


def _refused(services, site, code, running="1.1.0"):
    fw, _ = wait_reported(services, site, DEV, lambda fw, d: fw.get("state") == "failed" and fw.get("error") == code,
                          f"a {code} refusal")
    assert (fw["version"], fw["slot"]) == (running, "ota_1")
    return fw


def _idle_on(services, site, version, what):
    fw, _ = wait_reported(services, site, DEV, lambda fw, d: fw.get("version") == version and fw.get("state") == "idle",
                          what)
    return fw


def test_a_compromised_server_cannot_install_what_no_trusted_key_signed(site, services, devices, images):
    key = signing_key()
    a = release(site, images["A"], "1.0.0", secure_version=0)
    dev = devices(DEV, images["A"], "1.0.0")
    b = release(site, images["B"], "1.1.0", secure_version=1)
    _send(services, site, DEV, b)
    fw = _idle_on(services, site, "1.1.0", "the signed B")
    assert (fw["slot"], fw["signer"], fw["secure_version"]) == ("ota_1", key_digest(key.public_key())[:16], 1)
    assert json.loads((dev.root / "fs" / "signing.json").read_text())["secure_version"] == 1
    flash, boots = dev.flash.read_bytes(), len(dev.runner.boots)

    # 1. The database edited to desire an image with its correct hash, its bytes in the store,
    # and no signature.
    rogue = build_app_image("6.6.6", 180 * 1024)
    unsigned = _forge(site, rogue, "6.6.6", None)
    db = open_store(site.shadow_store)
    try:
        doc = db.rows([DEV])[DEV][0]
        fw = {"url": presign.sign(site.store_key, site.endpoints().store_url, unsigned.sha256, DEV),
              "version": "6.6.6", "sha256": unsigned.sha256, "size": unsigned.size}
        doc["state"]["desired"]["firmware"] = grants.granted(site.grant_key, DEV, fw)
        assert db.put(DEV, dict(doc, version=doc["version"] + 1), doc["version"])
    finally:
        db.close()
    outcome, _ = services.call(op.request(site, DEV, contract.UPDATE, {"state": {"desired": {"note": "look"}}}))
    assert outcome == "accepted"  # any update publishes the delta: the board looks at the shadow
    _refused(services, site, contract.E_UNSIGNED)

    # 2. A validly signed manifest, of another release, served beside this image.
    _send(services, site, DEV, _forge(site, rogue, "6.6.7", b.signature))
    _refused(services, site, contract.E_MANIFEST)
    # 3. The attacker's own key, and 4. a trusted key's signature with one bit changed.
    _send(services, site, DEV, _forge(site, rogue, "6.6.8", release_bundle(signing_key("attacker"), rogue, "6.6.8", 9)))
    _refused(services, site, contract.E_UNTRUSTED_KEY)
    genuine = release_bundle(key, rogue, "6.6.9", 9)  # (what the attacker cannot make)
    sig = base64.b64decode(genuine["sig"])
    forged = dict(genuine, sig=base64.b64encode(sig[:100] + bytes([sig[100] ^ 1]) + sig[101:]).decode())
    _send(services, site, DEV, _forge(site, rogue, "6.6.9", forged))
    _refused(services, site, contract.E_BAD_SIGNATURE)
    # 5. An older signed release, below the board's counter, replayed with allow_downgrade.
    _send(services, site, DEV, a, allow_downgrade=True)
    _refused(services, site, contract.E_ROLLBACK)

    # Nothing above wrote a byte of flash: no slot erased, otadata as it was, no reboot.
    assert dev.flash.read_bytes() == flash
    assert len(dev.runner.boots) == boots

    # 6. A released image swapped in the store: its signature verifies, and the download is
    # refused by the signed hash (streaming writes the inactive slot; the running image and
    # otadata stay as they were).
    c = release(site, build_app_image("1.2.0", 160 * 1024), "1.2.0", secure_version=1)
    path = site.releases.path_of(c.sha256)
    real = path.read_bytes()
    path.chmod(0o644)
    path.write_bytes(build_app_image("1.2.0", c.size, "rogue"))
    _send(services, site, DEV, c)
    _refused(services, site, contract.E_HASH)
    after = dev.flash.read_bytes()
    assert after[OTADATA] == flash[OTADATA] and after[OTA_1:OTA_1 + b.size] == images["B"]
    assert len(dev.runner.boots) == boots
    path.write_bytes(real)

    # The good paths: the signed update, then back to B at the same counter.
    _send(services, site, DEV, c, allow_downgrade=True)  # (a change: a new request)
    assert _idle_on(services, site, "1.2.0", "the signed update")["slot"] == "ota_0"
    _send(services, site, DEV, b, allow_downgrade=True)
    assert _idle_on(services, site, "1.1.0", "the rollback to B")["slot"] == "ota_1"
    assert flash_info(dev.flash)["next_boot"]["slot"] == "ota_1"
    assert json.loads((dev.root / "fs" / "signing.json").read_text())["secure_version"] == 1


def test_keys_rotate_and_revoke_over_the_air(site, services, devices, images):
    k1, k2 = signing_key(), signing_key("second")
    d1, d2 = key_digest(k1.public_key()), key_digest(k2.public_key())
    release(site, images["A"], "1.0.0")
    dev = devices(DEV, images["A"], "1.0.0")
    # B, signed with the old key and a higher counter, tells the boards to trust only the new
    # one from now on (the site knows the new key: `release` refuses a trust list naming others).
    site.trust.add(k2.public_key())
    b = release(site, images["B"], "1.1.0", secure_version=1, trust=[d2])
    _send(services, site, DEV, b)
    fw = _idle_on(services, site, "1.1.0", "B installed")
    assert fw["signer"] == d1[:16]
    assert json.loads((dev.root / "fs" / "signing.json").read_text()) == {"keys": [d2], "secure_version": 1}
    flash = dev.flash.read_bytes()

    # The old key is revoked: a release it signs is refused, whatever the server says.
    c_image = build_app_image("1.2.0", 150 * 1024)
    c_old = release(site, c_image, "1.2.0", secure_version=1)
    _send(services, site, DEV, c_old)
    _refused(services, site, contract.E_UNTRUSTED_KEY)
    # Nor can a release at the same counter, validly signed by the new key, bring the old key
    # back: a trust list changes only with a higher counter.
    back = release(site, build_app_image("1.2.5", 150 * 1024), "1.2.5", secure_version=1, key=k2, trust=[d1, d2])
    _send(services, site, DEV, back)
    _refused(services, site, contract.E_ROLLBACK)
    assert dev.flash.read_bytes() == flash

    # The new key's signature of the same image is installed.
    c_new = release(site, c_image, "1.2.1", secure_version=1, key=k2)
    assert c_new.sha256 == c_old.sha256
    _send(services, site, DEV, c_new)
    fw = _idle_on(services, site, "1.2.1", "C signed with the new key installed")
    assert (fw["signer"], fw["slot"]) == (d2[:16], "ota_0")
    assert json.loads((dev.root / "fs" / "signing.json").read_text()) == {"keys": [d2], "secure_version": 1}
