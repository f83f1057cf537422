"""What an operator (or an application) does over MQTT: set desired firmware, read shadows,
watch a device's topics. The seed's step 3 lives here."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass, field

import aiomqtt

from firmware import contract
from tools.control import grants
from tools.control import presign
from tools.control.clients import service_client
from tools.site.identities import OPERATOR
from tools.site.releases import Release
from tools.site import Site


class OperatorError(Exception):
    pass


def _client(site: Site, suffix: str) -> aiomqtt.Client:
    return service_client(site, OPERATOR, f"{suffix}-{secrets.token_hex(3)}")


def desired_firmware(site: Site, device: str, release: Release, ttl: int = presign.DEFAULT_TTL,
                     allow_downgrade: bool = False, token: bool = False) -> dict:
    """The `firmware` desired-state object for one device: with a URL pre-signed for it now,
    or (token) the bare URL, for which the device asks a temporary credential itself; and the
    operator's grant for it (tools.control.grants), without which the replica refuses it. A
    signed release names its signer, for whoever reads the shadow; the device fetches the
    signature itself, from the store beside the image."""
    store = site.endpoints().store_url
    url = store + presign.artifact_path(release.sha256) if token else \
        presign.sign(site.store_key, store, release.sha256, device, ttl)
    # The optional fields are always sent: null deletes what an earlier desired left (objects
    # merge). Checked as the device will check what is stored.
    fw = {"url": url, "version": release.version, "sha256": release.sha256, "size": release.size,
          "allow_downgrade": True if allow_downgrade else None, "auth": contract.AUTH_TOKEN if token else None,
          contract.SIGNER: release.signer}
    contract.check_firmware({k: v for k, v in fw.items() if v is not None})
    return grants.granted(site.grant_key, device, fw)


class DesiredWriter:
    """One operator connection that sets desired firmware for many devices (rollouts).
    Fire and forget at QoS 1: whether the replica took it shows in the shadow."""

    def __init__(self, site: Site, ttl: int = presign.DEFAULT_TTL):
        self.site, self.ttl = site, ttl
        self._client = _client(site, "rollout")

    async def __aenter__(self) -> "DesiredWriter":
        await self._client.__aenter__()
        return self

    async def __aexit__(self, *exc) -> None:
        await self._client.__aexit__(*exc)

    async def set(self, device: str, release: Release, allow_downgrade: bool = False, token: bool = False) -> None:
        fw = desired_firmware(self.site, device, release, self.ttl, allow_downgrade, token)
        await self._client.publish(contract.topic(device, contract.UPDATE),
                                   json.dumps(contract.firmware_update(contract.DESIRED, fw)), qos=1)


async def request(site: Site, device: str, suffix: str, body: dict, timeout: float = 10) -> tuple[str, dict]:
    """Publish a shadow request and wait for its accepted/rejected answer (by clientToken)."""
    token = secrets.token_hex(8)
    body = dict(body, clientToken=token)
    try:
        return await _request(site, device, suffix, body, token, timeout)
    except aiomqtt.MqttError as e:
        ep = site.endpoints()
        raise OperatorError(f"broker at {ep.host}:{ep.service_mqtt_port}: {e} (is `serve` running?)") from None


async def _request(site: Site, device: str, suffix: str, body: dict, token: str, timeout: float) -> tuple[str, dict]:
    async with _client(site, "req") as client:
        await client.subscribe(contract.topic(device, suffix + "/+"), qos=1)
        await client.publish(contract.topic(device, suffix), json.dumps(body), qos=1)
        try:
            async with asyncio.timeout(timeout):
                async for msg in client.messages:
                    doc = json.loads(msg.payload)
                    if doc.get("clientToken") == token:
                        return str(msg.topic).rsplit("/", 1)[1], doc
        except TimeoutError:
            raise OperatorError(f"no answer from the replica on {contract.topic(device, suffix)}/+ within {timeout}s") from None
    raise OperatorError("connection closed")


async def set_desired(site: Site, device: str, release: Release, ttl: int = presign.DEFAULT_TTL,
                      token: bool = False, allow_downgrade: bool = False) -> dict:
    fw = desired_firmware(site, device, release, ttl, allow_downgrade, token=token)
    outcome, doc = await request(site, device, contract.UPDATE, contract.firmware_update(contract.DESIRED, fw))
    if outcome != "accepted":
        raise OperatorError(f"replica rejected the update: {doc}")
    return doc


async def get_shadow(site: Site, device: str) -> dict:
    outcome, doc = await request(site, device, contract.GET, {})
    if outcome != "accepted":
        raise OperatorError(f"{doc.get('code')}: {doc.get('message')}")
    return doc


@dataclass
class Recorded:
    t: float
    topic: str
    payload: dict | str


@dataclass
class Recorder:
    """Subscribes to everything under state/<device>/ and keeps what it sees, in order."""

    site: Site
    device: str
    messages: list[Recorded] = field(default_factory=list)
    on_message: object = None

    async def run(self, ready: asyncio.Event) -> None:
        async with _client(self.site, "rec") as client:
            await client.subscribe(contract.topic(self.device, "#"), qos=1)
            ready.set()
            async for msg in client.messages:
                try:
                    payload = json.loads(msg.payload)
                except ValueError:
                    payload = bytes(msg.payload).decode(errors="replace")
                rec = Recorded(time.monotonic(), str(msg.topic), payload)
                self.messages.append(rec)
                if self.on_message:
                    self.on_message(rec)

    def suffixes(self) -> list[str]:
        return [contract.parse_topic(m.topic)[1] for m in self.messages]
