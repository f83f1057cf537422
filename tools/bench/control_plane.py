"""A fleet through the control plane on mosquitto: desired -> delta -> reported -> accepted.

N protocol-level simulated devices (tools/bench/simdevice.py: each its own TLS connection and
identity under the pattern ACL) are connected first (not timed). Then the operator sets a new
desired firmware for every device at once, and the clock runs until the replica has accepted
every device's report of running it. Replica: --workers processes behind $share/ on one
PostgreSQL database (or SQLite with --store sqlite). The reference in the same run is the
operator's own publish rate: how fast the desired states went out.

    python -m tools.bench.control_plane [--devices 10000] [--workers 2] [--runs 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import secrets
import ssl
import statistics
import tempfile
import threading
import time
from pathlib import Path

from firmware import contract
from tools.bench import write_results
from tools.control import grants
from tools.bench.replica import Client, _replica, _start, _stop
from tools.bench.simdevice import SimDevice
from tools.site import Site


async def _connect_all(sims: list[SimDevice], port: int, ctx: ssl.SSLContext, batch: int = 250) -> None:
    for i in range(0, len(sims), batch):
        await asyncio.gather(*(s.connect("127.0.0.1", port, ctx) for s in sims[i:i + batch]))
    for s in sims:
        s.task = asyncio.get_running_loop().create_task(s.serve())  # kept: the loop holds tasks weakly


def one_run(site: Site, tmp: Path, args, run: int, pg) -> dict:
    from tools.control.brokers import mosquitto

    n = args.devices
    m = mosquitto.Mosquitto(tmp / f"mosq{run}", site.pki)
    for user in ("replica", "operator"):
        m.add_user(user, site.service_password(user))
    passwords = {f"sim{i:05d}": secrets.token_hex(8) for i in range(n)}
    m.add_users(passwords)
    sims = [SimDevice(d, pw) for d, pw in passwords.items()]
    with m:
        store = pg.create_database(f"cp{run}") if pg else str(tmp / f"cp{run}.db")
        workers = [_start(_replica, str(site.root), m.service_port, store, f"w{i}", "cp") for i in range(args.workers)]
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        op = None
        try:
            op = Client(site, m.service_port, f"cp{run}")
            op.subscribe(f"{contract.ROOT}/+/{contract.UPDATE_ACCEPTED}")
            ctx = ssl.create_default_context(cafile=str(site.pki.ca_cert))
            t = time.monotonic()
            loop.run_until_complete(_connect_all(sims, m.port, ctx))
            connect_s = time.monotonic() - t
            thread.start()  # the simulated devices answer deltas on their own thread from here
            target = f"9.{run}.0"
            fw = {"url": "https://127.0.0.1/fw/x.bin", "version": target, "sha256": "c" * 64, "size": 1}
            # A grant per device, as operators send them (tools.grants), made before the clock starts.
            bodies = {d: json.dumps(contract.firmware_update(contract.DESIRED, grants.granted(site.grant_key, d, fw)))
                      for d in passwords}
            t0 = time.perf_counter()
            for d, body in bodies.items():
                op.c.publish(contract.topic(d, contract.UPDATE), body, qos=1)
            sent = time.perf_counter() - t0
            done: set[str] = set()
            deadline = time.monotonic() + args.timeout
            last = t0
            while len(done) < n and time.monotonic() < deadline:
                try:
                    when, topic, payload = op.q.get(timeout=5)
                except queue.Empty:
                    continue
                rep = contract.firmware_in(json.loads(payload), contract.REPORTED)
                if isinstance(rep, dict) and rep.get("version") == target:
                    done.add(topic.split("/")[1])
                    last = when
            return {"devices": n, "workers": args.workers, "store": "postgresql" if pg else "sqlite",
                    "connect_s": round(connect_s, 1), "publish_s": round(sent, 2), "completed": len(done),
                    "control_plane_s": round(last - t0, 2), "updates_per_s": round(2 * len(done) / (last - t0))}
        finally:
            if op is not None:
                op.close()
            if thread.is_alive():
                loop.call_soon_threadsafe(loop.stop)
                thread.join(10)
            for s in sims:
                s.close()
            if not thread.is_alive():  # end the devices' tasks instead of dropping them pending
                tasks = [s.task for s in sims if s.task is not None]
                for task in tasks:
                    task.cancel()
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
                loop.close()
            _stop(*workers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=10000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--store", choices=("postgresql", "sqlite"), default="postgresql")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--json", type=Path, default=Path("build/bench/control_plane.json"))
    args = ap.parse_args()

    from tools.control.brokers import mosquitto
    from tools.control.postgres import Postgres, find_bin

    if not mosquitto.available():
        raise SystemExit("mosquitto is not installed (make system-deps)")
    with tempfile.TemporaryDirectory(prefix="bench-cp-", ignore_cleanup_errors=True) as tmp:
        tmp = Path(tmp)
        os.chmod(tmp, 0o755)
        site = Site(tmp / "site")
        pg = Postgres(tmp / "pg").start() if args.store == "postgresql" and find_bin() else None
        try:
            rows = []
            for run in range(args.runs):
                rows.append(one_run(site, tmp, args, run, pg))
                print(json.dumps(rows[-1]), flush=True)
        finally:
            if pg:
                pg.stop()
    med = statistics.median(r["control_plane_s"] for r in rows)
    short = [r for r in rows if r["completed"] < args.devices]
    print(f"\n{args.devices} simulated devices, {args.workers} replica workers on {rows[0]['store']}, mosquitto, "
          f"{os.cpu_count()} CPUs: desired -> delta -> reported -> accepted for "
          f"{'all' if not short else min(r['completed'] for r in short)} in {med:.1f} s "
          f"(median of {args.runs}; target <= 60 s); {rows[0]['updates_per_s']} accepted updates/s; "
          f"the operator's {args.devices} desired states went out in {rows[0]['publish_s']} s")
    write_results(args.json, {"cpus": os.cpu_count(), "runs": rows, "median_s": med})
    if short:
        raise SystemExit(f"incomplete: {len(short)} of {args.runs} runs did not take every device through")


if __name__ == "__main__":
    main()
