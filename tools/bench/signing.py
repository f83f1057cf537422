"""What checking a release's signature costs the device: `firmware.release.check` (RSA-3072
PSS with MicroPython's big integers, the key digest, the manifest) under MicroPython, against
the SHA-256 of the 300 KiB image the same update hashes anyway (the firmware hashes every
image three times: the download, the read-back, set_boot()'s check), timed in the same
process; and `cryptography`'s verification on the host, for scale.

    python -m tools.bench.signing [--runs 21] [--json build/bench/signing.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import rsa

from tools.bench import write_results
from tools.bench.ota_throughput import _micropython
from tools.espidf.images import build_app_image
from tools.site.signing import key_digest, release_bundle, verify

_CODE = """
import hashlib, json, time
from firmware import release, rsapss
case = json.loads(open("case.json").read())
body = json.dumps(case["bundle"]).encode()
image = open("image.bin", "rb").read()
cfg = {"trusted_keys": [case["digest"]]}
out = {"check_ms": [], "sha256_ms": []}
for i in range(case["runs"]):
    t = time.ticks_us()
    seal = release.check(cfg, case["fw"], body)
    out["check_ms"].append(time.ticks_diff(time.ticks_us(), t) / 1000)
    t = time.ticks_us()
    hashlib.sha256(image).digest()
    out["sha256_ms"].append(time.ticks_diff(time.ticks_us(), t) / 1000)
out["signer"] = seal["signer"]
print(json.dumps(out))
"""


def measure(runs: int) -> dict:
    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    image = build_app_image("1.1.0", 300 * 1024)
    bundle = release_bundle(key, image, "1.1.0", 1)
    fw = {"url": "https://h/fw/x.bin", "version": "1.1.0", "sha256": hashlib.sha256(image).hexdigest(),
          "size": len(image)}
    with tempfile.TemporaryDirectory() as tmp:
        fs = Path(tmp)
        (fs / "case.json").write_text(json.dumps({"bundle": bundle, "fw": fw, "runs": runs,
                                                  "digest": key_digest(key.public_key())}))
        (fs / "image.bin").write_bytes(image)
        dev = _micropython(_CODE, fs)
    host = []
    for _ in range(runs):
        t = time.perf_counter()
        verify(bundle, [key_digest(key.public_key())])
        host.append((time.perf_counter() - t) * 1000)
    check, sha = statistics.median(dev["check_ms"]), statistics.median(dev["sha256_ms"])
    return {"runs": runs, "check_ms": round(check, 2), "sha256_300k_ms": round(sha, 2),
            "check_per_sha256": round(check / sha, 2), "host_verify_ms": round(statistics.median(host), 3),
            "signer": dev["signer"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=21)
    ap.add_argument("--json", type=Path, default=Path("build/bench/signing.json"))
    args = ap.parse_args(argv)
    r = measure(args.runs)
    print(f"release check on the device (MicroPython, median of {r['runs']}): {r['check_ms']} ms, "
          f"{r['check_per_sha256']}x the SHA-256 of the 300 KiB image in the same process ({r['sha256_300k_ms']} ms); "
          f"cryptography on the host: {r['host_verify_ms']} ms")
    write_results(args.json, r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
