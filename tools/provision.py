"""Create an emulated ESP32 for a site: identity, flash with a first image, filesystem."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from firmware import contract
from tools.esp32emu.runner import make_flash
from tools.mpy import compile_tree
from tools.site import Site
from tools.umqtt_fetch import fetch as fetch_umqtt

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "build" / "cache"


def copy_firmware(fs: Path, compiled: bool = True) -> None:
    """boot.py, main.py, firmware/ and lib/umqtt/simple onto a device filesystem; modules as
    .mpy (compiled with mpy-cross, as a deploy to a board does) unless compiled=False."""
    fs.mkdir(parents=True, exist_ok=True)
    for name in ("boot.py", "main.py"):
        shutil.copy2(REPO / name, fs / name)
    umqtt = fetch_umqtt(CACHE)
    if not compiled:
        shutil.copytree(REPO / "firmware", fs / "firmware", dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
        (fs / "lib" / "umqtt").mkdir(parents=True, exist_ok=True)
        shutil.copy2(umqtt, fs / "lib" / "umqtt" / "simple.py")
        return
    built = compile_tree(sorted((REPO / "firmware").glob("*.py")), CACHE / "firmware-mpy", REPO)
    shutil.copytree(built / "firmware", fs / "firmware", dirs_exist_ok=True)
    compiled_umqtt = compile_tree([umqtt], CACHE / "umqtt-mpy", CACHE)
    shutil.copytree(compiled_umqtt / "umqtt", fs / "lib" / "umqtt", dirs_exist_ok=True)


def provision_emulated(site: Site, device_id: str, image: bytes, version: str,
                       directory: Path | None = None, config: dict | None = None,
                       compiled: bool = True) -> Path:
    """Make `<site>/devices/<id>` (or `directory`): flash.bin with `image` in ota_0 (as
    esptool leaves a board), fs/ with the firmware, config, secrets and the CA. Returns it."""
    if not contract.valid_device_id(device_id):
        raise ValueError(f"invalid device id {device_id!r}")
    ep = site.endpoints()
    root = Path(directory) if directory else site.devices_dir / device_id
    root.mkdir(parents=True, exist_ok=True)
    make_flash(root / "flash.bin", image)
    fs = root / "fs"
    if fs.exists():
        shutil.rmtree(fs)
    copy_firmware(fs, compiled)
    password = site.creds.set(device_id)
    cfg = {"device_id": device_id, "broker_host": ep.host, "broker_port": ep.mqtt_port,
           "wifi_ssid": "emulated", "ntp_host": ep.host, "ntp_port": ep.ntp_port}
    cfg.update(config or {})
    (fs / "config.json").write_text(json.dumps(cfg, indent=1))
    (fs / "secrets.json").write_text(json.dumps({"mqtt_password": password}))
    shutil.copy2(site.pki.ca_der, fs / "ca.der")
    # What the factory flashed: the device reports this until it installs something else.
    record = {"version": version, "sha256": hashlib.sha256(image).hexdigest(), "size": len(image), "url": None}
    ota = {"phase": "idle", "target": None, "slot": None, "error": None, "attempts": 0,
           "images": {"ota_0": record}}
    (fs / "ota.json").write_text(json.dumps(ota))
    return root
