"""Protocol-level simulated devices: thousands of MQTT 3.1.1 clients on one asyncio loop.

Each is a real broker client with its own identity over TLS (so the broker's per-device ACL
applies), speaking just what a device speaks: CONNECT, SUBSCRIBE to its delta, PUBLISH QoS 1,
PUBACK. On a delta that names firmware it reports that firmware as running, the way the real
device does once an install is done, without the download: the control plane alone.
A minimal codec of our own, because a full client per device (paho, aiomqtt) costs a thread
or a task set each and would measure the simulator instead of the fleet's services.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import struct

from firmware import contract

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK = 1, 2, 3, 4, 8, 9


def _length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(s: str) -> bytes:
    b = s.encode()
    return struct.pack("!H", len(b)) + b


def packet(kind: int, flags: int, body: bytes) -> bytes:
    return bytes([kind << 4 | flags]) + _length(len(body)) + body


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
    head = await reader.readexactly(1)
    n, shift = 0, 0
    while True:
        b = (await reader.readexactly(1))[0]
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
    return head[0] >> 4, head[0] & 0x0F, await reader.readexactly(n)


class SimDevice:
    def __init__(self, device_id: str, password: str):
        self.id = device_id
        self.password = password
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.reports = 0
        self.task: asyncio.Task | None = None
        self._pid = 0

    async def connect(self, host: str, port: int, ctx: ssl.SSLContext, keepalive: int = 600) -> None:
        self.reader, self.writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname=host)
        flags = 0x80 | 0x40 | 0x02  # username, password, clean session
        body = _utf8("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive) + _utf8(self.id) + \
            _utf8(self.id) + _utf8(self.password)
        self.writer.write(packet(CONNECT, 0, body))
        kind, _, data = await read_packet(self.reader)
        if kind != CONNACK or data[1] != 0:
            raise ConnectionError(f"{self.id}: CONNACK {data!r}")
        self.writer.write(packet(SUBSCRIBE, 2, struct.pack("!H", self._next()) +
                                 _utf8(contract.topic(self.id, contract.UPDATE_DELTA)) + b"\x01"))
        kind, _, data = await read_packet(self.reader)
        if kind != SUBACK or data[2] != 1:
            raise ConnectionError(f"{self.id}: SUBACK {data!r}")

    def _next(self) -> int:
        self._pid = self._pid % 65535 + 1
        return self._pid

    def publish(self, suffix: str, doc: dict) -> None:
        body = _utf8(contract.topic(self.id, suffix)) + struct.pack("!H", self._next()) + json.dumps(doc).encode()
        self.writer.write(packet(PUBLISH, 2, body))

    async def serve(self) -> None:
        """Answer deltas until the connection ends."""
        while True:
            kind, flags, data = await read_packet(self.reader)
            if kind != PUBLISH:
                continue  # PUBACKs of our reports
            tlen = struct.unpack("!H", data[:2])[0]
            at = 2 + tlen
            if flags & 0x06:  # QoS 1: acknowledge
                self.writer.write(packet(PUBACK, 0, data[at:at + 2]))
                at += 2
            fw = json.loads(data[at:]).get("state", {}).get("firmware")
            if isinstance(fw, dict) and "version" in fw:
                self.reports += 1
                self.publish(contract.UPDATE, {"state": {"reported": {"firmware": {
                    "version": fw["version"], "sha256": fw.get("sha256"), "state": contract.ST_IDLE}}}})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
