"""Re-issues expired download URLs: the other half of a device's `need_url`.

A pre-signed URL lives 15 minutes by default; a device that was off longer, or whose download
stalled, reports `need_url: true` with error `url_expired`. This service (an operator-identity
MQTT client) watches accepted reports and answers with the same desired image under a freshly
signed URL, so the device resumes where its download stopped. It only re-signs images that are
released in the store and still desired by the shadow.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl

import aiomqtt

from firmware import contract
from tools import presign
from tools.site import Site

log = logging.getLogger("renewer")


def asks_for_url(accepted: dict) -> bool:
    """An accepted update whose reported firmware says need_url."""
    state = accepted.get("state")
    reported = state.get("reported") if isinstance(state, dict) else None
    fw = reported.get("firmware") if isinstance(reported, dict) else None
    return isinstance(fw, dict) and fw.get("need_url") is True


def renewal(site: Site, device: str, desired: dict | None) -> dict | None:
    """The desired-state update that gives `device` a fresh URL for the image it is told to
    install, or None when that image is not one of our releases."""
    fw = desired.get("firmware") if isinstance(desired, dict) else None
    if not isinstance(fw, dict) or not contract.is_sha256_hex(fw.get("sha256")):
        return None
    if not site.releases.path_of(fw["sha256"]).is_file():
        return None  # not ours to sign
    fresh = dict(fw, url=presign.sign(site.store_key, site.endpoints().store_url, fw["sha256"], device))
    return {"state": {"desired": {"firmware": fresh}}, "clientToken": "renewer"}


class Renewer:
    def __init__(self, site: Site, host: str, port: int):
        self.site, self.host, self.port = site, host, port
        self.renewed = 0

    async def run(self, ready: asyncio.Event | None = None) -> None:
        ctx = ssl.create_default_context(cafile=str(self.site.pki.ca_cert))
        delay = 0.5
        while True:
            try:
                async with aiomqtt.Client(self.host, self.port, username="operator",
                                          password=self.site.service_password("operator"),
                                          identifier="operator-renewer", tls_context=ctx) as client:
                    await client.subscribe(f"{contract.ROOT}/+/{contract.UPDATE_ACCEPTED}", qos=1)
                    await client.subscribe(f"{contract.ROOT}/+/{contract.GET_ACCEPTED}", qos=1)
                    delay = 0.5
                    if ready is not None:
                        ready.set()
                    await self._serve(client)
            except aiomqtt.MqttError as e:
                log.warning("broker connection lost (%s); reconnecting in %.1fs", e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)

    async def _serve(self, client: aiomqtt.Client) -> None:
        waiting: set[str] = set()  # devices that asked for a URL; their shadow is being read
        async for msg in client.messages:
            parsed = contract.parse_topic(str(msg.topic))
            if parsed is None:
                continue
            device, suffix = parsed
            try:
                doc = json.loads(msg.payload)
            except ValueError:
                continue
            if not isinstance(doc, dict):
                continue
            if suffix == contract.UPDATE_ACCEPTED and asks_for_url(doc):
                waiting.add(device)  # re-sign what the shadow desires now, not what it did
                await client.publish(contract.topic(device, contract.GET), json.dumps({"clientToken": "renewer"}), qos=1)
            elif suffix == contract.GET_ACCEPTED and doc.get("clientToken") == "renewer" and device in waiting:
                waiting.discard(device)
                state = doc.get("state")
                update = renewal(self.site, device, state.get("desired") if isinstance(state, dict) else None)
                if update is not None:
                    self.renewed += 1
                    log.info("fresh URL for %s (%s)", device, update["state"]["desired"]["firmware"]["version"])
                    await client.publish(contract.topic(device, contract.UPDATE), json.dumps(update), qos=1)
