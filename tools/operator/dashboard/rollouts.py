"""Rollouts from the dashboard: the same database and engine as `fleet-ota rollout`, so a
rollout started on the page is listed, cancelled or rolled back by the CLI and the other way
round. A rollout started (or driven on) from the page is driven by a task of the dashboard's
process, under the same one-driver lock as the CLI's; a cancel or roll back needs no driver
of its own, the one driving carries it out. Their sections are pushed to open pages as they
change."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import contextmanager

import aiomqtt

from tools.operator import rollout as ro
from tools.operator.dashboard.views import alert, rollout
from tools.operator.dashboard.live import Live

log = logging.getLogger("dashboard")

WATCH_S = 1.0  # how often open pages' rollouts are looked at for changes
RECENT_S = 120  # an ended rollout is still watched this long (its roll back, its last devices)


class Rollouts:
    def __init__(self, site, live: Live):
        self.site = site
        self.live = live
        self.tasks: dict[str, asyncio.Task] = {}
        self.errors: dict[str, str] = {}  # why the dashboard's driver of a rollout stopped
        self.shown: dict[str, str] = {}  # the section last pushed, by rollout

    @contextmanager
    def db(self):
        db = ro.RolloutDB(self.site.rollouts_path)
        try:
            yield db
        finally:
            db.close()

    def engine(self, db: ro.RolloutDB, rollout_id: str) -> ro.Engine:
        return ro.Engine(db, rollout_id, self.site.releases.by_sha256, self.site.grant_key)

    def driven_here(self, rollout_id: str) -> bool:
        task = self.tasks.get(rollout_id)
        return task is not None and not task.done()

    def drive(self, rollout_id: str) -> str:
        """Drive a rollout from this process (until it settles); what happened, in a sentence."""
        if self.driven_here(rollout_id):
            return f"{rollout_id} is driven by the dashboard."
        with self.db() as db:
            other = ro.driver_of(db, rollout_id)
        if other is not None:
            return f"{rollout_id} is driven by process {other}, which carries out any cancel or roll back."
        self.errors.pop(rollout_id, None)
        for done in [r for r, t in self.tasks.items() if t.done()]:
            del self.tasks[done]
        self.tasks[rollout_id] = asyncio.create_task(self._run(rollout_id), name=f"rollout {rollout_id}")
        return f"{rollout_id} is driven by the dashboard."

    async def _run(self, rollout_id: str) -> None:
        db = ro.RolloutDB(self.site.rollouts_path)
        try:
            info = await ro.run(self.site, self.engine(db, rollout_id))
            log.info("rollout %s %s", info.id, info.state)
        except (ro.RolloutError, aiomqtt.MqttError, OSError) as e:
            self.errors[rollout_id] = str(e)
            log.warning("rollout %s: %s", rollout_id, e)
        finally:
            db.close()

    def section(self, db: ro.RolloutDB, info: ro.RolloutInfo) -> str:
        rel = self.site.releases.by_sha256(info.sha256)
        driver = "here" if self.driven_here(info.id) else None
        targets = db.targets(info.id)
        if driver is None and (info.state == ro.RUNNING or any(t.rollback == ro.RB_REQUESTED for t in targets)):
            driver = ro.driver_of(db, info.id)
        out = rollout(info, targets, rel.signer if rel else None, driver)
        error = self.errors.get(info.id)  # (read once: drive() may drop it meanwhile)
        if error:
            out = out.replace("</section>", alert("The dashboard stopped driving it: " + error) + "</section>")
        return out

    def render(self, select) -> str:
        """The sections of the rollouts `select` picks from all of them (oldest first). Opens
        its own connection: called in a thread, off the pages' event loop."""
        if not self.site.rollouts_path.exists():
            return ""
        with self.db() as db:
            return "".join(self.section(db, i) for i in select(db.list()))

    def of_device(self, device: str) -> list:
        if not self.site.rollouts_path.exists():
            return []
        with self.db() as db:
            return db.of_device(device)

    def changed(self) -> list[tuple[str, str]]:
        """(rollout id, section) of each watched rollout whose section changed since last
        pushed: those running, rolling back, or ended in the last RECENT_S. In a thread."""
        if not self.site.rollouts_path.exists():
            return []
        out = []
        with self.db() as db:
            for info in db.watched(time.time() - RECENT_S):
                html = self.section(db, info)
                if self.shown.get(info.id) != html:
                    self.shown[info.id] = html
                    out.append((info.id, html))
        return out

    async def watch(self) -> None:
        """Push each watched rollout's section to open pages when it changes."""
        while True:
            await asyncio.sleep(WATCH_S)
            if not self.live.listeners:
                continue
            try:
                for rid, html in await asyncio.to_thread(self.changed):
                    self.live.push(f"rollout-{rid}", html)
            except Exception as e:  # the database busy for a moment: the next look tries again
                log.warning("watching rollouts: %s", e)

    async def stop(self) -> None:
        for task in self.tasks.values():
            task.cancel()
        for task in self.tasks.values():
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
