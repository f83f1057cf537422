"""Shadow document rules (tools/shadow.py), without a broker."""

import json

import pytest

from firmware import contract
from tools.shadow import ShadowError, apply_update, compact_bytes, delta, get_response, parse_request


def upd(doc, state, **extra):
    return apply_update(doc, dict(state=state, **extra), now=1000)


def test_desired_then_reported_converges_and_delta_disappears():
    doc, acc, d = upd(None, {"desired": {"firmware": {"version": "2", "url": "u"}}})
    assert doc["version"] == 1 and acc["version"] == 1
    assert d == {"state": {"firmware": {"version": "2", "url": "u"}}, "version": 1, "timestamp": 1000}
    doc, acc, d = upd(doc, {"reported": {"firmware": {"version": "2", "url": "u", "state": "idle"}}})
    assert doc["version"] == 2 and d is None
    assert get_response(doc, None)["state"].keys() == {"desired", "reported"}


def test_nested_merge_and_null_deletes():
    doc, _, _ = upd(None, {"reported": {"a": {"x": 1, "y": 2}, "b": 1}})
    doc, _, _ = upd(doc, {"reported": {"a": {"y": None, "z": 3}, "b": None}})
    assert doc["state"]["reported"] == {"a": {"x": 1, "z": 3}}
    assert doc["metadata"]["reported"]["a"]["z"] == {"timestamp": 1000}
    doc, _, _ = upd(doc, {"reported": None})
    assert "reported" not in doc["state"]


def test_delta_compares_leaves():
    assert delta({"f": {"v": 2, "u": "x"}}, {"f": {"v": 2, "u": "y", "s": "idle"}}) == {"f": {"u": "x"}}
    assert delta({"f": [1, 2]}, {"f": [1, 2]}) == {}
    assert delta({"f": 1}, {}) == {"f": 1}


def test_version_must_match_when_given():
    doc, _, _ = upd(None, {"desired": {"a": 1}})
    with pytest.raises(ShadowError) as e:
        upd(doc, {"desired": {"a": 2}}, version=7, clientToken="t1")
    assert e.value.code == contract.R_CONFLICT and e.value.payload()["clientToken"] == "t1"
    doc, acc, _ = upd(doc, {"desired": {"a": 2}}, version=1, clientToken="t2")
    assert doc["version"] == 2 and acc["clientToken"] == "t2"


@pytest.mark.parametrize("payload,code", [
    (b"{not json", contract.R_BAD_REQUEST),
    (b"[1,2]", contract.R_BAD_REQUEST),
    (b"\xff\xfe", contract.R_BAD_REQUEST),
    (json.dumps({"clientToken": "x" * 65}).encode(), contract.R_BAD_REQUEST),
    (b"x" * 20000, contract.R_TOO_LARGE),
    (b'{"state": {"desired": {"x": NaN}}}', contract.R_BAD_REQUEST),  # Python's json takes these
    (b'{"state": {"desired": {"x": -Infinity}}}', contract.R_BAD_REQUEST),
    (b'{"state": {"desired": {"x": -1e400}}}', contract.R_BAD_REQUEST),  # json reads it as -inf
])
def test_bad_payloads(payload, code):
    with pytest.raises(ShadowError) as e:
        parse_request(payload)
    assert e.value.code == code


@pytest.mark.parametrize("state,code", [
    ({}, contract.R_BAD_REQUEST),
    ({"desired": 5}, contract.R_BAD_REQUEST),
    ({"delta": {"a": 1}}, contract.R_BAD_REQUEST),
    ({"desired": {"a": {"b": {"c": {"d": {"e": {"f": {"g": 1}}}}}}}}, contract.R_BAD_REQUEST),
    ({"desired": {"blob": "x" * 9000}}, contract.R_TOO_LARGE),
])
def test_bad_states(state, code):
    with pytest.raises(ShadowError) as e:
        upd(None, state)
    assert e.value.code == code


def test_size_limit_counts_desired_plus_reported():
    doc, _, _ = upd(None, {"desired": {"a": "x" * 5000}})
    with pytest.raises(ShadowError) as e:
        upd(doc, {"reported": {"b": "y" * 5000}})
    assert e.value.code == contract.R_TOO_LARGE


def test_documents_with_what_json_allows_encode_and_count_as_before():
    # An integer beyond 64 bits (orjson refuses it: the standard encoder takes over) and
    # non-ASCII text (UTF-8 on the wire) come back as they went in.
    doc, acc, _ = upd(None, {"desired": {"big": 1 << 70, "name": "Zürich ☃"}})
    for msg in (doc, acc):
        assert json.loads(compact_bytes(msg)) == msg
    # The size limit counts the document as escaped ASCII, as it always has: 1400 "é" are
    # 2800 bytes of UTF-8 but 8400 escaped.
    with pytest.raises(ShadowError) as e:
        upd(None, {"desired": {"s": "é" * 1400}})
    assert e.value.code == contract.R_TOO_LARGE
