"""Per-identity passwords shared by the broker and the firmware store.

One line per identity, `name:<hash>`, in the same shape as amqtt's password file. A device
proves who it is with the same credential to the broker (MQTT username/password) and to the
store (HTTP Basic), so revoking a device is removing its line.

The passwords this project makes are 24 random bytes (192 bits): no guessing reaches them,
however fast the hash, so they are kept as a salted SHA-256 (`$sha256$`), checked in
microseconds. A slow hash defends passwords people choose, and costs its price on every
check: argon2id took ~30 ms of the store's CPU per download and of amqtt's per connect. A
password handed in from outside keeps argon2id, and lines written before keep verifying.

Beside it, `<file>.mosquitto` holds the same identities in mosquitto's own format (PBKDF2-SHA512,
`$7$`; mosquitto cannot read argon2), written in the same step, so either broker can serve a
site (`serve --broker mosquitto`).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import functools
import hashlib
import hmac
import os
import secrets
import threading
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from tools.site.secretfile import write_private

# OWASP's minimum argon2id profile (19 MiB, t=2, p=1), for passwords someone chose.
_HASHER = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)
_FAST = "$sha256$"


def _fast_digest(salt: bytes, password: str) -> bytes:
    return hashlib.sha256(salt + password.encode()).digest()


def _fast_hash(password: str) -> str:
    """`$sha256$<salt>$<digest>` (base64): for generated, high-entropy passwords only."""
    salt = os.urandom(16)
    return f"{_FAST}{base64.b64encode(salt).decode()}${base64.b64encode(_fast_digest(salt, password)).decode()}"


def _verify_fast(h: str, password: str) -> bool:
    try:
        salt, digest = (base64.b64decode(x, validate=True) for x in h[len(_FAST):].split("$"))
    except (ValueError, TypeError):  # binascii.Error is a ValueError; a wrong field count too
        return False
    return hmac.compare_digest(_fast_digest(salt, password), digest)


_DUMMY = _fast_hash("y" * 32)


@functools.cache
def _slow_dummy() -> str:
    return _HASHER.hash("y" * 32)


def mosquitto_hash(password: str) -> str:
    """A password in mosquitto 2's file format: PBKDF2-SHA512, 101 rounds, 12-byte salt."""
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101)
    return f"$7$101${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


class Credentials:
    """A password file that reloads itself when it changes on disk."""

    def __init__(self, path: Path, mosquitto: bool = True, chosen: bool = False):
        """`mosquitto`: keep the broker's copy beside it (a file no broker reads has none).
        `chosen`: passwords people chose (argon2id): an unknown name costs an argon2id check
        too, so the time of an answer does not tell which names exist."""
        self.path = Path(path)
        self.chosen = chosen
        self.mosquitto_path = self.path.with_name(self.path.name + ".mosquitto") if mosquitto else None
        self._lock = threading.Lock()
        self._mtime: tuple[int, int, int] | None = None
        self._hashes: dict[str, str] = {}

    def _load(self) -> dict[str, str]:
        with self._lock:
            try:
                st = self.path.stat()
            except FileNotFoundError:
                self._hashes, self._mtime = {}, None
                return self._hashes
            # The inode too: a rewrite is a new file (write_private renames one into place),
            # and two rewrites within one clock tick can share an mtime.
            mtime = (st.st_ino, st.st_mtime_ns, st.st_size)
            if mtime != self._mtime:
                self._hashes, self._mtime = _read_lines(self.path), mtime
            return self._hashes

    def names(self) -> list[str]:
        return sorted(self._load())

    def mosquitto_names(self) -> set[str]:
        """Identities the mosquitto file has (those set before it existed are missing)."""
        return set(_read_lines(self.mosquitto_path)) if self.mosquitto_path else set()

    def known(self, name: str) -> bool:
        """Whether `name` has a password (a stat per call; no hashing)."""
        return name in self._load()

    def verify(self, name: str, password: str) -> bool:
        h = self._load().get(name)
        if h is None or not password:
            # Spend what checking a password costs, so probing for names teaches nothing.
            if self.chosen:
                try:
                    _HASHER.verify(_slow_dummy(), "x" * 32)
                except VerificationError:
                    pass
            else:
                _verify_fast(_DUMMY, "x" * 32)
            return False
        if h.startswith(_FAST):
            return _verify_fast(h, password)
        try:
            return _HASHER.verify(h, password)
        except (VerificationError, InvalidHashError):
            return False

    def fingerprint(self, name: str) -> str | None:
        """A digest of `name`'s stored hash (None if unknown): it changes whenever the password
        is set again, so a session can end with the password it was opened with."""
        h = self._load().get(name)
        return None if h is None else hashlib.sha256(h.encode()).hexdigest()[:16]

    @contextlib.contextmanager
    def _editing(self):
        """Read-modify-write under an exclusive lock (threads and other processes alike)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                with self._lock:
                    self._mtime = None  # re-read: another process may have written
                hashes = dict(self._load())
                mosq = _read_lines(self.mosquitto_path) if self.mosquitto_path else {}
                yield hashes, mosq
                if self.mosquitto_path:
                    _write_lines(self.mosquitto_path, {n: h for n, h in mosq.items() if n in hashes})
                self._write(hashes)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def set(self, name: str, password: str | None = None, *, generated: bool | None = None) -> str:
        """Create or replace `name`'s password; returns the password. Without one, a random
        password is made and kept as a fast hash; a given one is kept as argon2id unless
        `generated` says it came from `set` before."""
        if not name or ":" in name or "\n" in name:
            raise ValueError(f"bad identity name {name!r}")
        if generated is None:
            generated = not password
        password = password or secrets.token_urlsafe(24)
        digest = _fast_hash(password) if generated else _HASHER.hash(password)
        with self._editing() as (hashes, mosq):
            hashes[name] = digest
            if self.mosquitto_path:
                mosq[name] = mosquitto_hash(password)
        return password

    def remove(self, name: str) -> bool:
        with self._editing() as (hashes, mosq):
            mosq.pop(name, None)
            return hashes.pop(name, None) is not None

    def _write(self, hashes: dict[str, str]) -> None:
        _write_lines(self.path, hashes)


def _read_lines(path: Path) -> dict[str, str]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    return {n: h for n, sep, h in (line.partition(":") for line in text.splitlines()) if sep and n and h}


def _write_lines(path: Path, hashes: dict[str, str]) -> None:
    write_private(path, "".join(f"{n}:{h}\n" for n, h in sorted(hashes.items())))
