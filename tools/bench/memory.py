"""Memory of the update path: bytes allocated per download block, and the smallest GC heap
with which a whole update (MQTT + shadow + OTA, firmware compiled with mpy-cross, one TLS
connection at a time) still succeeds.

- per block: the download loop (`Installer.copy_blocks`, a 200 KiB image from a stream into the
  emulated slot) under MicroPython with the collector off; `gc.mem_alloc()` growth divided by
  the number of blocks, minus what the same writes cost in the emulated flash driver alone
  (Python here, C on the chip), next to a naive loop that allocates a 4 KiB buffer per block.
- peak live heap: the same update on the default board, the emulator sampling the firmware's
  live heap after a collection at every emulated hardware call (_emuhw.heap_probe).
- smallest heap: bisection over `-X heapsize` (1 KiB steps) of a full update on an emulated
  board; each probe is a fresh board and must end on the new image with nothing failed.
  The reference point is the default 112 KiB board doing the same update. Signed (the
  default: the board fetches and checks the release's signature), and the same unsigned.

    python -m tools.bench.memory [--lo 64] [--hi 96] [--json build/bench/memory.json]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from firmware import contract
from tools.bench import write_results
from tools.operator import client as op
from tools.bench.ota_throughput import _micropython
from tools.esp32emu.runner import Runner, make_flash
from tools.espidf.images import build_app_image
from tools.board.provision import copy_firmware
from tools.esp32emu.provision import provision_emulated
from tools.control.services import ServicesThread
from tools.site import Site
from tools.bench.signed import SignedSite

_PER_BLOCK = """
import gc, io, json
from firmware import slots
from firmware.installer import Installer, BLOCK
data = open("img.bin", "rb").read()
size = len(data)
part = slots.next_update()
u = Installer(part, {}, ctx=False)  # no TLS here: the loop alone
nblocks = (size + BLOCK - 1) // BLOCK
rem = size % BLOCK
tail = memoryview(u.buf)[:rem] if rem else u.buf
import hashlib
h = hashlib.sha256()
stream = io.BytesIO(data)
gc.collect()
gc.disable()
a0 = gc.mem_alloc()
u.copy_blocks(part, stream, 0, nblocks, nblocks, tail, h)
a1 = gc.mem_alloc()
gc.enable()
gc.collect()
gc.disable()
f0 = gc.mem_alloc()
for blk in range(nblocks):
    part.writeblocks(blk, u.buf)  # the emulated flash driver alone (a chip's allocates nothing)
f1 = gc.mem_alloc()
gc.enable()
gc.collect()
stream = io.BytesIO(data)
gc.disable()
b0 = gc.mem_alloc()
for i in range(nblocks):
    b = bytearray(BLOCK)  # what a naive loop does: a new buffer per block
    stream.readinto(b)
b1 = gc.mem_alloc()
gc.enable()
print(json.dumps({"blocks": nblocks, "loop": a1 - a0, "flash": f1 - f0, "naive": b1 - b0}))
"""


def per_block(work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    make_flash(work / "flash.bin", build_app_image("1.0.0", 64 * 1024))
    copy_firmware(work / "fs")
    (work / "fs" / "img.bin").write_bytes(build_app_image("2.0.0", 200 * 1024))
    r = _micropython(_PER_BLOCK, work / "fs", work / "flash.bin")
    n = r["blocks"]
    return {"blocks": n, "loop_bytes_per_block": r["loop"] / n, "emulated_flash_bytes_per_block": r["flash"] / n,
            # what the firmware's own code allocates: the loop minus the emulated flash driver
            "firmware_bytes_per_block": (r["loop"] - r["flash"]) / n, "naive_bytes_per_block": r["naive"] / n}


def update_succeeds(site: Site, svc: ServicesThread, rel, image_a: bytes, heap_kib: int, work: Path,
                    timeout: float = 60, probe: Path | None = None) -> tuple[bool, float]:
    """One whole update on a fresh board with this heap. With `probe`, the emulator records
    the firmware's peak live heap of each boot there (_emuhw.heap_probe)."""
    device = f"heap{heap_kib}-{int(time.time() * 1000) % 100000}"
    root = provision_emulated(site, device, image_a, "1.0.0", directory=work / device,
                              config={"tls_slots": 1})
    lines: list[str] = []
    runner = Runner(root, heapsize=f"{heap_kib}k", tls_budget=1, max_boots=6, on_line=lines.append,
                    env={"ESP32EMU_HEAP_PROBE": str(probe)} if probe else None)
    t = threading.Thread(target=runner.run, daemon=True)
    t.start()
    t0 = time.monotonic()
    ok = False
    try:
        svc.call(op.set_desired(site, device, rel, 900))
        while time.monotonic() - t0 < timeout and t.is_alive():
            try:
                doc = svc.call(op.get_shadow(site, device))
            except op.OperatorError:
                doc = {}
            fw = contract.firmware_in(doc, contract.REPORTED) or {}
            if fw.get("sha256") == rel.sha256 and fw.get("state") == "idle":
                ok = True
                break
            if fw.get("state") == "failed" and fw.get("attempts", 0) >= 3:
                break
            time.sleep(0.3)
    finally:
        runner.stop()
        t.join(10)
    # "Nothing failed": no attempt ran out of memory and was retried on the way.
    failed = ("MemoryError", "out of memory", "update failed")
    return ok and not any(f in s for s in lines for f in failed), time.monotonic() - t0


def _releases(work: Path, signed: bool):
    """A site with releases A (1.0.0, 200 KiB) and B (1.1.0, 300 KiB): signed, as a new
    site requires; or unsigned, on a site that allows it (its devices check no signature)."""
    image_a, image_b = build_app_image("1.0.0", 200 * 1024), build_app_image("1.1.0", 300 * 1024)
    if signed:
        s = SignedSite(work / "site")
        s.release(image_a, "1.0.0")
        return s.site, image_a, s.release(image_b, "1.1.0")
    site = Site(work / "site")
    site.trust.require(False)
    site.releases.add(image_a, "1.0.0")
    return site, image_a, site.releases.add(image_b, "1.1.0")


def peak_heap(work: Path, heap_kib: int = 112, signed: bool = True) -> dict:
    """The firmware's peak live heap in each boot of an update (download boot, then the boot
    that confirms the new image), sampled after a collection at every emulated hardware call:
    every flash block, watchdog feed and TLS handshake. A sample cannot see a transient
    between two such calls, so this is a lower bound; the smallest heap is the upper one."""
    site, image_a, rel = _releases(work, signed)
    probe = work / "heap_peaks.txt"
    with ServicesThread(site) as svc:
        ok, _ = update_succeeds(site, svc, rel, image_a, heap_kib, work, probe=probe)
    boots: list[list[int]] = []
    for line in probe.read_text().split():
        if line == "boot":
            boots.append([0])
        else:
            boots[-1].append(int(line))
    return {"heap_kib": heap_kib, "update_ok": ok, "peak_bytes_per_boot": [max(b) for b in boots],
            "peak_bytes": max(max(b) for b in boots)}


def smallest_heap(work: Path, lo: int, hi: int, signed: bool = True) -> dict:
    site, image_a, rel = _releases(work, signed)
    probes = {}
    with ServicesThread(site) as svc:
        ref_ok, ref_s = update_succeeds(site, svc, rel, image_a, 112, work)
        if not update_succeeds(site, svc, rel, image_a, hi, work)[0]:
            return {"reference_112k_ok": ref_ok, "smallest_kib": None, "note": f"fails even at {hi} KiB"}
        while hi - lo > 1:  # invariant: hi succeeds, lo is not known to
            mid = (lo + hi) // 2
            ok, s = update_succeeds(site, svc, rel, image_a, mid, work)
            probes[mid] = ok
            if ok:
                hi = mid
            else:
                lo = mid
    return {"reference_112k_ok": ref_ok, "reference_112k_s": round(ref_s, 2), "smallest_kib": hi, "probes": probes}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lo", type=int, default=64, help="KiB known or assumed to fail")
    ap.add_argument("--hi", type=int, default=96, help="KiB expected to succeed")
    ap.add_argument("--json", type=Path, default=Path("build/bench/memory.json"), help="where to write the figures")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        blocks = per_block(Path(tmp) / "blocks")
        peak = peak_heap(Path(tmp) / "peak")
        heap = smallest_heap(Path(tmp) / "heap", args.lo, args.hi)
        unsigned = smallest_heap(Path(tmp) / "unsigned", args.lo, args.hi, signed=False)
    print(f"download loop: {blocks['firmware_bytes_per_block']:.1f} bytes allocated per 4 KiB block by the firmware "
          f"(target 0; the emulated flash driver adds {blocks['emulated_flash_bytes_per_block']:.0f}, "
          f"a naive loop {blocks['naive_bytes_per_block']:.0f}), {blocks['blocks']} blocks")
    print(f"smallest GC heap for a whole signed update (MQTT + shadow + signature + OTA, .mpy, one TLS connection): "
          f"{heap['smallest_kib']} KiB (target <= 64; reference 112 KiB board ok: {heap['reference_112k_ok']}); "
          f"the same update unsigned: {unsigned['smallest_kib']} KiB")
    print(f"probes: signed {heap.get('probes')}, unsigned {unsigned.get('probes')}")
    print(f"peak live GC heap of the firmware during the same update on a {peak['heap_kib']} KiB board "
          f"(sampled at every emulated hardware call, a lower bound): {peak['peak_bytes'] / 1024:.1f} KiB; "
          f"per boot {[round(b / 1024, 1) for b in peak['peak_bytes_per_boot']]} KiB (update ok: {peak['update_ok']})")
    write_results(args.json, {"per_block": blocks, "heap": heap, "heap_unsigned": unsigned, "peak": peak})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
