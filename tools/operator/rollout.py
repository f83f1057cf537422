"""Staged fleet rollouts: one release to many devices, in batches, with abort and roll back.

A rollout is persisted in `<site>/rollouts.db` (SQLite) before anything is sent, and every
decision is written there first, so a rollout command that is stopped or crashes resumes
where it was (`rollout resume ID`). The driver talks to devices only through the shadow:
it writes `desired.firmware` (a URL pre-signed for that device at the moment it is
targeted) via the replica, and it reads what devices report from the replica's database.
Expired URLs are re-signed by the renewer service, for rollouts as for everything else.

Per device: pending -> in_progress -> succeeded | failed (a device error the device will not
get past by itself, or no outcome within the timeout: a bricked device never reports), or
pending -> skipped when the rollout stops early, in_progress -> stopped when it is rolled back
before it finished. Per rollout: running -> completed, aborted
(failure threshold, or a batch that finished below the success threshold) or cancelled.
Rolling back sets desired to the release each device ran before it was targeted.
"""

from __future__ import annotations

import asyncio
import fcntl
import fnmatch
import json
import logging
import math
import os
import secrets
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

from firmware import contract
from tools.control import grants
from tools.control.shadows import Shadow
from tools.control import presign
from tools.site.releases import Release
from tools.control.shadowstore import sqlite_transaction

log = logging.getLogger("rollout")

# target states
PENDING, IN_PROGRESS, SUCCEEDED, FAILED, SKIPPED = "pending", "in_progress", "succeeded", "failed", "skipped"
STOPPED = "stopped"  # was in progress when the rollout set it back: no outcome of its own
# rollout states
RUNNING, COMPLETED, ABORTED, CANCELLED = "running", "completed", "aborted", "cancelled"
# rollback of one device
RB_REQUESTED, RB_DONE, RB_NO_PREVIOUS, RB_TIMEOUT = "requested", "done", "no_previous", "timeout"

E_TIMEOUT = "timeout"  # in progress longer than the rollout's timeout
E_SUPERSEDED = "superseded"  # someone else changed the device's desired firmware
E_UNGRANTED = "ungranted_desired"  # ... to one no operator granted (tools.grants): a device or the database

REPUBLISH_S = 15  # desired not in the shadow this long after publishing: publish again


class RolloutError(Exception):
    pass


@dataclass
class Policy:
    batches: list[str] = field(default_factory=lambda: ["1", "10%", "50%", "100%"])
    success_pct: float = 100.0  # a batch advances when this share of it has succeeded
    abort_failures: int | None = None  # abort at this many failed devices ...
    abort_pct: float | None = None  # ... or at this share of the finished ones
    min_finished: int = 1  # ... counted only once this many have finished
    timeout_s: int = 900  # in progress longer than this is a failure
    max_attempts: int = 3  # as the devices' config: a transient error this often is a failure
    rollback_on_abort: bool = True
    ttl: int = presign.DEFAULT_TTL
    auth: str = "url"  # "url": pre-signed per device; "token": devices fetch temporary credentials

    def check(self) -> None:
        if not self.batches:
            raise RolloutError("batches: at least one")
        for b in self.batches:
            try:
                v = float(b[:-1]) if b.endswith("%") else int(b)
            except ValueError:
                raise RolloutError(f"batch {b!r}: a count (5) or a percentage (10%)") from None
            if not (0 < v <= 100 if b.endswith("%") else v > 0):
                raise RolloutError(f"batch {b!r}: counts are > 0, percentages in (0, 100]")
        if not 0 <= self.success_pct <= 100:
            raise RolloutError("success threshold: a percentage from 0 to 100")
        if self.abort_pct is not None and not 0 < self.abort_pct <= 100:
            raise RolloutError("abort percentage: in (0, 100]")
        if self.abort_failures is not None and self.abort_failures < 1:
            raise RolloutError("abort count: at least 1")
        if self.timeout_s <= 0 or self.min_finished < 1 or self.max_attempts < 1:
            raise RolloutError("timeout, minimum finished and attempts must be positive")
        if self.auth not in ("url", contract.AUTH_TOKEN):
            raise RolloutError(f"auth: url or {contract.AUTH_TOKEN}")
        if not 0 < self.ttl <= presign.MAX_TTL:
            raise RolloutError(f"URL lifetime: 1 to {presign.MAX_TTL} seconds")


def select_devices(site, devices: list[str] | None = None, match: str | None = None, group: str | None = None,
                   every: bool = False) -> list[str]:
    """A rollout's targets: `devices` as given; `match` (a glob), `group` (a name in
    `<site>/groups.json`) or `every` among the devices the replica knows. One of the four."""
    from tools.control import shadows

    if sum(bool(x) for x in (devices, match, group, every)) != 1:
        raise RolloutError("targets: give device ids, a glob, a group or all, one of them")
    if devices:
        return list(devices)
    patterns = [match] if match else None
    if group:
        patterns = group_patterns(site, group)
    known = list(shadows.read(site.shadow_store))
    picked = known if patterns is None else matching(known, patterns)
    if not picked:
        raise RolloutError("no known device matches (devices appear once they have reported)")
    return picked


def matching(ids, patterns: list[str]) -> list[str]:
    """The ids that are one of `patterns` or match one of its globs (a group's, or --match)."""
    exact = {p for p in patterns if not any(c in p for c in "*?[")}
    globs = [p for p in patterns if p not in exact]
    return [d for d in ids if d in exact or any(fnmatch.fnmatchcase(d, g) for g in globs)]


def group_patterns(site, name: str) -> list[str]:
    """The ids or globs of a group in `<site>/groups.json`."""
    try:
        groups = site.groups()
    except ValueError as e:
        raise RolloutError(str(e)) from None
    if name not in groups:
        raise RolloutError(f"no group {name!r} in {site.root / 'groups.json'} (groups: {sorted(groups)})")
    return groups[name]


def batch_ends(batches: list[str], n: int) -> list[int]:
    """Cumulative batch ends over n devices: ["1", "10%", "50%", "100%"], 20 -> [1, 2, 10, 20].
    Every batch adds at least one device; the last one always reaches n."""
    ends: list[int] = []
    for b in batches:
        k = math.ceil(n * float(b[:-1]) / 100) if b.endswith("%") else int(b)
        k = min(max(k, ends[-1] + 1 if ends else 1), n)
        if not ends or k > ends[-1]:
            ends.append(k)
        if k == n:
            break
    if n and (not ends or ends[-1] < n):
        ends.append(n)
    return ends


# -- what a shadow says ----------------------------------------------------------------------

def desired_since(shadow: Shadow | None, sha256: str) -> int | None:
    """When (replica clock) the shadow started to desire `sha256`; None if it does not."""
    if shadow is None or shadow.desired.get("sha256") != sha256:
        return None
    return shadow.stamp(contract.DESIRED, "sha256")


def judge(shadow: Shadow | None, sha256: str, version: str, max_attempts: int) -> tuple[str, str | None]:
    """(SUCCEEDED | FAILED | IN_PROGRESS, error) for a device told to run image `sha256`:
    only reports made since the shadow desires it count."""
    since = desired_since(shadow, sha256)
    if since is None or shadow.stamp(contract.REPORTED, "state") < since:
        return IN_PROGRESS, None
    fw = shadow.reported
    if fw.get("sha256") == sha256 and fw.get("state") == contract.ST_IDLE:
        return SUCCEEDED, None
    if fw.get("state") == contract.ST_FAILED and fw.get("target") == version:
        err = fw.get("error")
        if fw.get("need_url"):
            return IN_PROGRESS, None  # the renewer signs a fresh URL
        attempts = fw.get("attempts") if isinstance(fw.get("attempts"), int) else 0
        # rolled_back: the image failed its health check on this device - exactly what a
        # staged rollout is there to catch, even though the device would try it again.
        if err == contract.E_ROLLED_BACK or err not in contract.TRANSIENT_ERRORS or attempts >= max_attempts:
            return FAILED, err or "failed"
    return IN_PROGRESS, None


# -- persisted state -----------------------------------------------------------------------

@dataclass
class Target:
    device: str
    position: int
    batch: int
    state: str = PENDING
    error: str | None = None
    prev_version: str | None = None  # what it ran when targeted: the roll-back image
    prev_sha256: str | None = None
    prev_desired: str | None = None  # desired sha256 before ours (None: nothing desired)
    targeted_at: float | None = None
    published_at: float | None = None
    finished_at: float | None = None
    rollback: str | None = None
    rollback_at: float | None = None


@dataclass
class RolloutInfo:
    id: str
    version: str
    sha256: str
    size: int
    policy: Policy
    state: str
    batch: int  # index of the batch being rolled out
    ends: list[int]
    created: float
    updated: float
    reason: str | None = None


class RolloutDB:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.conn = sqlite3.connect(str(path), isolation_level=None, timeout=30)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.executescript(
            "CREATE TABLE IF NOT EXISTS rollouts (id TEXT PRIMARY KEY, version TEXT NOT NULL,"
            " sha256 TEXT NOT NULL, size INTEGER NOT NULL, policy TEXT NOT NULL, state TEXT NOT NULL,"
            " batch INTEGER NOT NULL, ends TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL, reason TEXT);"
            "CREATE TABLE IF NOT EXISTS targets (rollout TEXT NOT NULL, device TEXT NOT NULL,"
            " position INTEGER NOT NULL, batch INTEGER NOT NULL, state TEXT NOT NULL, error TEXT,"
            " prev_version TEXT, prev_sha256 TEXT, prev_desired TEXT, targeted_at REAL, published_at REAL,"
            " finished_at REAL, rollback TEXT, rollback_at REAL, PRIMARY KEY (rollout, device));"
            "CREATE INDEX IF NOT EXISTS targets_by_device ON targets (device);"
            "CREATE INDEX IF NOT EXISTS targets_rolling_back ON targets (rollback) WHERE rollback = 'requested';"
        )

    def create(self, release: Release, devices: list[str], policy: Policy) -> RolloutInfo:
        policy.check()
        if not devices:
            raise RolloutError("no devices to roll out to")
        if len(set(devices)) != len(devices):
            raise RolloutError("a device is listed twice")
        for d in devices:
            if not contract.valid_device_id(d):
                raise RolloutError(f"{d!r} is not a device id")
        ends = batch_ends(policy.batches, len(devices))
        now = time.time()
        info = RolloutInfo(f"r-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(now))}-{secrets.token_hex(2)}",
                           release.version, release.sha256, release.size, policy, RUNNING, 0, ends, now, now)
        batch_of = [next(i for i, e in enumerate(ends) if pos < e) for pos in range(len(devices))]
        with self.conn:
            self.conn.execute("INSERT INTO rollouts VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                              (info.id, info.version, info.sha256, info.size, json.dumps(asdict(policy)),
                               info.state, 0, json.dumps(ends), now, now, None))
            self.conn.executemany("INSERT INTO targets (rollout, device, position, batch, state) VALUES (?,?,?,?,?)",
                                  [(info.id, d, i, batch_of[i], PENDING) for i, d in enumerate(devices)])
        return info

    def info(self, rollout_id: str) -> RolloutInfo:
        row = self.conn.execute("SELECT id, version, sha256, size, policy, state, batch, ends, created, updated,"
                                " reason FROM rollouts WHERE id = ?", (rollout_id,)).fetchone()
        if row is None:
            raise RolloutError(f"no rollout {rollout_id}")
        return RolloutInfo(row[0], row[1], row[2], row[3], Policy(**json.loads(row[4])), row[5], row[6],
                           json.loads(row[7]), row[8], row[9], row[10])

    def watched(self, since: float) -> list[RolloutInfo]:
        """Rollouts that may still change: running, rolling back, or changed since `since`."""
        rows = self.conn.execute("SELECT id FROM rollouts WHERE state = ? OR updated >= ? OR id IN"
                                 f" (SELECT rollout FROM targets WHERE rollback = '{RB_REQUESTED}') ORDER BY created",
                                 (RUNNING, since))  # a literal: the partial index applies
        return [self.info(r[0]) for r in rows.fetchall()]

    def list(self) -> list[RolloutInfo]:
        return [self.info(r[0]) for r in self.conn.execute("SELECT id FROM rollouts ORDER BY created")]

    def targets(self, rollout_id: str) -> list[Target]:
        cols = [f.name for f in Target.__dataclass_fields__.values()]
        rows = self.conn.execute(f"SELECT {', '.join(cols)} FROM targets WHERE rollout = ? ORDER BY position",
                                 (rollout_id,))
        return [Target(*r) for r in rows]

    def of_device(self, device: str) -> list[tuple[str, Target]]:
        """Every rollout that targeted `device`, newest first, with its record of the device."""
        cols = [f.name for f in Target.__dataclass_fields__.values()]
        rows = self.conn.execute(f"SELECT t.rollout, {', '.join('t.' + c for c in cols)} FROM targets t"
                                 " JOIN rollouts r ON r.id = t.rollout WHERE t.device = ? ORDER BY r.created DESC",
                                 (device,))
        return [(r[0], Target(*r[1:])) for r in rows]

    # Each write names the columns it changes and the state it expects them in: a cancel or
    # roll back from another process, between a driver's read and its write, is not undone.

    def save_outcomes(self, rollout_id: str, targets: list[Target]) -> None:
        """Devices a driver judged (state, error, finished_at): only while still in progress
        with no roll back under way (one with no previous release to go back to keeps being
        judged)."""
        with self.conn:
            self.conn.executemany(
                "UPDATE targets SET state = ?, error = ?, finished_at = ? WHERE rollout = ? AND device = ?"
                f" AND state = ? AND rollback IS NOT '{RB_REQUESTED}'",
                [(t.state, t.error, t.finished_at, rollout_id, t.device, IN_PROGRESS) for t in targets])

    def save_rollbacks_ended(self, rollout_id: str, targets: list[Target]) -> None:
        """Roll backs a driver followed to their end (done, no previous release, timeout)."""
        with self.conn:
            self.conn.executemany("UPDATE targets SET rollback = ? WHERE rollout = ? AND device = ? AND rollback = ?",
                                  [(t.rollback, rollout_id, t.device, RB_REQUESTED) for t in targets])

    def skip_pending(self, rollout_id: str) -> None:
        with self.conn:
            self.conn.execute("UPDATE targets SET state = ? WHERE rollout = ? AND state = ?",
                              (SKIPPED, rollout_id, PENDING))

    def request_rollbacks(self, rollout_id: str, targets: list[Target]) -> list[str]:
        """Ask for each target's roll back (or record that it has no previous release), unless
        one is already asked for or done; a device still in progress is stopped. The devices
        whose roll back this call asked for."""
        asked = []
        with sqlite_transaction(self.conn):
            for t in targets:
                stop = t.rollback == RB_REQUESTED
                # published_at cleared: whoever drives it sends the roll back at its next step,
                # not REPUBLISH_S after the device was targeted.
                n = self.conn.execute(
                    "UPDATE targets SET rollback = ?,"
                    " rollback_at = CASE WHEN ? THEN ? ELSE rollback_at END,"
                    " published_at = CASE WHEN ? THEN NULL ELSE published_at END,"
                    " finished_at = CASE WHEN ? AND state = ? THEN ? ELSE finished_at END,"
                    " state = CASE WHEN ? AND state = ? THEN ? ELSE state END"
                    " WHERE rollout = ? AND device = ? AND state NOT IN (?, ?)"
                    " AND (rollback IS NULL OR rollback NOT IN (?, ?))",
                    (t.rollback, stop, t.rollback_at, stop, stop, IN_PROGRESS, t.rollback_at, stop, IN_PROGRESS,
                     STOPPED, rollout_id, t.device, PENDING, SKIPPED, RB_REQUESTED, RB_DONE)).rowcount
                if n and stop:
                    asked.append(t.device)
        return asked

    def start_targets(self, rollout_id: str, targets: list[Target]) -> bool:
        """Save newly targeted devices, in one transaction and only while the rollout still
        runs: a `cancel` from another process that got there first wins (False)."""
        with sqlite_transaction(self.conn):
            row = self.conn.execute("SELECT state FROM rollouts WHERE id = ?", (rollout_id,)).fetchone()
            if row is None or row[0] != RUNNING:
                return False
            self.conn.executemany(
                "UPDATE targets SET state = ?, prev_version = ?, prev_sha256 = ?, prev_desired = ?, targeted_at = ?"
                " WHERE rollout = ? AND device = ? AND state = ?",
                [(t.state, t.prev_version, t.prev_sha256, t.prev_desired, t.targeted_at, rollout_id, t.device,
                  PENDING) for t in targets])
        return True

    def set_state(self, rollout_id: str, state: str, reason: str | None = None, batch: int | None = None,
                  only_from: str | None = RUNNING) -> bool:
        """Move a rollout on; with only_from, only if it is still in that state (a `cancel`
        from another process wins over a driver that has not seen it yet)."""
        sql = "UPDATE rollouts SET state = ?, reason = COALESCE(?, reason), batch = COALESCE(?, batch), updated = ?" \
              " WHERE id = ?" + (" AND state = ?" if only_from else "")
        args = (state, reason, batch, time.time(), rollout_id) + ((only_from,) if only_from else ())
        with self.conn:
            return self.conn.execute(sql, args).rowcount == 1

    def close(self) -> None:
        self.conn.close()


# -- the engine ------------------------------------------------------------------------------

@dataclass
class Send:
    """Set one device's desired firmware to `release` (allow_downgrade for roll backs)."""
    device: str
    release: Release
    allow_downgrade: bool = False


def counts(targets: list[Target]) -> dict[str, int]:
    out = {s: 0 for s in (PENDING, IN_PROGRESS, SUCCEEDED, FAILED, SKIPPED, STOPPED)}
    for t in targets:
        out[t.state] += 1
    out["rolled_back"] = sum(t.rollback == RB_DONE for t in targets)
    out["rolling_back"] = sum(t.rollback == RB_REQUESTED for t in targets)
    return out


class Engine:
    """The decisions of one rollout, as a function of the shadows it reads; no I/O besides its
    database. `step()` returns what to send; the caller sends it and calls `sent()`."""

    def __init__(self, db: RolloutDB, rollout_id: str, release_by_sha: Callable[[str], Release | None],
                 grant_key: bytes | None = None):
        """`grant_key`: the site's, to tell a desired firmware no operator granted (tools.grants)
        from one another operator set; None: every change counts as superseded."""
        self.db = db
        self.grant_key = grant_key
        self.id = rollout_id
        self.release_by_sha = release_by_sha
        self.info = db.info(rollout_id)
        self.release = release_by_sha(self.info.sha256)
        if self.release is None:
            raise RolloutError(f"release {self.info.version} ({self.info.sha256[:12]}) is gone from the store")

    def step(self, shadows: dict[str, Shadow], now: float | None = None) -> list[Send]:
        now = time.time() if now is None else now
        info = self.info = self.db.info(self.id)  # `cancel` may have come from another process
        targets = self.db.targets(self.id)
        p = info.policy
        sends: list[Send] = []
        judged: list[Target] = []  # devices with an outcome now
        followed: list[Target] = []  # roll backs that ended now

        for t in targets:
            shadow = shadows.get(t.device)
            if t.state == IN_PROGRESS:
                verdict, err = judge(shadow, info.sha256, info.version, p.max_attempts)
                desired_fw = shadow.desired if shadow is not None else {}
                desired = desired_fw.get("sha256")
                if verdict == IN_PROGRESS and desired not in (info.sha256, t.prev_desired):
                    ungranted = self.grant_key is not None and desired_fw \
                        and grants.issued(self.grant_key, t.device, desired_fw) is None
                    verdict, err = FAILED, E_UNGRANTED if ungranted else E_SUPERSEDED
                elif verdict == IN_PROGRESS and now - t.targeted_at > p.timeout_s:
                    verdict, err = FAILED, E_TIMEOUT
                if verdict != IN_PROGRESS:
                    t.state, t.error, t.finished_at = verdict, err, now
                    judged.append(t)
                elif desired != info.sha256 and now - (t.published_at or 0) > REPUBLISH_S:
                    sends.append(Send(t.device, self.release))  # lost, or sent before a crash
            if t.rollback == RB_REQUESTED:
                self._follow_rollback(t, shadow, now, sends, followed)

        c = counts(targets)
        if info.state == RUNNING:
            finished = c[SUCCEEDED] + c[FAILED]
            reason = None
            if finished >= p.min_finished and c[FAILED]:
                if p.abort_failures is not None and c[FAILED] >= p.abort_failures:
                    reason = f"{c[FAILED]} devices failed (threshold {p.abort_failures})"
                elif p.abort_pct is not None and 100 * c[FAILED] / finished >= p.abort_pct:
                    reason = f"{c[FAILED]} of {finished} finished devices failed (threshold {p.abort_pct:g}%)"
            in_batch = [t for t in targets if t.batch == info.batch]
            ok = sum(t.state == SUCCEEDED for t in in_batch)
            needed = math.ceil(len(in_batch) * p.success_pct / 100)
            if reason is None and ok < needed and all(t.state in (SUCCEEDED, FAILED) for t in in_batch):
                reason = (f"batch {info.batch + 1} finished with {ok} of {len(in_batch)} succeeded "
                          f"(needs {p.success_pct:g}%)")
            if reason is not None:
                self._save(judged, followed)
                sends = self.abort(reason, now)  # nothing more of this release goes out
            else:
                batch = info.batch
                while ok >= needed and batch + 1 < len(info.ends):
                    batch += 1  # this batch has done well enough: open the next one
                    in_batch = [t for t in targets if t.batch == batch]
                    ok = sum(t.state == SUCCEEDED for t in in_batch)
                    needed = math.ceil(len(in_batch) * p.success_pct / 100)
                if batch != info.batch:
                    self.db.set_state(self.id, RUNNING, batch=batch)
                    info.batch = batch
                self._save(judged, followed)
                starting = [t for t in targets if t.state == PENDING and t.batch <= info.batch]
                for t in starting:
                    self._target(t, shadows.get(t.device), now)
                if starting and self.db.start_targets(self.id, starting):
                    sends += [Send(t.device, self.release) for t in starting]
                if all(t.state in (SUCCEEDED, FAILED) for t in targets):
                    self.db.set_state(self.id, COMPLETED)
        self._save(judged, followed)
        self.info = self.db.info(self.id)
        return sends

    def _save(self, judged: list[Target], followed: list[Target]) -> None:
        self.db.save_outcomes(self.id, judged)
        self.db.save_rollbacks_ended(self.id, followed)
        judged.clear()
        followed.clear()

    def _target(self, t: Target, shadow: Shadow | None, now: float) -> None:
        rep = shadow.reported if shadow is not None else {}
        t.prev_version, t.prev_sha256 = rep.get("version"), rep.get("sha256")
        t.prev_desired = shadow.desired.get("sha256") if shadow is not None else None
        t.state, t.targeted_at = IN_PROGRESS, now

    def _follow_rollback(self, t: Target, shadow: Shadow | None, now: float, sends: list[Send],
                         ended: list[Target]) -> None:
        prev = self.release_by_sha(t.prev_sha256)
        if prev is None:
            t.rollback = RB_NO_PREVIOUS
            ended.append(t)
        elif judge(shadow, prev.sha256, prev.version, 1)[0] == SUCCEEDED:
            t.rollback = RB_DONE
            ended.append(t)
        elif now - t.rollback_at > self.info.policy.timeout_s:
            t.rollback = RB_TIMEOUT
            ended.append(t)
        elif desired_since(shadow, prev.sha256) is None and now - (t.published_at or 0) > REPUBLISH_S:
            sends.append(Send(t.device, prev, allow_downgrade=True))

    def cancel(self) -> None:
        """Target no more devices (those updating carry on): `rollout cancel`, or the page's button."""
        if self.db.info(self.id).state != RUNNING:
            raise RolloutError(f"rollout {self.id} is {self.db.info(self.id).state}: nothing to cancel")
        self.abort("cancelled by the operator", state=CANCELLED)

    def abort(self, reason: str, now: float | None = None, state: str = ABORTED) -> list[Send]:
        """Stop targeting (pending devices are skipped) and, if the policy says so for an
        abort, roll back the devices this rollout touched."""
        now = time.time() if now is None else now
        if not self.db.set_state(self.id, state, reason):
            return []
        self.db.skip_pending(self.id)
        if state == ABORTED and self.info.policy.rollback_on_abort:
            return self.roll_back(now)
        return []

    def roll_back(self, now: float | None = None) -> list[Send]:
        """Desired = the release each touched device ran before, downgrade allowed."""
        now = time.time() if now is None else now
        if self.db.info(self.id).state == RUNNING:
            self.abort("rolled back by the operator", now, CANCELLED)
        touched, previous = [], {}
        for t in self.db.targets(self.id):
            if t.state in (PENDING, SKIPPED) or t.rollback in (RB_REQUESTED, RB_DONE):
                continue
            prev = self.release_by_sha(t.prev_sha256) if t.prev_sha256 else None
            if prev is None:
                t.rollback = RB_NO_PREVIOUS  # it ran an image that is not one of our releases
            else:
                t.rollback, t.rollback_at, previous[t.device] = RB_REQUESTED, now, prev
            touched.append(t)
        return [Send(d, previous[d], allow_downgrade=True) for d in self.db.request_rollbacks(self.id, touched)]

    def sent(self, sends: list[Send | str], now: float | None = None) -> None:
        """Record that `sends` (what step() returned) went out. A send of this release is not
        recorded over a roll back asked for since the step (that would hold the roll back
        back for REPUBLISH_S); a bare device id is recorded whatever."""
        now = time.time() if now is None else now
        forward = [s.device for s in sends if isinstance(s, Send) and not s.allow_downgrade]
        other = [s.device if isinstance(s, Send) else s for s in sends
                 if not (isinstance(s, Send) and not s.allow_downgrade)]
        with self.db.conn:
            self.db.conn.executemany("UPDATE targets SET published_at = ? WHERE rollout = ? AND device = ?",
                                     [(now, self.id, d) for d in other])
            self.db.conn.executemany("UPDATE targets SET published_at = ? WHERE rollout = ? AND device = ?"
                                     f" AND rollback IS NOT '{RB_REQUESTED}'", [(now, self.id, d) for d in forward])

    def settled(self) -> bool:
        """Nothing left to do: the rollout has ended and no roll back is under way."""
        return self.info.state != RUNNING and not any(t.rollback == RB_REQUESTED for t in self.db.targets(self.id))


# -- driving it over MQTT ----------------------------------------------------------------------

Publisher = Callable[[Send], Awaitable[None]]
ShadowReader = Callable[[list[str]], dict[str, Shadow]]


def _lock_path(db: RolloutDB, rollout_id: str) -> Path:
    folder = db.path.with_name(db.path.name + ".drivers")
    folder.mkdir(exist_ok=True)
    return folder / f"{rollout_id}.lock"


def driver_of(db: RolloutDB, rollout_id: str) -> str | None:
    """The process id driving a rollout ('?' if it did not say), or None if nothing drives it."""
    with open(_lock_path(db, rollout_id), "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            return f.read().strip() or "?"
        fcntl.flock(f, fcntl.LOCK_UN)
        return None


@contextmanager
def sole_driver(db: RolloutDB, rollout_id: str):
    """Hold the right to drive one rollout. Two drivers would each send the devices they
    target a desired state with a fresh URL; a `cancel` or `rollback` from elsewhere needs no
    driver of its own, the running one carries it out. An exclusive lock on a file next to the
    database: the kernel lets go of it when the process ends, however it ends."""
    with open(_lock_path(db, rollout_id), "a+") as f:
        for _ in range(5):  # driver_of holds it for an instant: not a driver
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.02)
        else:
            f.seek(0)
            raise RolloutError(f"rollout {rollout_id} is already being driven (process {f.read().strip() or '?'}),"
                               " which carries out any cancel or roll back") from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


async def drive(engine: Engine, read_shadows: ShadowReader, publish: Publisher, tick: float = 1.0,
                on_tick: Callable[[RolloutInfo, list[Target]], None] | None = None) -> RolloutInfo:
    """Run the rollout until it has settled; returns its final record. Raises RolloutError if
    another process drives it."""
    devices = [t.device for t in engine.db.targets(engine.id)]
    with sole_driver(engine.db, engine.id):
        while True:
            # The shadows are read in a thread: at 10,000 devices that takes a tenth of a second,
            # which the dashboard's pages, on the same loop, should not wait for.
            sends = engine.step(await asyncio.to_thread(read_shadows, devices))
            for s in sends:
                await publish(s)
            engine.sent(sends)
            if on_tick is not None:
                on_tick(engine.info, engine.db.targets(engine.id))
            if engine.settled():
                return engine.info
            await asyncio.sleep(tick)


def progress_line(info: RolloutInfo, targets: list[Target], width: int = 24, signer: str | None = None) -> str:
    """One line: id, release (and the key that signed it), batch, a bar of finished devices,
    the counts, the outcome."""
    c = counts(targets)
    n = len(targets)
    done = c[SUCCEEDED] + c[FAILED]
    filled = round(width * done / n) if n else width
    bar = "#" * filled + "." * (width - filled)
    parts = [f"{info.id} {info.version}" + (f" [{signer[:8]}]" if signer else ""), f"batch {min(info.batch + 1, len(info.ends))}/{len(info.ends)}",
             f"[{bar}] {done}/{n}", f"{c[SUCCEEDED]} ok, {c[FAILED]} failed, {c[IN_PROGRESS]} updating,"
             f" {c[PENDING]} pending" + (f", {c[SKIPPED]} skipped" if c[SKIPPED] else "")
             + (f", {c[STOPPED]} stopped" if c[STOPPED] else "")]
    if c["rolling_back"] or c["rolled_back"]:
        parts.append(f"rolled back {c['rolled_back']}/{c['rolled_back'] + c['rolling_back']}")
    parts.append(info.state + (f": {info.reason}" if info.reason and info.state != RUNNING else ""))
    return "  ".join(parts)


def summary(info: RolloutInfo, targets: list[Target], with_devices: bool = True) -> dict:
    d = asdict(info)
    d["counts"] = counts(targets)
    if with_devices:
        d["devices"] = [asdict(t) for t in targets]
    return d


async def run(site, engine: Engine, tick: float = 1.0, on_tick=None, reconnects: int = 10) -> RolloutInfo:
    """Drive `engine` over the site's broker, reading shadows from the replica's database.
    A lost broker connection is retried with backoff (the engine's state is all on disk); a
    broker not there at all at the start is an error at once."""
    import aiomqtt

    from tools.operator.client import DesiredWriter
    from tools.control import shadows

    delay = 1.0
    connected = False
    for attempt in range(reconnects + 1):
        try:
            async with DesiredWriter(site, engine.info.policy.ttl) as writer:
                connected = True

                async def publish(s: Send) -> None:
                    await writer.set(s.device, s.release, s.allow_downgrade,
                                     token=engine.info.policy.auth == contract.AUTH_TOKEN)

                return await drive(engine, lambda devices: shadows.read(site.shadow_store, devices), publish, tick,
                                   on_tick)
        except aiomqtt.MqttError as e:
            if attempt == reconnects or not connected:
                raise
            log.warning("broker connection lost (%s); reconnecting in %.0fs", e, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30)
