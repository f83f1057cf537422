"""Fleet status from the replica's store: one row per device, what it runs and what is wanted.

Read-only: reads the store the replica writes (SQLite in WAL mode lets readers in while it
runs; PostgreSQL anyway), so `status` works with or without the services up.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from firmware import contract
from tools.control import grants
from tools.control import shadows
from tools.control.shadows import Shadow


@dataclass
class DeviceStatus:
    device: str
    running: str | None  # version the device reports it runs
    running_signer: str | None  # key id (tools.site.signing) that signed it, as the device reports it
    desired: str | None  # version the application asked for
    desired_signer: str | None  # key id that signed the desired release, as the desired firmware names it
    granted: bool | None  # the desired firmware carries an operator's grant (None: nothing desired)
    state: str | None  # the device's update phase (idle, downloading, ..., failed)
    in_sync: bool  # reported image is the desired one (or nothing is desired)
    last_seen: int | None  # unix time of the device's last report
    error: str | None
    attempts: int | None
    progress: int | None


def device_status(shadow: Shadow, grant_key: bytes) -> DeviceStatus:
    rep, des = shadow.reported, shadow.desired
    in_sync = not des or (rep.get("sha256") == des.get("sha256") and rep.get("state") in (contract.ST_IDLE, None))
    return DeviceStatus(
        device=shadow.device, running=rep.get("version"), running_signer=rep.get(contract.SIGNER),
        desired=des.get("version"), desired_signer=des.get(contract.SIGNER),
        granted=grants.issued(grant_key, shadow.device, des) is not None if des else None, state=rep.get("state"),
        in_sync=in_sync, last_seen=shadow.last_seen,
        error=rep.get("error"), attempts=rep.get("attempts"), progress=rep.get("progress"),
    )


def fleet(store, grant_key: bytes) -> list[DeviceStatus]:
    """Every device in the replica's store (an SQLite file or a postgresql:// URL); `grant_key`
    the site's, to tell desired firmware an operator granted from any other (tools.control.grants)."""
    return [device_status(s, grant_key) for s in shadows.read(store).values()]


def summary(rows: list[DeviceStatus]) -> dict:
    return {
        "devices": len(rows),
        "in_sync": sum(r.in_sync for r in rows),
        "updating": sum(1 for r in rows if not r.in_sync and r.state not in ("failed", None)),
        "failed": sum(1 for r in rows if r.state == "failed"),
        "never_reported": sum(1 for r in rows if r.last_seen is None),
        "ungranted": sum(1 for r in rows if r.granted is False),
    }


def as_json(rows: list[DeviceStatus]) -> dict:
    return {"summary": summary(rows), "devices": [asdict(r) for r in rows]}


def table(rows: list[DeviceStatus], now: float | None = None) -> str:
    """The fleet as text; [abcd1234] after a version names the key that signed it."""
    now = time.time() if now is None else now

    def ago(t):
        if t is None:
            return "never"
        s = int(now - t)
        return f"{s}s ago" if s < 120 else f"{s // 60}m ago" if s < 7200 else f"{s // 3600}h ago"

    head = ("device", "running", "desired", "state", "last seen", "error")
    def key(signer, version):
        return f" [{signer[:8]}]" if signer else " [unsigned]" if version else ""

    lines = [[r.device, (r.running or "-") + key(r.running_signer, r.running and r.running != "unknown"),
              (r.desired or "-") + key(r.desired_signer, r.desired) + (" (no grant)" if r.granted is False else ""),
              (r.state or "-") + (f" {r.progress}%" if r.progress is not None else ""),
              ago(r.last_seen), (r.error or "") + (f" (x{r.attempts})" if r.attempts else "")] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    s = summary(rows)
    out.append(f"{s['devices']} devices: {s['in_sync']} in sync, {s['updating']} updating, {s['failed']} failed, "
               f"{s['never_reported']} never reported"
               + (f", {s['ungranted']} desiring firmware no operator granted" if s["ungranted"] else ""))
    return "\n".join(out)
