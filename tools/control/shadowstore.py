"""Where the replica keeps shadow documents: SQLite by default, PostgreSQL to scale out.

One schema on both (a row per device: version, document, and the last request that carried a
clientToken with its answer), one interface, chosen by location: a file path is SQLite (WAL),
a `postgresql://` URL is PostgreSQL. Every write is a compare-and-swap on the version, so
several replica workers can share one store.
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import contextmanager
from pathlib import Path

from tools.control.shadow import compact

COLUMNS = ("device_id TEXT PRIMARY KEY, version INTEGER NOT NULL, doc TEXT NOT NULL,"
           " last_request TEXT, last_answer TEXT")


@contextmanager
def sqlite_transaction(conn: sqlite3.Connection):
    """Several statements, one commit (one fsync), or none on any exception. IMMEDIATE: other
    writers wait for it. For connections in autocommit mode (isolation_level=None)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class _Store:
    """The SQL both engines share; subclasses supply `_query`/`_write` and the parameter style."""

    P = "?"

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        raise NotImplementedError

    def _write(self, sql: str, args: tuple) -> int:
        raise NotImplementedError

    def _sql(self, sql: str) -> str:
        return sql.replace("?", self.P)

    def get(self, device_id: str) -> dict | None:
        rows = self._query(self._sql("SELECT doc FROM shadows WHERE device_id = ?"), (device_id,))
        return json.loads(rows[0][0]) if rows else None

    def rows(self, device_ids: list[str]) -> dict[str, tuple[dict, str | None, list | None] | None]:
        """For each device: (document, digest of the last request that carried a clientToken,
        what it was answered), or None when it has no shadow; one query per 500 devices."""
        out: dict[str, tuple[dict, str | None, list | None] | None] = dict.fromkeys(device_ids)
        for dev, doc, request, answer in self._in("device_id, doc, last_request, last_answer", list(out)):
            out[dev] = (json.loads(doc), request, json.loads(answer) if request is not None else None)
        return out

    def _in(self, columns: str, device_ids: list[str]) -> list[tuple]:
        rows = []
        for i in range(0, len(device_ids), 500):  # engines bound the number of parameters
            chunk = tuple(device_ids[i:i + 500])
            marks = ",".join([self.P] * len(chunk))
            rows += self._query(f"SELECT {columns} FROM shadows WHERE device_id IN ({marks})", chunk)
        return rows

    def put(self, device_id: str, doc: dict, expected_version: int, request: str | None = None,
            answer: list | None = None) -> bool:
        """Compare-and-swap on version; False if someone else wrote first. `request`/`answer`
        (kept when None) are written in the same statement as the document, so a replayed
        request is recognised after a crash too."""
        text = compact(doc)
        ans = compact(answer) if answer is not None else None
        if expected_version == 0:
            sql = ("INSERT INTO shadows (device_id, version, doc, last_request, last_answer) VALUES (?, ?, ?, ?, ?)"
                   " ON CONFLICT (device_id) DO NOTHING")
            return self._write(self._sql(sql), (device_id, doc["version"], text, request, ans)) == 1
        sql = ("UPDATE shadows SET version = ?, doc = ?, last_request = COALESCE(?, last_request),"
               " last_answer = COALESCE(?, last_answer) WHERE device_id = ? AND version = ?")
        return self._write(self._sql(sql), (doc["version"], text, request, ans, device_id, expected_version)) == 1

    def docs(self, devices: list[str] | None = None) -> dict[str, dict]:
        """Documents by device: all, or those of `devices` that have one."""
        if devices is None:
            rows = self._query("SELECT device_id, doc FROM shadows ORDER BY device_id")
        else:
            rows = self._in("device_id, doc", devices)
        return {d: json.loads(doc) for d, doc in rows}


class SQLiteStore(_Store):
    errors = (sqlite3.Error,)

    def __init__(self, path: Path, readonly: bool = False):
        self._in_tx = False
        if readonly:
            self.conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
            return
        self.conn = sqlite3.connect(str(path), isolation_level=None, timeout=30)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")  # accepted means on disk
        self.conn.execute(f"CREATE TABLE IF NOT EXISTS shadows ({COLUMNS})")
        columns = {row[1] for row in self.conn.execute("PRAGMA table_info(shadows)")}
        if "last_request" not in columns:  # databases from before idempotent requests
            self.conn.execute("ALTER TABLE shadows ADD COLUMN last_request TEXT")
            self.conn.execute("ALTER TABLE shadows ADD COLUMN last_answer TEXT")

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        return self.conn.execute(sql, args).fetchall()

    def _write(self, sql: str, args: tuple) -> int:
        if self._in_tx:
            return self.conn.execute(sql, args).rowcount
        with self.conn:
            return self.conn.execute(sql, args).rowcount

    @contextmanager
    def transaction(self):
        """Several writes, one commit (one fsync). IMMEDIATE: other writers wait for it."""
        self._in_tx = True
        try:
            with sqlite_transaction(self.conn):
                yield
        finally:
            self._in_tx = False

    def close(self) -> None:
        self.conn.close()


class PostgresStore(_Store):
    P = "%s"

    def __init__(self, url: str, readonly: bool = False):
        import psycopg

        self.errors = (psycopg.Error,)

        # autocommit: each statement is its own transaction, committed (and, with the
        # server's default synchronous_commit, flushed) before it returns.
        self.conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
        self.conn.execute(f"CREATE TABLE IF NOT EXISTS shadows ({COLUMNS})")
        if readonly:
            self.conn.read_only = True

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        return self.conn.execute(sql, args).fetchall()

    def _write(self, sql: str, args: tuple) -> int:
        return self.conn.execute(sql, args).rowcount

    @contextmanager
    def transaction(self):
        """Several writes, one commit. Row locks make a competing worker wait (or, on a
        deadlock, fail this transaction: the caller retries)."""
        with self.conn.transaction():
            yield

    def close(self) -> None:
        self.conn.close()


def is_url(location) -> bool:
    return str(location).startswith(("postgresql://", "postgres://"))


def open_store(location, readonly: bool = False) -> _Store:
    """A file path (SQLite) or a postgresql:// URL."""
    if is_url(location):
        return PostgresStore(str(location), readonly)
    return SQLiteStore(Path(location), readonly)
