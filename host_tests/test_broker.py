"""The broker confines each device to state/<its id>/ and refuses bad credentials.
(tools.control.acl's role rules, on both brokers and from the attacker's side: test_trust.py.)"""

import pytest

from conftest import wait_until


def test_device_cannot_reach_another_devices_topics(site, services, mqtt_probe):
    pw1, pw2 = site.creds.set("dev1"), site.creds.set("dev2")
    dev1 = mqtt_probe("dev1", pw1)
    dev2 = mqtt_probe("dev2", pw2)
    assert dev1.connected() == 0 and dev2.connected() == 0
    assert dev1.subscribe("state/dev1/update/delta") == [1]
    for foreign in ("state/dev2/update/delta", "state/+/update", "#", "state/#"):
        assert dev1.subscribe(foreign) == [128], foreign
    assert dev2.subscribe("state/dev2/#") == [1]
    # dev1 publishing on dev2's topics is dropped (3.1.1 has no publish refusal)
    dev1.publish("state/dev2/update/delta", b'{"state": {"evil": 1}}')
    dev1.publish("state/dev1/update", b'{"state": {"reported": {"ok": 1}}}')
    assert dev2.next_message(1.5) is None
    # while a legitimate message on dev2's topic does arrive: an answer, from the replica's identity
    replica = mqtt_probe("replica", site.service_password("replica"), "replica-test")
    assert replica.connected() == 0
    replica.publish("state/dev2/update/delta", b"{}")
    assert dev2.next_message(5) == ("state/dev2/update/delta", b"{}")


@pytest.mark.parametrize("who", ["wrong password", "anonymous", "client id is another device"])
def test_refused_connections(site, services, mqtt_probe, who):
    pw = site.creds.set("dev1")
    site.creds.set("dev2")
    if who == "wrong password":
        p = mqtt_probe("dev1", pw + "x")
    elif who == "anonymous":
        p = mqtt_probe("dev1", None)
    else:
        p = mqtt_probe("dev1", pw, client_id="dev2")
    rc = p.connected()
    assert rc not in (0, -1) or wait_until(lambda: not p.c.is_connected(), 5, "disconnect")
    assert rc != 0


def test_no_message_is_lost_while_other_clients_subscribe_and_leave(site, services, mqtt_probe):
    """amqtt 0.12.1 iterates its subscription table across awaits: a subscribe or disconnect
    in between raised 'dictionary changed size during iteration' and silently dropped the
    message being broadcast (tools/broker.py works around it). Churn while 300 messages flow."""
    import threading

    site.creds.set("dev1")
    op_pw = site.service_password("operator")
    sub = mqtt_probe("operator", op_pw, "operator-sub")
    pub = mqtt_probe("replica", site.service_password("replica"), "replica-pub")
    assert sub.connected() == 0 and pub.connected() == 0
    assert sub.subscribe("state/dev1/update/accepted") == [1]
    stop = threading.Event()

    def churn(i):
        from conftest import MQTTProbe

        while not stop.is_set():
            c = MQTTProbe(site, "operator", op_pw, f"operator-churn{i}")
            if c.connected() == 0:
                c.subscribe(f"state/dev{i}/#")
            c.close()

    threads = [threading.Thread(target=churn, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    try:
        for n in range(300):
            pub.publish("state/dev1/update/accepted", str(n).encode(), qos=1)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    got = set()
    while (m := sub.next_message(2)) is not None:
        got.add(int(m[1]))
    assert got == set(range(300))
