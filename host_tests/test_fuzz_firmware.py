"""Fuzzed shadow messages against the firmware's message handling, under MicroPython.

Hypothesis generates thousands of deltas and get/accepted documents (arbitrary JSON, near
misses of the firmware schema, raw bytes that are not JSON); one MicroPython process runs
Agent.handle_message on each, on an emulated chip, with the link replaced
by a recorder and what it decides to install collected. Nothing may escape, and anything the agent decides to install must pass the
contract's own check.
"""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import chip_env, run_micropython
from firmware import contract
from tools.esp32emu.runner import make_flash
from tools.espidf.images import build_app_image
from tools.board.provision import copy_firmware

N = 3000

json_leaf = st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=40)
json_any = st.recursive(json_leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4),
                        max_leaves=12)
near_fw = st.fixed_dictionaries({}, optional={
    "url": st.sampled_from(["https://127.0.0.1:1/fw/x.bin", "http://x", "", "https://" + "a" * 2000]) | json_any,
    "version": st.sampled_from(["1.0.0", "0.1", "9" * 40, ""]) | json_any,
    "sha256": st.sampled_from(["a" * 64, "A" * 64, "a" * 63, "z" * 64]) | json_any,
    "size": st.sampled_from([1, 0, -5, 2**40, 4096, True]) | json_any,
    "allow_downgrade": st.booleans() | json_any,
})
hexsha = st.text("0123456789abcdef", min_size=64, max_size=64)
valid_fw = st.fixed_dictionaries({
    "url": st.just("https://127.0.0.1:1/fw/x.bin?device=fuzz"),
    "version": st.sampled_from(["0.9.0", "1.0.0", "1.1.0", "2.0", "beta"]),
    "sha256": hexsha, "size": st.integers(1, 2 * 1024 * 1024)},
    optional={"allow_downgrade": st.booleans()})


def _mutate(fw_and_change):
    fw, (key, value, drop) = fw_and_change
    fw = dict(fw)
    if drop:
        fw.pop(key, None)
    else:
        fw[key] = value
    return fw


mutated_fw = st.tuples(valid_fw, st.tuples(st.sampled_from(["url", "version", "sha256", "size", "allow_downgrade", "x"]),
                                          json_any, st.booleans())).map(_mutate)
any_fw = valid_fw | mutated_fw | near_fw | json_any
documents = st.fixed_dictionaries({"state": st.fixed_dictionaries({}, optional={
    "desired": st.fixed_dictionaries({"firmware": any_fw}) | json_any,
    "reported": json_any,
    "delta": json_any})}, optional={"version": st.integers(-3, 10**6) | json_any, "clientToken": json_any})
deltas = st.fixed_dictionaries({"state": st.fixed_dictionaries({"firmware": any_fw}) | json_any},
                               optional={"version": st.integers(-3, 10**6) | json_any})
payloads = (documents.map(lambda d: json.dumps(d).encode()) | deltas.map(lambda d: json.dumps(d).encode())
            | json_any.map(lambda d: json.dumps(d).encode()) | st.binary(max_size=64))
messages = st.tuples(st.sampled_from([contract.UPDATE_DELTA, contract.GET_ACCEPTED, contract.GET_REJECTED,
                                      contract.UPDATE_REJECTED]), payloads)

FUZZ = """
import json, binascii
from firmware import agent as device, contract

class Link:
    def __init__(self):
        self.inbox = []
        self.gets = 0
        self.reports = 0
    def request_get(self, token=None):
        self.gets += 1
    def report(self, fw, token=None):
        json.dumps(fw)
        self.reports += 1
    def close(self):
        pass

cfg = {"device_id": "fuzz", "mqtt_password": "x", "ca": b"", "trusted_keys": [], "net_timeout_s": 1, "tls_slots": 2,
       "max_attempts": 3, "health_deadline_s": 1, "min_free_heap": 0}
agent = device.Agent(cfg)
agent.link = Link()
installs = []
bad = 0
n = 0
with open("cases.jsonl") as f:
    for line in f:
        suffix, hexmsg = json.loads(line)
        msg = binascii.unhexlify(hexmsg)
        try:
            action = agent.handle_message(suffix, msg)
            if action is not None:
                installs.append(action[0])
        except Exception as e:
            bad += 1
            print("ESCAPED", repr(e), suffix, hexmsg[:200])
        n += 1
for fw in installs:
    if contract.check_firmware(fw) != fw:
        print("BAD INSTALL", fw)
        bad += 1
print(json.dumps({"cases": n, "escaped": bad, "installs": len(installs), "gets": agent.link.gets,
                  "reports": agent.link.reports}))
"""


def test_firmware_survives_fuzzed_messages(tmp_path):
    cases = []

    # Hypothesis here is a generator of varied cases, not a shrinker: a failure prints the
    # offending messages (hex), which reproduce by feeding them to Agent.handle_message.
    @settings(max_examples=N, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(messages)
    def collect(m):
        cases.append(m)

    collect()
    fs = tmp_path / "fs"
    copy_firmware(fs)
    (fs / "cases.jsonl").write_text("".join(json.dumps([s, p.hex()]) + "\n" for s, p in cases))
    make_flash(tmp_path / "flash.bin", build_app_image("1.0.0", 80_000))
    proc = run_micropython(FUZZ, fs, chip_env(tmp_path / "flash.bin"), heapsize="256k", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["cases"] == len(cases) >= N * 0.9
    assert summary["escaped"] == 0, proc.stdout[-5000:]
    # the interesting paths were reached, not only the parse errors (observed: 8-33 installs,
    # 91-118 gets per 3000 cases)
    assert summary["installs"] >= 5 and summary["gets"] >= 50 and summary["reports"] >= 1, summary
