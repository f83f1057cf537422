"""The embedded MQTT broker: amqtt with TLS, password auth and the role ACL of tools.control.acl.

amqtt's packaged ACL plugin has no `%u` substitution, so the rules are this module's
RoleTopicPlugin. Devices must use their username as MQTT client id; service identities may
use any client id that starts with their name and a dash (tools.site.identities.service_client_id).

amqtt 0.12.1 acts on a CONNECT before it authenticates it, and publishes a client's will
without its topic ACL. GuardedBroker fixes both in the connect path (see there); it also keeps
no retained messages, which amqtt would hand to every client that connects, unchecked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import amqtt
from amqtt.broker import Broker as _AmqttBroker
from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter
from amqtt.contexts import Action
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.utils import gen_client_id

from tools.control import acl, brokers
from tools.site.identities import SERVICE_USERS
from tools.site.credentials import Credentials
from tools.site.pki import PKI, TLS12_CIPHERS

log = logging.getLogger("broker")

# The amqtt release whose connect path GuardedBroker was written against (its
# Broker._initialize_client_session). Another release must be read again before it serves:
# drop what it fixes itself, keep the rest, then name it here.
AMQTT_REVIEWED = "0.12.1"


class PasswordAuthPlugin(BaseAuthPlugin):
    """Username/password from the shared credentials file; anonymous clients are refused."""

    @dataclass
    class Config:
        password_file: str = ""
        superusers: list[str] = field(default_factory=lambda: list(SERVICE_USERS))

    def __init__(self, context) -> None:
        super().__init__(context)
        self._creds = Credentials(Path(self.config.password_file))

    async def authenticate(self, *, session) -> bool:
        user, password, cid = session.username, session.password, session.client_id or ""
        if not user or not password:
            log.info("refused %s: no credentials", cid)
            return False
        if user in self.config.superusers:
            id_ok = cid == user or cid.startswith(user + "-")
        else:
            id_ok = cid == user
        if not id_ok:
            log.info("refused %s: client id must be the username %s", cid, user)
            return False
        ok = await asyncio.to_thread(self._creds.verify, user, password)
        if not ok:
            log.info("refused %s: wrong password", cid)
        return ok


class RoleTopicPlugin(BaseTopicPlugin):
    """Publish, subscribe and receive by role (tools.acl). An identity removed from the
    credentials file (a revoked device) loses all three at once, even on a connection it
    opened before."""

    @dataclass
    class Config:
        password_file: str = ""

    def __init__(self, context) -> None:
        super().__init__(context)
        self._creds = Credentials(Path(self.config.password_file)) if self.config.password_file else None

    async def topic_filtering(self, *, session=None, topic=None, action=None) -> bool:
        if session is None or not topic or not session.username:
            return False
        user = session.username
        if self._creds is not None and not self._creds.known(user):
            log.info("denied %s %s on %s: identity revoked", user, action, topic)
            return False
        if action == Action.SUBSCRIBE:
            allowed = acl.may_subscribe(user, topic)
        elif action == Action.PUBLISH:
            allowed = acl.may_publish(user, topic)
        else:
            allowed = acl.may_read(user, topic)
        if not allowed and action != Action.RECEIVE:
            log.info("denied %s %s on %s", user, action, topic)
        return allowed


class PacketTooLarge(Exception):
    pass


class _CappedReader(StreamReaderAdapter):
    """A client's byte stream, refusing any one read beyond brokers.MAX_PACKET_BYTES: amqtt
    reads a packet's payload with one read of the length the packet announces, so a client
    announcing more is cut off before the broker holds it (mosquitto: max_packet_size)."""

    async def read(self, n: int = -1) -> bytes:
        if n > brokers.MAX_PACKET_BYTES:
            raise PacketTooLarge(f"a packet of {n} bytes; at most {brokers.MAX_PACKET_BYTES}")
        return await super().read(n)


class GuardedBroker(_AmqttBroker):
    """amqtt's broker with its connect path in the right order.

    amqtt 0.12.1 reads a CONNECT, then deletes (clean session) or takes over (persistent
    session) any session of that client id, copying the CONNECT's username and will into it,
    and only then authenticates. A CONNECT that is refused (CONNACK 5) has by then silenced
    the client it named, and for a moment given its session the sender's username. Here the
    CONNECT is authenticated first, and its will is held to the same topic ACL as a publish
    (amqtt sends wills unchecked), before anything of any session is touched; a refused one
    gets CONNACK 5 and changes nothing. The rest is amqtt's own code for the same step.
    """

    async def _initialize_client_session(self, reader, writer, remote_address, remote_port):
        try:
            handler, session = await BrokerProtocolHandler.init_from_connect(reader, writer, self.plugins_manager)
        except MQTTError:
            await writer.close()
            raise
        except NoDataError as exc:
            raise AMQTTError(exc) from exc

        refusal = await self._refusal(session)
        if refusal is not None:
            log.info("CONNECT of %r from %s:%s refused: %s", session.client_id, remote_address, remote_port, refusal)
            handler.attach(session, reader, writer)
            session.parent = 0
            with contextlib.suppress(OSError):  # the client may be gone already
                await handler.mqtt_connack_authorize(False)
                await writer.close()
            raise AMQTTError(f"CONNECT refused: {refusal}")

        # From here on, amqtt 0.12.1's own steps (Broker._initialize_client_session).
        if session.clean_session:
            if session.client_id:
                await self._delete_session(session.client_id)
            else:
                session.client_id = gen_client_id()
            session.parent = 0
        elif session.client_id in self._sessions:
            existing, _ = self._sessions[session.client_id]
            for name in ("will_flag", "will_message", "will_topic", "will_qos", "will_retain", "keep_alive",
                         "username", "password"):
                setattr(existing, name, getattr(session, name))
            session = existing
            session.parent = 1
        else:
            session.parent = 0
        delay = self.config.get("timeout-disconnect-delay", 0)
        if session.keep_alive > 0 and isinstance(delay, int):
            session.keep_alive += delay
        return handler, session

    async def _refusal(self, session) -> str | None:
        """Why this CONNECT may not go further, or None."""
        if not await self._authenticate(session, None):
            return "not authenticated"
        if session.will_flag:
            if session.will_retain:
                return "retained will (this broker keeps no retained messages)"
            if not await self._topic_filtering(session, session.will_topic, Action.PUBLISH):
                return f"will on {session.will_topic!r}, where this identity may not publish"
        return None

    async def stream_connected(self, reader, writer, listener_name) -> None:
        await self._client_connected(listener_name, _CappedReader(reader), StreamWriterAdapter(writer))

    async def _handle_disconnect(self, client_session, handler, disconnect_waiter) -> None:
        """The will, checked once more as it is sent: an identity revoked since its CONNECT
        publishes nothing."""
        if client_session.will_flag and not await self._topic_filtering(
                client_session, client_session.will_topic, Action.PUBLISH):
            client_session.will_flag = False
        await super()._handle_disconnect(client_session, handler, disconnect_waiter)

    async def retain_message(self, source_session, topic_name, data, qos=None) -> None:
        """Keep nothing: amqtt 0.12.1 sends every retained message that matches any client's
        subscription to each client that connects, without the receive ACL, so one device's
        retained publish would reach all of them. The contract does not use retained messages."""
        if data:
            log.info("not retaining the message on %s", topic_name)


# Benchmarks and tests subclass the broker the services run.
Broker = GuardedBroker


def broker_config(host: str, port: int, pki: PKI, password_file: Path) -> dict:
    return {
        "listeners": {
            "default": {
                "type": "tcp",
                "bind": f"{host}:{port}",
                "ssl": True,
                "certfile": str(pki.server_cert),
                "keyfile": str(pki.server_key),
                "cafile": str(pki.ca_cert),
            }
        },
        "plugins": {
            "tools.control.brokers.amqtt.PasswordAuthPlugin": {"password_file": str(password_file)},
            "tools.control.brokers.amqtt.RoleTopicPlugin": {"password_file": str(password_file)},
        },
    }


class _SnapshotTable(dict):
    """amqtt 0.12.1 iterates its subscription table across awaits (Broker._run_broadcast
    awaits the topic plugins per subscriber; the connect path awaits retained messages per
    filter). A subscribe or disconnect in between raised "dictionary changed size during
    iteration" inside a broadcast task and the message was silently dropped. Iterating over
    a snapshot of the table makes both loops safe; mutations still go to the table."""

    def __iter__(self):
        return iter(list(super().keys()))

    def keys(self):
        return list(super().keys())

    def items(self):
        return [(k, list(v)) for k, v in super().items()]


async def start_broker(host: str, port: int, pki: PKI, password_file: Path) -> Broker:
    """Start amqtt on the running loop; stop it with `await shutdown_broker(broker)`."""
    return await start_amqtt(broker_config(host, port, pki, password_file))


async def start_amqtt(config: dict, broker_class: type[Broker] = Broker) -> Broker:
    """Start an amqtt broker (GuardedBroker or a subclass) from a config, with our fixes applied."""
    if amqtt.__version__ != AMQTT_REVIEWED:
        raise RuntimeError(f"amqtt {amqtt.__version__}: tools/control/brokers/amqtt.py's fixes were "
                           f"written for {AMQTT_REVIEWED}; read GuardedBroker against the new release first")
    broker = broker_class(config)
    broker._subscriptions = _SnapshotTable()  # see _SnapshotTable
    made = broker_class._create_ssl_context  # amqtt has no setting for the TLS 1.2 suites

    def listener_ssl_context(listener):
        ctx = made(listener)
        ctx.set_ciphers(TLS12_CIPHERS)
        return ctx

    broker._create_ssl_context = listener_ssl_context
    await broker.start()
    return broker


async def shutdown_broker(broker: Broker, limit_s: float = 30.0) -> None:
    """broker.shutdown(), made to finish on Python 3.11.

    amqtt stops each client by cancelling its reader task once and waiting for it; the reader
    sits in asyncio.wait_for, which on 3.11 can swallow a cancellation that races with a packet
    arriving, so the reader reads on and shutdown waits forever (seen with a board reconnecting
    while the broker restarts). Cancel the readers again until shutdown is done.
    """
    handlers = [h for _, h in list(broker._sessions.values()) if h is not None]
    task = asyncio.create_task(broker.shutdown())
    deadline = asyncio.get_running_loop().time() + limit_s
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if done:
            task.result()
            return
        stuck = [h._reader_task for h in handlers if h._reader_task is not None and not h._reader_task.done()]
        for reader in stuck:
            reader.cancel()
        if asyncio.get_running_loop().time() > deadline:
            task.cancel()
            raise TimeoutError(f"amqtt did not shut down in {limit_s:.0f} s ({len(stuck)} client readers still running)")


class AmqttBroker(brokers.Broker):
    """The embedded broker, on this process's event loop; one listener for devices and
    services alike. It reads the credentials file at every CONNECT: nothing to reload."""

    def __init__(self, site, host: str, port: int, service_port: int = 0):
        super().__init__(site, host, port, 0)
        self._broker: Broker | None = None

    async def start(self) -> None:
        self._broker = await start_broker(self.host, self.port, self.site.pki, self.site.creds.path)
        self.service_port = self.port

    async def stop(self) -> None:
        if self._broker is not None:
            await shutdown_broker(self._broker)
            self._broker = None
