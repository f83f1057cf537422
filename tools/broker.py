"""The embedded MQTT broker: amqtt with TLS, password auth and a per-device topic ACL.

amqtt's packaged ACL plugin has no `%u` substitution, so "device X may only use state/X/#"
is this module's DeviceTopicPlugin. Devices must use their username as MQTT client id (so one
device cannot take over another's session); service identities (`superusers`) may use any
client id that starts with their name and may use all of `state/`.

Known amqtt 0.12.1 limits (see README): a CONNECT with a taken client id wipes the holder's
subscriptions before authentication runs, and refused CONNECTs leak sessions. Keep this broker
on loopback or a trusted network; use mosquitto for anything exposed.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin

from tools.credentials import Credentials
from tools.pki import PKI, TLS12_CIPHERS

log = logging.getLogger("broker")

SERVICE_USERS = ("replica", "operator")


def _device_owns(user: str, topic: str) -> bool:
    """True if `topic` (a name or filter) lies inside state/<user>/."""
    parts = topic.split("/")
    return len(parts) >= 3 and parts[0] == "state" and parts[1] == user and "#" not in parts[:2]


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


class DeviceTopicPlugin(BaseTopicPlugin):
    """Devices: only state/<own id>/... Services: anything under state/. An identity removed
    from the credentials file (a revoked device) loses publish, subscribe and receive at once,
    even on a connection it opened before."""

    @dataclass
    class Config:
        password_file: str = ""
        superusers: list[str] = field(default_factory=lambda: list(SERVICE_USERS))

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
        if user in self.config.superusers:
            return topic.split("/", 1)[0] == "state"
        allowed = _device_owns(user, topic)
        if not allowed and action != Action.RECEIVE:
            log.info("denied %s %s on %s", user, action, topic)
        return allowed


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
            "tools.broker.PasswordAuthPlugin": {"password_file": str(password_file)},
            "tools.broker.DeviceTopicPlugin": {"password_file": str(password_file)},
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
    """Start an amqtt broker (or subclass) from a config, with our fixes applied."""
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
