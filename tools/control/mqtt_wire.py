"""MQTT 3.1.1 for the host's services: the packet codec and one asyncio client connection.

A general client (aiomqtt over paho) cost the replica ~0.85 ms of CPU per request, four times
its own work on the request. This one does only what a service needs, in batches: CONNECT with
a persistent session, SUBSCRIBE, PUBLISH at QoS 0/1 both ways, PUBACK, PINGREQ. A received
QoS 1 PUBLISH is acknowledged only when the caller says it is done with it (after its commit),
so a request the service dies on is delivered again, not lost. Publishes still unacknowledged
when a connection drops are sent again, marked DUP, on the next one (MQTT-4.4.0-1).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
from typing import NamedTuple

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK = 1, 2, 3, 4, 8, 9
PINGREQ, PINGRESP, DISCONNECT = 12, 13, 14

CONNACK_REASONS = {1: "unacceptable protocol version", 2: "client identifier rejected", 3: "server unavailable",
                   4: "bad user name or password", 5: "not authorized"}


class MQTTError(Exception):
    """The connection failed, was refused, or broke the protocol."""


class Message(NamedTuple):
    topic: str
    payload: bytes
    qos: int
    pid: int  # 0 at QoS 0


def varint(n: int) -> bytes:
    """The remaining-length encoding: 7 bits a byte, high bit = more follow."""
    if n < 128:
        return bytes((n,))
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def utf8(s: str) -> bytes:
    b = s.encode()
    return struct.pack("!H", len(b)) + b


def packet(kind: int, flags: int, body: bytes) -> bytes:
    return bytes((kind << 4 | flags,)) + varint(len(body)) + body


def publish_packet(topic: str, payload: bytes, qos: int = 0, pid: int = 0) -> bytes:
    return packet(PUBLISH, qos << 1, utf8(topic) + (struct.pack("!H", pid) if qos else b"") + payload)


def connect_packet(client_id: str, username: str | None, password: str | None, clean_session: bool,
                   keepalive: int) -> bytes:
    flags = (0x80 if username is not None else 0) | (0x40 if password is not None else 0) | \
        (0x02 if clean_session else 0)
    body = utf8("MQTT") + bytes((4, flags)) + struct.pack("!H", keepalive) + utf8(client_id)
    if username is not None:
        body += utf8(username)
    if password is not None:
        body += utf8(password)
    return packet(CONNECT, 0, body)


def parse_publish(flags: int, body: bytes) -> Message:
    qos = flags >> 1 & 3
    if qos == 3 or len(body) < 2:
        raise MQTTError("malformed PUBLISH")
    end = 2 + (body[0] << 8 | body[1])
    try:
        topic = body[2:end].decode()
    except UnicodeDecodeError:
        raise MQTTError("PUBLISH topic is not UTF-8") from None
    if qos:
        if len(body) < end + 2:
            raise MQTTError("malformed PUBLISH")
        return Message(topic, body[end + 2:], qos, body[end] << 8 | body[end + 1])
    return Message(topic, body[end:], 0, 0)


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
    """One packet from a stream: (type, flags, body). For simple peers (the benchmark's
    simulated devices, tests); Client parses whatever arrives with Parser."""
    head = await reader.readexactly(1)
    n, shift = 0, 0
    while True:
        b = (await reader.readexactly(1))[0]
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
        if shift > 21:
            raise MQTTError("remaining length longer than 4 bytes")
    return head[0] >> 4, head[0] & 0x0F, await reader.readexactly(n)


class Parser:
    """Splits a byte stream into (kind, flags, body) packets, keeping a partial one for later.
    No size limit below the protocol's (what 4 length bytes can say): a smaller one would drop
    the connection on an oversized request, and the broker would deliver it again on the next.
    The replica rejects those itself; the broker is where sizes are bounded (tools/mosquitto.py,
    max_packet_size)."""

    def __init__(self):
        self._rest = b""

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        buf = self._rest + data if self._rest else data
        out, i, n = [], 0, len(buf)
        while n - i >= 2:
            length, shift, j = 0, 0, i + 1
            while j < n:
                b = buf[j]
                j += 1
                length |= (b & 0x7F) << shift
                if not b & 0x80:
                    break
                shift += 7
                if shift > 21:
                    raise MQTTError("remaining length longer than 4 bytes")
            else:
                break  # the length itself is not complete yet
            if n - j < length:
                break
            out.append((buf[i] >> 4, buf[i] & 0x0F, bytes(buf[j:j + length])))
            i = j + length
        self._rest = bytes(buf[i:])
        return out


class _Link(asyncio.Protocol):
    """One TCP/TLS connection of a Client. A fresh one per connect, so that a late event from
    a connection already given up on cannot touch the next one."""

    def __init__(self, client: Client):
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.client._data(self, data)

    def pause_writing(self) -> None:
        self.client._writable(self, False)

    def resume_writing(self) -> None:
        self.client._writable(self, True)

    def connection_lost(self, exc) -> None:
        self.client._lost_link(self, exc)


class Client:
    """One client identity; `connect` may be called again after a connection is lost, and the
    session (unacknowledged publishes, packet ids) carries over."""

    def __init__(self, client_id: str, username: str | None = None, password: str | None = None, *,
                 clean_session: bool = True, keepalive: int = 60, max_inflight: int = 1000):
        self.client_id, self.username, self.password = client_id, username, password
        self.clean_session = clean_session
        self.keepalive = keepalive
        self.max_inflight = max_inflight
        self.inflight: dict[int, bytes] = {}  # our QoS 1 publishes awaiting PUBACK, by packet id
        self._pid = 0
        self._transport: asyncio.Transport | None = None
        self._parser = Parser()
        self._inbox: list[Message] = []
        self._waiters: dict[tuple[int, int], asyncio.Future] = {}  # (CONNACK|SUBACK, pid) -> future
        self._wake = asyncio.Event()  # a message, a PUBACK, writable again, or the connection ended
        self._paused = False
        self._lost: Exception | None = MQTTError("not connected")
        self._last_heard = 0.0
        self._pinger: asyncio.Task | None = None
        self._out: list[bytes] = []  # what this turn of the event loop wrote: one TLS record for all

    # -- from the connection (_Link) ------------------------------------------------------
    def _data(self, link: _Link, data: bytes) -> None:
        if link.transport is not self._transport:
            return  # a connection we already gave up on
        try:
            for kind, flags, body in self._parser.feed(data):
                self._on_packet(kind, flags, body)
        except MQTTError as e:
            self._drop(e)
            return
        self._last_heard = asyncio.get_running_loop().time()

    def _on_packet(self, kind: int, flags: int, body: bytes) -> None:
        if kind == PUBLISH:
            msg = parse_publish(flags, body)
            if msg.qos == 2:
                raise MQTTError("QoS 2 PUBLISH on a session that subscribes at QoS 1 at most")
            self._inbox.append(msg)
            self._wake.set()
        elif kind == PUBACK:
            if self.inflight.pop(struct.unpack("!H", body[:2])[0], None) is not None \
                    and len(self.inflight) < self.max_inflight:
                self._wake.set()
        elif kind == CONNACK:
            self._resolve((CONNACK, 0), body)
        elif kind == SUBACK:
            self._resolve((SUBACK, struct.unpack("!H", body[:2])[0]), body[2:])
        elif kind != PINGRESP:
            raise MQTTError(f"unexpected packet type {kind} from the broker")

    def _resolve(self, key, value) -> None:
        fut = self._waiters.pop(key, None)
        if fut is not None and not fut.done():
            fut.set_result(value)

    def _writable(self, link: _Link, yes: bool) -> None:
        if link.transport is self._transport:
            self._paused = not yes
            self._wake.set()

    def _lost_link(self, link: _Link, exc) -> None:
        if link.transport is self._transport:
            self._drop(MQTTError(f"connection lost: {exc}" if exc else "connection closed by the broker"))

    def _drop(self, err: Exception) -> None:
        if self._lost is None:
            self._lost = err
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(self._lost)
        self._waiters.clear()
        self._out = []  # its publishes are kept in `inflight`; its acks the broker does without
        self._wake.set()
        if self._transport is not None:
            self._transport.abort()
            self._transport = None
        if self._pinger is not None:
            self._pinger.cancel()
            self._pinger = None

    # -- the caller's side -----------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._lost is None

    async def connect(self, host: str, port: int, tls: ssl.SSLContext | None, timeout: float = 10) -> bool:
        """Connect and log in; returns whether the broker still had our session."""
        loop = asyncio.get_running_loop()
        self._parser = Parser()
        self._inbox = []
        self._paused = False
        if self.clean_session:
            self.inflight.clear()
        try:
            transport, _ = await asyncio.wait_for(loop.create_connection(
                lambda: _Link(self), host, port, ssl=tls, server_hostname=host if tls else None), timeout)
        except (OSError, asyncio.TimeoutError, ssl.SSLError) as e:
            raise MQTTError(f"cannot reach {host}:{port}: {e!r}") from None
        self._transport, self._lost = transport, None
        sock = self._transport.get_extra_info("socket")
        if sock is not None:  # answers are small writes: Nagle would hold each for the last one's ACK
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        body = await self._request((CONNACK, 0), connect_packet(self.client_id, self.username, self.password,
                                                                self.clean_session, self.keepalive), timeout)
        if len(body) != 2 or body[1] != 0:
            code = body[1] if len(body) == 2 else -1
            self._drop(MQTTError(f"refused: {CONNACK_REASONS.get(code, f'code {code}')}"))
            raise self._lost
        self._last_heard = loop.time()
        self._pinger = loop.create_task(self._ping())
        if self.inflight:  # the previous connection's, in order, marked DUP
            self._transport.write(b"".join(bytes((p[0] | 0x08,)) + p[1:] for p in self.inflight.values()))
        return bool(body[0] & 1)

    async def subscribe(self, filters: list[tuple[str, int]], timeout: float = 10) -> list[int]:
        pid = self._next_pid()
        body = struct.pack("!H", pid) + b"".join(utf8(f) + bytes((qos,)) for f, qos in filters)
        granted = list(await self._request((SUBACK, pid), packet(SUBSCRIBE, 2, body), timeout))
        refused = [f for (f, _), g in zip(filters, granted) if g == 0x80]
        if refused or len(granted) != len(filters):
            raise MQTTError(f"subscription refused: {refused or filters}")
        return granted

    async def _request(self, key, data: bytes, timeout: float) -> bytes:
        if self._lost is not None:
            raise self._lost
        fut = asyncio.get_running_loop().create_future()
        self._waiters[key] = fut
        self._transport.write(data)
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            self._drop(MQTTError(f"no answer to packet type {data[0] >> 4} within {timeout} s"))
            raise self._lost from None

    async def _ping(self) -> None:
        """Keep the session alive, and give up on a broker that stopped answering."""
        loop = asyncio.get_running_loop()
        while self._transport is not None:
            await asyncio.sleep(self.keepalive / 2)
            if loop.time() - self._last_heard > self.keepalive * 1.5:
                self._drop(MQTTError(f"nothing from the broker for {self.keepalive * 1.5:.0f} s"))
                return
            if self._transport is not None:
                self._transport.write(packet(PINGREQ, 0, b""))

    def _next_pid(self) -> int:
        while True:
            self._pid = self._pid % 65535 + 1
            if self._pid not in self.inflight:
                return self._pid

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        """Queue a publish on the wire now; at QoS 1 it is kept until the broker acknowledges it,
        across reconnects. Callers bound what is outstanding with `drain`."""
        if qos not in (0, 1):
            raise ValueError("QoS 0 or 1")
        pid = self._next_pid() if qos else 0
        data = publish_packet(topic, payload, qos, pid)
        if qos:
            self.inflight[pid] = data
        self._write(data)

    def ack(self, messages: list[Message]) -> None:
        """Done with these: acknowledge the QoS 1 ones, in one write."""
        for m in messages:
            if m.qos == 1:
                self._write(packet(PUBACK, 0, struct.pack("!H", m.pid)))

    def _write(self, data: bytes) -> None:
        """Writes made in one turn of the event loop go out together: a TLS record and a
        system call per batch, not per packet."""
        if self._transport is None:
            return
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(data)

    def _flush(self) -> None:
        data, self._out = b"".join(self._out), []
        if self._transport is not None:
            self._transport.write(data)

    async def receive(self, limit: int = 200) -> list[Message]:
        """At least one received message, up to `limit`: all that have arrived, in order."""
        while True:
            if self._lost is not None:
                raise self._lost  # what was left unacknowledged comes again on the next connection
            if self._inbox:
                break
            self._wake.clear()
            await self._wake.wait()
        batch, self._inbox = self._inbox[:limit], self._inbox[limit:]
        return batch

    async def drain(self) -> None:
        """Wait while the socket's buffer is full or too many publishes await their PUBACK."""
        while self._paused or len(self.inflight) >= self.max_inflight:
            if self._lost is not None:
                raise self._lost
            self._wake.clear()
            await self._wake.wait()

    def close(self) -> None:
        """DISCONNECT and close; the session's unacknowledged publishes are kept."""
        if self._transport is not None:
            self._flush()
            self._transport.write(packet(DISCONNECT, 0, b""))
            self._transport.close()
            self._transport = None
        self._drop(MQTTError("closed"))
