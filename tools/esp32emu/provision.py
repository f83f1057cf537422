"""Create an emulated ESP32 for a site: identity, flash with a first image, filesystem."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from firmware import state
from tools.board.provision import check_device_id, copy_firmware, trusted_keys
from tools.esp32emu.runner import make_flash
from tools.espidf.images import check_app_image
from tools.site import Site
from tools.site.secretfile import write_private


def provision_emulated(site: Site, device_id: str, image: bytes, version: str,
                       directory: Path | None = None, config: dict | None = None,
                       compiled: bool = True) -> Path:
    """Make `<site>/devices/<id>` (or `directory`): flash.bin with `image` in ota_0 (as
    esptool leaves a board), fs/ with the firmware, config, secrets and the CA. Returns it.
    Raises ImageError for an image `image-check` refuses, with the same codes."""
    check_device_id(device_id)
    check_app_image(image)
    ep = site.endpoints()
    keys = trusted_keys(site)
    root = Path(directory) if directory else site.devices_dir / device_id
    root.mkdir(parents=True, exist_ok=True)
    make_flash(root / "flash.bin", image)
    fs = root / "fs"
    if fs.exists():
        shutil.rmtree(fs)
    copy_firmware(fs, compiled)
    password = site.creds.set(device_id)
    cfg = {"device_id": device_id, "broker_host": ep.host, "broker_port": ep.mqtt_port,
           "wifi_ssid": "emulated", "ntp_host": ep.host, "ntp_port": ep.ntp_port, "trusted_keys": keys}
    cfg.update(config or {})
    (fs / "config.json").write_text(json.dumps(cfg, indent=1))
    write_private(fs / "secrets.json", json.dumps({"mqtt_password": password}))
    shutil.copy2(site.pki.ca_der, fs / "ca.der")
    # What the factory flashed: the device reports this until it installs something else.
    st = state.fresh()
    st["images"]["ota_0"] = {"version": version, "sha256": hashlib.sha256(image).hexdigest(), "size": len(image),
                             "url": None}
    state.save(st, str(fs / state.PATH))
    return root
