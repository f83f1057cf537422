"""Pieces of pages that change as devices report, pushed to every open page over Server-Sent
Events (/events); live.js swaps each in by its element id. One stream per page, fed by the
dashboard's single MQTT subscription and its rollout watcher: nothing polls per browser."""

from __future__ import annotations

import asyncio
import json
from typing import Callable

from aiohttp import web

from tools.operator.dashboard.views import CSRF_MARK

QUEUE = 256  # changes a page may fall behind by before its stream is closed (it reconnects)
HEARTBEAT_S = 15
LIVE_JS = """// Rows and rollouts change as devices report: the server pushes each changed piece
// (Server-Sent Events) and this puts it in place of the element with the same id.
if (document.body.hasAttribute("data-live")) {
  const events = new EventSource("/events");
  events.onmessage = (e) => {
    const m = JSON.parse(e.data);
    const old = document.getElementById(m.id);
    if (old) old.outerHTML = m.html;
  };
}
"""


class Live:
    def __init__(self):
        self.listeners: dict[asyncio.Queue, str] = {}  # an open stream's queue -> its session's CSRF token

    def push(self, element_id: str, html: str) -> None:
        """Replace element `element_id` on every open page with `html` (CSRF_MARK becomes each
        page's own token)."""
        for q, csrf in list(self.listeners.items()):
            try:
                q.put_nowait(json.dumps({"id": element_id, "html": html.replace(CSRF_MARK, csrf)}))
            except asyncio.QueueFull:  # a page that stopped reading: its stream ends (it reconnects)
                self.listeners.pop(q, None)

    async def stream(self, request: web.Request, csrf: str, alive: Callable[[], bool]) -> web.StreamResponse:
        """One page's stream, for as long as `alive()` (its session) holds: looked at before
        each change and each heartbeat, so signing out or removing the account ends it."""
        q: asyncio.Queue = asyncio.Queue(QUEUE)
        self.listeners[q] = csrf
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"})
        await resp.prepare(request)
        try:
            while q in self.listeners:
                try:
                    data = await asyncio.wait_for(q.get(), HEARTBEAT_S)
                except TimeoutError:
                    data = ""
                if data is None or not alive():  # the dashboard is stopping, or the session ended
                    break
                if not data:
                    await resp.write(b": still here\n\n")
                    continue
                await resp.write(f"data: {data}\n\n".encode())
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.listeners.pop(q, None)
        return resp

    def close(self) -> None:
        """End every open stream now, not at its next heartbeat."""
        for q in list(self.listeners):
            self.listeners.pop(q, None)
            try:
                q.put_nowait(None)
            except asyncio.QueueFull:
                pass
