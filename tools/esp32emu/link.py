"""Wi-Fi link loss for an emulated board, without the board's cooperation.

While the link is down the runner cuts every TCP connection the MicroPython process holds:
it takes a duplicate of each socket descriptor with pidfd_getfd(2) and shuts it down, so a
blocked read returns end-of-stream and writes fail, as when the access point disappears; new
connections are cut the same way until the link is back. network.WLAN.isconnected() reads the
state from <ctl>/link. Needs Linux >= 5.6 and permission to inspect the child (the parent has
it under the default ptrace scope).
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading
import time
from pathlib import Path

_SYS_PIDFD_OPEN = 434
_SYS_PIDFD_GETFD = 438
_libc = ctypes.CDLL(None, use_errno=True)


def cut_sockets(pid: int) -> int:
    """Shut down every socket the process `pid` holds; returns how many."""
    pidfd = _libc.syscall(_SYS_PIDFD_OPEN, pid, 0)
    if pidfd < 0:
        return 0  # the process is gone
    cut = 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                    continue
            except OSError:
                continue
            dup = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, int(fd), 0)
            if dup < 0:
                err = ctypes.get_errno()
                if err in (1, 38):  # EPERM, ENOSYS: this machine cannot do it at all
                    raise OSError(err, "cannot take the board's sockets (pidfd_getfd)")
                continue
            with socket.socket(fileno=dup) as s:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                    cut += 1
                except OSError:
                    pass  # not connected (yet)
    except FileNotFoundError:
        pass
    finally:
        os.close(pidfd)
    return cut


class Link:
    """The board's Wi-Fi link, driven by the runner (or a test) from outside."""

    def __init__(self, ctl: Path, pid_of):
        self.path = Path(ctl) / "link"
        self._pid_of = pid_of  # () -> pid of the running MicroPython process, or None
        self._down = threading.Event()
        self.path.write_text("up")

    @property
    def up(self) -> bool:
        return not self._down.is_set()

    def down(self) -> None:
        self.path.write_text("down")
        self._down.set()
        threading.Thread(target=self._keep_cut, daemon=True, name="link-down").start()

    def restore(self) -> None:
        self._down.clear()
        self.path.write_text("up")

    def _keep_cut(self) -> None:
        while self._down.is_set():
            pid = self._pid_of()
            if pid is not None:
                cut_sockets(pid)
            time.sleep(0.02)
