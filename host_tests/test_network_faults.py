"""Network faults during an update: everything converges and nothing is lost.

Stores here are test doubles served next to the real one (same pre-signed URLs): one whose
connection drops after every 64 KiB, one that trickles bytes so that the broker or the replica
can be restarted while the device is still downloading.
"""

import asyncio
import socket
import threading
import time

import pytest
from aiohttp import web

from conftest import device_on_a, wait_reported, wait_until, release
from firmware import contract
from tools.operator import client as op
from tools.control import grants
from tools.control import presign
from tools.control import store
from tools.site.pki import server_ssl_context

DEV = "esp32-faults"


def _range_start(request, size):
    r = request.headers.get("Range", "")
    return int(r[6:-1]) if r.startswith("bytes=") and r.endswith("-") else 0


def _faulty_store(site, chunk, pause_s=0.0, drop_after=None, stall_after=None, release=None):
    """An artifact server with pre-signed URLs and Range, which sends an image `chunk` bytes
    per write (pausing between) and closes the connection after `drop_after` bytes, or goes
    silent without closing it (a link that died) after `stall_after` bytes, if given."""
    async def artifact(request):
        name = request.match_info["name"]
        sha = name[:-4]
        try:
            presign.verify(site.store_key, presign.artifact_path(sha), dict(request.query))
        except presign.PresignError as e:
            return web.json_response({"error": str(e)}, status=403)
        if name.endswith(".sig"):  # the release's signature, served whole as the store does
            return web.json_response(site.releases.get(request.query["version"]).signature)
        data = site.releases.path_of(sha).read_bytes()
        start = _range_start(request, len(data))
        headers = {"Content-Length": str(len(data) - start)}
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        resp = web.StreamResponse(status=206 if start else 200, headers=headers)
        await resp.prepare(request)
        sent, pos = 0, start
        while pos < len(data):
            if drop_after is not None and sent >= drop_after:
                request.transport.close()  # the link drops mid-body
                return resp
            if stall_after is not None and sent >= stall_after:
                await release.wait()  # nothing more arrives, nothing is closed (until teardown)
                return resp
            await resp.write(data[pos : pos + chunk])
            sent += min(chunk, len(data) - pos)
            pos += chunk
            if pause_s:
                await asyncio.sleep(pause_s)
        return resp

    app = web.Application()
    app.router.add_get("/fw/{name}", artifact)
    return app


@pytest.fixture
def faulty(site, services):
    started = []

    async def make_release():
        return asyncio.Event()

    release = services.call(make_release())

    def start(**kw):
        app = _faulty_store(site, release=release, **kw)
        runner, port = services.call(store.start_store("127.0.0.1", 0, app, server_ssl_context(site.pki)))
        started.append(runner)
        return f"https://127.0.0.1:{port}"

    yield start
    services.loop.call_soon_threadsafe(release.set)
    for r in started:
        services.call(r.cleanup())


def _desire(site, services, rel, base):
    fw = grants.granted(site.grant_key, DEV, {"url": presign.sign(site.store_key, base, rel.sha256, DEV),
                                              "version": rel.version, "sha256": rel.sha256, "size": rel.size})
    outcome, _ = services.call(op.request(site, DEV, contract.UPDATE, {"state": {"desired": {"firmware": fw}}}))
    assert outcome == "accepted"


def _device(site, services, devices, images, **cfg):
    return device_on_a(site, services, devices, images, DEV, **cfg)


def _updated(fw, doc):
    return fw.get("version") == "1.1.0" and fw.get("state") == "idle" and "delta" not in doc["state"]


def test_link_dropping_every_64k_still_converges(site, services, devices, images, faulty):
    dev, rel = _device(site, services, devices, images)
    base = faulty(chunk=4096, drop_after=64 * 1024)
    _desire(site, services, rel, base)
    fw, _ = wait_reported(services, site, DEV, _updated, "1.1.0 over a link that keeps dropping", 120)
    assert fw["sha256"] == rel.sha256
    resumes = [ln for ln in dev.lines if "installing 1.1.0" in ln]
    # 300 KiB in 64 KiB pieces: started once, resumed at each 64 KiB mark
    assert [ln.split(" from ")[1].split()[0] for ln in resumes] == ["0", "65536", "131072", "196608", "262144"]
    assert len(dev.runner.boots) == 2  # only the reboot into the new image


def test_link_that_goes_silent_is_timed_out_and_resumed(site, services, devices, images, faulty):
    # A dead Wi-Fi link sends no FIN: only the device's socket timeout ends the wait.
    dev, rel = _device(site, services, devices, images, net_timeout_s=2)
    _desire(site, services, rel, faulty(chunk=4096, stall_after=128 * 1024))
    fw, _ = wait_reported(services, site, DEV, lambda fw, d: fw.get("state") == "failed", "a timeout", 60)
    assert fw["error"] == contract.E_NETWORK and fw["target"] == "1.1.0"
    # now serve it properly (the renewer-style fresh URL points at the real store)
    services.call(op.set_desired(site, DEV, rel))
    wait_reported(services, site, DEV, _updated, "1.1.0 after the stall", 120)
    assert "installing 1.1.0 into ota_1 from 131072" in dev.output()


@pytest.mark.parametrize("what", ["broker", "replica"])
def test_restart_mid_download_converges(site, services, devices, images, faulty, what):
    dev, rel = _device(site, services, devices, images, tls_slots=2)
    base = faulty(chunk=8192, pause_s=0.1)  # ~4 s for 300 KiB
    _desire(site, services, rel, base)
    wait_reported(services, site, DEV, lambda fw, d: fw.get("state") == "downloading", "download start")
    time.sleep(1.0)
    if what == "broker":
        services.call(services.services.restart_broker(down_s=1.0))
    else:
        services.call(services.services.stop_replica())
        time.sleep(1.0)
        services.call(services.services.start_replica())
    fw, doc = wait_reported(services, site, DEV, _updated, f"1.1.0 after a {what} restart", 120)
    assert fw["sha256"] == rel.sha256 and doc["state"]["desired"]["firmware"]["sha256"] == rel.sha256


@pytest.mark.parametrize("tls_slots", [2, 1], ids=["mqtt-up", "mqtt-parked"])
def test_desired_change_mid_download_is_followed(site, services, devices, images, faulty, tls_slots):
    """While 1.1.0 trickles in, the operator switches to 1.2.0: the device abandons 1.1.0 (at a
    checkpoint when MQTT is up, or at the check before set_boot() when it was parked) and
    installs 1.2.0. 1.1.0 is never booted."""
    from tools.espidf.images import build_app_image

    dev, rel_b = _device(site, services, devices, images, tls_slots=tls_slots)
    rel_c = release(site, build_app_image("1.2.0", 150 * 1024), "1.2.0")
    _desire(site, services, rel_b, faulty(chunk=8192, pause_s=0.1))  # ~4 s for 300 KiB
    wait_reported(services, site, DEV, lambda fw, d: fw.get("state") == "downloading", "download start")
    services.call(op.set_desired(site, DEV, rel_c))
    fw, doc = wait_reported(services, site, DEV, lambda fw, d: fw.get("version") == "1.2.0" and fw.get("state") == "idle",
                            "1.2.0 after the switch", 120)
    assert fw["sha256"] == rel_c.sha256 and "delta" not in doc["state"]
    assert "abandoning 1.1.0" in dev.output()
    assert [b.slot for b in dev.runner.boots] == ["ota_0", "ota_1"]  # one reboot, into 1.2.0


def test_wifi_drop_on_the_device_cuts_its_connections_and_it_recovers(site, services, devices, images, faulty):
    """The board's own Wi-Fi goes down in the middle of a download (the emulator cuts its
    connections and its station reports no link) and comes back: the download resumes."""
    dev, rel = _device(site, services, devices, images, tls_slots=2)
    _desire(site, services, rel, faulty(chunk=8192, pause_s=0.1))  # ~4 s for 300 KiB
    wait_reported(services, site, DEV, lambda fw, d: fw.get("state") == "downloading", "download start")
    time.sleep(1.5)
    dev.runner.link.down()
    wait_until(lambda: "Wi-Fi join timed out" in dev.output(), 60, "the device to notice the link is gone")
    dev.runner.link.restore()
    fw, _ = wait_reported(services, site, DEV, _updated, "1.1.0 after the Wi-Fi drop", 120)
    assert fw["sha256"] == rel.sha256
    resumed = [ln for ln in dev.lines if "installing 1.1.0 into ota_1 from" in ln]
    assert len(resumed) >= 2 and resumed[-1].split(" from ")[1].split()[0] != "0"


class _CuttingProxy:
    """A TCP pass-through to the broker that cuts every connection `after` seconds in (TLS
    goes through untouched): a link that comes up, works briefly, and drops."""

    def __init__(self, target_port: int, after: float):
        self.target_port, self.after = target_port, after
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.live: list = []
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            self.connections += 1
            up = socket.create_connection(("127.0.0.1", self.target_port))
            self.live += [c, up]
            for a, b in ((c, up), (up, c)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()
            timer = threading.Timer(self.after, self._cut, args=(c, up))
            timer.daemon = True
            timer.start()

    @staticmethod
    def _pipe(a, b) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass

    def _cut(self, *socks) -> None:
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.srv.close()
        self._cut(*self.live)


def test_a_link_that_drops_right_after_connecting_backs_off(site, services, devices, images):
    # Each connection works (CONNACK, subscriptions, the report) and is cut a second later.
    # Only a link that stayed up a while may reset the backoff; before, every round counted
    # as a success and the board reconnected every 0.5-1 s for as long as it lasted.
    release(site, images["A"], "1.0.0")
    proxy = _CuttingProxy(site.endpoints().mqtt_port, after=1.0)
    try:
        dev = devices(DEV, images["A"], "1.0.0", broker_port=proxy.port)
        wait_reported(services, site, DEV, lambda fw, d: fw.get("version") == "1.0.0", "a report through the proxy")
        t0 = time.monotonic()
        time.sleep(20)
        rounds = dev.output().count("link error")
    finally:
        proxy.close()
    assert 2 <= rounds <= 6, f"{rounds} reconnects in {time.monotonic() - t0:.0f} s:\n{dev.output()[-3000:]}"


def test_a_get_nobody_answers_is_asked_again(site, services, devices, images, mqtt_probe):
    """The board comes back after the broker restarted, before the replica has subscribed
    again: the broker drops its request for the shadow (no session keeps it for the replica
    across a restart), and the desired change it missed while away was announced to nobody.
    Nothing else will be sent to it, so it must ask again until it is answered, and then
    install what is desired."""
    dev, rel = _device(site, services, devices, images)
    dev.runner.link.down()
    wait_until(lambda: "Wi-Fi join timed out" in dev.output(), 60, "the device to notice the link is gone")
    services.call(op.set_desired(site, DEV, rel))  # its delta reaches nobody
    services.call(services.services.stop_replica())
    services.call(services.services.restart_broker())  # and with it the replica's session
    probe = mqtt_probe("operator", site.service_password("operator"))
    assert probe.subscribe(contract.topic(DEV, contract.GET)) == [1]
    dev.runner.link.restore()
    assert probe.next_message(60) is not None, "the board did not ask for its shadow"
    services.call(services.services.start_replica())
    # Nothing here may read the shadow before the board acts: an operator's get is answered
    # on the device's get/accepted too, and would wake it.
    wait_until(lambda: "installing 1.1.0" in dev.output(), 60, "the board to ask again and install")
    asks = 0
    while (m := probe.next_message(0)) is not None:
        asks += m[0].endswith("/get")
    assert 1 <= asks <= 2  # asked again after 5-10 s (then 10-20 s), not in a loop
    fw, _ = wait_reported(services, site, DEV, _updated, "1.1.0 once the replica answers", 120)
    assert fw["sha256"] == rel.sha256


def test_an_answer_that_misses_the_boards_report_is_answered_with_it(site, services, devices, images):
    """The shadow's reported firmware is not what the board runs (a report of its was dropped
    the same way, or another client wrote there): the next answer the board sees makes it
    report again, so no stale report outlives it."""
    dev, _ = _device(site, services, devices, images)
    stale = {"state": {"reported": {"firmware": {"state": "downloading", "target": "9.9.9"}}}}
    outcome, _ = services.call(op.request(site, DEV, contract.UPDATE, stale))
    assert outcome == "accepted"
    # Reading the shadow is an operator's get: its answer goes to the board's get/accepted too.
    fw, _ = wait_reported(services, site, DEV, lambda fw, d: fw.get("state") == "idle", "the board's own report", 30)
    assert "target" not in fw and fw["version"] == "1.0.0"  # null deleted it


def test_a_trial_whose_first_get_is_lost_still_confirms(site, services, devices, images, faulty):
    """The new image's health check is a shadow round trip. Here the broker restarts while
    the image downloads, with the replica stopped, so the board's requests after the download
    and its trial's first one are lost; the replica subscribes again only after that. The
    check asks again within its deadline, feeding a 5 s watchdog while it waits, and the good
    image is confirmed, not rolled back."""
    dev, rel = _device(site, services, devices, images, health_deadline_s=30, wdt_ms=5000)
    _desire(site, services, rel, faulty(chunk=8192, pause_s=0.1))  # ~4 s for 300 KiB
    wait_until(lambda: "installing 1.1.0" in dev.output(), 30, "the download to start")
    services.call(services.services.stop_replica())
    services.call(services.services.restart_broker())  # and with it the replica's session
    wait_until(lambda: "trial boot of 1.1.0" in dev.output(), 60, "the trial boot")
    time.sleep(3)  # it connects and asks; nobody is subscribed
    assert "confirmed" not in dev.output()
    services.call(services.services.start_replica())
    wait_until(lambda: "confirmed 1.1.0" in dev.output(), 25, "the trial to confirm")
    wait_reported(services, site, DEV, _updated, "1.1.0 confirmed", 30)
    assert [b.slot for b in dev.runner.boots] == ["ota_0", "ota_1"]  # no rollback
