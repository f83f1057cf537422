"""The wire contract behaves the same under CPython and the MicroPython unix port."""

import json

import pytest

from conftest import run_micropython
from firmware import contract

CASES = [
    ("parse_topic", ["state/dev1/update/delta"]),
    ("parse_topic", ["state/dev1/update"]),
    ("parse_topic", ["state/dev1/nope"]),
    ("parse_topic", ["state/+/update"]),
    ("parse_topic", ["other/dev1/update"]),
    ("valid_device_id", ["esp32-01_a"]),
    ("valid_device_id", ["a/b"]),
    ("valid_device_id", ["x" * 65]),
    ("valid_device_id", [""]),
    ("split_url", ["https://127.0.0.1:8443/fw/a.bin?x=1&y=2"]),
    ("split_url", ["https://example.org/"]),
    ("check_firmware", [{"url": "https://h/x", "version": "1", "sha256": "a" * 64, "size": 5}]),
    ("check_firmware", [{"url": "http://h/x", "version": "1", "sha256": "a" * 64, "size": 5}]),
    ("check_firmware", [{"url": "https://h/x", "version": "", "sha256": "a" * 64, "size": 5}]),
    ("check_firmware", [{"url": "https://h/x", "version": "1", "sha256": "A" * 64, "size": 5}]),
    ("check_firmware", [{"url": "https://h/x", "version": "1", "sha256": "a" * 64, "size": True}]),
    ("check_firmware", [{"url": "https://h/x", "version": "1", "sha256": "a" * 64, "size": 0}]),
    ("check_firmware", [{"url": "https://h/x", "version": 1, "sha256": "a" * 64, "size": 5}]),
    ("check_firmware", [["not", "a", "dict"]]),
    ("check_firmware", [{"url": "https://h/x", "version": "1", "sha256": "a" * 64, "size": 5, "allow_downgrade": True}]),
    ("check_firmware", [{"url": "https://h/x", "version": "1", "sha256": "a" * 64, "size": 5, "allow_downgrade": 1}]),
    ("check_firmware", [{"url": "https://h/x", "version": "1", "sha256": "a" * 64, "size": 5, "auth": "token"}]),
    ("check_firmware", [{"url": "https://h/x", "version": "1", "sha256": "a" * 64, "size": 5, "auth": "basic"}]),
    ("check_firmware", [{"url": "https://h/x", "version": "1", "sha256": "a" * 64, "size": 5, "auth": None}]),
    ("check_firmware", [{"url": "https://h/x", "version": "1", "sha256": "a" * 64, "size": 5, "grant": "1.ab"}]),
    ("parse_topic", ["state/dev1/credentials/get/accepted"]),
    ("compare_versions", ["1.10.0", "1.9"]),
    ("compare_versions", ["1.0", "1.0.0"]),
    ("compare_versions", ["0.9.9", "1.0"]),
    ("compare_versions", ["1.0-rc1", "1.0"]),
    ("compare_versions", ["1..0", "1.0"]),
]


def _run_cpython():
    out = []
    for fn, args in CASES:
        try:
            r = getattr(contract, fn)(*args)
            out.append(["ok", list(r) if isinstance(r, tuple) else r])
        except ValueError as e:
            out.append(["ValueError", str(e)])
    return out


MP_SCRIPT = """
import json
from firmware import contract
out = []
for fn, args in json.loads(%r):
    try:
        r = getattr(contract, fn)(*args)
        out.append(["ok", list(r) if isinstance(r, tuple) else r])
    except ValueError as e:
        out.append(["ValueError", str(e)])
print(json.dumps(out))
"""


def test_same_answers_under_micropython(tmp_path):
    proc = run_micropython(MP_SCRIPT % json.dumps(CASES), tmp_path)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == json.loads(json.dumps(_run_cpython()))


def test_topics_round_trip():
    for suffix in (contract.UPDATE, contract.UPDATE_DELTA, contract.GET_ACCEPTED):
        assert contract.parse_topic(contract.topic("d-1", suffix)) == ("d-1", suffix)


@pytest.mark.parametrize("bad", ["state/a/b/c/update", "state//update", "state/dev1"])
def test_parse_topic_rejects(bad):
    assert contract.parse_topic(bad) is None


def test_firmware_auth_is_token_or_absent():
    fw = {"url": "https://h/fw/x.bin", "version": "1", "sha256": "a" * 64, "size": 5}
    assert "auth" not in contract.check_firmware(dict(fw, auth=None))
    assert contract.check_firmware(dict(fw, auth="token"))["auth"] == "token"
    with pytest.raises(ValueError, match="auth"):
        contract.check_firmware(dict(fw, auth="basic"))
