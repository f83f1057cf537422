"""The fleet dashboard: the HTTPS pages operators keep open. `serve` runs it on its own port
with the site's certificate.

- Sign-in, sessions, CSRF: `auth`. Every page's HTML: `views`.
- Fleet: one row per device from an in-memory index of the replica's store (`fleetindex`),
  kept current by one MQTT subscription to `update/documents` for all browsers; each changed
  row is pushed to open pages over Server-Sent Events (`live`).
- Device page: its shadow as the replica answers it, the documents seen for it, the rollouts
  that targeted it, and set desired firmware (the same call as `fleet-ota desired`).
- Releases: the registry's list, and an upload with the same checks as `fleet-ota release`.
- Rollouts: the CLI's database and engine (`rollouts`); start, cancel, roll back, drive.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections import deque
from urllib.parse import quote, urlencode

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from firmware import contract
from tools.control.clients import service_client
from tools.control.shadows import Shadow
from tools.espidf.onflash import SLOT_SIZE
from tools.operator import client as op
from tools.operator import rollout as ro
from tools.operator.dashboard import views
from tools.operator.dashboard.auth import COOKIE, Auth, forbidden
from tools.operator.dashboard.fleetindex import FleetIndex
from tools.operator.dashboard.live import LIVE_JS, Live
from tools.operator.dashboard.rollouts import Rollouts
from tools.operator.status import device_status
from tools.site import Site
from tools.site.identities import OPERATOR
from tools.site.releases import ReleaseError


log = logging.getLogger("dashboard")

HISTORY = 20  # documents kept per device for its page (since the dashboard started)
UPLOAD_MAX = SLOT_SIZE + 64 * 1024  # an image no bigger than a slot, and its signature bundle
ROLLOUTS_PAGE = 20  # rollouts a page lists, newest first


class Dashboard:
    def __init__(self, site: Site):
        self.site = site
        self.auth = Auth(site)
        self.live = Live()
        self.index = FleetIndex(site)
        self.rollouts = Rollouts(site, self.live)
        self.history: dict[str, deque] = {}  # device -> its last HISTORY documents (time, row)
        self.reading: asyncio.Task | None = None

    def publish(self, topic: str, payload: bytes) -> None:
        """An update/documents message: the device's row as it is now, to the index and every page."""
        parsed = contract.parse_topic(topic)
        try:
            current = json.loads(payload)["current"]
        except (ValueError, KeyError, TypeError):
            return
        if parsed is None or not isinstance(current, dict):
            return
        row = device_status(Shadow(parsed[0], current), self.site.grant_key)
        now = time.time()
        self.index.update(row)
        self.history.setdefault(row.device, deque(maxlen=HISTORY)).appendleft((now, row))
        if self.live.listeners:  # no page open: nothing to render
            self.live.push(f"row-{row.device}", views.row(row, now))

    async def follow(self) -> None:
        """One subscription for all pages, kept up with backoff while the dashboard runs; after
        each (re)subscription the index is read whole, for what came while it was down."""
        delay = 1.0
        while True:
            try:
                async with service_client(self.site, OPERATOR, "dashboard") as client:
                    await client.subscribe(contract.topic("+", contract.UPDATE_DOCUMENTS), qos=0)
                    delay = 1.0
                    self.reading = asyncio.create_task(self.index.refresh())  # held: a task nobody holds may vanish
                    async for msg in client.messages:
                        self.publish(str(msg.topic), bytes(msg.payload))
            except Exception as e:  # the broker gone, or anything else: the pages must not stop changing
                log.warning("following the documents: %s; again in %.0f s", e, delay)
                await asyncio.sleep(delay)
                delay = min(30.0, delay * 2)

    def groups(self) -> tuple[dict[str, list[str]], str | None]:
        try:
            return self.site.groups(), None
        except (ValueError, OSError) as e:
            return {}, f"groups: {e}"


def make_app(site: Site) -> web.Application:
    dash = Dashboard(site)
    auth = dash.auth

    def page(request, s, title, body, status=200, live=False):
        return views.page(title, body, s.user, s.csrf, status, live)

    async def fleet_page(request: web.Request) -> web.Response:
        s = auth.signed_in(request)
        if not dash.index.ready:
            await dash.index.refresh()
        q = dict(request.query)
        groups, problem = dash.groups()
        patterns = None
        if q.get("group"):
            patterns = groups.get(q["group"], [])
            if q["group"] not in groups:
                problem = problem or f"no group {q['group']!r}"
        rows = dash.index.query(q.get("state", ""), q.get("version", ""), patterns, q.get("q", "").strip(),
                                q.get("sort", "device"))
        running = await asyncio.to_thread(dash.rollouts.render, lambda infos: [i for i in infos if i.state == ro.RUNNING])
        now = time.time()
        return page(request, s, "Fleet", views.fleet(rows, q, dash.index.versions(), sorted(groups), now, running,
                                                      problem), live=True)

    async def device_page(request: web.Request) -> web.Response:
        s = auth.signed_in(request)
        device = request.match_info["device"]
        if not contract.valid_device_id(device):
            return page(request, s, "No such device", views.alert(f"{device!r} is not a device id"), 404)
        try:
            doc = await op.get_shadow(site, device)
        except op.OperatorError as e:
            return page(request, s, device, views.alert(str(e)), 404 if "404" in str(e) else 502)
        runs = await asyncio.to_thread(dash.rollouts.of_device, device)
        return page(request, s, device, views.device(device, doc, dash.history.get(device, ()), site.releases.list(),
                                                     runs, request.query.get("said")))

    async def set_desired(request: web.Request) -> web.Response:
        checked = await auth.action(request)
        if checked is None:
            return forbidden()
        s, form = checked
        device = request.match_info["device"]
        rel = site.releases.get(str(form.get("version", "")))
        if not contract.valid_device_id(device):
            raise web.HTTPNotFound(text=f"{device!r} is not a device id")
        if rel is None:
            said = "No such release."
        else:
            try:
                await op.set_desired(site, device, rel, allow_downgrade=form.get("allow_downgrade") == "on")
                said = f"Desired firmware set to {rel.version}."
                log.info("%s set %s's desired firmware to %s", s.user, device, rel.version)
            except (op.OperatorError, ValueError) as e:
                said = f"Refused: {e}"
        raise web.HTTPSeeOther(f"/device/{quote(device)}?" + urlencode({"said": said}))

    async def releases_page(request: web.Request, error: str | None = None, version: str = "",
                            status: int = 200) -> web.Response:
        s = auth.signed_in(request)
        return page(request, s, "Releases", views.releases(site.releases.list(), site.trust.required,
                                                           request.query.get("said"), error, version), status)

    async def add_release(request: web.Request) -> web.Response:
        s = auth.session(request)
        if s is None:
            return forbidden()
        fields: dict[str, bytes] = {}
        names: dict[str, str] = {}
        if not request.content_type.startswith("multipart/form-data"):
            return await releases_page(request, "Not a form this page sends.", status=400)
        try:
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if isinstance(part, BodyPartReader) and part.name in ("csrf", "version", "image", "signature"):
                    fields[part.name] = bytes(await part.read())
                    names[part.name] = part.filename or part.name
        except (ValueError, AssertionError, HttpProcessingError):  # a body that is not the form's
            return await releases_page(request, "Not a form this page sends.", status=400)
        if not hmac.compare_digest(fields.get("csrf", b""), s.csrf.encode()):
            return forbidden()
        version = fields.get("version", b"").decode(errors="replace").strip()
        image = fields.get("image") or b""
        if not image:
            return await releases_page(request, "Choose the app image to release.", version, 400)
        bundle = fields.get("signature") or None
        try:
            rel = await asyncio.to_thread(site.releases.add_files, image, bundle, version or None,
                                          names.get("image", "image"), names.get("signature", "signature"))
        except ReleaseError as e:
            return await releases_page(request, f"Refused: {e}", version, 400)
        log.info("%s added release %s (%s)", s.user, rel.version, rel.sha256)
        raise web.HTTPSeeOther("/releases?" + urlencode({"said": f"Release {rel.version} added."}))

    async def rollouts_page(request: web.Request, values: dict | None = None, error: str | None = None,
                            status: int = 200) -> web.Response:
        s = auth.signed_in(request)
        groups, problem = dash.groups()
        try:
            number = max(1, int(request.query.get("page", "1")))
        except ValueError:
            number = 1
        shown: list[int] = []

        def newest(infos):
            shown.append(len(infos))
            return list(reversed(infos))[(number - 1) * ROLLOUTS_PAGE: number * ROLLOUTS_PAGE]
        listed = await asyncio.to_thread(dash.rollouts.render, newest)
        more = f'<p><a href="/rollouts?page={number + 1}" rel="next">Older rollouts</a></p>' \
            if shown and shown[0] > number * ROLLOUTS_PAGE else ""
        body = (views.said(request.query.get("said")) + views.alert(problem)
                + views.start_form(site.releases.list(), sorted(groups), values or {}, error)
                + "<h2>Rollouts</h2>" + (listed or "<p>none yet</p>") + more)
        return page(request, s, "Rollouts", body, status, live=True)

    async def start_rollout(request: web.Request) -> web.Response:
        checked = await auth.action(request)
        if checked is None:
            return forbidden()
        s, form = checked
        values = {k: str(form.get(k, "")) for k in views.START_FIELDS}
        try:
            rid = await asyncio.to_thread(_create_rollout, site, values)
        except ro.RolloutError as e:
            return await rollouts_page(request, values, f"Refused: {e}", 400)
        said = dash.rollouts.drive(rid)
        log.info("%s started rollout %s", s.user, rid)
        raise web.HTTPSeeOther("/rollouts?" + urlencode({"said": f"Started {rid}. {said}"}))

    async def rollout_page(request: web.Request) -> web.Response:
        s = auth.signed_in(request)
        rid = request.match_info["id"]
        if not site.rollouts_path.exists():
            raise web.HTTPNotFound(text=f"no rollout {rid}")
        with dash.rollouts.db() as db:
            try:
                info = db.info(rid)
            except ro.RolloutError as e:
                raise web.HTTPNotFound(text=str(e)) from None
            body = views.said(request.query.get("said")) + dash.rollouts.section(db, info) + \
                views.rollout_devices(db.targets(rid))
        return page(request, s, f"Rollout {rid}", body, live=True)

    async def rollout_action(request: web.Request) -> web.Response:
        checked = await auth.action(request)
        if checked is None:
            return forbidden()
        rid, action = request.match_info["id"], request.match_info["action"]
        try:
            with dash.rollouts.db() as db:
                engine = dash.rollouts.engine(db, rid)
                if action == "cancel":
                    engine.cancel()
                    said = f"{rid} cancelled: no more devices are targeted."
                elif action == "rollback":
                    n = len(engine.roll_back())
                    said = f"{rid}: rolling back {n} devices. " + dash.rollouts.drive(rid)
                else:
                    said = dash.rollouts.drive(rid)
            log.info("%s: %s %s", checked[0].user, action, rid)
        except ro.RolloutError as e:
            said = f"Refused: {e}"
        back = request.headers.get("Referer", "")
        to = f"/rollout/{quote(rid)}" if f"/rollout/{quote(rid)}" in back else "/rollouts"
        raise web.HTTPSeeOther(to + "?" + urlencode({"said": said}))

    async def root(request: web.Request) -> web.Response:
        raise web.HTTPSeeOther("/fleet")

    async def live_js(request: web.Request) -> web.Response:
        return web.Response(text=LIVE_JS, content_type="text/javascript", headers={"Cache-Control": "no-store"})

    async def events(request: web.Request) -> web.StreamResponse:
        token = request.cookies.get(COOKIE, "")
        s = auth.valid(token)
        if s is None:
            return web.Response(status=403, text="forbidden: not signed in")
        return await dash.live.stream(request, s.csrf, lambda: auth.valid(token) is s)

    async def close_streams(app: web.Application) -> None:
        dash.live.close()

    async def background(app: web.Application):
        tasks = [asyncio.create_task(c) for c in (dash.follow(), dash.index.keep_fresh(), dash.rollouts.watch())]
        yield
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await dash.rollouts.stop()

    @web.middleware
    async def headers(request: web.Request, handler):
        """The security headers on every answer, and Server-Timing: what the server spent on
        it (browsers' developer tools show it; the dashboard benchmark reads it)."""
        t0 = time.perf_counter()
        try:
            resp = await handler(request)
        except web.HTTPException as e:  # redirects and refusals are answers too
            resp = e
        if not resp.prepared:
            resp.headers.update(views.SECURITY_HEADERS)
            resp.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - t0) * 1000:.2f}"
        if isinstance(resp, web.HTTPException):
            raise resp
        return resp

    app = web.Application(client_max_size=UPLOAD_MAX, middlewares=[headers])
    app.cleanup_ctx.append(background)
    app.on_shutdown.append(close_streams)
    app.router.add_get("/", root)
    app.router.add_get("/live.js", live_js)
    app.router.add_get("/events", events)
    app.router.add_get("/login", auth.login_page)
    app.router.add_post("/login", auth.login)
    app.router.add_post("/logout", auth.logout)
    app.router.add_get("/fleet", fleet_page)
    app.router.add_get("/device/{device}", device_page)
    app.router.add_post("/device/{device}/desired", set_desired)
    app.router.add_get("/releases", releases_page)
    app.router.add_post("/releases", add_release)
    app.router.add_get("/rollouts", rollouts_page)
    app.router.add_post("/rollouts", start_rollout)
    app.router.add_get("/rollout/{id}", rollout_page)
    app.router.add_post("/rollout/{id}/{action:cancel|rollback|resume}", rollout_action)
    return app


def _create_rollout(site: Site, values: dict[str, str]) -> str:
    """A rollout from the start form's fields, with the CLI's checks (Policy.check, the same
    target selection); its id."""
    def number(name, kind, optional=False):
        v = values.get(name, "").strip()
        if not v and optional:
            return None
        try:
            return kind(v)
        except ValueError:
            raise ro.RolloutError(f"{name.replace('_', ' ')}: {'a whole number' if kind is int else 'a number'}, "
                                  f"not {v!r}") from None

    rel = site.releases.get(values.get("version", ""))
    if rel is None:
        raise ro.RolloutError(f"no release {values.get('version')!r}")
    policy = ro.Policy([b.strip() for b in values.get("batches", "").split(",")], number("success", float),
                       number("abort_failures", int, True), number("abort_pct", float, True),
                       number("min_finished", int), number("timeout", int), number("max_attempts", int),
                       values.get("rollback") == "on", number("ttl", int), values.get("auth", "url"))
    how = values.get("targets")
    if how not in ("devices", "match", "group", "all"):
        raise ro.RolloutError("targets: choose devices, a glob, a group or all")
    devices = ro.select_devices(site, values["devices"].split() if how == "devices" else None,
                                values["match"].strip() if how == "match" else None,
                                values["group"] if how == "group" else None, how == "all")
    db = ro.RolloutDB(site.rollouts_path)
    try:
        return db.create(rel, devices, policy).id
    finally:
        db.close()


async def start(site: Site, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve the dashboard over TLS with the site's server certificate; (runner, bound port).
    Stop with `await runner.cleanup()`."""
    from tools.control.store import start_store
    from tools.site.pki import server_ssl_context

    return await start_store(host, port, make_app(site), server_ssl_context(site.pki))
