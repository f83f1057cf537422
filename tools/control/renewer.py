"""Download access for devices: re-signs expired URLs and issues temporary credentials.

A pre-signed URL lives 15 minutes by default; a device that was off longer, or whose download
stalled, reports `need_url: true` with error `url_expired`. This service (an operator-identity
MQTT client) watches accepted reports and answers with the same desired image under a freshly
signed URL, so the device resumes where its download stopped.

A device whose desired firmware says `auth: token` asks on `state/<id>/credentials/get` for a
short-lived bearer token bound to its id and one image (tools.presign), answered on
`.../accepted` or `.../rejected` {code, message}. The broker's ACL has already proved who asks.

Either way, only images that are released in the store and desired by the device's shadow
(read from the replica's store when the request comes), under an operator's grant for that
device (tools.grants), are signed: a device that wrote its own desired firmware, or a shadow
edited in the database, gets nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import aiomqtt

from firmware import contract
from tools.control import grants
from tools.control import presign
from tools.control import shadow
from tools.control.clients import service_client
from tools.site.identities import OPERATOR
from tools.site import Site
from tools.control import shadows

log = logging.getLogger("renewer")

RENEWAL_TOKEN = "renewer"  # the clientToken of the renewer's updates


def asks_for_url(accepted: dict) -> bool:
    """An accepted update whose reported firmware says need_url."""
    fw = contract.firmware_in(accepted, contract.REPORTED)
    return isinstance(fw, dict) and fw.get("need_url") is True


def renewal(site: Site, device: str, fw: dict) -> dict | None:
    """The desired-state update that gives `device` a fresh URL for the image it is told to
    install (its desired firmware `fw`), or None when that is not one of our releases under an
    operator's grant."""
    if not contract.is_sha256_hex(fw.get("sha256")):
        return None
    if grants.issued(site.grant_key, device, fw) is None:
        log.warning("no fresh URL for %s: its desired firmware has no operator grant", device)
        return None
    if not site.releases.path_of(fw["sha256"]).is_file():
        return None  # not ours to sign
    if fw.get("auth") == contract.AUTH_TOKEN:
        return None  # a bare URL: the device asks for a fresh token itself
    fresh = dict(fw, url=presign.sign(site.store_key, site.endpoints().store_url, fw["sha256"], device))
    return contract.firmware_update(contract.DESIRED, fresh, RENEWAL_TOKEN)


def credential(site: Site, device: str, request: dict, fw: dict, ttl: int = presign.DEFAULT_TTL,
               now: float | None = None) -> tuple[str, dict]:
    """(suffix, message) answering a device's credentials/get `request`, given its shadow's
    desired firmware `fw` ({} for none): a token for the image it is told to install, or a
    rejection."""
    token = request.get("clientToken")
    sha = request.get("sha256")

    def reject(code: int, message: str) -> tuple[str, dict]:
        return contract.CREDENTIALS_REJECTED, shadow.ShadowError(code, message, token).payload()

    if not contract.is_sha256_hex(sha):
        return reject(contract.R_BAD_REQUEST, "sha256: must be 64 lowercase hex digits")
    if fw.get("sha256") != sha:
        return reject(contract.R_FORBIDDEN, "not the firmware this device is told to install")
    try:
        grants.check(site.grant_key, device, fw)
    except grants.GrantError as e:
        return reject(contract.R_FORBIDDEN, str(e))
    if not site.releases.path_of(sha).is_file():
        return reject(contract.R_NOT_FOUND, "no such release")
    tok, expires = presign.issue_token(site.store_key, device, sha, ttl, now)
    out = {"token": tok, "expires": expires, "sha256": sha}
    if token is not None:
        out["clientToken"] = token
    return contract.CREDENTIALS_ACCEPTED, out


class Renewer:
    def __init__(self, site: Site, host: str, port: int):
        self.site, self.host, self.port = site, host, port
        self.renewed = 0
        self.issued = 0
        self.clock = time.time  # what tokens are dated by (tests skew it)

    async def run(self, ready: asyncio.Event | None = None) -> None:
        delay = 0.5
        while True:
            try:
                async with service_client(self.site, OPERATOR, "renewer", self.host, self.port) as client:
                    await client.subscribe(f"{contract.ROOT}/+/{contract.UPDATE_ACCEPTED}", qos=1)
                    await client.subscribe(f"{contract.ROOT}/+/{contract.CREDENTIALS}", qos=1)
                    delay = 0.5
                    if ready is not None:
                        ready.set()
                    await self._serve(client)
            except aiomqtt.MqttError as e:
                log.warning("broker connection lost (%s); reconnecting in %.1fs", e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)

    async def _serve(self, client: aiomqtt.Client) -> None:
        async for msg in client.messages:
            try:
                await self._one(client, str(msg.topic), bytes(msg.payload))
            except aiomqtt.MqttError:
                raise
            except Exception:  # noqa: BLE001 - no message may stop the service for the fleet
                log.exception("failed to handle %s", msg.topic)

    async def _one(self, client: aiomqtt.Client, topic: str, payload: bytes) -> None:
        parsed = contract.parse_topic(topic)
        if parsed is None:
            return
        device, suffix = parsed
        try:
            # The replica's rules for a request (size, UTF-8, depth: thousands of nested
            # brackets would exhaust the JSON decoder's recursion), an answer of its too.
            doc = shadow.parse_request(payload)
        except shadow.ShadowError:
            return  # nothing we could answer to
        if suffix == contract.UPDATE_ACCEPTED and asks_for_url(doc):
            request = None
        elif suffix == contract.CREDENTIALS:
            request = doc
        else:
            return
        # Sign what the shadow desires now (the replica's store), not what a message said.
        read = await asyncio.to_thread(shadows.read, self.site.shadow_store, [device])
        await self._answer(client, device, request, read[device].desired if device in read else {})

    async def _answer(self, client: aiomqtt.Client, device: str, request: dict | None, desired: dict) -> None:
        if request is None:
            update = renewal(self.site, device, desired)
            if update is not None:
                self.renewed += 1
                log.info("fresh URL for %s (%s)", device, desired.get("version"))
                await client.publish(contract.topic(device, contract.UPDATE), json.dumps(update), qos=1)
            return
        suffix, answer = credential(self.site, device, request, desired, now=self.clock())
        self.issued += suffix == contract.CREDENTIALS_ACCEPTED
        log.info("credential for %s: %s", device, "issued" if "token" in answer else answer["message"])
        await client.publish(contract.topic(device, suffix), json.dumps(answer), qos=1)
