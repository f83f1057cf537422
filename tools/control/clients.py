"""An aiomqtt client of a service identity (operator tools, the renewer) on the site's broker."""

from __future__ import annotations

import socket
import ssl

import aiomqtt

from tools.site import Site
from tools.site.identities import service_client_id

# paho leaves Nagle on: a publish right after another would wait for the first one's ACK,
# which the broker delays (delayed ACK), ~40 ms per hop.
NODELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)


def service_client(site: Site, user: str, role: str, host: str | None = None,
                   port: int | None = None) -> aiomqtt.Client:
    """TLS with the site's CA, `user`'s password, on the services' listener of the running
    site (or `host`:`port`); the client id names the `role` (identities.service_client_id)."""
    if host is None or port is None:
        ep = site.endpoints()
        host, port = ep.host, ep.service_mqtt_port
    ctx = ssl.create_default_context(cafile=str(site.pki.ca_cert))
    password = site.service_password(user)
    return aiomqtt.Client(host, port, username=user, password=password,
                          identifier=service_client_id(user, password, role),
                          tls_context=ctx, socket_options=NODELAY)
