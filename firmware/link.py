# link.py The MQTT link to the broker: umqtt.simple over verified TLS, with bounded waits.
#
# Works with the umqtt.simple frozen into ESP32 builds (>= 1.6) and with the 1.3.4 sdist the
# emulator uses: both accept ssl=True + ssl_params and call ssl.wrap_socket(sock, **params).
# umqtt opens its own socket and its wait_msg() calls setblocking(True), which clears any
# timeout; so the link hands umqtt a socket factory that sets one, and re-arms it after each
# umqtt call. Incoming packets are only read when poll() says data is there.

import json
import select
import socket
import time

from umqtt import simple as umqtt

from firmware import contract

_INBOX_MAX = 8


class _Sockets:
    # Stands in for the `socket` module inside umqtt.simple.
    def __init__(self, timeout_s):
        self.timeout_s = timeout_s
        self.last = None

    def socket(self, *args):
        s = socket.socket(*args)
        s.settimeout(self.timeout_s)
        try:
            s.setsockopt(6, 1, 1)  # TCP_NODELAY: small packets, latency matters
        except OSError:
            pass
        self.last = s
        return s

    def getaddrinfo(self, *args):
        return socket.getaddrinfo(*args)


class Link:
    def __init__(self, cfg):
        import ssl

        self.cfg = cfg
        self.device_id = cfg["device_id"]
        self.keepalive_s = cfg["keepalive_s"]
        self.inbox = []
        self._sockets = _Sockets(cfg["net_timeout_s"])
        umqtt.socket = self._sockets
        self.client = umqtt.MQTTClient(
            self.device_id,
            cfg["broker_host"],
            cfg["broker_port"],
            user=self.device_id,
            password=cfg["mqtt_password"],
            keepalive=self.keepalive_s,
            ssl=True,
            ssl_params={
                "server_hostname": cfg["tls_name"],
                "cert_reqs": ssl.CERT_REQUIRED,
                "cadata": None,  # read for each connect, dropped once connected
            },
        )
        self.client.set_callback(self._on_message)
        self._poller = None
        self._last_tx = time.ticks_ms()

    def _on_message(self, topic, msg):
        parsed = contract.parse_topic(topic.decode())
        if parsed is None or parsed[0] != self.device_id:
            return
        if len(self.inbox) >= _INBOX_MAX:
            self.inbox.pop(0)
        self.inbox.append((parsed[1], msg))

    def _rearm(self):
        if self._sockets.last is not None:
            self._sockets.last.settimeout(self._sockets.timeout_s)

    def connect(self):
        """Connect and subscribe; raises OSError (network/TLS) or umqtt.MQTTException."""
        params = self.client.ssl_params
        with open(self.cfg["ca_file"], "rb") as f:
            params["cadata"] = f.read()
        try:
            self.client.connect()
        finally:
            params["cadata"] = None
        for suffix in (contract.UPDATE_DELTA, contract.GET_ACCEPTED, contract.GET_REJECTED,
                       contract.UPDATE_REJECTED, contract.CREDENTIALS + "/+"):
            self.client.subscribe(contract.topic(self.device_id, suffix))
            self._rearm()
        self._poller = select.poll()
        self._poller.register(self.client.sock, select.POLLIN)
        self._last_tx = time.ticks_ms()

    def publish(self, suffix, obj):
        self.client.publish(contract.topic(self.device_id, suffix), json.dumps(obj))
        self._last_tx = time.ticks_ms()

    def report(self, firmware, token=None):
        doc = {"state": {"reported": {"firmware": firmware}}}
        if token:
            doc["clientToken"] = token
        self.publish(contract.UPDATE, doc)

    def request_get(self, token=None):
        self.publish(contract.GET, {"clientToken": token} if token else {})

    def poll(self, timeout_ms):
        """Read at most one packet if one arrives within timeout_ms; keep the session alive."""
        if time.ticks_diff(time.ticks_ms(), self._last_tx) > self.keepalive_s * 500:
            self.client.ping()
            self._last_tx = time.ticks_ms()
        ev = self._poller.poll(timeout_ms)
        if ev:
            if ev[0][1] & (select.POLLHUP | select.POLLERR):
                raise OSError(104, "broker connection closed")
            self.client.wait_msg()
            self._rearm()

    def wait_for(self, suffixes, timeout_ms, token=None):
        """Poll until a message on one of `suffixes` (a tuple; with clientToken `token`, if
        given) arrives. Returns the decoded document, or None at the deadline. Other
        messages stay queued."""
        t0 = time.ticks_ms()
        while True:
            for i in range(len(self.inbox)):
                sfx, msg = self.inbox[i]
                if sfx in suffixes:
                    try:
                        doc = json.loads(msg)
                    except ValueError:
                        continue
                    if token is None or (isinstance(doc, dict) and doc.get("clientToken") == token):
                        self.inbox.pop(i)
                        return doc
            left = timeout_ms - time.ticks_diff(time.ticks_ms(), t0)
            if left <= 0:
                return None
            self.poll(min(left, 500))

    def close(self):
        try:
            self.client.disconnect()
        except Exception:  # noqa: BLE001 - the link may already be dead; closing must not raise
            pass
        try:
            self.client.sock.close()
        except Exception:  # noqa: BLE001
            pass
