"""A whole fleet update: a release rolled out with `rollout` to N emulated ESP32s running the
real firmware (download over HTTPS, SHA-256, flash, reboot, health check, confirm, report).

Measures the wall time from the rollout's start until every device has reported the new image
and the CPU time it took (the boards' MicroPython processes and the services), so a figure
for a larger fleet on this machine can be read off as CPU-bound: CPU per board x boards / cores.
The reference in the same run is the time the same fleet took to boot and report.

    python -m tools.bench.fleet_rollout --devices 20 --size 1572864
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import threading
import time
from pathlib import Path

from tools.bench import write_results
from tools.operator import rollout as ro
from tools.esp32emu.runner import Runner
from tools.espidf.images import build_app_image
from tools.esp32emu.provision import provision_emulated
from tools.control.services import ServicesProcess
from firmware import contract
from tools.control import shadows
from tools.bench.signed import SignedSite
from tools.site import Site


def _cpu() -> float:
    """CPU-seconds the whole machine has spent busy (/proc/stat). Not getrusage: a board's
    MicroPython process is counted as a child only once it has exited, so its first boot would
    land in whichever phase reaps it. The machine runs nothing else during the benchmark."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _fs_type(path: Path) -> str:
    """The type of the filesystem `path` is on (/proc/mounts: the longest mount point above it)."""
    best, kind = "", "?"
    path = str(path.resolve())
    with open("/proc/mounts") as f:
        for line in f:
            _, mnt, fstype = line.split()[:3]
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                best, kind = mnt, fstype
    return kind


def _wait_all(site: Site, ids: list[str], sha256: str, timeout: float) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        read = shadows.read(site.shadow_store, ids)
        if len(read) == len(ids) and all(s.reported.get("sha256") == sha256 and s.reported.get("state") == contract.ST_IDLE
                                         for s in read.values()):
            return time.monotonic() - t0
        time.sleep(0.25)
    return None


def measure(n: int, size: int, workdir: Path, timeout: float, broker: str = "mosquitto",
            batches: list[str] | None = None, boot_wave: int = 0) -> dict:
    signed = SignedSite(workdir / "site")
    site = signed.site
    old = signed.release(build_app_image("1.0.0", 256 * 1024), "1.0.0")
    new = signed.release(build_app_image("2.0.0", size), "2.0.0")
    ids = [f"fleet{i:03d}" for i in range(n)]
    with ServicesProcess(site, broker=broker):
        runners = [Runner(provision_emulated(site, d, site.releases.path_of(old.sha256).read_bytes(), "1.0.0",
                                             directory=workdir / d), on_line=lambda s: None) for d in ids]
        threads = [threading.Thread(target=r.run, daemon=True) for r in runners]
        try:
            cpu0 = _cpu()
            t0 = time.monotonic()
            # Boards power on in waves of boot_wave (0: all at once), as a site's boards would
            # come up over minutes; each wave has reported before the next powers on.
            wave = boot_wave or n
            for i in range(0, n, wave):
                for t in threads[i:i + wave]:
                    t.start()
                if _wait_all(site, ids[i:i + wave], old.sha256, timeout) is None:
                    raise SystemExit(f"boards {i}..{i + wave} did not boot and report within {timeout} s")
            boot_s = time.monotonic() - t0
            cpu1 = _cpu()
            db = ro.RolloutDB(site.rollouts_path)
            info = db.create(new, ids, ro.Policy(batches=batches or ["100%"], timeout_s=int(timeout)))
            t0 = time.monotonic()
            final = asyncio.run(ro.run(site, ro.Engine(db, info.id, site.releases.by_sha256, site.grant_key), tick=0.25))
            rollout_s = time.monotonic() - t0
            counts = ro.counts(db.targets(info.id))
            db.close()
            cpu2 = _cpu()
        finally:
            for r in runners:
                r.stop()
            for t in threads:
                t.join(15)
    return {"devices": n, "broker": broker, "batches": batches or ["100%"], "boot_wave": boot_wave, "image_bytes": new.size, "boot_and_report_s": round(boot_s, 1),
            "rollout_s": round(rollout_s, 1), "state": final.state, "succeeded": counts[ro.SUCCEEDED],
            "failed": counts[ro.FAILED], "cpu_s_boot": round(cpu1 - cpu0, 1), "cpu_s_rollout": round(cpu2 - cpu1, 1),
            "cpu_s_per_board_update": round((cpu2 - cpu1) / n, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--size", type=int, default=1536 * 1024, help="bytes of the new image (default 1.5 MiB)")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--broker", choices=("mosquitto", "amqtt"), default="mosquitto",
                    help="the embedded amqtt broker is one Python process; mosquitto scales further")
    ap.add_argument("--batches", default="100%", help="rollout batches, as `rollout start --batches`")
    ap.add_argument("--boot-wave", type=int, default=0, help="power boards on this many at a time (0: all at once)")
    ap.add_argument("--json", type=Path, default=Path("build/bench/fleet_rollout.json"))
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where the boards' folders go (default: the system's temporary directory); "
                         "each state save creates a file, which costs more on a disk filesystem than on tmpfs")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-fleet-", dir=args.workdir, ignore_cleanup_errors=True) as tmp:
        row = measure(args.devices, args.size, Path(tmp), args.timeout, args.broker,
                      args.batches.split(","), args.boot_wave)
        row["workdir_fs"] = _fs_type(Path(tmp))
    print(json.dumps(row))
    cores = os.cpu_count() or 1
    per = row["cpu_s_per_board_update"]
    print(f"\n{row['devices']} emulated boards on {row['broker']} (their files on {row['workdir_fs']}), "
          f"{row['image_bytes']} byte image, {cores} CPUs: "
          f"rollout {row['state']} "
          f"in {row['rollout_s']} s ({row['succeeded']} succeeded, {row['failed']} failed); the same boards took "
          f"{row['boot_and_report_s']} s to boot and report. CPU per board update {per} s, so 200 boards need at "
          f"least {200 * per / cores:.0f} s of this machine (target 30 s)")
    write_results(args.json, {"cpus": cores, **row})
    if row["state"] != ro.COMPLETED:
        raise SystemExit("the rollout did not complete")


if __name__ == "__main__":
    main()
