# config.py Device configuration: defaults here, the site file config.json, secrets.json.
#
# config.json (written by provisioning): device_id, broker_host, broker_port, tls_name,
# wifi_ssid, ... ; secrets.json (never committed): mqtt_password, wifi_password.

import json

DEFAULTS = {
    "device_id": None,
    "broker_host": None,
    "broker_port": 8883,
    "tls_name": None,  # name the broker/store certificate is checked against; default: host
    "ca_file": "ca.der",
    "wifi_ssid": "",
    "wifi_password": "",
    "mqtt_password": None,
    "keepalive_s": 60,
    "net_timeout_s": 15,
    "health_deadline_s": 60,  # a new image must prove itself within this time, or roll back
    "wdt_ms": 120000,
    # TLS connections the board can hold at once. 1 (ESP32 without PSRAM): MQTT is closed
    # while the image downloads; 2: MQTT stays up and progress is reported live.
    "tls_slots": 1,
    "max_attempts": 3,  # tries per target for transient failures that make no progress
    "min_free_heap": 8192,  # below this (after parking MQTT) do not start a download
    "ntp_host": None,  # SNTP server for the clock; None: the frozen ntptime's default
    "ntp_port": 123,
    # Digests (hex) of the keys whose signed releases this device installs, at most three
    # (release.py; signing.json takes over once a release rotates them). Empty: unsigned.
    "trusted_keys": [],
}


_MAX_BYTES = 4096


def _read(path):
    try:
        with open(path) as f:
            text = f.read(_MAX_BYTES + 1)  # json.load(f) would read a byte at a time
    except OSError:
        return {}
    if len(text) > _MAX_BYTES:
        raise ValueError("%s: longer than %d bytes" % (path, _MAX_BYTES))
    d = json.loads(text)
    if not isinstance(d, dict):
        raise ValueError("%s: must hold a JSON object" % path)
    return d


def load(path="config.json", secrets="secrets.json"):
    """Merge defaults, config.json and secrets.json; raises ValueError naming what is wrong."""
    from firmware import contract

    cfg = dict(DEFAULTS)
    for src in (_read(path), _read(secrets)):
        for k in src:
            if k not in DEFAULTS:
                raise ValueError("unknown config key %r" % k)
            cfg[k] = src[k]
    if not contract.valid_device_id(cfg["device_id"]):
        raise ValueError("device_id: missing or invalid")
    for k in ("broker_host", "mqtt_password"):
        if not isinstance(cfg[k], str) or not cfg[k]:
            raise ValueError("%s: missing" % k)
    for k in ("broker_port", "keepalive_s", "net_timeout_s", "health_deadline_s", "wdt_ms",
              "tls_slots", "max_attempts", "min_free_heap", "ntp_port"):
        if not isinstance(cfg[k], int) or cfg[k] < 0:
            raise ValueError("%s: must be a non-negative integer" % k)
    keys = cfg["trusted_keys"]
    if not isinstance(keys, list) or len(keys) > contract.MAX_TRUSTED_KEYS:
        raise ValueError("trusted_keys: must list at most %d key digests" % contract.MAX_TRUSTED_KEYS)
    for k in keys:
        if not contract.is_sha256_hex(k):
            raise ValueError("trusted_keys: each is 64 lowercase hex digits")
    cfg["tls_name"] = cfg["tls_name"] or cfg["broker_host"]
    # Checked here (a missing CA is a config error, not a TLS failure later) but not kept: it
    # is read for each TLS connection, which parses it, so the heap does not hold its ~0.9 KB.
    with open(cfg["ca_file"], "rb"):
        pass
    return cfg
