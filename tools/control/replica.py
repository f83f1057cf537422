"""The Device State Replica: an ordinary MQTT client that keeps one shadow per device.

Subscribes `state/+/update` and `state/+/get`; for each update it validates and merges
(tools.shadow), commits the document (tools.control.shadowstore: SQLite, or PostgreSQL to scale out;
messages that arrive together share one transaction), and only then
publishes `update/accepted`, while desired differs from reported `update/delta`, and
`update/documents` (previous and current document). Bad input
gets `update/rejected` {code, message}; nothing a client sends can stop the service.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

from firmware import contract
from tools.control import grants
from tools.control import mqtt_wire
from tools.control import shadow
from tools.control.shadowstore import open_store
from tools.site.identities import service_client_id

log = logging.getLogger("replica")


# The group `serve`'s own worker joins on mosquitto: `replica --share-group replicas` workers
# split the stream with it. A worker outside the group would get every request as well.
SHARE_GROUP = "replicas"


@dataclass
class MQTTSettings:
    host: str
    port: int
    username: str
    password: str
    ca_file: Path
    worker: str = "replica"  # the client id's role (identities.service_client_id)
    # Several workers split one stream with an MQTT 5 / mosquitto shared subscription
    # ($share/<group>/...); amqtt has none, so the embedded setup runs one worker.
    share_group: str | None = None

    def tls_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))


async def _back_off(delay: float, what: str) -> float:
    """Wait half to all of `delay` (jitter: workers that failed together do not retry together);
    returns the next delay, doubled up to 10 s."""
    wait = delay * random.uniform(0.5, 1.0)
    log.warning("%s in %.1fs", what, wait)
    await asyncio.sleep(wait)
    return min(delay * 2, 10)


class Replica:
    def __init__(self, mqtt: MQTTSettings, store: Path | str, *, grant_key: bytes | None):
        """`store`: an SQLite file or a postgresql:// URL (tools.shadowstore). `grant_key`: the
        site's (tools.grants); an update that leaves a desired firmware without a valid grant is
        refused. None turns the check off (tests of the shadow rules alone)."""
        self.mqtt = mqtt
        self.grant_key = grant_key
        self.db = open_store(store)
        self.handled = 0
        self.batch_max = 200  # messages per transaction, at most
        self._batch: dict | None = None  # rows the current batch read up front (handle_many)

    def handle(self, topic: str, payload: bytes) -> list[tuple[str, dict]]:
        """Process one message; returns the (topic, message) pairs to publish, in order.
        Storage happens here, before anything is returned for publishing."""
        parsed = contract.parse_topic(topic)
        if parsed is None:
            return []
        device_id, suffix = parsed
        if suffix == contract.GET:
            token = None
            try:
                req = shadow.parse_request(payload) if payload.strip() else {}
                token = req.get("clientToken")
            except shadow.ShadowError as e:
                return [(contract.topic(device_id, contract.GET_REJECTED), e.payload())]
            doc = self._read(device_id)[0]
            if doc is None:
                err = shadow.ShadowError(contract.R_NOT_FOUND, f"No shadow exists with name: '{device_id}'", token)
                return [(contract.topic(device_id, contract.GET_REJECTED), err.payload())]
            return [(contract.topic(device_id, contract.GET_ACCEPTED), shadow.get_response(doc, token, int(time.time())))]
        if suffix != contract.UPDATE:
            return []
        try:
            req = shadow.parse_request(payload)
            # A request with a clientToken is applied once: the same bytes again (a QoS 1
            # redelivery after a lost PUBACK, a client retrying) get the first answer replayed.
            digest = hashlib.sha256(payload).hexdigest() if req.get("clientToken") is not None else None
            for attempt in range(3):  # compare-and-swap: another worker may write between read and put
                doc, seen, answer = self._read(device_id, fresh=attempt > 0)
                if digest is not None and seen == digest:
                    return [(contract.topic(device_id, suffix), msg) for suffix, msg in answer]
                new, accepted, delta = shadow.apply_update(doc, req, int(time.time()))
                if self.grant_key is not None:
                    self._check_grant(device_id, req, doc, new)
                out = [(contract.UPDATE_ACCEPTED, accepted)]
                if delta is not None:
                    out.append((contract.UPDATE_DELTA, delta))
                out.append((contract.UPDATE_DOCUMENTS, shadow.documents_message(doc, new, req.get("clientToken"))))
                if self.db.put(device_id, new, doc["version"] if doc else 0, digest, out if digest else None):
                    if self._batch is not None:  # what the next message of this batch reads
                        self._batch[device_id] = (new, digest, out) if digest else (new, seen, answer)
                    break
            else:
                raise shadow.ShadowError(contract.R_CONFLICT, "concurrent updates; retry", req.get("clientToken"))
        except shadow.ShadowError as e:
            return [(contract.topic(device_id, contract.UPDATE_REJECTED), e.payload())]
        return [(contract.topic(device_id, suffix), msg) for suffix, msg in out]

    def _check_grant(self, device_id: str, req: dict, old: dict | None, new: dict) -> None:
        """403 unless the desired firmware this update leaves carries an operator's grant for
        this device (tools.control.grants), no older than the newest this shadow has accepted.
        That date is kept in the document outside its state (GRANTED), where no update
        reaches: removing the desired firmware (which needs no grant) and then bringing back
        an older grant the device once saw gains nothing."""
        floor = (old or {}).get(grants.GRANTED, 0)
        new[grants.GRANTED] = floor
        desired = (req["state"] or {}).get(contract.DESIRED)
        if not isinstance(desired, dict) or contract.FIRMWARE not in desired:
            return  # the desired firmware is not touched (or all of desired goes)
        fw = contract.firmware_in(new, contract.DESIRED)
        if fw is None:
            return
        token = req.get("clientToken")
        try:
            issued = grants.check(self.grant_key, device_id, fw)
        except grants.GrantError as e:
            raise shadow.ShadowError(contract.R_FORBIDDEN, str(e), token) from None
        if issued < floor:
            raise shadow.ShadowError(contract.R_FORBIDDEN, "desired firmware's operator grant is older than "
                                     "one this shadow has already accepted", token)
        new[grants.GRANTED] = issued

    def _read(self, device_id: str, fresh: bool = False) -> tuple:
        """(document or None, digest of the last request with a clientToken, its answer): from
        what the batch read up front unless `fresh` (a compare-and-swap just failed), else in
        one query of its own."""
        if fresh or self._batch is None or device_id not in self._batch:
            return self.db.rows([device_id])[device_id] or (None, None, None)
        return self._batch[device_id] or (None, None, None)

    def _one(self, topic: str, payload: bytes) -> list[tuple[str, dict]]:
        try:
            return self.handle(topic, payload)
        except self.db.errors:
            raise
        except Exception:  # noqa: BLE001 - one bad message must not stop the service
            log.exception("failed to handle %s", topic)
            return []

    def handle_many(self, batch: list[tuple[str, bytes]]) -> list[list[tuple[str, dict]]]:
        """Messages that arrived together, in one transaction: one commit (one fsync) for all,
        and only then their answers. If the store fails part way (a deadlock with another
        worker, a busy database), none of it was committed: each is handled again alone."""
        if len(batch) > 1:
            try:
                with self.db.transaction():
                    # Every shadow the batch touches in one query, not two per message.
                    devices = [parsed[0] for parsed in (contract.parse_topic(t) for t, _ in batch) if parsed]
                    self._batch = self.db.rows(devices)
                    return [self._one(t, p) for t, p in batch]
            except self.db.errors as e:
                log.warning("batch of %d failed (%s); one at a time", len(batch), e)
            finally:
                self._batch = None
        return [self._one(t, p) for t, p in batch]

    async def run(self, ready: asyncio.Event | None = None) -> None:
        """Serve until cancelled; reconnects with backoff if the broker goes away. A request is
        acknowledged to the broker only once committed and answered: while the store fails it
        is tried again here, and one cut off by a lost connection or a crash is delivered again
        by a broker that keeps the session."""
        m = self.mqtt
        client = mqtt_wire.Client(service_client_id(m.username, m.password, m.worker), m.username, m.password,
                                  clean_session=False, max_inflight=1000)
        share = f"$share/{m.share_group}/" if m.share_group else ""
        delay = 0.5
        try:
            while True:
                try:
                    await client.connect(m.host, m.port, m.tls_context())
                    await client.subscribe([(f"{share}{contract.ROOT}/+/{contract.UPDATE}", 1),
                                            (f"{share}{contract.ROOT}/+/{contract.GET}", 1)])
                    log.info("replica subscribed on %s:%d", m.host, m.port)
                    delay = 0.5
                    if ready is not None:
                        ready.set()
                    await self._serve(client)
                except mqtt_wire.MQTTError as e:
                    client.close()
                    delay = await _back_off(delay, f"{e}; reconnecting")
        finally:
            client.close()

    async def _handle_until_stored(self, client: mqtt_wire.Client, batch: list[tuple[str, bytes]]):
        """handle_many, tried again with backoff while the store fails (locked, restarting):
        the requests are in hand, and not every broker delivers unacknowledged ones again
        (amqtt 0.12.1 drops them when the connection ends). If the connection ends meanwhile,
        give up: the broker's redelivery, where there is one, takes over."""
        delay = 0.5
        while True:
            try:
                return self.handle_many(batch)
            except self.db.errors as e:
                delay = await _back_off(delay, f"store failed ({e}); {len(batch)} requests again")
                if not client.connected:
                    raise mqtt_wire.MQTTError("connection lost while the store was failing") from e

    async def _serve(self, client: mqtt_wire.Client) -> None:
        while True:
            batch = await client.receive(self.batch_max)
            outs = await self._handle_until_stored(client, [(msg.topic, msg.payload) for msg in batch])
            self.handled += len(batch)
            # In order on the wire; the broker's PUBACKs are collected as they come, and
            # drain() holds the next batch back only when 1000 are outstanding.
            for out in outs:
                for topic, msg in out:
                    client.publish(topic, shadow.compact_bytes(msg), 1)
            client.ack(batch)
            await client.drain()
