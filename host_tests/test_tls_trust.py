"""The firmware talks only to servers the project CA vouches for, under the name it asked for.

Its two TLS clients, the MQTT link (`firmware/link.py`: umqtt.simple with CERT_REQUIRED, the
CA and `tls_name`) and the image download (`firmware/https.py`), run here under the
MicroPython unix port on an emulated chip against three TLS servers on loopback: one with the
site's own certificate, one whose certificate another CA signed, and one whose certificate
the site's CA signed for another name. Only the first may see a byte of MQTT or HTTP.
"""

import json
import socket
import ssl
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from conftest import last_json_line, run_micropython, wait_until
from tools.control.brokers import mosquitto
from tools.esp32emu.runner import chip_env, make_flash
from tools.espidf.images import build_app_image
from tools.site.pki import issue_server_cert, make_ca
from tools.board.provision import CACHE
from tools.board.umqtt_fetch import fetch as fetch_umqtt

CLIENT = """
import json
from firmware import https, trust
from firmware.link import Link

out = {}
for name, port in PORTS:
    cfg = {"device_id": "dev-1", "broker_host": "127.0.0.1", "broker_port": port, "tls_name": "127.0.0.1",
           "mqtt_password": "pw", "keepalive_s": 60, "net_timeout_s": 5, "ca_file": "ca.der"}
    link = Link(cfg)
    try:
        link.connect()
        mqtt = "connected"
    except Exception as e:
        mqtt = "%s: %s" % (type(e).__name__, e)
    link.close()
    try:
        ctx = trust.context(open("ca.der", "rb").read())  # as install.py makes it
        https.get(ctx, "https://127.0.0.1:%d/fw/x.bin" % port, None, 5).close()
        get = "answered"
    except Exception as e:
        get = "%s: %s" % (type(e).__name__, e)
    out[name] = [mqtt, get]
print(json.dumps(out))
"""


class TLSServer:
    """Accepts TLS connections with one certificate; records the first bytes each client
    sends after the handshake (b"" when the handshake failed), then closes."""

    def __init__(self, tmp_path, name, key, cert):
        pem_key, pem_cert = tmp_path / f"{name}.key", tmp_path / f"{name}.pem"
        pem_key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
        pem_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(pem_cert, pem_key)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.settimeout(5)
            try:
                with self.ctx.wrap_socket(conn, server_side=True) as tls:
                    self.received.append(tls.recv(64))
            except (OSError, ssl.SSLError):
                self.received.append(b"")
                conn.close()

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)


@pytest.fixture
def servers(site, tmp_path):
    ca_key = serialization.load_pem_private_key(site.pki.ca_key.read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(site.pki.ca_cert.read_bytes())
    other_key, other_ca = make_ca("some other CA")
    made = {
        "ours": TLSServer(tmp_path, "ours", *issue_server_cert(ca_key, ca_cert, ("127.0.0.1",))),
        "other_ca": TLSServer(tmp_path, "other_ca", *issue_server_cert(other_key, other_ca, ("127.0.0.1",))),
        "other_name": TLSServer(tmp_path, "other_name", *issue_server_cert(ca_key, ca_cert, ("store.example",))),
    }
    yield made
    for s in made.values():
        s.close()


def test_firmware_tls_clients_refuse_servers_the_ca_does_not_vouch_for(site, servers, tmp_path):
    fetch_umqtt(CACHE)
    work = tmp_path / "dev"
    work.mkdir()
    (work / "ca.der").write_bytes(site.pki.ca_der.read_bytes())
    make_flash(work / "flash.bin", build_app_image("1.0.0", 64 * 1024))
    ports = [(name, s.port) for name, s in servers.items()]
    out = run_micropython(f"PORTS = {ports!r}\n" + CLIENT, work, chip_env(work / "flash.bin"))
    res = last_json_line(out.stdout + out.stderr)
    for name, s in servers.items():  # each saw two connections (its thread may lag the client)
        wait_until(lambda: len(s.received) == 2, 10, f"{name}: both connections")

    # Our certificate: both clients get through TLS and speak (the test server then hangs up).
    assert servers["ours"].received[0][:1] == b"\x10"  # MQTT CONNECT
    assert servers["ours"].received[1].startswith(b"GET /fw/x.bin HTTP/1.1")
    assert res["ours"][0] != "connected"  # no CONNACK from this server
    # Another CA, or our CA for another name: refused in the handshake, nothing sent.
    for name, why in (("other_ca", "not correctly signed"), ("other_name", "does not match")):
        assert servers[name].received == [b"", b""], name
        for client in res[name]:
            assert client.startswith("ValueError") and why in client, (name, client)
    assert json.dumps(res)  # the whole verdict, for the log on failure


def _suite_given(site, port: int, offer: str) -> str:
    """The TLS 1.2 suite a server picks for a client that offers only `offer`, or "refused"."""
    ctx = ssl.create_default_context(cafile=str(site.pki.ca_cert))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(offer)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                return tls.cipher()[0]
    except ssl.SSLError:
        return "refused"


@pytest.mark.parametrize("server", ["store", "amqtt", "mosquitto"])
def test_servers_accept_only_forward_secret_aead_suites(site, services, tmp_path, server):
    """A recorded session stays closed to whoever gets a server key later (its passwords and
    download URLs with it): no RSA key exchange; no finite-field DHE either (in TLS 1.2 the
    server picks its group) and no CBC. mosquitto's default accepts all three, Python's CBC
    with SHA-256. MicroPython's ECDHE-RSA with AES-GCM is what the servers take."""
    if server == "mosquitto":
        if not mosquitto.available():
            pytest.skip("mosquitto is not installed")
        broker = mosquitto.Mosquitto(tmp_path / "mosquitto", site.pki)
        broker.add_user("dev1", "pw1")
        broker.start()
        ports = [broker.port, broker.service_port]
    else:
        broker = None
        ep = site.endpoints()
        ports = [ep.https_port if server == "store" else ep.mqtt_port]
    try:
        for port in ports:
            for weak in ("AES128-GCM-SHA256", "AES256-SHA256", "DHE-RSA-AES128-GCM-SHA256",
                         "ECDHE-RSA-AES128-SHA", "ECDHE-RSA-AES128-SHA256"):
                assert _suite_given(site, port, weak) == "refused", (server, port, weak)
            for good in ("ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-AES256-GCM-SHA384"):
                assert _suite_given(site, port, good) == good, (server, port, good)
    finally:
        if broker is not None:
            broker.stop()
