"""The replica answers bad input with `rejected`, keeps serving, and survives a restart, on
SQLite and on PostgreSQL."""

import json

import pytest

from firmware import contract
from conftest import new_site
from tools.control import shadows


def _answer(probe, timeout=5, documents=False):
    """The next answer from the replica (update/documents skipped unless asked for)."""
    while True:
        msg = probe.next_message(timeout)
        assert msg is not None, "no answer from the replica"
        if documents or not msg[0].endswith("/update/documents"):
            return msg[0].rsplit("/", 2)[-2:], json.loads(msg[1])


@pytest.fixture(params=["sqlite", "postgresql"])
def site(request, tmp_path):
    """Every case here runs against both stores (tools/shadowstore.py)."""
    s = new_site(tmp_path / "site")
    if request.param == "postgresql":
        s.use_shadow_store(request.getfixturevalue("postgres_url"))
    return s


@pytest.fixture
def operator(site, mqtt_probe):
    op = mqtt_probe("operator", site.service_password("operator"), "operator-t")
    assert op.connected() == 0
    assert op.subscribe("state/dev1/update/+") == [1]
    assert op.subscribe("state/dev1/get/+") == [1]
    return op


@pytest.mark.parametrize("payload,code", [
    (b"{broken", 400),
    (b'"a string"', 400),
    (json.dumps({"state": {"desired": 3}}).encode(), 400),
    (json.dumps({"state": {"desired": {"x": "y" * 9000}}}).encode(), 413),
    (json.dumps({"state": {"desired": {"x": 1}}, "clientToken": 5}).encode(), 400),
    (b'{"state":{"desired":' + b'{"a":' * 10 + b'1' + b'}' * 12, 400),  # deeper than MAX_DEPTH
    (b"[" * 8000 + b"]" * 8000, 400),  # deeper than the JSON decoder recurses
])
def test_bad_updates_are_rejected_and_the_service_stays_up(operator, payload, code):
    operator.publish("state/dev1/update", payload)
    (kind, outcome), doc = _answer(operator)
    assert (kind, outcome) == ("update", "rejected") and doc["code"] == code and doc["message"]
    operator.publish("state/dev1/update", json.dumps({"state": {"desired": {"ok": 1}}, "clientToken": "c1"}))
    (kind, outcome), doc = _answer(operator)
    assert outcome == "accepted" and doc["clientToken"] == "c1" and doc["version"] == 1


def test_a_utf16_document_is_refused_with_415_and_the_delta_says_who_caused_it(operator):
    body = {"state": {"desired": {"colour": "red"}}, "clientToken": "c16"}
    operator.publish("state/dev1/update", json.dumps(body).encode("utf-16"))
    (kind, outcome), doc = _answer(operator)
    assert (outcome, doc["code"]) == ("rejected", contract.R_UNSUPPORTED_ENCODING)
    operator.publish("state/dev1/update", json.dumps(body).encode())
    (_, outcome), accepted = _answer(operator)
    (_, kind), d = _answer(operator)
    assert (outcome, kind) == ("accepted", "delta")
    assert d["state"] == {"colour": "red"} and d["clientToken"] == "c16"
    assert d["metadata"] == {"colour": {"timestamp": accepted["timestamp"]}}


def test_get_before_any_update_is_404(operator):
    operator.publish("state/dev1/get", b"{}")
    (kind, outcome), doc = _answer(operator)
    assert (kind, outcome) == ("get", "rejected") and doc["code"] == contract.R_NOT_FOUND


def test_document_survives_a_replica_restart(site, services, operator):
    operator.publish("state/dev1/update", json.dumps({"state": {"desired": {"config": {"version": "2"}}}}))
    assert _answer(operator)[0][1] == "accepted"
    _answer(operator)  # the delta
    services.call(services.services.stop_replica())
    services.call(services.services.start_replica())
    operator.publish("state/dev1/get", json.dumps({"clientToken": "after"}))
    (kind, outcome), doc = _answer(operator)
    assert outcome == "accepted" and doc["clientToken"] == "after"
    assert doc["version"] == 1 and doc["state"]["desired"]["config"]["version"] == "2"
    assert doc["state"]["delta"] == {"config": {"version": "2"}}
    assert shadows.read(site.shadow_store)["dev1"].doc["version"] == 1  # it is in this backend's store


def test_documents_carry_previous_and_current_after_each_accepted_update(operator):
    operator.publish("state/dev1/update", json.dumps({"state": {"desired": {"a": 1, "b": {"c": 2}}}, "clientToken": "t1"}))
    first = [_answer(operator, documents=True) for _ in range(3)]  # accepted, delta, documents
    assert [k for k, _ in first] == [["update", "accepted"], ["update", "delta"], ["update", "documents"]]
    docs = first[2][1]
    assert docs["previous"] is None and docs["clientToken"] == "t1"
    assert docs["current"]["version"] == 1 and docs["current"]["state"] == {"desired": {"a": 1, "b": {"c": 2}}}
    assert docs["current"]["metadata"]["desired"]["b"]["c"]["timestamp"] == docs["timestamp"]
    operator.publish("state/dev1/update", json.dumps({"state": {"desired": {"b": None}, "reported": {"a": 1}}}))
    seen = [_answer(operator, documents=True) for _ in range(2)]  # accepted, documents (no delta left)
    assert [k for k, _ in seen] == [["update", "accepted"], ["update", "documents"]]
    docs = seen[1][1]
    assert docs["previous"]["version"] == 1 and docs["previous"]["state"]["desired"]["b"] == {"c": 2}
    assert docs["current"]["version"] == 2 and docs["current"]["state"] == {"desired": {"a": 1}, "reported": {"a": 1}}
    assert "clientToken" not in docs
    # A rejected update publishes no documents.
    operator.publish("state/dev1/update", json.dumps({"state": {"desired": {"a": 2}}, "version": 1}))
    (kind, outcome), doc = _answer(operator, documents=True)
    assert outcome == "rejected" and doc["code"] == contract.R_CONFLICT
    assert operator.next_message(1) is None


def test_a_request_with_a_client_token_is_applied_once(services, operator):
    # What a QoS 1 redelivery (or a client retrying) looks like: the same bytes again.
    req = json.dumps({"state": {"desired": {"n": 1}}, "clientToken": "once-1"})
    operator.publish("state/dev1/update", req)
    (_, outcome), first = _answer(operator)
    assert outcome == "accepted" and first["version"] == 1
    _answer(operator)  # delta
    operator.publish("state/dev1/update", json.dumps({"state": {"reported": {"m": 1}}}))  # no token: applied
    assert _answer(operator)[1]["version"] == 2  # (a report brings no delta)
    services.call(services.services.stop_replica())  # and across a restart
    services.call(services.services.start_replica())
    operator.publish("state/dev1/update", req)
    (_, outcome), again = _answer(operator)
    assert outcome == "accepted" and again == first  # the first answer, replayed
    operator.publish("state/dev1/get", json.dumps({"clientToken": "g"}))
    (kind, outcome), doc = _answer(operator)
    while kind != "get":  # skip the replayed delta
        (kind, outcome), doc = _answer(operator)
    assert doc["version"] == 2  # not applied a second time
    operator.publish("state/dev1/update", json.dumps({"state": {"desired": {"n": 1}}, "clientToken": "once-2"}))
    assert _answer(operator)[1]["version"] == 3  # another token is another request


def test_messages_that_arrive_together_share_one_transaction_and_fall_back_alone(site, monkeypatch):
    from tools.control.replica import Replica

    r = Replica(None, site.shadow_store, grant_key=None)
    try:
        batch = [("state/b1/update", json.dumps({"state": {"desired": {"n": i}}, "clientToken": f"t{i}"}).encode())
                 for i in range(5)]
        batch += [batch[4], ("state/b1/get", b"{}"), ("state/b2/get", b"{}")]  # t4 again: replayed
        outs = r.handle_many(batch)
        assert [o[0][1]["version"] for o in outs[:6]] == [1, 2, 3, 4, 5, 5]
        assert outs[5] == outs[4]
        get = outs[6][0][1]
        assert get["state"]["desired"] == {"n": 4} and get["version"] == 5  # sees the updates before it
        assert outs[7][0][1]["code"] == contract.R_NOT_FOUND
        # The store fails on the third write of the next batch: nothing of that batch may stay
        # committed, and each message is then handled alone, exactly once.
        calls = {"n": 0}
        put = r.db.put

        def flaky(*a, **kw):
            calls["n"] += 1
            if calls["n"] == 3:
                raise r.db.errors[0]("deadlock detected")
            return put(*a, **kw)
        monkeypatch.setattr(r.db, "put", flaky)
        more = [("state/b1/update", json.dumps({"state": {"desired": {"m": i}}, "clientToken": f"u{i}"}).encode())
                for i in range(4)]
        outs = r.handle_many(more)
        assert [o[0][1]["version"] for o in outs] == [6, 7, 8, 9]
        doc = r.db.get("b1")
        assert doc["version"] == 9 and doc["state"]["desired"] == {"n": 4, "m": 3}
    finally:
        r.db.close()


def test_a_request_the_store_failed_on_is_answered_once_the_store_works(site, operator, monkeypatch):
    """The replica keeps a request it could not store and tries it again: on this broker
    (amqtt drops unacknowledged messages when a client disconnects) nothing else would."""
    from tools.control.shadowstore import _Store

    failed = []
    put = _Store.put

    def put_failing_twice(self, *args, **kwargs):
        if len(failed) < 2:
            failed.append(args[0])
            raise self.errors[0]("disk I/O error")
        return put(self, *args, **kwargs)

    monkeypatch.setattr(_Store, "put", put_failing_twice)
    operator.publish("state/dev1/update", json.dumps({"state": {"desired": {"x": 1}}, "clientToken": "once"}))
    (kind, outcome), doc = _answer(operator, timeout=15)
    assert (kind, outcome) == ("update", "accepted") and doc["clientToken"] == "once" and doc["version"] == 1
    assert failed == ["dev1", "dev1"]
    assert shadows.read(site.shadow_store)["dev1"].doc["state"] == {"desired": {"x": 1}}
