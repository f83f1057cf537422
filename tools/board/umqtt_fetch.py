"""Fetch umqtt.simple for the emulated device, by name and pinned hash, from pip's index.

The PyPI sdist `micropython-umqtt.simple` 1.3.4 has no setup.py, so pip cannot install it; this
asks the index pip is configured with (PEP 691 JSON API) for that one file, checks its SHA-256
and extracts `umqtt/simple.py`. Real ESP32 builds have umqtt.simple frozen in.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import ssl
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

PACKAGE = "micropython-umqtt.simple"
VERSION = "1.3.4"
FILENAME = f"{PACKAGE}-{VERSION}.tar.gz"
SHA256 = "b6a2520239e3992c63a7de9370ee9b3d9d27819a90359c521f1c0f7ccab8d12f"


def _index_urls() -> list[str]:
    """index-url and extra-index-urls as pip itself resolves them (config files, env)."""
    urls = []
    for key in ("global.index-url", "global.extra-index-url"):
        out = subprocess.run([sys.executable, "-m", "pip", "config", "get", key],
                             capture_output=True, text=True)
        if out.returncode == 0:
            urls += out.stdout.split()
    for env in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
        urls += os.environ.get(env, "").split()
    if not any(u.startswith("http") for u in urls):
        from pip._internal.models.index import PyPI  # pip's own default index

        urls.insert(0, PyPI.simple_url)
    return [u for u in dict.fromkeys(urls) if u.startswith(("http://", "https://"))]


def _ssl_context() -> ssl.SSLContext:
    cafile = os.environ.get("PIP_CERT")
    return ssl.create_default_context(cafile=cafile) if cafile else ssl.create_default_context()


def _find(index: str) -> str | None:
    req = urllib.request.Request(
        f"{index.rstrip('/')}/{PACKAGE.replace('.', '-')}/",
        headers={"Accept": "application/vnd.pypi.simple.v1+json"},
    )
    with urllib.request.urlopen(req, context=_ssl_context(), timeout=60) as r:
        data = json.load(r)
    for f in data.get("files", []):
        if f.get("filename") == FILENAME and f.get("hashes", {}).get("sha256") == SHA256:
            return f["url"]
    return None


def fetch(cache: Path) -> Path:
    """Return the path of umqtt/simple.py under `cache`, downloading it once."""
    target = Path(cache) / "umqtt" / "simple.py"
    if target.exists():
        return target
    errors = []
    for index in _index_urls():
        try:
            url = _find(index)
            if not url:
                errors.append(f"{index}: {FILENAME} with the pinned hash not listed")
                continue
            with urllib.request.urlopen(url, context=_ssl_context(), timeout=60) as r:
                blob = r.read()
        except (OSError, ValueError) as e:
            errors.append(f"{index}: {e}")
            continue
        if hashlib.sha256(blob).hexdigest() != SHA256:
            errors.append(f"{index}: downloaded file does not match the pinned SHA-256")
            continue
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
            member = tar.getmember(f"{PACKAGE}-{VERSION}/umqtt/simple.py")
            src = tar.extractfile(member).read()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.with_suffix(".tmp").write_bytes(src)
        target.with_suffix(".tmp").replace(target)
        return target
    raise RuntimeError(f"could not fetch {FILENAME}:\n  " + "\n  ".join(errors))


if __name__ == "__main__":
    print(fetch(Path(sys.argv[1] if len(sys.argv) > 1 else "build/cache")))
