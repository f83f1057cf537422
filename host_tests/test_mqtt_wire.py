"""The services' own MQTT 3.1.1 client (tools/mqtt_wire.py): the codec on its own, and the
session rules against a scripted broker on loopback (acks only when told, resend with DUP)."""

import asyncio
import struct

import pytest

from tools.control import mqtt_wire as w


def _decode_varint(data: bytes) -> int:
    n = 0
    for i, b in enumerate(data):
        n |= (b & 0x7F) << (7 * i)
    return n


@pytest.mark.parametrize("n,size", [(0, 1), (127, 1), (128, 2), (16383, 2), (16384, 3), (2097151, 3),
                                    (2097152, 4), (268435455, 4)])
def test_remaining_length_takes_the_bytes_the_protocol_says(n, size):
    b = w.varint(n)
    assert len(b) == size and _decode_varint(b) == n
    assert all(x & 0x80 for x in b[:-1]) and not b[-1] & 0x80


def test_packets_split_anywhere_come_out_whole_and_in_order():
    stream = (w.publish_packet("state/d1/update", b"x" * 300, 1, 7) + w.packet(w.PUBACK, 0, b"\x00\x09")
              + w.publish_packet("state/d2/update", b"{}", 0) + b"\xd0\x00")
    whole = w.Parser().feed(stream)
    assert [k for k, _, _ in whole] == [w.PUBLISH, w.PUBACK, w.PUBLISH, w.PINGRESP]
    assert w.parse_publish(whole[0][1], whole[0][2]) == ("state/d1/update", b"x" * 300, 1, 7)
    assert w.parse_publish(whole[2][1], whole[2][2]) == ("state/d2/update", b"{}", 0, 0)
    for step in (1, 2, 3, 5, 64):
        p, got = w.Parser(), []
        for i in range(0, len(stream), step):
            got += p.feed(stream[i:i + step])
        assert got == whole, step


@pytest.mark.parametrize("data", [b"\x30\xff\xff\xff\xff\x01", b"\x30\x80\x80\x80\x80\x00"])
def test_a_length_over_four_bytes_is_a_protocol_error(data):
    with pytest.raises(w.MQTTError, match="4 bytes"):
        w.Parser().feed(data)


@pytest.mark.parametrize("flags,body", [(6, b"\x00\x01a\x00\x01"), (2, b"\x00\x05ab"), (0, b"\x00")])
def test_malformed_publishes_are_refused(flags, body):
    with pytest.raises(w.MQTTError):
        w.parse_publish(flags, body)


class ScriptedBroker:
    """A TCP MQTT 'broker' on loopback that records what it receives and runs a script per
    connection: `script(n, reader, writer)` for the n-th connection."""

    def __init__(self, script):
        self.script = script
        self.connections = 0

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader, writer):
        n = self.connections
        self.connections += 1
        try:
            await self.script(n, reader, writer)
        finally:
            writer.close()


def test_an_unacknowledged_publish_is_sent_again_marked_dup_on_the_next_connection():
    seen = []

    async def script(n, reader, writer):
        kind, _, body = await w.read_packet(reader)
        assert kind == w.CONNECT and body[9] & 0x02 == 0  # a persistent session
        writer.write(b"\x20\x02" + bytes((1 if n else 0, 0)))
        kind, flags, body = await w.read_packet(reader)
        seen.append((n, kind, flags, w.parse_publish(flags, body)))
        if n == 1:  # the first connection drops it unacknowledged; this one acknowledges
            writer.write(w.packet(w.PUBACK, 0, struct.pack("!H", seen[-1][3].pid)))
            await writer.drain()
            await reader.read()  # until the client closes

    async def main():
        async with ScriptedBroker(script) as broker:
            c = w.Client("svc", "svc", "pw", clean_session=False)
            assert await c.connect("127.0.0.1", broker.port, None) is False
            c.publish("state/d1/update/accepted", b'{"v":1}', 1)
            with pytest.raises(w.MQTTError):
                await asyncio.wait_for(c.receive(), 5)  # the broker hung up
            assert len(c.inflight) == 1
            assert await c.connect("127.0.0.1", broker.port, None) is True
            for _ in range(50):
                if not c.inflight:
                    break
                await asyncio.sleep(0.05)
            c.close()
            return c

    c = asyncio.run(main())
    assert c.inflight == {}
    (n0, k0, f0, first), (n1, k1, f1, again) = seen
    assert (n0, n1, k0, k1) == (0, 1, w.PUBLISH, w.PUBLISH)
    assert f0 == 0x02 and f1 == 0x0A  # QoS 1, then QoS 1 + DUP
    assert first == again == ("state/d1/update/accepted", b'{"v":1}', 1, first.pid)


def test_a_received_message_is_acknowledged_only_when_the_caller_says_so():
    got = {}

    async def script(n, reader, writer):
        await w.read_packet(reader)
        writer.write(b"\x20\x02\x00\x00")
        writer.write(w.publish_packet("state/d1/update", b"{}", 1, 42))
        await writer.drain()
        try:
            got["early"] = await asyncio.wait_for(w.read_packet(reader), 0.5)
        except asyncio.TimeoutError:
            got["early"] = None
        got["ack"] = await asyncio.wait_for(w.read_packet(reader), 5)

    async def main():
        async with ScriptedBroker(script) as broker:
            c = w.Client("svc")
            await c.connect("127.0.0.1", broker.port, None)
            (msg,) = await asyncio.wait_for(c.receive(), 5)
            assert msg == ("state/d1/update", b"{}", 1, 42)
            await asyncio.sleep(0.7)
            c.ack([msg])
            await asyncio.sleep(0.3)
            c.close()

    asyncio.run(main())
    assert got["early"] is None
    assert got["ack"] == (w.PUBACK, 0, b"\x00\x2a")


def test_a_refused_login_says_why():
    async def script(n, reader, writer):
        await w.read_packet(reader)
        writer.write(b"\x20\x02\x00\x05")
        await writer.drain()

    async def main():
        async with ScriptedBroker(script) as broker:
            c = w.Client("svc", "svc", "wrong")
            with pytest.raises(w.MQTTError, match="not authorized"):
                await c.connect("127.0.0.1", broker.port, None)
            assert not c.connected

    asyncio.run(main())


def test_a_broker_that_stops_answering_is_given_up_on():
    async def script(n, reader, writer):
        await w.read_packet(reader)
        writer.write(b"\x20\x02\x00\x00")
        await writer.drain()
        await asyncio.sleep(10)  # no PINGRESP, nothing

    async def main():
        async with ScriptedBroker(script) as broker:
            c = w.Client("svc", keepalive=1)
            await c.connect("127.0.0.1", broker.port, None)
            t0 = asyncio.get_running_loop().time()
            with pytest.raises(w.MQTTError, match="nothing from the broker"):
                await asyncio.wait_for(c.receive(), 5)
            return asyncio.get_running_loop().time() - t0

    assert 1.4 <= asyncio.run(main()) < 3
