"""The emulated board's USB serial: its REPL on a local TCP port, for mpremote.

`mpremote connect socket://127.0.0.1:PORT` talks to the emulated ESP32 as to a board on a
serial port. The MicroPython unix port needs a terminal for its (raw) REPL, so the board runs
on a pseudo-terminal in raw mode with ISIG kept on (Ctrl-C must still interrupt main.py; with
output post-processing left on, every line would end "\\r\\r\\n" and mpremote would hang).

A soft reset differs: a board prints "soft reboot" and comes back with the same filesystem,
while the unix port prints "OK" and exits. The runner restarts the process (no chip reset)
and this bridge says "soft reboot"; if the host was in the raw REPL, it puts the new process
back into it, as a board does, and boot.py runs but main.py does not (ports' pyexec rule).
"""

from __future__ import annotations

import os
import pty
import socket
import termios
import threading
import tty
from collections.abc import Callable


def _raw_tty_keep_signals() -> None:
    # In the child, before exec: raw mode for the REPL, but Ctrl-C still raises SIGINT.
    from tools.esp32emu.process import die_with_parent

    die_with_parent()
    os.setsid()
    tty.setraw(0)
    attrs = termios.tcgetattr(0)
    attrs[3] |= termios.ISIG
    termios.tcsetattr(0, termios.TCSANOW, attrs)
    import fcntl

    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class ReplBridge:
    """TCP server on 127.0.0.1 that joins one client at a time to the board's terminal."""

    def __init__(self, port: int = 0, on_line: Callable[[str], None] | None = None):
        self._srv = socket.socket()
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._srv.bind(("127.0.0.1", port))
        self._srv.listen(1)
        self.port = self._srv.getsockname()[1]
        self.on_line = on_line
        self.raw_mode = False  # the host's last request: Ctrl-A raw REPL, Ctrl-B friendly
        self._client: socket.socket | None = None
        self._master: int | None = None
        self._lock = threading.Lock()
        self._ready = threading.Event()  # the current process has printed its first prompt
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="repl-accept").start()

    # -- the board side -----------------------------------------------------------------

    def spawn_args(self) -> dict:
        """Popen arguments that run the board process on a new pseudo-terminal."""
        master, slave = pty.openpty()
        with self._lock:
            old, self._master = self._master, master
        if old is not None:
            os.close(old)
        self._ready.clear()
        self._slave = slave
        return {"stdin": slave, "stdout": slave, "stderr": slave, "preexec_fn": _raw_tty_keep_signals}

    def started(self) -> None:
        """Call after Popen: the parent keeps only the master side."""
        os.close(self._slave)
        threading.Thread(target=self._pump, args=(self._master,), daemon=True, name="repl-pump").start()

    def _pump(self, master: int) -> None:
        line = b""
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            if not data:
                return
            if b">>> " in data or b"raw REPL" in data:
                self._ready.set()
            self.to_client(data)
            if self.on_line:
                line += data
                *lines, line = line.split(b"\n")
                for ln in lines:
                    self.on_line(ln.decode(errors="replace").rstrip("\r"))

    def soft_reboot(self) -> None:
        """The process exited on a soft reset: tell the host, as a board would."""
        self.to_client(b"MPY: soft reboot\r\n")

    def reenter_raw(self, timeout: float = 10.0) -> None:
        """After a soft reset from the raw REPL, put the new process back into it."""
        if self._ready.wait(timeout):
            self.to_board(b"\r\x01")

    def to_board(self, data: bytes) -> None:
        with self._lock:
            master = self._master
        if master is not None:
            try:
                os.write(master, data)
            except OSError:
                pass

    def to_client(self, data: bytes) -> None:
        with self._lock:
            client = self._client
        if client is not None:
            try:
                client.sendall(data)
            except OSError:
                pass

    # -- the host side ------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._srv.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                old, self._client = self._client, conn
            if old is not None:
                old.close()
            threading.Thread(target=self._from_client, args=(conn,), daemon=True, name="repl-in").start()

    def _from_client(self, conn: socket.socket) -> None:
        while True:
            try:
                data = conn.recv(4096)
            except OSError:
                data = b""
            if not data:
                with self._lock:
                    if self._client is conn:
                        self._client = None
                conn.close()
                return
            for b in data:
                if b == 0x01:
                    self.raw_mode = True
                elif b == 0x02:
                    self.raw_mode = False
            self.to_board(data)

    def close(self) -> None:
        self._closed = True
        self._srv.close()
        with self._lock:
            if self._client is not None:
                self._client.close()
            if self._master is not None:
                os.close(self._master)
                self._master = None
