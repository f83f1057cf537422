# link.py The MQTT link to the broker: umqtt.simple over verified TLS, with bounded waits.
#
# umqtt opens its own socket, so the link hands it a socket factory. The factory's sockets
# are TLS (CERT_REQUIRED, the project CA, tls_name) once connect() returns, and umqtt gets
# ssl=False: its wait_msg() calls setblocking(True) after a packet's first byte, which on the
# ESP32 port means no timeout at all (modsocket.c), so a broker that sends half a packet, or
# never answers a SUBSCRIBE after another packet, would hold the board until the watchdog.
# Here setblocking(True) sets the link's timeout instead. That is also the one umqtt path
# all its versions share (1.3.4 in the emulator, 1.4-1.8 frozen into ESP32 builds). Incoming
# packets are only read when poll() says data is there.

import json
import random
import select
import socket
import time

from umqtt import simple as umqtt

from firmware import contract, power

_INBOX_MAX = 8


class _Sockets:
    # Stands in for the `socket` module inside umqtt.simple.
    def __init__(self, cfg):
        self.cfg = cfg
        self.timeout_s = cfg["net_timeout_s"]
        self.last = None

    def socket(self, *args):
        s = socket.socket(*args)
        s.settimeout(self.timeout_s)
        try:
            s.setsockopt(6, 1, 1)  # TCP_NODELAY: small packets, latency matters
        except OSError:
            pass
        self.last = _TLSSocket(self, s)
        return self.last

    def getaddrinfo(self, *args):
        return socket.getaddrinfo(*args)


class _TLSSocket:
    # What umqtt holds as its socket: TCP until connect(), then verified TLS before umqtt
    # writes a byte. Every wait on it has the link's deadline.
    def __init__(self, owner, raw):
        self.owner = owner
        self.raw = raw
        self.tls = None

    def connect(self, addr):
        from firmware import trust

        self.raw.connect(addr)
        cfg = self.owner.cfg
        self.tls = trust.load(cfg["ca_file"]).wrap_socket(self.raw, server_hostname=cfg["tls_name"])

    def settimeout(self, t):
        # on the TCP socket (SSLSocket has none); umqtt >= 1.5 passes connect()'s
        # timeout=None on, which must not lift the deadline of the handshake
        self.raw.settimeout(self.owner.timeout_s if t is None else t)

    def setblocking(self, flag):
        self.raw.settimeout(self.owner.timeout_s if flag else 0)

    def read(self, n):
        return self.tls.read(n)

    def write(self, buf, n=None):
        return self.tls.write(buf) if n is None else self.tls.write(buf, n)

    def close(self):
        (self.tls or self.raw).close()  # closing the TLS socket closes the TCP one


class Link:
    def __init__(self, cfg):
        self.cfg = cfg
        self.device_id = cfg["device_id"]
        self.keepalive_s = cfg["keepalive_s"]
        self.inbox = []
        self._sockets = _Sockets(cfg)
        umqtt.socket = self._sockets
        self.client = umqtt.MQTTClient(  # TLS comes with the factory's sockets: ssl=False
            self.device_id,
            cfg["broker_host"],
            cfg["broker_port"],
            user=self.device_id,
            password=cfg["mqtt_password"],
            keepalive=self.keepalive_s,
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

    def connect(self):
        """Connect and subscribe; raises OSError (network), ValueError (TLS) or
        umqtt.MQTTException (refused)."""
        self.client.connect()
        for suffix in (contract.UPDATE_DELTA, contract.GET_ACCEPTED, contract.GET_REJECTED,
                       contract.UPDATE_REJECTED, contract.CREDENTIALS + "/+"):
            self.client.subscribe(contract.topic(self.device_id, suffix))
        self._poller = select.poll()
        self._poller.register(self._sockets.last.tls, select.POLLIN)
        self._last_tx = time.ticks_ms()

    def publish(self, suffix, obj):
        self.client.publish(contract.topic(self.device_id, suffix), json.dumps(obj))
        self._last_tx = time.ticks_ms()

    def report(self, firmware, token=None):
        self.publish(contract.UPDATE, contract.firmware_update(contract.REPORTED, firmware, token))

    def request_get(self):
        self.publish(contract.GET, {})

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

    def exchange(self, suffix, obj, answers, timeout_ms, tag):
        """Publish a request (obj, given a clientToken "<tag>-<random>") and wait for its
        answer on one of `answers`, publishing it again after waits of 2, 4, 8 s... until
        timeout_ms: a broker drops a request nobody is subscribed for (a service restarting).
        Returns the answer or None."""
        token = obj["clientToken"] = "%s-%d" % (tag, random.getrandbits(24))
        left = timeout_ms
        wait = 2000
        while left > 0:
            t0 = time.ticks_ms()
            self.publish(suffix, obj)
            doc = self.wait_for(answers, min(left, wait), token)
            if doc is not None:
                return doc
            left -= time.ticks_diff(time.ticks_ms(), t0)
            wait *= 2
        return None

    def wait_for(self, suffixes, timeout_ms, token):
        """Poll until a message on one of `suffixes` (a tuple) with clientToken `token`
        arrives. Returns the decoded document, or None at the deadline. Other messages stay
        queued."""
        t0 = time.ticks_ms()
        while True:
            for i in range(len(self.inbox)):
                sfx, msg = self.inbox[i]
                if sfx in suffixes:
                    try:
                        doc = json.loads(msg)
                    except ValueError:
                        continue
                    if isinstance(doc, dict) and doc.get("clientToken") == token:
                        self.inbox.pop(i)
                        return doc
            left = timeout_ms - time.ticks_diff(time.ticks_ms(), t0)
            if left <= 0:
                return None
            power.feed()  # a wait with a deadline is not a hang (exchange() may take 60 s)
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
