"""Replica throughput and latency, side by side with a peer, end to end over a broker.

1. Accepted updates per second on one amqtt broker (TLS, password auth, the same config):
   our replica (an MQTT client in its own process, SQLite WAL) vs amqtt's contrib ShadowPlugin
   (inside the broker, SQLAlchemy + aiosqlite), each fed by the same load generator.
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
import json
import multiprocessing as mp
import os
import queue
import statistics
import tempfile
import threading
import time
from pathlib import Path

from tools.services import free_port
from tools.site import Site


# -- processes under test -------------------------------------------------------------------

def _amqtt(site_root: str, port: int, contrib_db: str | None, ready) -> None:
    import asyncio
    import logging

    from tools.broker import Broker, _SnapshotTable, broker_config, shutdown_broker

    logging.disable(logging.WARNING)
    site = Site(Path(site_root))
    cfg = broker_config("127.0.0.1", port, site.pki, site.creds.path)
    # No topic ACL for either contestant: it is the same cost for both and would hide $shadow/.
    del cfg["plugins"]["tools.broker.DeviceTopicPlugin"]
    if contrib_db:
        cfg["plugins"]["amqtt.contrib.shadows.ShadowPlugin"] = {"connection": f"sqlite+aiosqlite:///{contrib_db}"}

    async def main():
        broker = Broker(cfg)
        broker._subscriptions = _SnapshotTable()
        await broker.start()
        ready.set()
        try:
            await asyncio.Event().wait()
        finally:
            await shutdown_broker(broker)

    asyncio.run(main())


def _replica(site_root: str, port: int, store: str, name: str, group: str | None, ready) -> None:
    import asyncio
    import logging

    from tools.replica import MQTTSettings, Replica

    logging.disable(logging.WARNING)
    site = Site(Path(site_root))
    settings = MQTTSettings("127.0.0.1", port, "replica", site.service_password("replica"), site.pki.ca_cert,
                            client_id=f"replica-{name}", share_group=group)

    async def main():
        ev = asyncio.Event()
        task = asyncio.create_task(Replica(settings, store).run(ev))
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
               tag: str) -> float:
    """Accepted updates per second: `updates` QoS 1 updates over `devices` shadows, from the
    first PUBLISH to the last update/accepted."""
    c = Client(site, port, f"load-{tag}")
    try:
        c.subscribe(accepted_filter)
        t0 = time.perf_counter()
        for i in range(updates):
            body = {"state": {"desired": {"firmware": {"version": f"{i}", "n": i}}}}
            c.c.publish(update_topic.format(dev=f"b{i % devices}"), json.dumps(body), qos=1)
        got, last = 0, t0
        deadline = time.monotonic() + 300
        while got < updates and time.monotonic() < deadline:
            try:
                last, _, _ = c.q.get(timeout=10)
                got += 1
            except queue.Empty:
                break
        if got < updates:
            raise RuntimeError(f"{tag}: only {got} of {updates} accepted")
        return updates / (last - t0)
    finally:
        c.close()


def latency(site: Site, port: int, update_topic: str, delta_topic: str, samples: int, tag: str) -> dict:
    """desired -> delta at the device: one update at a time, timed until the delta arrives."""
    dev = Client(site, port, f"dev-{tag}")
    op = Client(site, port, f"op-{tag}")
    try:
        dev.subscribe(delta_topic.format(dev="lat"))
        times = []
        for i in range(samples + 10):
            body = {"state": {"desired": {"firmware": {"version": f"{tag}-{i}"}}}}
            t0 = time.perf_counter()
            op.c.publish(update_topic.format(dev="lat"), json.dumps(body), qos=1)
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
        rate = throughput(site, port, topics[0], topics[1], args.devices, args.updates, tag)
        lat = latency(site, port, topics[0], topics[2], args.samples, tag)
        return {"updates_per_s": round(rate), **lat}
    finally:
        _stop(*procs)


def run_mosquitto(site: Site, tmp: Path, workers: int, store: str, args, run: int, pg) -> dict:
    from tools import mosquitto

    m = mosquitto.Mosquitto(tmp / f"mosq{run}-{workers}-{store}", site.pki)
    for user in ("replica", "operator"):
        m.add_user(user, site.service_password(user))
    with m:
        location = pg.create_database(f"b{run}_{workers}") if store == "postgresql" else \
            str(tmp / f"mosq{run}-{workers}.db")
        procs = [_start(_replica, str(site.root), m.port, location, f"w{i}", "bench") for i in range(workers)]
        try:
            tag = f"mosq{run}-{workers}-{store}"
            rate = throughput(site, m.port, OURS[0], OURS[1], args.devices, args.updates, tag)
            lat = latency(site, m.port, OURS[0], OURS[2], args.samples, tag) if workers == 1 else {}
            return {"updates_per_s": round(rate), "per_worker": round(rate / workers), **lat}
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

    from tools import mosquitto
    from tools.postgres import Postgres, find_bin

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
    print(f"\n{args.updates} updates over {args.devices} shadows, median of {args.runs} runs, {os.cpu_count()} CPUs")
    print(f"{'':32} {'updates/s':>10} {'per worker':>11} {'delta p50 ms':>13} {'p99 ms':>8}")
    for k, r in results.items():
        print(f"{k:32} {r['updates_per_s']:>10.0f} {r.get('per_worker', r['updates_per_s']):>11.0f}"
              f" {r.get('p50_ms', float('nan')):>13.2f} {r.get('p99_ms', float('nan')):>8.2f}")
    ratio = ours["updates_per_s"] / contrib["updates_per_s"]
    print(f"ours / contrib ShadowPlugin on amqtt: {ratio:.2f}x updates/s (target >= 3x); "
          f"delta p99 {ours['p99_ms']:.1f} ms vs {contrib['p99_ms']:.1f} ms (target <= 20 ms)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"cpus": os.cpu_count(), "updates": args.updates, "devices": args.devices,
                                     "runs": args.runs, "median": results, "ours_vs_contrib": round(ratio, 2)},
                                    indent=1))


if __name__ == "__main__":
    main()
