"""Shadow document rules (tools/shadow.py), without a broker: AWS IoT Device Shadow's, as
docs/shadow.md lists them."""

import json

import pytest

from firmware import contract
from tools.control.shadow import ShadowError, apply_update, compact_bytes, delta, get_response, parse_request


def upd(doc, state, **extra):
    return apply_update(doc, dict(state=state, **extra), now=1000)


def test_desired_then_reported_converges_and_delta_disappears():
    doc, acc, d = upd(None, {"desired": {"firmware": {"version": "2", "url": "u"}}})
    assert doc["version"] == 1 and acc["version"] == 1
    assert d == {"state": {"firmware": {"version": "2", "url": "u"}},
                 "metadata": {"firmware": {"version": {"timestamp": 1000}, "url": {"timestamp": 1000}}},
                 "version": 1, "timestamp": 1000}
    doc, acc, d = upd(doc, {"reported": {"firmware": {"version": "2", "url": "u", "state": "idle"}}})
    assert doc["version"] == 2 and d is None
    got = get_response(doc, None, 2000)
    assert got["state"].keys() == {"desired", "reported"} and got["timestamp"] == 2000  # when answered


def test_delta_carries_the_metadata_of_its_leaves_and_the_causing_clientToken():
    doc, _, _ = apply_update(None, {"state": {"desired": {"a": 1, "b": {"c": 2, "d": 3}, "e": [1, 2]}}}, now=10)
    doc, _, _ = apply_update(doc, {"state": {"reported": {"a": 1, "b": {"c": 2}}}}, now=20)
    doc, _, d = apply_update(doc, {"state": {"desired": {"b": {"d": 4}}}, "clientToken": "tok"}, now=30)
    assert d == {"state": {"b": {"d": 4}, "e": [1, 2]},
                 "metadata": {"b": {"d": {"timestamp": 30}}, "e": {"timestamp": 10}},
                 "version": 3, "timestamp": 30, "clientToken": "tok"}
    _, _, d = apply_update(doc, {"state": {"reported": {"x": 1}}}, now=40)
    assert d is None  # a report does not bring the delta back (AWS sends it when desired changes)
    _, _, d = apply_update(doc, {"state": {"desired": {"x": 1}}}, now=40)  # no token: none in the delta
    assert "clientToken" not in d and d["metadata"]["b"] == {"d": {"timestamp": 30}}


def test_accepted_stamps_every_leaf_the_request_set_deletions_too():
    doc, _, _ = upd(None, {"desired": {"a": 1, "b": {"c": 2}}, "reported": {"x": 1}})
    _, acc, _ = upd(doc, {"desired": {"a": None, "b": {"c": 3}}, "reported": None})
    assert acc["metadata"] == {"desired": {"a": {"timestamp": 1000}, "b": {"c": {"timestamp": 1000}}},
                               "reported": {"timestamp": 1000}}


def test_a_state_key_named_timestamp_keeps_its_metadata():
    doc, _, _ = upd(None, {"reported": {"clock": {"timestamp": 5, "zone": "UTC"}}})
    doc, _, _ = apply_update(doc, {"state": {"reported": {"clock": {"zone": "CET"}}}}, now=2000)
    assert doc["metadata"]["reported"]["clock"] == {"timestamp": {"timestamp": 1000}, "zone": {"timestamp": 2000}}


def test_true_is_not_1_and_false_is_not_0():
    assert delta({"on": True, "n": 0, "l": [False]}, {"on": 1, "n": False, "l": [0]}) == {"on": True, "n": 0, "l": [False]}
    assert delta({"n": 1, "f": 1.5}, {"n": 1, "f": 1.5}) == {}


def test_state_null_empties_the_document_and_keeps_its_version_going():
    doc, _, _ = upd(None, {"desired": {"a": 1}, "reported": {"a": 2}})
    doc, acc, d = upd(doc, None)
    assert (doc["state"], doc["metadata"], doc["version"], d) == ({}, {}, 2, None)
    doc, _, _ = upd(doc, {"reported": {"a": 3}})
    assert doc["version"] == 3


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


@pytest.mark.parametrize("payload,code,message", [
    (b"{not json", contract.R_BAD_REQUEST, "Invalid JSON"),
    (b"[1,2]", contract.R_BAD_REQUEST, "Invalid JSON"),
    (b"\xff\xfe", contract.R_UNSUPPORTED_ENCODING, "Unsupported documented encoding; supported encoding is UTF-8"),
    # UTF-16 with a byte order mark: Python's json would read it; only UTF-8 is a shadow document
    ('{"state": {"desired": {"a": 1}}}'.encode("utf-16"), contract.R_UNSUPPORTED_ENCODING, "Unsupported"),
    ('{"state": {"desired": {"a": 1}}}'.encode("utf-32"), contract.R_UNSUPPORTED_ENCODING, "Unsupported"),
    (json.dumps({"clientToken": "x" * 65}).encode(), contract.R_BAD_REQUEST, "Invalid clientToken"),
    (b"x" * 20000, contract.R_TOO_LARGE, "The payload exceeds the maximum size allowed"),
    (b'{"state": {"desired": {"x": NaN}}}', contract.R_BAD_REQUEST, "Invalid JSON"),  # Python's json takes these
    (b'{"state": {"desired": {"x": -Infinity}}}', contract.R_BAD_REQUEST, "Invalid JSON"),
    (b'{"state": {"desired": {"x": -1e400}}}', contract.R_BAD_REQUEST, "Invalid JSON"),  # json reads it as -inf
])
def test_bad_payloads(payload, code, message):
    with pytest.raises(ShadowError) as e:
        parse_request(payload)
    assert e.value.code == code and e.value.message.startswith(message)


@pytest.mark.parametrize("state,code,message", [
    ({}, contract.R_BAD_REQUEST, "State node must be an object"),
    ([], contract.R_BAD_REQUEST, "State node must be an object"),
    ({"desired": 5}, contract.R_BAD_REQUEST, "Desired node must be an object"),
    ({"reported": [1]}, contract.R_BAD_REQUEST, "Reported node must be an object"),
    ({"delta": {"a": 1}}, contract.R_BAD_REQUEST, "State contains an invalid node: 'delta'"),
    ({"desired": {"a": {"b": {"c": {"d": {"e": {"f": {"g": 1}}}}}}}}, contract.R_BAD_REQUEST,
     "JSON contains too many levels of nesting; maximum is 6"),
    ({"desired": {"colors": [None, "RED"]}}, contract.R_BAD_REQUEST, "Invalid JSON"),  # arrays can't hold null
    ({"reported": {"a": {"b": [[1, None]]}}}, contract.R_BAD_REQUEST, "Invalid JSON"),
    ({"desired": {"blob": "x" * 9000}}, contract.R_TOO_LARGE, "The payload exceeds the maximum size allowed"),
])
def test_bad_states(state, code, message):
    with pytest.raises(ShadowError) as e:
        upd(None, state)
    assert e.value.code == code and e.value.message.startswith(message)


def test_the_depth_limit_is_awss_example():
    upd(None, {"desired": {"one": {"two": {"three": {"four": {"five": {}}}}}}})  # AWS's own example: 6 levels
    with pytest.raises(ShadowError):
        upd(None, {"desired": {"one": {"two": {"three": {"four": {"five": {"six": {}}}}}}}})


def test_a_request_without_state_or_with_a_bad_version():
    with pytest.raises(ShadowError) as e:
        apply_update(None, {"clientToken": "t"}, now=1)
    assert (e.value.code, e.value.message, e.value.client_token) == (400, "Missing required node: state", "t")
    for v in ("1", 1.0, True):
        with pytest.raises(ShadowError) as e:
            upd(None, {"desired": {"a": 1}}, version=v)
        assert (e.value.code, e.value.message) == (400, "Invalid version")


def test_size_limit_counts_desired_plus_reported():
    doc, _, _ = upd(None, {"desired": {"a": "x" * 5000}})
    with pytest.raises(ShadowError) as e:
        upd(doc, {"reported": {"b": "y" * 5000}})
    assert e.value.code == contract.R_TOO_LARGE


def test_documents_with_what_json_allows_encode_and_count_in_utf8_bytes():
    # An integer beyond 64 bits (orjson refuses it: the standard encoder takes over) and
    # non-ASCII text (UTF-8 on the wire) come back as they went in.
    doc, acc, _ = upd(None, {"desired": {"big": 1 << 70, "name": "Zürich ☃"}})
    for msg in (doc, acc):
        assert json.loads(compact_bytes(msg)) == msg
    # The size limit counts the UTF-8 bytes of the compact document: "é" is 2 of them.
    upd(None, {"desired": {"s": "é" * 4000}})  # 8000 bytes of text, 8014 in all
    with pytest.raises(ShadowError) as e:
        upd(None, {"desired": {"s": "é" * 4100}})
    assert e.value.code == contract.R_TOO_LARGE
