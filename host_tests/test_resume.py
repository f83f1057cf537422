"""Interrupted downloads resume where they stopped, and only on terms the device can trust.

A power cut during the download leaves a checkpoint (bytes safely in flash, persisted every
64 KiB). After power-on the device hashes that prefix again and asks for the rest with
`Range`; it accepts only a 206 whose Content-Range matches, starts over on a 200, and waits
for a fresh URL (reporting need_url) when the old one expired.
"""

from aiohttp import web

from conftest import device_on_a, wait_reported, release
from firmware import contract
from tools.operator import client as op
from tools.control import grants
from tools.control import presign
from tools.control import store
from tools.espidf.images import build_app_image
from tools.site.pki import server_ssl_context

DEV = "esp32-resume"
BLOCK_OPS = 2  # each 4 KiB block is one erase and one program


def _updated(fw, doc):
    return fw.get("version") == "1.1.0" and fw.get("state") == "idle"


def _start(site, services, devices, images, **cfg):
    return device_on_a(site, services, devices, images, DEV, **cfg)


def test_download_resumes_after_a_power_cut(site, services, devices, images):
    dev, rel = _start(site, services, devices, images)
    dev.runner.arm_power_cut(20 * BLOCK_OPS)  # power dies after block 20; checkpoint: 16
    services.call(op.set_desired(site, DEV, rel))
    fw, _ = wait_reported(services, site, DEV, _updated, "1.1.0 after the power cut")
    assert fw["sha256"] == rel.sha256
    out = dev.output()
    assert "power cut" in out and "installing 1.1.0 into ota_1 from 65536" in out
    assert [b.ended for b in dev.runner.boots[:2]] == ["power cut", "reset"]


def test_store_that_ignores_range_makes_the_device_start_over(site, services, devices, images):
    """A server answering 200 to a Range request: the device takes it from byte 0."""
    ranges = []

    @web.middleware
    async def ignore_range(request, handler):
        if "Range" in request.headers:
            ranges.append(request.headers["Range"])
            request = request.clone(headers={k: v for k, v in request.headers.items() if k != "Range"})
        return await handler(request)

    async def start_plain_store():
        app = store.make_app(site.releases, site.store_key, site.creds)
        app.middlewares.append(ignore_range)
        return await store.start_store("127.0.0.1", 0, app, server_ssl_context(site.pki))

    runner, port = services.call(start_plain_store())
    try:
        dev, rel = _start(site, services, devices, images)
        dev.runner.arm_power_cut(20 * BLOCK_OPS)
        fw = grants.granted(site.grant_key, DEV, {
            "url": presign.sign(site.store_key, f"https://127.0.0.1:{port}", rel.sha256, DEV),
            "version": rel.version, "sha256": rel.sha256, "size": rel.size})
        outcome, _ = services.call(op.request(site, DEV, contract.UPDATE, {"state": {"desired": {"firmware": fw}}}))
        assert outcome == "accepted"
        wait_reported(services, site, DEV, _updated, "1.1.0 from a store without Range")
        assert ranges == ["bytes=65536-"]
        data = dev.flash.read_bytes()
        assert data[0x190000 : 0x190000 + rel.size] == images["B"]
    finally:
        services.call(runner.cleanup())


def test_expired_url_is_reported_and_a_fresh_one_resumes(site, services, recorder, devices, images):
    rec = recorder(DEV)
    dev, rel = _start(site, services, devices, images)
    dev.runner.off_after_cut = 3.0  # dark for longer than the URL lives
    dev.runner.arm_power_cut(20 * BLOCK_OPS)
    services.call(op.set_desired(site, DEV, rel, ttl=2))
    # the device says need_url; the renewer answers with a freshly signed URL on its own
    wait_reported(services, site, DEV, _updated, "1.1.0 with a fresh URL")
    asked = [m for m in rec.messages if m.topic.endswith("/update") and
             ((m.payload.get("state") or {}).get("reported") or {}).get("firmware", {}).get("need_url")]
    assert asked and asked[0].payload["state"]["reported"]["firmware"]["error"] == contract.E_URL_EXPIRED
    renewed = [m for m in rec.messages if m.topic.endswith("/update") and m.payload.get("clientToken") == "renewer"]
    assert len(renewed) == 1 and services.services.renewer.renewed == 1
    assert dev.output().count("installing 1.1.0 into ota_1 from 65536") == 2


def test_downgrade_needs_permission(site, services, devices, images):
    dev, _ = _start(site, services, devices, images)
    old = release(site, build_app_image("0.9.0", 120 * 1024), "0.9.0")
    services.call(op.set_desired(site, DEV, old))
    fw, _ = wait_reported(services, site, DEV, lambda fw, d: fw.get("error") == contract.E_DOWNGRADE, "refusal")
    assert fw["version"] == "1.0.0" and fw["state"] == "failed" and len(dev.runner.boots) == 1
    allowed = op.desired_firmware(site, DEV, old, allow_downgrade=True)
    outcome, _ = services.call(op.request(site, DEV, contract.UPDATE, {"state": {"desired": {"firmware": allowed}}}))
    assert outcome == "accepted"
    wait_reported(services, site, DEV, lambda fw, d: fw.get("version") == "0.9.0" and fw.get("state") == "idle",
                  "the permitted downgrade")
