"""A throwaway PostgreSQL server for tests and benchmarks: initdb in a folder, loopback only.

Uses the distribution's server binaries (Debian: postgresql-15, `make system-deps`). PostgreSQL
refuses to run as root, so as root the server runs as the `postgres` user the package creates.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from pathlib import Path

from tools.control.ports import free_port


class PostgresError(Exception):
    pass


def find_bin() -> Path | None:
    """Folder of initdb/pg_ctl: on PATH, or Debian's /usr/lib/postgresql/<major>/bin."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


class Postgres:
    def __init__(self, directory: Path, port: int | None = None):
        self.bin = find_bin()
        if self.bin is None:
            raise PostgresError("PostgreSQL server binaries not found (apt-get install postgresql-15)")
        self.dir = Path(directory)
        self.data = self.dir / "data"
        self.port = port or free_port("127.0.0.1")
        self._as = []
        if os.geteuid() == 0:
            if shutil.which("runuser") is None:
                raise PostgresError("running as root needs runuser to start PostgreSQL as the postgres user")
            self._as = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str, timeout: float = 60) -> None:
        r = subprocess.run([*self._as, *args], capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise PostgresError(f"{Path(args[0]).name} failed: {r.stderr.strip() or r.stdout.strip()}")

    def start(self) -> "Postgres":
        self.dir.mkdir(parents=True, exist_ok=True)
        if self._as:
            shutil.chown(self.dir, "postgres", "postgres")
        if not self.data.exists():
            # trust: only loopback and a socket in our own folder can reach it
            self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
                      "--no-sync", "-E", "UTF8")
        opts = f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.dir}" \
               " -c max_connections=200 -c fsync=on"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.dir / "log"),
                  "-w", "-t", "60", "start")
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def __enter__(self) -> "Postgres":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
