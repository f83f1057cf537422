"""`make demo`: one emulated ESP32 updates itself, end to end, narrated step by step.

Starts the broker, replica and store on loopback, boots an emulated ESP32 running 1.0.0,
releases 1.1.0, sets it as the desired firmware and narrates the seed's steps 1-9 from what
actually crosses the broker (a recorder subscribed as the operator) until the device reports
1.1.0 and the replica has accepted it with no delta left. Then it checks flash.bin.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import threading
import time
from pathlib import Path

from firmware import contract
from tools.operator import client as op
from tools.esp32emu.flashinfo import flash_info
from tools.esp32emu.runner import Runner
from tools.espidf.images import build_app_image
from tools.operator.client import Recorded, Recorder
from tools.esp32emu.provision import provision_emulated
from tools.control.services import Services, start_ready, stop_task
from tools.site import Site
from tools.site.signing import generate_key, load_private, load_public, release_bundle

DEVICE = "esp32-demo-1"
OLD, NEW = "1.0.0", "1.1.0"
TIMEOUT_S = 180

_tty = sys.stdout.isatty()


def _c(code: str, text: str) -> str:
    return f"\033[{code}m{text}\033[0m" if _tty else text


def say(text: str) -> None:
    print(_c("1", text), flush=True)


def step(n: str, text: str, topic: str | None = None) -> None:
    where = f"  {_c('36', topic)}" if topic else ""
    print(f"{_c('1;32', f'[{n}]')} {text}{where}", flush=True)


def device_line(line: str) -> None:
    print(_c("2", f"    {DEVICE} | {line}"), flush=True)


def _fw(doc: dict, section: str | None = None) -> dict:
    fw = contract.firmware_in(doc, section)
    return fw if isinstance(fw, dict) else {}


class Narrator:
    """Turns recorded MQTT messages into the seed's numbered steps."""

    def __init__(self) -> None:
        self.seen_subscribed = False
        self.done = asyncio.Event()
        self.delta_pending = False  # a delta arrived that the device has not acted on yet
        self.deltas_told: set = set()
        self.device_get = False  # the next get/accepted answers the device, not the operator

    def __call__(self, m: Recorded) -> None:
        dev, suffix = contract.parse_topic(m.topic)
        p = m.payload if isinstance(m.payload, dict) else {}
        desired, reported = (_fw(p, contract.DESIRED), _fw(p, contract.REPORTED))
        if suffix == contract.UPDATE and desired:
            fw = desired
            step("3", f"application sets desired firmware {fw.get('version')} "
                      f"(sha256 {str(fw.get('sha256'))[:12]}…, {fw.get('size')} bytes, pre-signed URL)", m.topic)
        elif suffix == contract.UPDATE and reported:
            fw = reported
            st = fw.get("state")
            if not self.seen_subscribed:
                self.seen_subscribed = True
                step("1", "device is subscribed to its delta topic and reports what it runs: "
                          f"{fw.get('version')} in {fw.get('slot')}", m.topic)
            elif st == contract.ST_DOWNLOADING:
                step("7", f"device streams the image into the inactive slot: {fw.get('progress', 0)}%", m.topic)
            elif st == contract.ST_REBOOTING:
                step("7", "device checked the release's signature before writing, verified SHA-256, switched the "
                          "boot partition and reboots", m.topic)
            elif st == contract.ST_IDLE:
                step("8", f"device confirmed itself and reports it runs {fw.get('version')} "
                          f"(sha256 {str(fw.get('sha256'))[:12]}…, signed by key {fw.get('signer')}) from "
                          f"{fw.get('slot')}", m.topic)
            elif st == contract.ST_FAILED:
                step("!", f"device reports failure: {fw.get('error')}", m.topic)
        elif suffix == contract.UPDATE_ACCEPTED:
            if desired:
                step("4", f"replica stored the desired state (document version {p.get('version')})", m.topic)
            elif reported.get("state") == contract.ST_IDLE and reported.get("version") == NEW:
                step("9", f"replica recorded the reported state (version {p.get('version')}): update complete", m.topic)
                self.done.set()
        elif suffix == contract.UPDATE_DELTA:
            fw = _fw(p)
            self.delta_pending = True
            if fw.get("sha256") not in self.deltas_told:  # re-sent after each report: tell once
                self.deltas_told.add(fw.get("sha256"))
                step("4", f"replica publishes the delta: firmware → {fw.get('version')}", m.topic)
        elif suffix == contract.GET:
            token = p.get("clientToken")
            self.device_get = token is None
            if token and str(token).startswith("health-"):
                step("8", "new image runs its health check: shadow round trip over TLS", m.topic)
            elif token is None and self.delta_pending:
                step("5", "device received the delta (its update command) and asks for the whole shadow", m.topic)
            elif token is None:
                step("1", "device asks for its whole shadow after connecting, so nothing published while it "
                          "was offline is missed", m.topic)
            self.delta_pending = False
        elif suffix == contract.GET_ACCEPTED and self.device_get:
            self.device_get = False
            fw = _fw(p, contract.DELTA)
            if "url" in fw:
                step("6", f"device obtains the update URL from the shadow: {str(fw.get('url'))[:60]}…", m.topic)
        elif suffix == contract.UPDATE_REJECTED:
            step("!", f"replica rejected an update: {p}", m.topic)


async def run_demo(root: Path) -> int:
    if root.exists():
        shutil.rmtree(root)
    say("== esp32-fleet-ota demo: one emulated ESP32 updates itself ==")
    site = Site(root)
    print(f"local CA and server certificate in {site.pki.dir}")
    services = Services(site)
    ep = await services.start()
    print(f"broker  mqtts://{ep.host}:{ep.mqtt_port}  (amqtt, TLS, per-device ACL)")
    print(f"store   https://{ep.host}:{ep.https_port}  (pre-signed, device-bound URLs)")
    print(f"replica store {site.shadow_store}")
    runner = None
    thread = None
    rec_task = None
    try:
        # The release key, as kept on an offline machine (here: a folder beside the site);
        # the site holds only its public half, which the device is provisioned to trust.
        offline = root / "offline"
        offline.mkdir()
        key_path = offline / "release-key.pem"
        digest = generate_key(key_path)
        site.trust.add(load_public(key_path))
        key = load_private(key_path)
        print(f"signing key {key_path} (RSA-3072; the device trusts its digest {digest[:16]}…)")
        old = build_app_image(OLD, 600 * 1024)
        site.releases.add(old, OLD, signature=release_bundle(key, old, OLD))
        # Two TLS connections at once, so MQTT stays up and progress is reported live.
        devdir = provision_emulated(site, DEVICE, old, OLD, directory=root / DEVICE,
                                    config={"tls_slots": 2})
        print(f"device  {devdir} (flash.bin with {OLD} in ota_0, fs/ with the firmware)")

        narrator = Narrator()
        recorder = Recorder(site, DEVICE, on_message=narrator)
        rec_task = await start_ready(recorder.run, 10)

        say(f"-- power on {DEVICE}")
        runner = Runner(devdir, on_line=device_line)
        thread = threading.Thread(target=runner.run, daemon=True)
        thread.start()
        t0 = time.monotonic()
        while not narrator.seen_subscribed:
            if time.monotonic() - t0 > 60 or not thread.is_alive():
                raise RuntimeError("the device did not come up")
            await asyncio.sleep(0.1)

        new = build_app_image(NEW, 1200 * 1024)
        rel = site.releases.add(new, NEW, signature=release_bundle(key, new, NEW))
        step("2", f"application builds {NEW} ({rel.size} bytes, esptool-valid app image), signs its "
                  f"manifest with the offline key and releases it into the store as {rel.sha256[:12]}…")
        await op.set_desired(site, DEVICE, rel)

        try:
            await asyncio.wait_for(narrator.done.wait(), TIMEOUT_S)
        except TimeoutError:
            raise RuntimeError(f"the device did not report {NEW} within {TIMEOUT_S}s") from None
        doc = await op.get_shadow(site, DEVICE)
        if contract.DELTA in doc["state"]:
            raise RuntimeError(f"a delta is left: {doc['state'][contract.DELTA]}")
        runner.stop()
        thread.join(10)
        info = flash_info(devdir / "flash.bin")
        slot = info["app_slots"]["ota_1"]
        active = info["otadata"]["entries"][info["otadata"]["active"]]
        if info["next_boot"]["slot"] != "ota_1" or active["state"] != "VALID" or slot["image_sha256"] != rel.sha256:
            raise RuntimeError(f"flash.bin does not hold the new image as the valid boot slot: {info}")
        say("-- checked flash.bin:")
        print(f"   ota_1 holds {NEW}: image SHA-256 {slot['image_sha256'][:12]}… matches the release, "
              f"checksum and digest valid")
        print(f"   otadata selects ota_1 (seq {active['seq']}, {active['state']}); "
              f"ota_0 still holds {OLD} as the fallback")
        say(f"== done: {DEVICE} runs {NEW}; state left in {root} ==")
        return 0
    except Exception as e:  # noqa: BLE001 - the demo reports any failure as one line
        print(_c("1;31", f"demo failed: {e}"), flush=True)
        return 1
    finally:
        if runner:
            runner.stop()
        if thread:
            thread.join(10)
        if rec_task:
            await stop_task(rec_task)
        await services.stop()
