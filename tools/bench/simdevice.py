"""Protocol-level simulated devices: thousands of MQTT 3.1.1 clients on one asyncio loop.

Each is a real broker client with its own identity over TLS (so the broker's per-device ACL
applies), speaking just what a device speaks: CONNECT, SUBSCRIBE to its delta, PUBLISH QoS 1,
PUBACK. On a delta that names firmware it reports that firmware as running, the way the real
device does once an install is done, without the download: the control plane alone.
Each speaks through tools/mqtt_wire's codec on one stream; a full client per device (paho,
aiomqtt) costs a thread or a task set each and would measure the simulator instead of the
fleet's services.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import struct

from firmware import contract
from tools.control.mqtt_wire import CONNACK, PUBACK, PUBLISH, SUBACK, SUBSCRIBE, connect_packet, packet, read_packet, utf8

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
        self.writer.write(connect_packet(self.id, self.id, self.password, True, keepalive))
        kind, _, data = await read_packet(self.reader)
        if kind != CONNACK or data[1] != 0:
            raise ConnectionError(f"{self.id}: CONNACK {data!r}")
        self.writer.write(packet(SUBSCRIBE, 2, struct.pack("!H", self._next()) +
                                 utf8(contract.topic(self.id, contract.UPDATE_DELTA)) + b"\x01"))
        kind, _, data = await read_packet(self.reader)
        if kind != SUBACK or data[2] != 1:
            raise ConnectionError(f"{self.id}: SUBACK {data!r}")

    def _next(self) -> int:
        self._pid = self._pid % 65535 + 1
        return self._pid

    def publish(self, suffix: str, doc: dict) -> None:
        body = utf8(contract.topic(self.id, suffix)) + struct.pack("!H", self._next()) + json.dumps(doc).encode()
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
            fw = contract.firmware_in(json.loads(data[at:]))  # a delta's
            if isinstance(fw, dict) and "version" in fw:
                self.reports += 1
                self.publish(contract.UPDATE, contract.firmware_update(contract.REPORTED, {
                    "version": fw["version"], "sha256": fw.get("sha256"), "state": contract.ST_IDLE}))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
