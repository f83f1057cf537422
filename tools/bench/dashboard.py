"""How long the dashboard's server takes for a page of the fleet, at 10,000 devices.

The fleet is seeded through the replica's own request handling (as devices' reports would
be), then the dashboard is started over HTTPS as `serve` starts it and signed in to. Each
query (the first page, the last, filters by state, version, group and id, a sort) is asked
--runs times; the figure is the server's time per page (its Server-Timing header) and the
round trip a client sees. The reference, in the same run, is the same page built the way
`status` reads the fleet: the whole store read for the request (the dashboard without its
index).

    python -m tools.bench.dashboard [--devices 10000] [--runs 21] [--json build/bench/dashboard.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import ssl
import statistics
import tempfile
import time
from pathlib import Path

from tools.bench import write_results

QUERIES = [
    ("first page", {}),
    ("last page", {"page": "last"}),
    ("state = failed", {"state": "failed"}),
    ("running = 1.0.0, sorted by last seen", {"version": "1.0.0", "sort": "seen"}),
    ("group (1,000 by glob)", {"group": "aisle-3"}),
    ("id contains", {"q": "-077"}),
]


def seed(site, n: int) -> None:
    from tools.control.replica import Replica

    r = Replica(None, site.shadow_store, grant_key=None)
    for i in range(n):
        failed = i % 100 == 7
        fw = {"version": "1.1.0" if i % 4 else "1.0.0", "sha256": "ab" * 32, "slot": "ota_0",
              "state": "failed" if failed else "idle", "error": "hash_mismatch" if failed else None,
              "attempts": 3 if failed else None}
        r.handle(f"state/shelf-{i:05d}/update", json.dumps({"state": {"reported": {"firmware": fw}}}).encode())
    r.db.close()
    (site.root / "groups.json").write_text(json.dumps({"aisle-3": ["shelf-03*"]}))


async def measure(site, n: int, runs: int) -> dict:
    import aiohttp

    from tools.operator import dashboard
    from tools.operator.dashboard import views
    from tools.operator.dashboard.fleetindex import FleetIndex
    from tools.site.identities import OPERATOR

    runner, port = await dashboard.start(site, "127.0.0.1", 0)
    base = f"https://127.0.0.1:{port}"
    ctx = ssl.create_default_context(cafile=str(site.pki.ca_cert))
    out = {}
    try:
        # unsafe: the jar keeps cookies of an IP address (127.0.0.1)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx),
                                         cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            async with http.get(base + "/login") as r:
                token = r.cookies["fleet_login"].value
            async with http.post(base + "/login", data={"user": OPERATOR, "password": site.service_password(OPERATOR),
                                                        "csrf": token}, allow_redirects=False) as r:
                if r.status != 303:
                    raise SystemExit(f"sign-in: HTTP {r.status}")
            for name, q in QUERIES:
                q = dict(q, page=str((n + views.PAGE - 1) // views.PAGE)) if q.get("page") == "last" else q
                server, trip = [], []
                for _ in range(runs):
                    t0 = time.perf_counter()
                    async with http.get(base + "/fleet", params=q) as r:
                        body = await r.text()
                        if r.status != 200 or 'id="count"' not in body:
                            raise SystemExit(f"{name}: HTTP {r.status}")
                        trip.append((time.perf_counter() - t0) * 1000)
                        server.append(float(r.headers["Server-Timing"].split("dur=")[1]))
                count = body.split('<p id="count">')[1].split("<")[0]

                # The reference: the same page with the store read whole for it.
                ref = []
                for _ in range(max(3, runs // 3)):
                    t0 = time.perf_counter()
                    index = FleetIndex(site)
                    await index.refresh()
                    rows = index.query(q.get("state", ""), q.get("version", ""),
                                       site.groups().get(q["group"]) if q.get("group") else None, q.get("q", ""),
                                       q.get("sort", "device"))
                    views.fleet(rows, q, index.versions(), sorted(site.groups()), time.time())
                    ref.append((time.perf_counter() - t0) * 1000)
                out[name] = {"shown": count, "server_ms": statistics.median(server),
                             "round_trip_ms": statistics.median(trip), "whole_read_ms": statistics.median(ref),
                             "bytes": len(body.encode())}
    finally:
        await runner.cleanup()
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=10_000)
    p.add_argument("--runs", type=int, default=21)
    p.add_argument("--json", type=Path, default=Path("build/bench/dashboard.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.CRITICAL)  # no broker here: the dashboard's subscription retries quietly

    from tools.site import Site

    with tempfile.TemporaryDirectory() as tmp:
        site = Site(Path(tmp) / "site")
        t0 = time.perf_counter()
        seed(site, args.devices)
        seeded = time.perf_counter() - t0
        results = asyncio.run(measure(site, args.devices, args.runs))

    print(f"{args.devices} devices seeded through the replica in {seeded:.1f} s; medians of {args.runs} pages")
    print(f"{'query':<38} {'shown':<28} {'server':>9} {'trip':>9} {'whole read':>11} {'ratio':>7} {'KiB':>6}")
    for name, r in results.items():
        print(f"{name:<38} {r['shown']:<28} {r['server_ms']:>7.1f}ms {r['round_trip_ms']:>7.1f}ms "
              f"{r['whole_read_ms']:>9.1f}ms {r['whole_read_ms'] / r['server_ms']:>6.1f}x {r['bytes'] / 1024:>6.1f}")
    write_results(args.json, {"devices": args.devices, "seed_s": seeded, "runs": args.runs, "queries": results})


if __name__ == "__main__":
    main()
