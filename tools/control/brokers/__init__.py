"""MQTT brokers behind one interface: the embedded amqtt, and mosquitto for scale-out.

Both serve the site's PKI and credentials with the same rules (tools.control.acl). A broker
has a devices' listener (`port`) and a services' one (`service_port`; the same port when the
broker has one listener), says whether it has shared subscriptions (several replica workers
split one stream), and re-reads the site's credentials when they change.

Adding a broker: a module here with a class like these, and a line in KINDS.
"""

from __future__ import annotations

import abc
import importlib

from tools.site import Site

# A client that sends a larger packet is disconnected, so that a device cannot make the
# broker and the replica hold payloads of any size: ~16x the largest message the replica
# sends (update/documents of an 8 KiB document of one-character leaves: ~62 KB).
MAX_PACKET_BYTES = 1 << 20

KINDS = {"amqtt": "tools.control.brokers.amqtt:AmqttBroker",
         "mosquitto": "tools.control.brokers.mosquitto:MosquittoBroker"}


class Broker(abc.ABC):
    shared_subscriptions: bool = False

    def __init__(self, site: Site, host: str, port: int, service_port: int = 0):
        self.site, self.host, self.port, self.service_port = site, host, port, service_port

    @abc.abstractmethod
    async def start(self) -> None:
        """Listen on `port` (and `service_port`); both are set when this returns."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Disconnect every client and stop listening."""


def make(kind: str, site: Site, host: str, port: int, service_port: int = 0) -> Broker:
    """The broker `kind` (a key of KINDS); its module is imported only when asked for."""
    if kind not in KINDS:
        raise ValueError(f"broker: one of {', '.join(KINDS)}")
    module, cls = KINDS[kind].split(":")
    return getattr(importlib.import_module(module), cls)(site, host, port, service_port)
