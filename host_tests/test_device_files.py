"""The device's own files under MicroPython: the update state (ota.json) and the config.

Both are read whole and parsed in one call (json.load on a stream reads it a byte at a time),
so a damaged file must be bounded: it may not exhaust the heap, and it must not stop a boot.
"""

import json

from conftest import run_micropython

STATE = """
import json
from firmware import state
st = state.load()
print(json.dumps({"fresh": st == state.fresh(), "phase": st["phase"], "written": st["written"]}))
"""


def _state_after(tmp_path, contents: bytes | None) -> dict:
    if contents is not None:
        (tmp_path / "ota.json").write_bytes(contents)
    proc = run_micropython(STATE, tmp_path, heapsize="64k")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_state_survives_a_save_and_a_load(tmp_path):
    proc = run_micropython("""
from firmware import state
st = state.fresh()
st.update(phase="downloading", written=65536, target={"url": "https://h/fw/x.bin", "version": "2.0.0",
          "sha256": "a" * 64, "size": 100000})
state.save(st)
""", tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    saved = json.loads((tmp_path / "ota.json").read_text())
    assert saved["phase"] == "downloading" and saved["written"] == 65536 and saved["target"]["size"] == 100000
    assert not (tmp_path / "ota.json.tmp").exists()
    assert _state_after(tmp_path, None) == {"fresh": False, "phase": "downloading", "written": 65536}


def test_damaged_state_files_give_a_fresh_state(tmp_path):
    fresh = {"fresh": True, "phase": "idle", "written": 0}
    assert _state_after(tmp_path, b'{"phase": "downloading", "writ') == fresh  # cut short
    assert _state_after(tmp_path, bytes(range(256)) * 4) == fresh  # not JSON
    # Valid JSON, but 200 KB: bigger than the whole heap; only its first 8 KiB are read.
    big = json.dumps({"phase": "downloading", "written": 4096, "pad": "x" * 200_000}).encode()
    assert _state_after(tmp_path, big) == fresh


CONFIG = """
from firmware import config
try:
    cfg = config.load()
    print("OK", cfg["device_id"], cfg["broker_host"], cfg["tls_name"])
except ValueError as e:
    print("ERR", e)
"""


def test_config_loads_and_refuses_an_oversized_file(tmp_path):
    (tmp_path / "ca.der").write_bytes(b"\x30\x03\x02\x01\x00")
    (tmp_path / "secrets.json").write_text(json.dumps({"mqtt_password": "pw"}))
    (tmp_path / "config.json").write_text(json.dumps({"device_id": "dev-1", "broker_host": "10.0.0.2"}))
    out = run_micropython(CONFIG, tmp_path).stdout
    assert "OK dev-1 10.0.0.2 10.0.0.2" in out
    (tmp_path / "config.json").write_text(json.dumps({"device_id": "dev-1", "broker_host": "10.0.0.2",
                                                      "wifi_ssid": "s" * 5000}))
    out = run_micropython(CONFIG, tmp_path).stdout
    assert "ERR config.json: longer than 4096 bytes" in out


def test_config_code_is_not_loaded_again_after_boot(tmp_path):
    """main() reads the config once and drops its module (~3 KiB of bytecode); the modules
    loaded later for TLS connections (link, the installer) must not bring it back."""
    proc = run_micropython("""
import sys
import firmware
from firmware import agent, config, unload
del config
unload("firmware.config")
from firmware import https, installer, link
print("LOADED" if "firmware.config" in sys.modules or hasattr(firmware, "config") else "DROPPED")
""", tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "DROPPED"
