"""The trust boundary, tried from the attacker's side on both brokers.

The attacker holds one device's password (or none at all, or the replica's database) and
nothing else. Every case ends with a legitimate update still served: the targeted device
downloads its own image, 200, hash right.
"""

import base64
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import REPO, MQTTProbe, https_get, wait_until, release, new_site
from firmware import contract
from tools.control import grants
from tools.control.brokers import mosquitto
from tools.control import presign
from tools.operator import client as op
from tools.espidf.images import build_app_image
from tools.control.services import ServicesThread
from tools.control.shadowstore import open_store
from tools.operator.status import fleet

QUIET_S = 2  # how long "nothing arrives" is watched for
NOT_AUTHORIZED = 135  # CONNACK 5 of MQTT 3.1.1, as paho reports it (MQTT 5's 0x87)


@pytest.fixture(params=["amqtt", "mosquitto"])
def services(request, site):
    if request.param == "mosquitto" and not mosquitto.available():
        pytest.skip("mosquitto is not installed (make test installs it: apt-get install mosquitto)")
    with ServicesThread(site, broker=request.param) as svc:
        yield svc


@pytest.fixture
def releases(site):
    """Two releases: {version: (release, image)}."""
    images = {v: build_app_image(v, 64 * 1024 + n) for n, v in enumerate(("1.0.0", "1.1.0"))}
    return {v: (release(site, img, v), img) for v, img in images.items()}


@pytest.fixture
def device(site, mqtt_probe):
    """device(name, **probe options): a device's connection (one password per name), subscribed
    to everything under its id; the broker delivers what its role may read."""
    passwords = {}

    def connect(name: str, **kw) -> MQTTProbe:
        if name not in passwords:
            passwords[name] = site.creds.set(name)
        # mosquitto learns a new password on the SIGHUP `serve` sends when the file changes
        deadline = time.monotonic() + 10
        while (dev := mqtt_probe(name, passwords[name], **kw)).connected() != 0:
            assert time.monotonic() < deadline, f"{name} could not log in"
            dev.close()
            time.sleep(0.2)
        dev.subscribe(contract.topic(name, "#"))
        dev.password = passwords[name]
        return dev

    return connect


def _watch(mqtt_probe, site, *devices) -> MQTTProbe:
    """An operator seeing every message on these devices' topics."""
    w = mqtt_probe("operator", site.service_password("operator"), "operator-watch")
    assert w.connected() == 0
    for d in devices:
        assert w.subscribe(contract.topic(d, "#")) == [1]
    return w


def _quiet(probe: MQTTProbe) -> list:
    """What arrives until nothing has for QUIET_S."""
    got = []
    while (m := probe.next_message(QUIET_S)) is not None:
        got.append(m)
    return got


def _legit_update(site, services, dev: MQTTProbe, name: str, release) -> None:
    """The operator targets the device (a temporary credential) and it downloads its image."""
    rel, image = release
    services.call(op.set_desired(site, name, rel, token=True))
    outcome, answer = dev.ask(contract.topic(name, contract.CREDENTIALS), {"sha256": rel.sha256})
    assert outcome == "accepted", answer
    status, _, body = https_get(site, site.endpoints().store_url + presign.artifact_path(rel.sha256),
                                {"Authorization": "Bearer " + answer["token"]})
    assert status == 200 and hashlib.sha256(body).hexdigest() == rel.sha256 and body == image


def test_a_will_may_publish_only_where_its_sender_may(site, services, mqtt_probe, device, releases):
    """A device's Last Will on another device's topics (or on its own answer topics, or retained)
    is refused at CONNECT by the embedded broker and never sent by mosquitto."""
    amqtt = services.services.broker_kind == "amqtt"
    victim = device("victim")
    watch = _watch(mqtt_probe, site, "victim", "evil")
    evil_pw = device("evil").password  # a login of its own
    fw = op.desired_firmware(site, "victim", releases["1.0.0"][0], allow_downgrade=True, token=True)
    desired = json.dumps({"state": {"desired": {"firmware": fw}}})
    for topic, retain in ((contract.topic("victim", contract.UPDATE), False),
                          (contract.topic("victim", contract.UPDATE_DELTA), True),
                          (contract.topic("victim", contract.GET_ACCEPTED), False),
                          (contract.topic("evil", contract.UPDATE_ACCEPTED), False)):
        evil = MQTTProbe(site, "evil", evil_pw, will=(topic, desired, retain))
        rc = evil.connected(3)
        if amqtt:
            assert rc == NOT_AUTHORIZED, f"a will on {topic} was let in"
        if rc == 0:
            evil.drop()
        evil.close()
    assert _quiet(watch) == [] and _quiet(victim) == []
    victim.close()
    victim = device("victim")  # subscribing anew: nothing was retained for it either
    assert _quiet(victim) == []
    _legit_update(site, services, victim, "victim", releases["1.1.0"])


def test_a_refused_connect_under_another_clients_id_changes_nothing(site, services, device, releases):
    """CONNECTs with no or wrong credentials, under a device's client id (clean and persistent
    session) and the ids a reader of our source would guess for the services, are refused and
    leave every session as it was, across the broker's next reload too: nobody is disconnected
    or stops receiving, and nobody's rights change. (On mosquitto 2.0.11 an anonymous CONNECT
    under the replica's id, then a reload, crashed the broker: service ids are not guessable.)"""
    ep = site.endpoints()
    victim = device("victim")
    keeper = device("keeper", clean_session=False)
    attempts = [("victim", None, None, True), ("victim", "victim", "wrong", True),
                ("keeper", "keeper", "wrong", False), ("keeper", "operator", "wrong", False),
                ("replica-replica", None, None, True), ("replica-replica", "replica", "wrong", False),
                ("operator-renewer", "operator", "wrong", True)]
    for client_id, user, password, clean in attempts:
        for port in {ep.mqtt_port, ep.service_mqtt_port}:
            squat = MQTTProbe(site, user, password, client_id, port=port, clean_session=clean)
            assert squat.connected(5) != 0, (client_id, user, port)
            squat.close()
    time.sleep(0.5)
    assert victim.drops == [] and keeper.drops == []
    if services.services.broker_kind == "amqtt":  # mosquitto grants any SUBACK and filters delivery
        assert keeper.subscribe("state/#") == [128]
    # Another device's valid login under their client ids: refused (amqtt) or given a session
    # named after its own login (mosquitto's devices' listener); theirs stay as they were.
    thief_pw = site.creds.set("thief")
    time.sleep(1)  # mosquitto's reload (the new login), after the refusals above
    for client_id, clean in (("victim", True), ("keeper", False)):
        thief = MQTTProbe(site, "thief", thief_pw, client_id, clean_session=clean)
        thief.connected(5)
        thief.close()
    time.sleep(0.5)
    assert victim.drops == [] and keeper.drops == []
    for dev, name in ((victim, "victim"), (keeper, "keeper")):  # the replica answers, and they hear it
        try:
            outcome, _ = dev.ask(contract.topic(name, contract.GET), {})
        except AssertionError:
            pid = services.services.broker._proc.proc.pid
            print("POLL", services.services.broker._proc.proc.poll(), open(f"/proc/{pid}/status").read()[:300] if os.path.exists(f"/proc/{pid}") else "gone", flush=True)
            import subprocess; print("SS", subprocess.run(["ss","-ltnp"],capture_output=True,text=True).stdout, flush=True)
            raise
        assert outcome in ("accepted", "rejected")
    _legit_update(site, services, victim, "victim", releases["1.1.0"])


def test_a_device_cannot_target_itself(site, services, mqtt_probe, device, releases):
    """Desired firmware a device writes into its own shadow is refused (no operator grant for
    it), whatever it copies from elsewhere; one edited into the database gets no token and no
    URL, and status shows it for what it is."""
    old, new = releases["1.0.0"][0], releases["1.1.0"][0]
    dev = device("selfish")
    topic = contract.topic("selfish", contract.UPDATE)

    def write(fw):
        return dev.ask(topic, {"state": {"desired": {"firmware": fw}}})

    mine = op.desired_firmware(site, "selfish", old, token=True)
    for fw in ({k: v for k, v in mine.items() if k != contract.GRANT},
               op.desired_firmware(site, "victim", old, token=True),  # another device's grant
               dict(mine, allow_downgrade=True),  # altered
               dict(mine, size=str(old.size))):
        outcome, answer = write(fw)
        assert (outcome, answer.get("code")) == ("rejected", 403), answer
    outcome, answer = dev.ask(contract.topic("selfish", contract.CREDENTIALS), {"sha256": old.sha256})
    assert (outcome, answer.get("code")) == ("rejected", 403)

    # A grant the device has seen cannot bring back what an operator has since replaced.
    earlier = op.desired_firmware(site, "selfish", old, allow_downgrade=True, token=True)
    earlier[contract.GRANT] = grants.make(site.grant_key, "selfish", earlier, int(time.time()) - 60)
    outcome, _ = services.call(op.request(site, "selfish", contract.UPDATE, {"state": {"desired": {"firmware": earlier}}}))
    assert outcome == "accepted"
    services.call(op.set_desired(site, "selfish", new, token=True))
    outcome, answer = write(earlier)
    assert (outcome, answer.get("code")) == ("rejected", 403) and "older" in answer["message"]
    # ... nor after it removes its desired firmware first (which needs no grant)
    outcome, _ = dev.ask(topic, {"state": {"desired": {"firmware": None}}})
    assert outcome == "accepted"
    outcome, answer = write(earlier)
    assert (outcome, answer.get("code")) == ("rejected", 403) and "older" in answer["message"]
    outcome, _ = dev.ask(topic, {"state": None})
    assert outcome == "accepted"
    outcome, answer = write(earlier)
    assert (outcome, answer.get("code")) == ("rejected", 403) and "older" in answer["message"]
    services.call(op.set_desired(site, "selfish", new, token=True))

    # The database's attacker: a desired firmware written past the replica gains nothing either.
    db = open_store(site.shadow_store)
    try:
        doc = db.rows(["selfish"])["selfish"][0]
        doc["state"]["desired"]["firmware"] = {"url": site.endpoints().store_url + presign.artifact_path(old.sha256),
                                               "version": old.version, "sha256": old.sha256, "size": old.size}
        assert db.put("selfish", dict(doc, version=doc["version"] + 1), doc["version"])
    finally:
        db.close()
    outcome, answer = dev.ask(contract.topic("selfish", contract.CREDENTIALS), {"sha256": old.sha256})
    assert (outcome, answer.get("code")) == ("rejected", 403)
    watch = _watch(mqtt_probe, site, "selfish")
    outcome, _ = dev.ask(topic, {"state": {"reported": {"firmware": {"state": "failed", "error": "url_expired",
                                                                      "need_url": True}}}})
    assert outcome == "accepted"
    renewals = [m for t, m in _quiet(watch) if t == topic and json.loads(m).get("clientToken") == "renewer"]
    assert renewals == []
    row = {r.device: r for r in fleet(site.shadow_store, site.grant_key)}["selfish"]
    assert (row.desired, row.granted) == (old.version, False)
    _legit_update(site, services, dev, "selfish", releases["1.1.0"])


def test_a_device_can_neither_forge_answers_nor_read_requests(site, services, mqtt_probe, device, releases):
    """Only the replica answers shadow requests (and operators credential requests); a device
    reads its answers, not the requests others make for it nor the documents history."""
    dev = device("forger")
    watch = _watch(mqtt_probe, site, "forger")
    forged = json.dumps({"state": {"desired": {"firmware": {"version": "6.6.6"}}}, "version": 99})
    for suffix in (contract.UPDATE_ACCEPTED, contract.UPDATE_REJECTED, contract.UPDATE_DELTA, contract.UPDATE_DOCUMENTS,
                   contract.GET_ACCEPTED, contract.GET_REJECTED, contract.CREDENTIALS_ACCEPTED,
                   contract.CREDENTIALS_REJECTED):
        dev.publish(contract.topic("forger", suffix), forged)
    assert _quiet(watch) == [] and _quiet(dev) == []

    rel, image = releases["1.1.0"]
    services.call(op.set_desired(site, "forger", rel))
    assert {contract.parse_topic(t)[1] for t, _ in _quiet(dev)} == {contract.UPDATE_ACCEPTED, contract.UPDATE_DELTA}
    fw = services.call(op.get_shadow(site, "forger"))["state"]["desired"]["firmware"]
    basic = base64.b64encode(f"forger:{dev.password}".encode()).decode()
    status, _, body = https_get(site, fw["url"], {"Authorization": "Basic " + basic})
    assert status == 200 and body == image


def test_secret_files_are_made_private_before_a_byte_is_written(tmp_path, monkeypatch):
    """Keys, passwords and a device's secrets.json: mode 0600 from the moment they exist, even
    under a umask that would leave them readable by everyone."""
    from tools.esp32emu.provision import provision_emulated
    from tools.site import Endpoints

    created: dict[int, int] = {}  # descriptor -> mode when the file was made
    placed: dict[str, int] = {}  # final name -> the mode its file was made with
    mkstemp, replace = tempfile.mkstemp, os.replace
    last_fd: dict[str, int] = {}

    def spy_mkstemp(*args, **kw):
        fd, name = mkstemp(*args, **kw)
        created[fd], last_fd[name] = os.fstat(fd).st_mode & 0o777, fd
        return fd, name

    def spy_replace(src, dst):
        if str(src) in last_fd:
            placed[str(dst)] = created[last_fd.pop(str(src))]
        return replace(src, dst)

    monkeypatch.setattr(tempfile, "mkstemp", spy_mkstemp)
    monkeypatch.setattr(os, "replace", spy_replace)
    old = os.umask(0)
    try:
        site = new_site(tmp_path / "site")
        site.write_endpoints(Endpoints("127.0.0.1", 1, 2, 3))
        root = provision_emulated(site, "dev1", build_app_image("1.0.0", 4096), "1.0.0", directory=tmp_path / "dev1")
        site.store_key, site.grant_key, site.service_password("operator")
    finally:
        os.umask(old)
    secret = [root / "fs" / "secrets.json", site.root / "store.key", site.root / "grant.key",
              site.root / "services.json", site.creds.path, site.creds.mosquitto_path, site.pki.server_key,
              site.pki.ca_key]
    assert {str(p): p.stat().st_mode & 0o777 for p in secret} == {str(p): 0o600 for p in secret}
    # each was written under another name, made 0600 before its first byte, and renamed into place
    assert {str(p): placed.get(str(p)) for p in secret} == {str(p): 0o600 for p in secret}


def test_a_service_client_id_is_stable_and_known_only_to_its_password():
    """The same across restarts (the broker keeps a replica worker's session), a name no device
    may take, and different under another password: no one without it can aim at the id."""
    from tools.site.identities import reserved_id, service_client_id

    ids = {service_client_id("replica", "pw-a", "replica"), service_client_id("replica", "pw-a", "replica")}
    assert len(ids) == 1 and reserved_id(ids.pop())
    others = {service_client_id("replica", "pw-b", "replica"), service_client_id("replica", "pw-a", "w1"),
              service_client_id("operator", "pw-a", "replica"), "replica-replica"}
    assert service_client_id("replica", "pw-a", "replica") not in others and len(others) == 4


@pytest.mark.parametrize("name", ["operator", "replica", "replica-w0", "operator-renewer"])
def test_a_service_identity_cannot_be_provisioned_or_revoked_as_a_device(site, tmp_path, name):
    from tools.site import Endpoints

    site.write_endpoints(Endpoints("127.0.0.1", 1, 2, 3))
    password = site.service_password("operator")
    image = tmp_path / "a.bin"
    image.write_bytes(build_app_image("1.0.0", 4096))
    for argv in (["provision", name, "--image", str(image), "--version", "1.0.0"], ["revoke", name]):
        out = subprocess.run([sys.executable, "-m", "tools", *argv, "--site", str(site.root)], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 1 and "service identity" in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert site.creds.verify("operator", password)


def test_nothing_is_retained_for_later_subscribers(site, services, mqtt_probe, device, releases):
    """A retained message (a publish, or a will, on the sender's own request topic) would reach
    every later subscriber; neither broker keeps one."""
    evil = device("evil")
    evil.c.publish(contract.topic("evil", contract.UPDATE), b'{"state": {"reported": {"x": 1}}}', qos=1,
                   retain=True)
    time.sleep(0.5)
    dropper = MQTTProbe(site, "evil", evil.password, "evil",
                        will=(contract.topic("evil", contract.UPDATE), b'{"state": {}}', True))
    if dropper.connected(3) == 0:
        dropper.drop()
    dropper.close()
    watch = _watch(mqtt_probe, site, "evil")  # subscribes only now
    assert [t for t, _ in _quiet(watch)] == []


def test_an_oversized_packet_costs_its_sender_the_connection_and_nothing_else(site, services, device, releases):
    from tools.control.brokers import MAX_PACKET_BYTES

    big = device("big")
    other = device("other")
    big.c.publish(contract.topic("big", contract.UPDATE), b"{" * (MAX_PACKET_BYTES + 1), qos=0)
    wait_until(lambda: big.drops, 15, "the oversized sender to be cut off")
    assert other.drops == []
    _legit_update(site, services, other, "other", releases["1.1.0"])


def test_a_will_is_not_sent_for_an_identity_revoked_since_its_connect(site, services, mqtt_probe, device):
    from tools.board.provision import revoke

    watch = _watch(mqtt_probe, site, "gone")
    pw = site.creds.set("gone")
    time.sleep(1)  # mosquitto's reload
    dev = MQTTProbe(site, "gone", pw, will=(contract.topic("gone", contract.UPDATE),
                                            b'{"state": {"reported": {"last": "will"}}}', False))
    assert dev.connected(5) == 0
    assert revoke(site, "gone")
    time.sleep(1.5)
    if dev.c.is_connected():  # amqtt keeps the connection, refusing all it does
        dev.drop()
    dev.close()
    assert _quiet(watch) == []


def test_no_request_a_device_sends_stops_the_renewer(site, services, device, releases):
    """The renewer serves the whole fleet: thousands of nested brackets (past the JSON
    decoder's recursion), bytes that are not UTF-8, or a request without a hash each cost it
    that message alone."""
    dev = device("hostile")
    for payload in (b"[" * 5000, b"\xff\xfe{}", b"{}", b'{"sha256": 5}', b"[]"):
        dev.publish(contract.topic("hostile", contract.CREDENTIALS), payload)
    time.sleep(0.5)
    _legit_update(site, services, dev, "hostile", releases["1.1.0"])
