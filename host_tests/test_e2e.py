"""End to end: broker + replica + store + one emulated ESP32 running the real firmware.

A recorder subscribed as the operator sees what crosses the broker; afterwards flash.bin is
checked the way the chip and esptool would read it.
"""

import json

import pytest
from esptool.bin_image import LoadFirmwareImage

from conftest import wait_reported, wait_until, release
from firmware import contract
from tools.operator import client as op
from tools.control import grants
from tools.control import presign
from tools.esp32emu.flashinfo import flash_info
from tools.esp32emu.runner import PANIC_ON_BOOT
from tools.espidf.images import build_app_image

DEV = "esp32-e2e"



def find_in_order(messages, steps):
    """Indices of the first messages matching each predicate, in order; fails if any is missing."""
    at, found = 0, []
    for name, pred in steps:
        for i in range(at, len(messages)):
            if pred(messages[i]):
                found.append(i)
                at = i + 1
                break
        else:
            pytest.fail(f"no '{name}' after message {at}; saw:\n" + "\n".join(
                f"  {m.topic} {json.dumps(m.payload)[:160]}" for m in messages))
    return found


def _fw(m, section):
    st = m.payload.get("state", {}) if isinstance(m.payload, dict) else {}
    return (st.get(section) or {}).get("firmware") if isinstance(st, dict) else None


@pytest.fixture(params=[1, 2], ids=["one-tls-connection", "two-tls-connections"])
def device_a(request, site, services, devices, images):
    release(site, images["A"], "1.0.0")
    dev = devices(DEV, images["A"], "1.0.0", tls_slots=request.param)
    dev.tls_slots = request.param
    wait_reported(services, site, DEV, lambda fw, d: fw.get("version") == "1.0.0", "first report")
    return dev


def test_device_updates_itself(site, services, recorder, images, device_a):
    rec = recorder(DEV)
    rel = release(site, images["B"], "1.1.0")
    services.call(op.set_desired(site, DEV, rel))
    fw, doc = wait_reported(services, site, DEV,
                            lambda fw, d: fw.get("version") == "1.1.0" and fw.get("state") == "idle",
                            "the device to report 1.1.0")
    assert fw["sha256"] == rel.sha256 and fw["slot"] == "ota_1"
    assert set(fw) == {"version", "sha256", "size", "url", "slot", "state", "signer", "secure_version"}  # nothing stale
    assert "delta" not in doc["state"]
    wait_until(lambda: any(m.topic.endswith("/update/accepted") and (_fw(m, "reported") or {}).get("version") == "1.1.0"
                           for m in rec.messages), 10, "accepted for the new version")

    def t(suffix):
        return lambda m: m.topic == contract.topic(DEV, suffix)

    def reported_state(state):
        return lambda m: t("update")(m) and (_fw(m, "reported") or {}).get("state") == state

    steps = [
        ("desired update", lambda m: t("update")(m) and _fw(m, "desired")),
        ("accepted desired", lambda m: t("update/accepted")(m) and _fw(m, "desired")),
        ("delta to the device", lambda m: t("update/delta")(m) and m.payload["state"]["firmware"]["sha256"] == rel.sha256),
        ("device asks for the shadow", t("get")),
        ("reported progress", reported_state("downloading")),
    ]
    if device_a.tls_slots == 2:  # MQTT stayed up during the download
        steps += [("progress 100", lambda m: t("update")(m) and (_fw(m, "reported") or {}).get("progress") == 100)]
    steps += [("reported rebooting", reported_state("rebooting"))]
    steps += [
        ("reported new version", lambda m: t("update")(m) and (_fw(m, "reported") or {}).get("version") == "1.1.0"),
        ("accepted with reported == desired", lambda m: t("update/accepted")(m)
            and (_fw(m, "reported") or {}).get("sha256") == rel.sha256),
    ]
    find_in_order(rec.messages, steps)

    # flash.bin: new image in ota_1, otadata selects it VALID, esptool verifies it
    device_a.stop()
    data = device_a.flash.read_bytes()
    info = flash_info(device_a.flash)
    assert info["next_boot"]["slot"] == "ota_1" and info["next_boot"]["otadata_writes"] == []
    active = info["otadata"]["entries"][info["otadata"]["active"]]
    assert active["state"] == "VALID" and (active["seq"] - 1) % 2 == 1
    slot = data[0x190000 : 0x190000 + rel.size]
    assert slot == images["B"]
    im = LoadFirmwareImage("esp32", slot)
    assert im.checksum == im.calculate_checksum() and im.stored_digest == im.calc_digest
    assert data[0x10000 : 0x10000 + len(images["A"])] == images["A"]  # the fallback is intact


def test_wrong_bytes_are_refused_and_nothing_changes(site, services, images, device_a):
    rel_b = release(site, images["B"], "1.1.0")
    imposter = release(site, build_app_image("6.6.6", len(images["B"])), "6.6.6")
    otadata_before = device_a.flash.read_bytes()[0xD000:0xF000]
    # Desired names B's hash and size, but the URL serves another (valid) image.
    url = presign.sign(site.store_key, site.endpoints().store_url, imposter.sha256, DEV)
    fw = grants.granted(site.grant_key, DEV, {"url": url, "version": "1.1.0", "sha256": rel_b.sha256, "size": rel_b.size})
    outcome, _ = services.call(op.request(site, DEV, contract.UPDATE, {"state": {"desired": {"firmware": fw}}}))
    assert outcome == "accepted"
    fw, doc = wait_reported(services, site, DEV, lambda fw, d: fw.get("state") == "failed", "a failure report")
    # The store has no signature of release 1.1.0 for the imposter's bytes: the board refuses
    # before it downloads (hash_mismatch, for a signature served with other bytes:
    # test_signed_e2e.py).
    assert fw["error"] == contract.E_UNSIGNED
    assert fw["version"] == "1.0.0" and fw["slot"] == "ota_0" and fw["sha256"] == device_a_sha(images)
    assert device_a.flash.read_bytes()[0xD000:0xF000] == otadata_before
    assert len(device_a.runner.boots) == 1  # never rebooted
    assert flash_info(device_a.flash)["next_boot"]["slot"] == "ota_0"


def device_a_sha(images):
    import hashlib

    return hashlib.sha256(images["A"]).hexdigest()


def test_image_that_never_confirms_is_rolled_back(site, services, images, device_a):
    bad = release(site, build_app_image("1.2.0", 150 * 1024, PANIC_ON_BOOT), "1.2.0")
    services.call(op.set_desired(site, DEV, bad))
    fw, doc = wait_reported(services, site, DEV,
                            lambda fw, d: fw.get("state") == "failed" and fw.get("error") == contract.E_ROLLED_BACK,
                            "a rolled_back report")
    assert fw["version"] == "1.0.0" and fw["slot"] == "ota_0" and fw["target"] == "1.2.0"
    boots = device_a.runner.boots
    assert [(b.slot, b.ended) for b in boots[:3]] == [("ota_0", "reset"), ("ota_1", "panic"), ("ota_0", "running")]
    info = flash_info(device_a.flash)
    assert info["next_boot"]["slot"] == "ota_0"
    assert [e["state"] for e in info["otadata"]["entries"]] == ["VALID", "ABORTED"]
    assert "delta" in doc["state"]  # the operator still wants 1.2.0: the shadow says so
