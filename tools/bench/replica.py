"""Replica throughput and latency, side by side with a peer, end to end over a broker.

1. Accepted shadow writes per second on one amqtt broker (TLS, password auth, the same config):
   our replica (an MQTT client in its own process, SQLite WAL) vs amqtt's contrib ShadowPlugin
   (inside the broker, SQLAlchemy + aiosqlite), each fed by the same closed-loop load (at most
   50 requests unanswered). The contrib plugin only survives the first write to each shadow,
   so that is what is compared; ours is also measured updating existing shadows.
2. Our replica workers on mosquitto: one worker, and two behind $share/ on one PostgreSQL
   (and on one SQLite file), per worker.
3. desired -> delta latency as a device sees it (subscribed to its delta topic), p50/p99, for
   both shadow services on amqtt and for ours on mosquitto.

Every run is repeated (--runs) and the median reported; ratios are against the reference in
the same invocation. Prints a table, writes build/bench/replica.json.

    python -m tools.bench.replica [--updates 4000] [--devices 100] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import queue
import socket
import ssl
import statistics
import tempfile
import threading
import time
from pathlib import Path

from firmware import contract
from tools.bench import write_results
from tools.control import grants
from tools.control import mqtt_wire
from tools.control.ports import free_port
from tools.site import Site


# -- processes under test -------------------------------------------------------------------

def _amqtt(site_root: str, port: int, contrib_db: str | None, ready) -> None:
    import asyncio
    import logging

    from amqtt.broker import BrokerEvents

    from tools.control.brokers.amqtt import Broker, broker_config, shutdown_broker, start_amqtt

    logging.basicConfig(level=logging.ERROR)  # plugin failures are worth seeing
    site = Site(Path(site_root))
    cfg = broker_config("127.0.0.1", port, site.pki, site.creds.path)
    # No topic ACL for either contestant: it is the same cost for both and would hide $shadow/.
    del cfg["plugins"]["tools.control.brokers.amqtt.RoleTopicPlugin"]
    if contrib_db:
        cfg["plugins"]["amqtt.contrib.shadows.ShadowPlugin"] = {"connection": f"sqlite+aiosqlite:///{contrib_db}"}

    class ShadowBroker(Broker):
        """amqtt 0.12.1 hands a client's PUBLISH to plugins (the ShadowPlugin handles it) and
        then closes that client's connection because the topic starts with `$` (MQTT-4.7.2-1),
        so a client could make one shadow update per connection. Let `$shadow/` requests stop
        after the plugins have seen them: the only change, so that the plugin can be measured."""

        async def _handle_message_delivery(self, client_session, handler, wait_deliver):
            msg = wait_deliver.result()
            if msg is not None and (msg.topic or "").startswith("$shadow/"):
                await self.plugins_manager.fire_event(BrokerEvents.MESSAGE_RECEIVED,
                                                      client_id=client_session.client_id, message=msg)
                return True
            return await super()._handle_message_delivery(client_session, handler, wait_deliver)

    async def main():
        broker = await start_amqtt(cfg, ShadowBroker if contrib_db else Broker)
        ready.set()
        try:
            await asyncio.Event().wait()
        finally:
            await shutdown_broker(broker)

    asyncio.run(main())


def _replica(site_root: str, port: int, store: str, name: str, group: str | None, ready) -> None:
    import asyncio
    import logging

    from tools.control.replica import MQTTSettings, Replica

    logging.disable(logging.WARNING)
    site = Site(Path(site_root))
    settings = MQTTSettings("127.0.0.1", port, "replica", site.service_password("replica"), site.pki.ca_cert,
                            worker=name, share_group=group)

    async def main():
        ev = asyncio.Event()
        task = asyncio.create_task(Replica(settings, store, grant_key=site.grant_key).run(ev))
        await ev.wait()
        ready.set()
        await task

    asyncio.run(main())


def _start(target, *args) -> mp.Process:
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    p = ctx.Process(target=target, args=(*args, ready), daemon=True)
    p.start()
    if not ready.wait(60):
        p.kill()
        raise RuntimeError(f"{target.__name__} did not start")
    return p


def _stop(*procs: mp.Process) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()


# -- the load ----------------------------------------------------------------------------------

class Client:
    """A paho MQTT client (TLS, the operator identity) collecting messages into a queue."""

    def __init__(self, site: Site, port: int, name: str):
        import paho.mqtt.client as mqtt

        self.q: queue.Queue = queue.Queue()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"operator-{name}", protocol=mqtt.MQTTv311)
        self.c.tls_set(ca_certs=str(site.pki.ca_cert))
        self.c.username_pw_set("operator", site.service_password("operator"))
        self.c.max_inflight_messages_set(200)
        self.c.max_queued_messages_set(0)
        subscribed = threading.Event()
        self.c.on_message = lambda c, u, m: self.q.put((time.perf_counter(), m.topic, m.payload))
        self.c.on_subscribe = lambda *a: subscribed.set()
        # as every client of ours does (paho leaves Nagle on)
        self.c.on_socket_open = lambda c, u, sock: sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._subscribed = subscribed
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()

    def subscribe(self, topic: str) -> None:
        self._subscribed.clear()
        self.c.subscribe(topic, qos=1)
        if not self._subscribed.wait(10):
            raise RuntimeError(f"no SUBACK for {topic}")

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def throughput(site: Site, port: int, update_topic: str, accepted_filter: str, devices: int, updates: int,
               tag: str, window: int = 50) -> tuple[float, int]:
    """Accepted updates per second: `updates` QoS 1 updates round-robin over `devices` shadows,
    at most `window` (< devices) unanswered at a time, so no shadow ever has two updates in
    flight (the contrib plugin loses concurrent updates to one shadow: UNIQUE constraint).
    From the first PUBLISH to the last update/accepted. Returns (rate, requests never answered):
    an unanswered request frees its slot in the window after 5 s. The load is one client of
    tools.control.mqtt_wire: with paho it cost as much CPU per update as the replica under test."""
    if window >= devices:
        raise ValueError("window must be smaller than the number of devices")
    return asyncio.run(_throughput(site, port, update_topic, accepted_filter, devices, updates, tag, window))


async def _throughput(site, port, update_topic, accepted_filter, devices, updates, tag, window):
    c = mqtt_wire.Client(f"operator-load-{tag}", "operator", site.service_password("operator"))
    await c.connect("127.0.0.1", port, ssl.create_default_context(cafile=str(site.pki.ca_cert)))

    # Operators grant what they desire, or the replica refuses it; made before the clock
    # starts, as the operator's work is not the replica's.
    key = site.grant_key
    bodies = [json.dumps(contract.firmware_update(contract.DESIRED, grants.granted(key, f"b{i % devices}", {
        "version": f"{i}", "n": i}))).encode() for i in range(updates)]

    def send(i: int) -> None:
        c.publish(update_topic.format(dev=f"b{i % devices}"), bodies[i], 1)

    try:
        await c.subscribe([(accepted_filter, 1)])
        t0 = time.perf_counter()
        for i in range(window):
            send(i)
        sent, got, lost, last = window, 0, 0, t0
        while got + lost < updates:
            try:
                answers = await asyncio.wait_for(c.receive(window), 5)
                last = time.perf_counter()
                got += len(answers)
                c.ack(answers)
            except asyncio.TimeoutError:
                answers = [None]
                lost += 1  # given up on; its slot goes to the next request
            for _ in answers:
                if sent < updates:
                    send(sent)
                    sent += 1
        return got / (last - t0), lost
    finally:
        c.close()


def latency(site: Site, port: int, update_topic: str, delta_topic: str, samples: int, tag: str) -> dict:
    """desired -> delta at the device: one update at a time, timed until the delta arrives."""
    dev = Client(site, port, f"dev-{tag}")
    op = Client(site, port, f"op-{tag}")
    try:
        dev.subscribe(delta_topic.format(dev="+"))
        times = []
        for i in range(samples + 10):
            body = contract.firmware_update(contract.DESIRED, grants.granted(site.grant_key, f"lat{i}", {"version": f"{tag}-{i}"}))
            t0 = time.perf_counter()
            # A shadow per sample: the contrib plugin cannot update an existing one (see main)
            op.c.publish(update_topic.format(dev=f"lat{i}"), json.dumps(body), qos=1)
            t1, _, _ = dev.q.get(timeout=10)
            if i >= 10:  # warm-up
                times.append((t1 - t0) * 1000)
        times.sort()
        return {"p50_ms": round(statistics.median(times), 2), "p99_ms": round(times[int(len(times) * 0.99) - 1], 2)}
    finally:
        dev.close()
        op.close()


OURS = ("state/{dev}/update", "state/+/update/accepted", "state/{dev}/update/delta")
CONTRIB = ("$shadow/{dev}/fw/update", "$shadow/+/fw/update/accepted", "$shadow/{dev}/fw/update/delta")


def run_amqtt(site: Site, tmp: Path, contrib: bool, args, run: int) -> dict:
    port = free_port("127.0.0.1")
    procs = [_start(_amqtt, str(site.root), port, str(tmp / f"contrib{run}.db") if contrib else None)]
    try:
        if not contrib:
            procs.append(_start(_replica, str(site.root), port, str(tmp / f"ours{run}.db"), "solo", None))
        topics = CONTRIB if contrib else OURS
        tag = f"{'contrib' if contrib else 'ours'}{run}"
        # First write to each shadow: the one path the contrib plugin survives (see main).
        created, lost = throughput(site, port, topics[0], topics[1], args.updates + 1, args.updates, tag + "c")
        out = {"creates_per_s": round(created), "lost": lost}
        if not contrib:
            rate, lost = throughput(site, port, topics[0], topics[1], args.devices, args.updates, tag + "u")
            out.update(updates_per_s=round(rate), lost=out["lost"] + lost)
        return {**out, **latency(site, port, topics[0], topics[2], args.samples, tag)}
    finally:
        _stop(*procs)


def run_mosquitto(site: Site, tmp: Path, workers: int, store: str, args, run: int, pg) -> dict:
    from tools.control.brokers import mosquitto

    m = mosquitto.Mosquitto(tmp / f"mosq{run}-{workers}-{store}", site.pki)
    for user in ("replica", "operator"):
        m.add_user(user, site.service_password(user))
    with m:
        location = pg.create_database(f"b{run}_{workers}") if store == "postgresql" else \
            str(tmp / f"mosq{run}-{workers}.db")
        procs = [_start(_replica, str(site.root), m.service_port, location, f"w{i}", "bench") for i in range(workers)]
        try:
            tag = f"mosq{run}-{workers}-{store}"
            rate, lost = throughput(site, m.service_port, OURS[0], OURS[1], args.devices, args.updates, tag)
            lat = latency(site, m.service_port, OURS[0], OURS[2], args.samples, tag) if workers == 1 else {}
            return {"updates_per_s": round(rate), "per_worker": round(rate / workers), "lost": lost, **lat}
        finally:
            _stop(*procs)


def median_of(rows: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--updates", type=int, default=4000)
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--samples", type=int, default=200, help="latency samples per run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path, default=Path("build/bench/replica.json"))
    args = ap.parse_args()

    from tools.control.brokers import mosquitto
    from tools.control.postgres import Postgres, find_bin

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-replica-", ignore_cleanup_errors=True) as tmp:
        tmp = Path(tmp)
        os.chmod(tmp, 0o755)  # PostgreSQL runs as its own user when we are root
        site = Site(tmp / "site")
        site.service_password("replica")
        site.service_password("operator")
        rows: dict[str, list] = {"ours_amqtt": [], "contrib_amqtt": []}
        for run in range(args.runs):
            rows["ours_amqtt"].append(run_amqtt(site, tmp, False, args, run))
            rows["contrib_amqtt"].append(run_amqtt(site, tmp, True, args, run))
            print(json.dumps({k: v[-1] for k, v in rows.items()}), flush=True)
        if mosquitto.available():
            pg = Postgres(tmp / "pg").start() if find_bin() else None
            try:
                configs = [(1, "sqlite"), (2, "sqlite")] + ([(1, "postgresql"), (2, "postgresql")] if pg else [])
                for workers, store in configs:
                    key = f"mosquitto_{workers}w_{store}"
                    rows[key] = [run_mosquitto(site, tmp, workers, store, args, run, pg) for run in range(args.runs)]
                    print(json.dumps({key: rows[key]}), flush=True)
            finally:
                if pg:
                    pg.stop()
        results = {k: median_of(v) for k, v in rows.items()}

    ours, contrib = results["ours_amqtt"], results["contrib_amqtt"]
    nan = float("nan")
    print(f"\n{args.updates} requests (updates over {args.devices} shadows; creates: one per new shadow), "
          f"median of {args.runs} runs, {os.cpu_count()} CPUs")
    print(f"{'':28} {'creates/s':>10} {'updates/s':>10} {'per worker':>11} {'delta p50 ms':>13} {'p99 ms':>8}"
          f" {'lost':>5}")
    for k, r in results.items():
        print(f"{k:28} {r.get('creates_per_s', nan):>10.0f} {r.get('updates_per_s', nan):>10.0f}"
              f" {r.get('per_worker', r.get('updates_per_s', nan)):>11.0f}"
              f" {r.get('p50_ms', nan):>13.2f} {r.get('p99_ms', nan):>8.2f} {r['lost']:>5.0f}")
    ratio = ours["creates_per_s"] / contrib["creates_per_s"]
    print(f"ours / amqtt contrib ShadowPlugin: {ratio:.2f}x shadow writes/s (target >= 3x); "
          f"delta p99 {ours['p99_ms']:.1f} ms vs {contrib['p99_ms']:.1f} ms (target <= 20 ms).\n"
          "The contrib plugin (amqtt 0.12.1) can write each shadow once: a second update to any shadow fails "
          "(its new version row reuses id '', UNIQUE constraint) and is lost, so updates/s cannot be compared; "
          "and the broker closes a client after each $shadow/ publish unless patched (done here).")
    write_results(args.json, {"cpus": os.cpu_count(), "updates": args.updates, "devices": args.devices,
                              "runs": args.runs, "median": results, "ours_vs_contrib": round(ratio, 2)})


if __name__ == "__main__":
    main()
