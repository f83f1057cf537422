"""OTA download throughput: the firmware's real path against a bare reference, in one run.

Three ways to fetch the same release from the same store over HTTPS (loopback), each N times:

- firmware: `firmware.installer.Installer.download` under MicroPython on an emulated chip: TLS with
  CERT_REQUIRED and the CA, SHA-256, erase + program of the inactive slot in flash.bin;
- reference: a bare MicroPython loop doing only socket (TCP_NODELAY, as the firmware's) + ssl
  (CERT_REQUIRED) + readinto + sha256 + file write, with the same block size;
- curl: `curl | sha256sum` (the host's own TLS and hashing).

Each run fetches once each way, one after the other. Prints the median time of each, the
firmware/reference throughput ratio as the median of the runs' own ratios (a pair is measured
seconds apart, so the machine's drift cancels; their quartiles show the spread; single
downloads on this shared machine vary by a third), firmware/curl, and the TLS handshake time
(median of 21 handshakes from MicroPython, beside 21 from CPython's OpenSSL with the same
protocol, key exchange and chain, in interleaved batches); writes JSON with --json.

    python -m tools.bench.ota_throughput --size 1500000 --runs 21
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from tools.bench import write_results
from tools.control import presign
from tools.esp32emu.runner import FLASH_SIZE, chip_env, make_flash, run_script
from tools.espidf import onflash
from tools.espidf.images import build_app_image
from tools.control.services import ServicesThread
from tools.site import Site

DEVICE = "bench-ota"

# An ESP32 maps at most 16 MB of flash, so two OTA slots hold at most ~8 MB each: the largest
# image a real ESP32 can take by OTA. This layout (16 MB flash, two 0x7F0000-byte slots) is
# where the bench measures it; a 16 MiB image fits no ESP32 OTA layout at all.
LARGEST_SLOTS_16MB = (
    ("nvs", onflash.TYPE_DATA, 0x02, 0x9000, 0x4000),
    ("otadata", onflash.TYPE_DATA, onflash.SUBTYPE_DATA_OTA, 0xD000, 0x2000),
    ("phy_init", onflash.TYPE_DATA, 0x01, 0xF000, 0x1000),
    ("ota_0", onflash.TYPE_APP, 0x10, 0x10000, 0x7F0000),
    ("ota_1", onflash.TYPE_APP, 0x11, 0x800000, 0x7F0000),
)

_FIRMWARE = """
import json, time
from firmware import trust
from firmware import slots
from firmware.installer import Installer
fw = json.loads(open("fw.json").read())
ca = open("ca.der", "rb").read()
part = slots.next_update()
t0 = time.ticks_us()  # the TLS context is made inside, as in the reference (and per download in install.py)
u = Installer(part, {"Authorization": AUTH}, 30, ctx=trust.context(ca))
digest, _ = u.download(fw, 0)
t1 = time.ticks_us()
import binascii
print(json.dumps({"us": time.ticks_diff(t1, t0), "sha": binascii.hexlify(digest).decode()}))
"""

_REFERENCE = """
import json, time, socket, ssl, hashlib, binascii
fw = json.loads(open("fw.json").read())
ca = open("ca.der", "rb").read()
host, port, path = HOST, PORT, PATH
buf = bytearray(4096)
t0 = time.ticks_us()
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.verify_mode = ssl.CERT_REQUIRED
ctx.load_verify_locations(cadata=ca)
s = socket.socket()
s.setsockopt(6, 1, 1)  # TCP_NODELAY: without it Nagle stalls the handshake ~40 ms
s.connect(socket.getaddrinfo(host, port)[0][-1])
s = ctx.wrap_socket(s, server_hostname=host)
s.write(b"GET " + path.encode() + b" HTTP/1.0\\r\\nHost: " + host.encode() + b"\\r\\nAuthorization: " + AUTH.encode() + b"\\r\\n\\r\\n")
length = 0
while True:
    line = s.readline()
    if line in (b"\\r\\n", b""):
        break
    if line.lower().startswith(b"content-length:"):
        length = int(line[15:])
h = hashlib.sha256()
out = open("ref.bin", "wb")
mv = memoryview(buf)
left = length
while left:
    n = s.readinto(mv[:min(left, len(buf))])
    if not n:
        break
    h.update(mv[:n])
    out.write(mv[:n])
    left -= n
out.close()
s.close()
t1 = time.ticks_us()
print(json.dumps({"us": time.ticks_diff(t1, t0), "sha": binascii.hexlify(h.digest()).decode()}))
"""

# The emulated flash driver alone (Python here, C and SPI on a chip): erase + program of as
# many blocks as the image has, into the same slot, the way the Installer writes them.
_FLASH_ONLY = """
import json, time
from firmware import slots
part = slots.next_update()
buf = bytearray(4096)
n = (SIZE + 4095) // 4096
t0 = time.ticks_us()
for blk in range(n):
    part.writeblocks(blk, buf)
print(json.dumps({"us": time.ticks_diff(time.ticks_us(), t0)}))
"""

# The firmware's own handshake: `https.get` (its socket options, TCP_NODELAY among them, and its
# CERT_REQUIRED context) with only `wrap_socket` timed. Unauthenticated, so the store answers
# 401 without checking a credential.
_HANDSHAKE = """
import json, time
from firmware import https, trust
ctx = trust.context(open("ca.der", "rb").read())
times = []

class Timed:
    def wrap_socket(self, raw, server_hostname):
        t0 = time.ticks_us()
        s = ctx.wrap_socket(raw, server_hostname=server_hostname)
        times.append(time.ticks_diff(time.ticks_us(), t0))
        return s

for i in range(N):
    https.get(Timed(), URL).close()
print(json.dumps({"us": times}))
"""


def _host_handshakes(host: str, port: int, ca: Path, n: int) -> list[float]:
    """`n` handshakes from CPython (OpenSSL) to the store, in seconds: the same TLS 1.2, ECDHE
    on P-256 and RSA chain as MicroPython's, and TCP_NODELAY as the firmware sets it."""
    import socket
    import ssl

    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2  # MicroPython's mbedTLS speaks 1.2 only
    ctx.set_ecdh_curve("prime256v1")  # the one group both offer (mbedTLS here has no X25519)
    times = []
    for _ in range(n):
        with socket.create_connection((host, port)) as raw:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t0 = time.perf_counter()
            with ctx.wrap_socket(raw, server_hostname=host):
                times.append(time.perf_counter() - t0)
    return times


def _micropython(code: str, cwd: Path, flash: Path | None = None) -> dict:
    out = run_script(code, cwd, chip_env(flash) if flash is not None else None, heapsize="512k", timeout=600)
    for line in reversed(out.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"MicroPython run failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")


def run(size: int, runs: int, flash_mb: int = 4) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        site = Site(tmp / "site")
        site.trust.require(False)  # the download path alone (the release check: tools.bench.signing)
        flash_size, layout = (16 << 20, LARGEST_SLOTS_16MB) if flash_mb == 16 else (FLASH_SIZE, onflash.MICROPYTHON_OTA_4MIB)
        slot_size = max(row[4] for row in layout if row[1] == onflash.TYPE_APP)
        image = build_app_image("2.0.0", size)
        rel = site.releases.add(image, "2.0.0", slot_size)
        running = build_app_image("1.0.0", 64 * 1024)
        password = site.creds.set(DEVICE)
        auth = "Basic " + base64.b64encode(f"{DEVICE}:{password}".encode()).decode()
        with ServicesThread(site):
            ep = site.endpoints()
            work = tmp / "dev"
            work.mkdir()
            (work / "ca.der").write_bytes(site.pki.ca_der.read_bytes())
            results: dict[str, list[float]] = {"firmware": [], "emulated_flash": [], "reference": [], "curl": []}
            for _ in range(runs):
                url = presign.sign(site.store_key, ep.store_url, rel.sha256, DEVICE, 600)
                fw = {"url": url, "version": "2.0.0", "sha256": rel.sha256, "size": rel.size}
                (work / "fw.json").write_text(json.dumps(fw))
                path = url.split(str(ep.https_port), 1)[1]
                consts = f"AUTH = {auth!r}\nHOST = {ep.host!r}\nPORT = {ep.https_port}\nPATH = {path!r}\n"

                make_flash(work / "flash.bin", running, flash_size, layout)
                r = _micropython(consts + _FIRMWARE, work, work / "flash.bin")
                assert r["sha"] == rel.sha256, "firmware path hashed something else"
                results["firmware"].append(r["us"] / 1e6)

                r = _micropython(f"SIZE = {size}\n" + _FLASH_ONLY, work, work / "flash.bin")
                results["emulated_flash"].append(r["us"] / 1e6)

                r = _micropython(consts + _REFERENCE, work)
                assert r["sha"] == rel.sha256, "reference loop hashed something else"
                results["reference"].append(r["us"] / 1e6)

                if shutil.which("curl") is None:
                    continue
                t0 = time.perf_counter()
                out = subprocess.run(f"curl -sS --fail --cacert {site.pki.ca_cert} -H 'Authorization: {auth}' "
                                     f"'{url}' | sha256sum", shell=True, capture_output=True, text=True, timeout=300)
                results["curl"].append(time.perf_counter() - t0)
                assert out.stdout.split()[0] == rel.sha256, f"curl: {out.stderr}"
            hs, host_hs = [], []
            for _ in range(3):  # interleaved, so both see the same machine
                hs += [us / 1e6 for us in _micropython(f"N = 7\nURL = {ep.store_url + '/handshake'!r}\n" + _HANDSHAKE, work)["us"]]
                host_hs += _host_handshakes(ep.host, ep.https_port, site.pki.ca_cert, 7)
    med = {k: statistics.median(v) for k, v in results.items() if v}
    pairs = sorted(r / f for f, r in zip(results["firmware"], results["reference"]))
    q1, _, q3 = statistics.quantiles(pairs, n=4) if len(pairs) > 1 else (pairs[0],) * 3
    mib = size / (1024 * 1024)
    return {
        "size_bytes": size,
        "flash_mb": flash_mb,
        "runs": runs,
        "seconds_median": med,
        "mib_per_s": {k: mib / v for k, v in med.items()},
        "firmware_vs_reference": statistics.median(pairs),  # throughput ratio, target >= 0.95
        "firmware_vs_reference_quartiles": [q1, q3],
        "firmware_vs_reference_of_medians": med["reference"] / med["firmware"],
        "firmware_vs_curl": med["curl"] / med["firmware"] if "curl" in med else None,
        # the same ratio with the emulated flash driver's own time taken out of the firmware path
        "firmware_less_emulated_flash_vs_reference": med["reference"] / (med["firmware"] - med["emulated_flash"]),
        "tls_handshake_ms_median": statistics.median(hs) * 1000,  # target <= 10 ms on loopback
        "tls_handshake_ms_min": min(hs) * 1000,
        "tls_handshake_host_ms_median": statistics.median(host_hs) * 1000,
        "tls_handshake_vs_host": statistics.median(hs) / statistics.median(host_hs),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1_500_000, help="image bytes (must fit the slot: 1.5 MiB, or 7.9 MiB with --flash-mb 16)")
    ap.add_argument("--flash-mb", type=int, choices=(4, 16), default=4,
                    help="4: MicroPython's 4 MiB OTA layout; 16: a 16 MB board with the largest slots an ESP32 can have")
    ap.add_argument("--runs", type=int, default=21)
    ap.add_argument("--json", type=Path, default=Path("build/bench/ota_throughput.json"), help="where to write the figures")
    args = ap.parse_args(argv)
    r = run(args.size, args.runs, args.flash_mb)
    print(f"OTA download of {r['size_bytes']} bytes ({r['flash_mb']} MB flash), median of {r['runs']} runs (loopback)")
    print(f"{'path':<15} {'seconds':>8} {'MiB/s':>8}")
    for k in (k for k in ("firmware", "emulated_flash", "reference", "curl") if k in r["seconds_median"]):
        print(f"{k:<15} {r['seconds_median'][k]:8.3f} {r['mib_per_s'][k]:8.2f}")
    q1, q3 = r["firmware_vs_reference_quartiles"]
    print(f"firmware / reference throughput: {r['firmware_vs_reference']:.2f}x, median of the runs' ratios "
          f"(quartiles {q1:.2f}-{q3:.2f}; ratio of the medians {r['firmware_vs_reference_of_medians']:.2f}x; target >= 0.95)")
    print(f"  without the emulated flash driver's {r['seconds_median']['emulated_flash']:.3f} s "
          f"(Python here, C on a chip): {r['firmware_less_emulated_flash_vs_reference']:.2f}x")
    if r["firmware_vs_curl"] is not None:
        print(f"firmware / curl|sha256sum throughput: {r['firmware_vs_curl']:.2f}x")
    print(f"TLS handshake (MicroPython, CERT_REQUIRED, loopback): {r['tls_handshake_ms_median']:.1f} ms median, "
          f"{r['tls_handshake_ms_min']:.1f} ms fastest (target <= 10); CPython/OpenSSL, same key exchange and chain: "
          f"{r['tls_handshake_host_ms_median']:.1f} ms -> MicroPython takes {r['tls_handshake_vs_host']:.1f}x as long")
    write_results(args.json, r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
