"""Fixtures: a site on disk, the services on loopback, emulated devices, MicroPython runs.

Everything a test starts is stopped by its fixture: services (broker, replica, store) on a
background loop, emulated devices (runner thread + MicroPython process), recorders.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tools.site.identities import SERVICE_USERS
from tools.esp32emu.runner import DEFAULT_CHIP_REV, Runner, TARGET_DIR, chip_env
from tools.esp32emu.runner import run_script as run_micropython  # noqa: F401 - tests import it from here
from tools.espidf.images import build_app_image
from tools.operator.client import Recorder
from tools.esp32emu.provision import provision_emulated
from tools.control.services import ServicesThread, start_ready, stop_task
from tools.site import Site
from tools.site.releases import Release
from tools.site.signing import release_bundle
from cryptography.hazmat.primitives.asymmetric import rsa

REPO = Path(__file__).resolve().parent.parent


def pytest_addoption(parser):
    parser.addoption("--sweep", choices=("quick", "full"), default="quick",
                     help="power-cut sweep: a spread of cut points (quick) or every one (full)")
    parser.addoption("--sweep-workers", type=int, default=3,
                     help="emulated devices the power-cut sweep runs at once")
    g = parser.getgroup("hil", "hardware in the loop (host_tests/test_hil.py)")
    g.addoption("--port", help="a board to test: /dev/ttyUSB0, or socket://127.0.0.1:PORT for an emulated "
                "board behind mpremote's bridge (default: the suite starts an emulated board itself)")
    g.addoption("--host", default="127.0.0.1",
                help="address the services bind to and put in certificates; a real board must reach it")
    g.addoption("--wifi-ssid", default=os.environ.get("WIFI_SSID", ""), help="Wi-Fi for a real board ($WIFI_SSID)")
    g.addoption("--wifi-password", default=os.environ.get("WIFI_PASSWORD", ""), help="($WIFI_PASSWORD)")
    g.addoption("--device-id", default="hil-board", help="identity the board under test gets")
    g.addoption("--ota-image", type=Path,
                help="app image (micropython.bin of ESP32_GENERIC-OTA) the board updates to; on a real board "
                "it must be a MicroPython build that runs this firmware")
    g.addoption("--bad-image", type=Path,
                help="app image that boots but never confirms, for the rollback test on a real board")


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll `predicate` until it returns a truthy value; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def reported_firmware(services, site, device: str) -> tuple[dict, dict | None]:
    """(state.reported.firmware, whole document) from the replica; ({}, None) before any."""
    from tools.operator import client as op

    try:
        doc = services.call(op.get_shadow(site, device))
    except op.OperatorError:
        return {}, None
    return doc["state"].get("reported", {}).get("firmware", {}), doc


def wait_reported(services, site, device: str, pred, what: str, timeout: float = 90):
    """Poll the shadow until pred(firmware, document) holds; returns (firmware, document)."""
    def check():
        fw, doc = reported_firmware(services, site, device)
        return (fw, doc) if fw and pred(fw, doc) else None
    return wait_until(check, timeout, what, interval=0.5)


@pytest.fixture(scope="session")
def images():
    """Two releases-to-be and helpers, built once per session."""
    return {
        "A": build_app_image("1.0.0", 200 * 1024),
        "B": build_app_image("1.1.0", 300 * 1024),
    }


@functools.cache
def signing_key(name: str = "release") -> rsa.RSAPrivateKey:
    """An RSA-3072 release signing key per name, made once a session (each takes ~0.5 s)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=3072)


def release(site: Site, image: bytes, version: str, secure_version: int = 0, key: rsa.RSAPrivateKey | None = None,
            trust: list[str] | None = None) -> Release:
    """Sign `image` (with the session's release key, or `key`) and register it: what `sign`
    on the offline machine and `release --signature` on the server do."""
    bundle = release_bundle(key or signing_key(), image, version, secure_version, trust)
    return site.releases.add(image, version, signature=bundle)


def device_on_a(site, services, devices, images, device: str, **cfg):
    """Release A (1.0.0) and B (1.1.0), power on `device` running A and wait for its first
    report. Returns (the device, release B)."""
    release(site, images["A"], "1.0.0")
    rel = release(site, images["B"], "1.1.0")
    dev = devices(device, images["A"], "1.0.0", **cfg)
    wait_reported(services, site, device, lambda fw, d: fw.get("version") == "1.0.0", "first report")
    return dev, rel


@pytest.fixture
def site(tmp_path) -> Site:
    return new_site(tmp_path / "site")


def new_site(root: Path, **kw) -> Site:
    """A new site (it installs signed releases only) trusting the session's release key."""
    site = Site(root, **kw)
    site.trust.add(signing_key().public_key())
    return site


@pytest.fixture
def services(site):
    with ServicesThread(site) as svc:
        yield svc


@dataclass
class EmuDevice:
    runner: Runner
    thread: threading.Thread
    root: Path
    lines: list[str] = field(default_factory=list)

    @property
    def flash(self) -> Path:
        return self.root / "flash.bin"

    def output(self) -> str:
        return "\n".join(self.lines)

    def stop(self) -> None:
        self.runner.stop()
        self.thread.join(15)


@pytest.fixture
def devices(site, services, tmp_path):
    """Factory: devices(id, image, version) provisions and powers on an emulated ESP32."""
    started: list[EmuDevice] = []

    def start(device_id: str, image: bytes, version: str, max_boots: int = 20,
              heapsize: str = "112k", tls_budget: int = 2, chip_rev: int = DEFAULT_CHIP_REV, **cfg) -> EmuDevice:
        root = provision_emulated(site, device_id, image, version, directory=tmp_path / device_id,
                                  config=cfg or None)
        lines: list[str] = []
        runner = Runner(root, heapsize=heapsize, tls_budget=tls_budget, max_boots=max_boots,
                        chip_rev=chip_rev, on_line=lines.append)
        thread = threading.Thread(target=runner.run, daemon=True, name=device_id)
        dev = EmuDevice(runner, thread, root, lines)
        started.append(dev)
        thread.start()
        return dev

    yield start
    for dev in started:
        dev.stop()
        print(f"--- console of {dev.root.name} ---\n{dev.output()}")  # shown when a test fails


@pytest.fixture(scope="session")
def postgres_server():
    """One PostgreSQL server for the session (tools/postgres.py), stopped at the end."""
    import shutil
    import tempfile

    from tools.control.postgres import Postgres, find_bin

    if find_bin() is None:
        pytest.skip("PostgreSQL server not installed (`make system-deps` installs postgresql-15)")
    # Not under pytest's tmp_path: its parents are private to root, and the server runs as postgres.
    folder = Path(tempfile.mkdtemp(prefix="fleet-ota-pg-"))
    pg = Postgres(folder).start()
    yield pg
    pg.stop()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server):
    """A fresh, empty database for one test."""
    import secrets

    return postgres_server.create_database("t_" + secrets.token_hex(4))


@pytest.fixture
def recorder(site, services):
    """Factory: recorder(device) subscribes as the operator to state/<device>/#."""
    tasks = []

    def make(device: str) -> Recorder:
        rec = Recorder(site, device)
        tasks.append(services.call(start_ready(rec.run, 10)))
        return rec

    yield make

    async def _stop():
        for t in tasks:
            await stop_task(t)

    services.call(_stop())


def https_get(site, url: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    """GET over TLS with the site's CA: (status, headers, body), for refusals too."""
    import ssl
    import urllib.error
    import urllib.request

    ctx = ssl.create_default_context(cafile=str(site.pki.ca_cert))
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), context=ctx, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def last_json_line(out: str):
    for line in reversed(out.strip().splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    raise AssertionError(f"no JSON line in output:\n{out}")


__all__ = ["wait_until", "run_micropython", "chip_env", "last_json_line", "TARGET_DIR", "release", "signing_key", "new_site"]


class MQTTProbe:
    """A synchronous paho MQTT 3.1.1 client for tests: TLS to the site's broker."""

    def __init__(self, site, user: str | None, password: str | None, client_id: str | None = None,
                 port: int | None = None, clean_session: bool = True, will: tuple | None = None):
        """`user` None: no username at all; `will`: (topic, payload, retain) for the CONNECT."""
        import queue

        import paho.mqtt.client as mqtt

        ep = site.endpoints() if port is None else None
        self.messages: "queue.Queue" = queue.Queue()
        self.suback: "queue.Queue" = queue.Queue()
        self.connack: "queue.Queue" = queue.Queue()
        self.drops: list = []
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or user,
                             protocol=mqtt.MQTTv311, clean_session=clean_session)
        self.c.tls_set(ca_certs=str(site.pki.ca_cert))
        if user is not None:
            self.c.username_pw_set(user, password)
        if will is not None:
            self.c.will_set(will[0], will[1], qos=1, retain=will[2])
        self.c.on_disconnect = lambda *a: self.drops.append(a)
        self.c.on_message = lambda c, u, m: self.messages.put((m.topic, m.payload))
        self.c.on_subscribe = lambda c, u, mid, codes, p: self.suback.put([rc.value for rc in codes])
        self.c.on_connect = lambda c, u, f, rc, p: self.connack.put(rc.value)
        if ep is not None:  # the services' own listener for service identities (mosquitto)
            port = ep.service_mqtt_port if user in SERVICE_USERS else ep.mqtt_port
        self.c.connect(ep.host if ep else "127.0.0.1", port)
        self.c.loop_start()

    def connected(self, timeout: float = 10) -> int:
        """CONNACK return code (0 = accepted)."""
        import queue

        try:
            return self.connack.get(timeout=timeout)
        except queue.Empty:
            return -1

    def subscribe(self, topic: str, timeout: float = 10) -> list[int]:
        self.c.subscribe(topic, qos=1)
        return self.suback.get(timeout=timeout)

    def publish(self, topic: str, payload, qos: int = 1) -> None:
        self.c.publish(topic, payload, qos=qos).wait_for_publish(10)

    def next_message(self, timeout: float):
        import queue

        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            return None

    def ask(self, topic: str, body: dict, timeout: float = 10) -> tuple[str, dict]:
        """Publish a request with a fresh clientToken; (last topic level, answer) of the answer
        carrying it, among the messages this probe's subscriptions bring."""
        import secrets

        token = secrets.token_hex(4)
        self.publish(topic, json.dumps(dict(body, clientToken=token)))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            msg = self.next_message(left)
            if msg is not None and json.loads(msg[1]).get("clientToken") == token:
                return msg[0].rsplit("/", 1)[1], json.loads(msg[1])
        raise AssertionError(f"no answer to {topic} within {timeout}s")

    def drop(self) -> None:
        """Lose the connection without a DISCONNECT (a power cut): the broker sends the will."""
        import socket

        self.c.socket().shutdown(socket.SHUT_RDWR)
        wait_until(lambda: self.drops, 10, "the connection to drop")
        self.c.loop_stop()

    def close(self) -> None:
        self.c.disconnect()
        try:
            self.c.loop_stop()
        except AttributeError:
            pass  # paho 2.2: its thread ended (and cleared itself) between the check and the join


@pytest.fixture
def mqtt_probe(site, services):
    made: list[MQTTProbe] = []

    def make(user: str | None, password: str | None, client_id: str | None = None, **kw) -> MQTTProbe:
        p = MQTTProbe(site, user, password, client_id, **kw)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


# ---- markers: the tiers of the suite ------------------------------------------------------
# unit: pure host code; micropython: runs code under the MicroPython unix port; e2e: services
# on loopback (broker, replica, store) with clients or emulated boards; hil: a board (or an
# emulated one) behind mpremote or esptool; slow: takes seconds. `make test-fast` runs what
# is neither slow nor hil, in well under a minute.
TIERS = {
    "test_acl": "unit", "test_shadow": "unit", "test_espidf": "unit", "test_images": "unit",
    "test_rollout": "unit", "test_mqtt_wire": "unit", "test_passwd": "unit", "test_structure": "unit",
    "test_status": "unit", "test_cli_errors": "unit", "test_ota": "unit", "test_grants": "unit",
    "test_contract": "unit micropython", "test_device_files": "micropython", "test_emulator": "micropython",
    "test_mpy": "micropython", "test_fuzz_firmware": "micropython slow", "test_tls_trust": "micropython e2e",
    "test_link": "micropython e2e slow", "test_firmware": "micropython e2e slow",
    "test_power_sweep": "micropython e2e slow",
    "test_e2e": "e2e slow", "test_credentials": "e2e slow", "test_network_faults": "e2e slow",
    "test_resume": "e2e slow", "test_rollout_e2e": "e2e slow", "test_trust": "e2e slow",
    "test_mosquitto": "e2e slow", "test_broker": "e2e slow", "test_replica": "e2e slow", "test_store": "e2e slow",
    "test_provision": "e2e slow", "test_signed_e2e": "e2e slow",
    "test_signing": "unit micropython", "test_signing_agreement": "micropython slow",
    "test_dashboard": "e2e browser",
    "test_hil": "hil slow", "test_mpremote": "hil slow", "test_flashing": "hil slow",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rpartition(".")[2]
        if module not in TIERS:
            raise pytest.UsageError(f"{module}: give it its tiers in conftest.TIERS")
        for mark in TIERS[module].split():
            item.add_marker(getattr(pytest.mark, mark))


# ---- options and the end-of-run summary ---------------------------------------------------

SUMMARY: list[str] = []  # lines tests want shown after the run (e.g. the power-cut table)


def pytest_terminal_summary(terminalreporter):
    if SUMMARY:
        terminalreporter.section("summary tables")
        for line in SUMMARY:
            terminalreporter.write_line(line)
