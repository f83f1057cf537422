"""What an emulated ESP32 costs on this machine: boot time, memory, how many run at once.

For each fleet size N: start the services, provision N emulated devices (real firmware, clock
unset, SNTP, MQTT over TLS), power them all on at once and measure the time until each has
reported its firmware (power-on to first accepted report), the resident memory of each board
process, and the machine's load. Prints a table and writes JSON.

    python -m tools.bench.emulator_cost --devices 1,10,50,100
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from firmware import contract
from tools.bench import write_results
from tools.esp32emu.runner import Runner
from tools.operator.client import Recorder
from tools.espidf.images import build_app_image
from tools.esp32emu.provision import provision_emulated
from tools.control.services import ServicesThread, start_ready, stop_task
from tools.bench.signed import SignedSite


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(n: int, workdir: Path, timeout: float = 300) -> dict:
    signed = SignedSite(workdir / f"site{n}")
    site = signed.site
    image = build_app_image("1.0.0", 256 * 1024)
    signed.release(image, "1.0.0")
    with ServicesThread(site) as svc:
        runners = []
        for i in range(n):
            root = provision_emulated(site, f"cost{i}", image, "1.0.0", directory=workdir / f"n{n}" / f"cost{i}")
            runners.append(Runner(root, on_line=lambda s: None))
        ready: dict[str, float] = {}
        started = time.monotonic()

        def seen(m):  # first accepted report of each board, timed as it crosses the broker
            dev = m.topic.split("/")[1]
            if m.topic.endswith("/update/accepted") and contract.firmware_in(m.payload, contract.REPORTED):
                ready.setdefault(dev, time.monotonic() - started)

        watcher = Recorder(site, "+", on_message=seen)
        watch = svc.call(start_ready(watcher.run, 10))
        started = time.monotonic()
        threads = [threading.Thread(target=r.run, daemon=True) for r in runners]
        for t in threads:
            t.start()
        while len(ready) < n and time.monotonic() - started < timeout:
            time.sleep(0.2)
        rss = [_rss_kib(r._proc.pid) for r in runners if r._proc is not None]
        load = os.getloadavg()[0]
        for r in runners:
            r.stop()
        for t in threads:
            t.join(10)
        svc.call(stop_task(watch))
    times = sorted(ready.values())
    return {
        "devices": n,
        "reported": len(ready),
        "first_report_s_median": round(statistics.median(times), 2) if times else None,
        "all_reported_s": round(times[-1], 2) if len(times) == n else None,
        "rss_mib_per_board_median": round(statistics.median(rss) / 1024, 1) if rss else None,
        "rss_mib_total": round(sum(rss) / 1024, 1),
        "load_1min": round(load, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", default="1,10,50", help="comma-separated fleet sizes")
    ap.add_argument("--json", type=Path, default=Path("build/bench/emulator_cost.json"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        for n in (int(x) for x in args.devices.split(",")):
            row = measure(n, Path(tmp))
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_results(args.json, {"cpus": os.cpu_count(), "rows": rows})
    print(f"{'devices':>8} {'reported':>9} {'median s':>9} {'all s':>7} {'RSS MiB/board':>14} {'RSS MiB':>8} {'load':>5}")
    for r in rows:
        print(f"{r['devices']:>8} {r['reported']:>9} {r['first_report_s_median']!s:>9} {r['all_reported_s']!s:>7} "
              f"{r['rss_mib_per_board_median']!s:>14} {r['rss_mib_total']!s:>8} {r['load_1min']:>5}")


if __name__ == "__main__":
    main()
