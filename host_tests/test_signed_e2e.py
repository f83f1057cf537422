"""Signed releases end to end: a compromised server cannot install firmware.

The attacker holds the whole server: the replica's database, the store's files, the grant
and store keys, the operator's password. Every desired firmware below reaches the emulated
board through the real replica (with a valid grant where the replica asks for one); the
board refuses each with its code before anything is written to flash, and keeps running
what it ran. The good paths (a signed update, a rollback at the same security counter, a key
rotation followed by an update signed with the new key) work on the same boards.
"""

import base64
import json

from conftest import release, signing_key, wait_reported
from firmware import contract
from tools.control import grants, presign
from tools.control.shadowstore import open_store
from tools.esp32emu.flashinfo import flash_info
from tools.espidf.images import build_app_image
from tools.operator import client as op
from tools.site.signing import key_digest, release_bundle

DEV = "esp32-signed"
OTADATA = slice(0xD000, 0xF000)
OTA_0 = 0x10000


def _send(services, site, device, fw):
    """Desire `fw` the way a compromised server can: through the replica, with a grant made
    with the server's own grant key."""
    fw = grants.granted(site.grant_key, device, fw)
    outcome, answer = services.call(op.request(site, device, contract.UPDATE,
                                               contract.firmware_update(contract.DESIRED, fw)))
    assert outcome == "accepted", answer


def _desired(site, device, rel, **over):
    # Every optional field is sent, null where unset: desired objects merge with what is stored.
    fw = {"url": presign.sign(site.store_key, site.endpoints().store_url, rel.sha256, device),
          "version": rel.version, "sha256": rel.sha256, "size": rel.size, "allow_downgrade": None, "auth": None,
          contract.SIGNATURE: rel.signature}
    fw.update(over)
    return fw


def _refused(services, site, dev, code, running="1.0.0"):
    fw, _ = wait_reported(services, site, DEV, lambda fw, d: fw.get("state") == "failed" and fw.get("error") == code,
                          f"a {code} refusal")
    assert (fw["version"], fw["slot"]) == (running, "ota_0")
    return fw


def test_a_compromised_server_cannot_install_what_no_trusted_key_signed(site, services, devices, images):
    a = release(site, images["A"], "1.0.0", secure_version=1)
    dev = devices(DEV, images["A"], "1.0.0")
    # The board adopts A's signed release (it runs it): its counter becomes 1.
    _send(services, site, DEV, _desired(site, DEV, a))
    fw, _ = wait_reported(services, site, DEV, lambda fw, d: fw.get("signer") is not None, "the signed A adopted")
    assert (fw["signer"], fw["secure_version"]) == (key_digest(signing_key().public_key())[:16], 1)
    flash = dev.flash.read_bytes()

    # 1. The database edited to desire an unsigned image, its hash correct, its bytes in the store.
    rogue = build_app_image("6.6.6", 180 * 1024)
    unsigned = type(a)("6.6.6", *_sha_size(rogue), "now")
    site.releases.path_of(unsigned.sha256).write_bytes(rogue)
    db = open_store(site.shadow_store)
    try:
        doc = db.rows([DEV])[DEV][0]
        fw = {k: v for k, v in _desired(site, DEV, unsigned).items() if v is not None}
        doc["state"]["desired"]["firmware"] = grants.granted(site.grant_key, DEV, fw)
        assert db.put(DEV, dict(doc, version=doc["version"] + 1), doc["version"])
    finally:
        db.close()
    outcome, _ = services.call(op.request(site, DEV, contract.UPDATE, {"state": {"desired": {"note": "look"}}}))
    assert outcome == "accepted"  # any update publishes the delta: the board looks at the shadow
    _refused(services, site, dev, contract.E_UNSIGNED)

    # 2. A validly signed manifest, of another release, with this image.
    b = release(site, images["B"], "1.1.0", secure_version=1)
    _send(services, site, DEV, _desired(site, DEV, unsigned, signature=b.signature, version="1.1.0"))
    _refused(services, site, dev, contract.E_MANIFEST)

    # 3. The attacker's own key, and 4. a signature with one character changed.
    own = release_bundle(signing_key("attacker"), rogue, "6.6.6", 9)
    _send(services, site, DEV, _desired(site, DEV, unsigned, signature=own))
    _refused(services, site, dev, contract.E_UNTRUSTED_KEY)
    sig = base64.b64decode(b.signature["sig"])
    forged = dict(b.signature, sig=base64.b64encode(sig[:100] + bytes([sig[100] ^ 1]) + sig[101:]).decode())
    _send(services, site, DEV, _desired(site, DEV, b, signature=forged))
    _refused(services, site, dev, contract.E_BAD_SIGNATURE)

    # 5. An older signed release, below the board's counter, replayed with allow_downgrade.
    old = release(site, build_app_image("0.9.0", 120 * 1024), "0.9.0", secure_version=0)
    _send(services, site, DEV, _desired(site, DEV, old, allow_downgrade=True))
    _refused(services, site, dev, contract.E_ROLLBACK)

    # Nothing above wrote a byte of flash: no slot erased, otadata as it was, no reboot.
    assert dev.flash.read_bytes() == flash
    assert len(dev.runner.boots) == 1

    # 6. A released image swapped in the store: found by the signed hash after the download
    # (streaming writes the inactive slot; the running image and otadata are untouched).
    path = site.releases.path_of(b.sha256)
    genuine = path.read_bytes()
    path.chmod(0o644)
    path.write_bytes(build_app_image("1.1.0", len(genuine), "rogue"))
    _send(services, site, DEV, _desired(site, DEV, b))
    _refused(services, site, dev, contract.E_HASH)
    after = dev.flash.read_bytes()
    assert after[OTADATA] == flash[OTADATA] and after[OTA_0:OTA_0 + a.size] == images["A"]
    assert len(dev.runner.boots) == 1
    path.write_bytes(genuine)

    # The good paths: the signed update, then back to A at the same counter.
    _send(services, site, DEV, _desired(site, DEV, b, allow_downgrade=True))  # changed: a new request
    fw, _ = wait_reported(services, site, DEV, lambda fw, d: fw.get("version") == "1.1.0" and fw.get("state") == "idle",
                          "the signed update")
    assert (fw["slot"], fw["secure_version"]) == ("ota_1", 1)
    _send(services, site, DEV, _desired(site, DEV, a, allow_downgrade=True))
    fw, _ = wait_reported(services, site, DEV, lambda fw, d: fw.get("version") == "1.0.0" and fw.get("state") == "idle",
                          "the rollback to A")
    assert fw["slot"] == "ota_0"
    info = flash_info(dev.flash)
    assert info["next_boot"]["slot"] == "ota_0"
    assert json.loads((dev.root / "fs" / "signing.json").read_text())["secure_version"] == 1


def _sha_size(data):
    import hashlib

    return hashlib.sha256(data).hexdigest(), len(data)


def test_keys_rotate_and_revoke_over_the_air(site, services, devices, images):
    k1, k2 = signing_key(), signing_key("second")
    d1, d2 = key_digest(k1.public_key()), key_digest(k2.public_key())
    release(site, images["A"], "1.0.0")
    dev = devices(DEV, images["A"], "1.0.0")
    # B, signed with the old key, tells the boards to trust only the new one from now on.
    b = release(site, images["B"], "1.1.0", trust=[d2])
    _send(services, site, DEV, _desired(site, DEV, b))
    fw, _ = wait_reported(services, site, DEV, lambda fw, d: fw.get("version") == "1.1.0" and fw.get("state") == "idle",
                          "B installed")
    assert fw["signer"] == d1[:16]
    assert json.loads((dev.root / "fs" / "signing.json").read_text())["keys"] == [d2]

    # The old key is revoked: a release it signs is refused, whatever the server says.
    c_image = build_app_image("1.2.0", 150 * 1024)
    c_old = release(site, c_image, "1.2.0")
    flash = dev.flash.read_bytes()
    _send(services, site, DEV, _desired(site, DEV, c_old))
    fw, _ = wait_reported(services, site, DEV, lambda fw, d: fw.get("error") == contract.E_UNTRUSTED_KEY,
                          "the revoked key refused")
    assert fw["version"] == "1.1.0" and dev.flash.read_bytes() == flash

    # The new key's signature of the same image is installed.
    site.trust.add(k2.public_key())
    c_new = release(site, c_image, "1.2.1", key=k2)
    assert c_new.sha256 == c_old.sha256
    _send(services, site, DEV, _desired(site, DEV, c_new, version="1.2.1"))
    fw, _ = wait_reported(services, site, DEV, lambda fw, d: fw.get("version") == "1.2.1" and fw.get("state") == "idle",
                          "C signed with the new key installed")
    assert fw["signer"] == d2[:16]
