"""Provisioning a real board and revoking a device; server certificates that name the serve address."""

import json
import os
import stat
import subprocess
import sys

import pytest
from cryptography import x509

from conftest import REPO, wait_until, release
from tools.site.pki import cert_names
from tools.board.provision import provision_board, revoke
from tools.site import Site


def test_provision_board_writes_what_deploy_copies(site, services, tmp_path):
    out = provision_board(site, "board-7", tmp_path / "cfg", "lab", "hunter2", host="192.0.2.10")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["device_id"] == "board-7" and cfg["broker_host"] == "192.0.2.10"
    assert cfg["broker_port"] == site.endpoints().mqtt_port and cfg["ntp_port"] == site.endpoints().ntp_port
    secrets = json.loads((out / "secrets.json").read_text())
    assert secrets["wifi_password"] == "hunter2"
    assert stat.S_IMODE((out / "secrets.json").stat().st_mode) == 0o600
    assert site.creds.verify("board-7", secrets["mqtt_password"])  # the broker and the store use this file
    assert (out / "ca.der").read_bytes() == site.pki.ca_der.read_bytes()
    assert not (out / "ota.json").exists()


def test_provision_board_refuses_loopback_and_bad_ids(site, services, tmp_path):
    with pytest.raises(ValueError, match="loopback"):
        provision_board(site, "board-7", tmp_path / "cfg", "lab", "pw")  # serve listens on 127.0.0.1
    with pytest.raises(ValueError, match="every interface"):
        provision_board(site, "board-7", tmp_path / "cfg", "lab", "pw", host="0.0.0.0")
    with pytest.raises(ValueError, match="invalid device id"):
        provision_board(site, "a/b", tmp_path / "cfg", "lab", "pw", host="192.0.2.10")
    assert "board-7" not in site.creds.names()


def test_revoked_device_loses_the_broker_and_the_store_at_once(site, services, mqtt_probe):
    import base64
    import ssl
    import urllib.error
    import urllib.request

    from tools.control import presign
    from tools.espidf.images import build_app_image

    pw = site.creds.set("dev1")
    live = mqtt_probe("dev1", pw)
    assert live.connected() == 0 and live.subscribe("state/dev1/update/delta") == [1]
    op = mqtt_probe("replica", site.service_password("replica"), "replica-revoke")  # answers: the replica's
    assert op.connected() == 0
    op.publish("state/dev1/update/delta", b"1")
    assert live.next_message(5) == ("state/dev1/update/delta", b"1")
    rel = release(site, build_app_image("1.0.0", 50_000), "1.0.0")
    url = presign.sign(site.store_key, site.endpoints().store_url, rel.sha256, "dev1", 300)

    def download() -> int:
        req = urllib.request.Request(url, headers={"Authorization": "Basic " + base64.b64encode(f"dev1:{pw}".encode()).decode()})
        try:
            with urllib.request.urlopen(req, context=ssl.create_default_context(cafile=str(site.pki.ca_cert)), timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    assert download() == 200
    assert revoke(site, "dev1") and not revoke(site, "dev1")
    assert download() == 403  # even with a URL signed before the revocation
    # The connection it already had: no more deliveries, no new subscriptions.
    op.publish("state/dev1/update/delta", b"2")
    assert live.next_message(2) is None
    assert live.subscribe("state/dev1/update/accepted") == [128]
    again = mqtt_probe("dev1", pw, client_id="dev1")
    assert again.connected() != 0 or wait_until(lambda: not again.c.is_connected(), 5, "refusal")


def test_server_certificate_is_reissued_to_name_the_serve_address(tmp_path):
    first = Site(tmp_path / "s")
    ca = first.pki.ca_der.read_bytes()
    assert cert_names(x509.load_pem_x509_certificate(first.pki.server_cert.read_bytes())) == {"127.0.0.1", "localhost"}
    lan = Site(tmp_path / "s", ("192.0.2.10", "ota.lab"))
    cert = lan.pki.server_cert.read_bytes()
    assert cert_names(x509.load_pem_x509_certificate(cert)) == {"127.0.0.1", "localhost", "192.0.2.10", "ota.lab"}
    assert lan.pki.ca_der.read_bytes() == ca  # same CA: provisioned boards keep trusting it
    Site(tmp_path / "s", ("192.0.2.10",))
    assert lan.pki.server_cert.read_bytes() == cert  # covered already: not reissued


def test_cli_provision_board_and_revoke(site, services, tmp_path):
    env = dict(os.environ, WIFI_PASSWORD="pw")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "tools", *args, "--site", str(site.root)],
                              cwd=REPO, capture_output=True, text=True, env=env, timeout=60)

    r = cli("provision-board", "board-9", "--out", str(tmp_path / "b9"), "--wifi-ssid", "lab")
    assert r.returncode == 1 and "loopback" in r.stderr
    r = cli("provision-board", "board-9", "--out", str(tmp_path / "b9"), "--wifi-ssid", "lab",
            "--broker-host", "192.0.2.10")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "b9" / "secrets.json").read_text())["wifi_password"] == "pw"
    assert cli("revoke", "board-9").returncode == 0
    r = cli("revoke", "board-9")
    assert r.returncode == 1 and "no device board-9" in r.stderr
