"""Every device's row in memory, so that a page of the fleet is a filter, a sort and a slice,
not a read of every shadow: read whole from the replica's store at start and every
REFRESH_S, and kept current between reads by the documents the replica publishes."""

from __future__ import annotations

import asyncio
import logging
import time

from tools.operator.rollout import matching
from tools.operator.status import DeviceStatus, fleet
from tools.operator.dashboard.views import number, text

REFRESH_S = 60  # a whole read of the store: catches what a lost QoS 0 document missed


class FleetIndex:
    def __init__(self, site):
        self.site = site
        self.rows: dict[str, DeviceStatus] = {}
        self.touched: dict[str, float] = {}  # device -> when a document last changed its row (monotonic)
        self.ready = False
        self._reading: asyncio.Lock | None = None

    def update(self, row: DeviceStatus) -> None:
        self.rows[row.device] = row
        self.touched[row.device] = time.monotonic()

    async def refresh(self) -> None:
        """Read the store whole (in a thread). A row a document changed while the read ran is
        newer than what the read found, and is kept."""
        if self._reading is None:
            self._reading = asyncio.Lock()
        async with self._reading:
            started = time.monotonic()
            read = await asyncio.to_thread(fleet, self.site.shadow_store, self.site.grant_key)
            fresh = {r.device: r for r in read}
            for d in [d for d in self.rows if d not in fresh and self.touched.get(d, 0) < started]:
                del self.rows[d]
            for d, r in fresh.items():
                if self.touched.get(d, 0) < started:
                    self.rows[d] = r
            self.ready = True

    async def keep_fresh(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as e:  # a store that is briefly unreadable: the next read tries again
                logging.getLogger("dashboard").warning("reading the fleet: %s", e)
            await asyncio.sleep(REFRESH_S)

    def versions(self) -> list[str]:
        return sorted({r.running for r in self.rows.values() if isinstance(r.running, str) and r.running})

    def query(self, state: str = "", version: str = "", patterns: list[str] | None = None, text_: str = "",
              sort: str = "device") -> list[DeviceStatus]:
        """The rows that pass every filter given, sorted; `patterns`: a group's ids or globs."""
        rows = self.rows.values()
        if state:
            rows = [r for r in rows if r.state == state]
        if version:
            rows = [r for r in rows if r.running == version]
        if patterns is not None:
            picked = set(matching((r.device for r in rows), patterns))
            rows = [r for r in rows if r.device in picked]
        if text_:
            rows = [r for r in rows if text_ in r.device]
        keys = {"running": lambda r: (text(r.running), r.device), "state": lambda r: (text(r.state), r.device),
                "seen": lambda r: (-(number(r.last_seen) or 0), r.device)}
        return sorted(rows, key=keys.get(sort, lambda r: r.device))
