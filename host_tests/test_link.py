"""The MQTT link (`firmware/link.py`) has a deadline on every wait, also inside umqtt's loops.

umqtt.simple's wait_msg() calls setblocking(True) after a packet's first byte, which on
MicroPython clears the socket's timeout: from then on, inside the same umqtt call (subscribe
waiting for its SUBACK, the rest of a packet), a broker that stops answering would hold the
board until the watchdog. Here a TLS broker on loopback answers CONNECT and then goes silent,
or sends half a packet; the firmware's link, under MicroPython on an emulated chip, must give
up within its `net_timeout_s` with an OSError.
"""

import json
import socket
import threading
import time

import pytest

from conftest import last_json_line, run_micropython
from tools.esp32emu.runner import chip_env, make_flash
from tools.espidf.images import build_app_image
from tools.site.pki import server_ssl_context
from tools.board.provision import CACHE
from tools.board.umqtt_fetch import fetch as fetch_umqtt

CLIENT = """
import json, time
from firmware.link import Link

cfg = {"device_id": "dev-1", "broker_host": "127.0.0.1", "broker_port": PORT, "tls_name": "127.0.0.1",
       "mqtt_password": "pw", "keepalive_s": 60, "net_timeout_s": 2, "ca_file": "ca.der"}
link = Link(cfg)
t0 = time.ticks_ms()
try:
    link.connect()
    if MODE == "half":
        link.poll(5000)  # the first byte of a PUBLISH arrives, the rest never does
    out = "no error"
except OSError as e:
    out = "OSError %s" % e.args[0]
print(json.dumps({"result": out, "ms": time.ticks_diff(time.ticks_ms(), t0)}))
link.close()
"""


def _packet(tls) -> tuple[int, bytes]:
    """One MQTT packet: (first byte, body)."""
    def take(n):
        data = b""
        while len(data) < n:
            chunk = tls.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    kind = take(1)[0]
    size, shift = 0, 0
    while True:
        b = take(1)[0]
        size |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return kind, take(size)


class SilentBroker:
    """TLS on loopback: answers CONNECT with CONNACK; "silent" then never answers SUBSCRIBE,
    "half" answers every SUBSCRIBE and then sends the first two bytes of a PUBLISH only."""

    def __init__(self, site, mode):
        self.ctx = server_ssl_context(site.pki)
        self.mode = mode
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(2)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        tls = self.ctx.wrap_socket(conn, server_side=True)
        self.conns.append(tls)
        tls.settimeout(30)
        try:
            _packet(tls)  # CONNECT
            tls.sendall(b"\x20\x02\x00\x00")
            subscribed = 0
            while True:
                kind, body = _packet(tls)
                if kind != 0x82 or self.mode == "silent":
                    continue
                tls.sendall(b"\x90\x03" + body[:2] + b"\x00")  # SUBACK for its packet id
                subscribed += 1
                if subscribed == 5:  # the link's last subscription
                    tls.sendall(b"\x30\x20")  # a PUBLISH of 32 bytes, none of which follow
        except (OSError, EOFError):
            return

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.mark.parametrize("mode", ["silent", "half"])
def test_a_broker_that_stops_answering_costs_a_timeout_not_a_hang(site, tmp_path, mode):
    fetch_umqtt(CACHE)
    broker = SilentBroker(site, mode)
    try:
        work = tmp_path / "dev"
        work.mkdir()
        (work / "ca.der").write_bytes(site.pki.ca_der.read_bytes())
        make_flash(work / "flash.bin", build_app_image("1.0.0", 64 * 1024))
        t0 = time.monotonic()
        out = run_micropython(f"PORT = {broker.port}\nMODE = {mode!r}\n" + CLIENT, work, chip_env(work / "flash.bin"),
                              timeout=60)
        res = last_json_line(out.stdout + out.stderr)
        print(mode, res)
        assert res["result"].startswith("OSError"), res
        assert res["ms"] < 10_000, res  # net_timeout_s is 2: a couple of deadlines at most
        assert time.monotonic() - t0 < 30
    finally:
        broker.close()
    assert json.dumps(res)
