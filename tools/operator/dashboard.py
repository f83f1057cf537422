"""The fleet dashboard: an HTTPS page operators keep open (issue 22, first parts: sign-in, the
fleet table with filters, sort and paging, rows that change live).

Served by `serve` on its own port with the site's certificate. Sign-in is for operator
identities only (`operator`; a device's credential never signs in, whatever its password),
checked against the site's password file. A session is a random token in a cookie that is
`Secure; HttpOnly; SameSite=Strict`, kept in memory and dropped at logout or after
SESSION_S; every action (sign-in, sign-out) carries a CSRF token that must match the one the
server gave that browser. Failed sign-ins are limited per client address. Plain HTML the
server writes, escaped, and one small script of ours (live.js); nothing from elsewhere.

Live: the server holds one MQTT subscription for all browsers, to the replica's
`update/documents` (each accepted update's whole document), renders the changed device's row
as the page would, and pushes it to every signed-in page over Server-Sent Events (/events),
where live.js swaps the row in place.
"""

from __future__ import annotations

import asyncio
import hmac
import html
import secrets
import time
from dataclasses import dataclass, field
from urllib.parse import quote, urlencode

import json
import logging
from collections import deque

import aiomqtt
from aiohttp import web

from firmware import contract
from tools.control.clients import service_client
from tools.control.shadows import Shadow
from tools.operator import client as op
from tools.operator.status import DeviceStatus, device_status, fleet
from tools.site import Site
from tools.site.identities import OPERATOR

log = logging.getLogger("dashboard")

SESSION_S = 8 * 3600
COOKIE = "fleet_session"
LOGIN_COOKIE = "fleet_login"  # the sign-in form's CSRF token (double-submit), before a session exists
PAGE = 50  # rows per page
FAILS_ALLOWED = 5  # failed sign-ins per address per FAIL_WINDOW_S
FAIL_WINDOW_S = 60
OPERATORS = (OPERATOR,)  # identities that may sign in
STATES = ("idle", "downloading", "verifying", "rebooting", "trial", "failed")
HISTORY = 20  # documents kept per device for its page (since the dashboard started)
QUEUE = 1000  # row changes a page may fall behind by before its stream is closed (it reconnects)
HEARTBEAT_S = 15
LIVE_JS = """// Rows change as devices report: the server pushes each changed row (Server-Sent Events).
const rows = document.querySelector("tbody");
if (rows) {
  const events = new EventSource("/events");
  events.onmessage = (e) => {
    const m = JSON.parse(e.data);
    const row = document.getElementById("row-" + m.device);
    if (row) row.outerHTML = m.html;
  };
}
"""


@dataclass
class Session:
    user: str
    csrf: str
    expires: float


@dataclass
class Dashboard:
    site: Site
    sessions: dict[str, Session] = field(default_factory=dict)
    fails: dict[str, list[float]] = field(default_factory=dict)  # failed sign-ins by address
    listeners: set = field(default_factory=set)  # a queue of row changes per open event stream
    history: dict[str, deque] = field(default_factory=dict)  # device -> its last HISTORY documents

    def session(self, request: web.Request) -> Session | None:
        token = request.cookies.get(COOKIE, "")
        s = self.sessions.get(token)
        if s is not None and s.expires < time.time():
            del self.sessions[token]
            s = None
        return s

    def publish(self, topic: str, payload: bytes) -> None:
        """An update/documents message: the device's row as it is now, to every page."""
        parsed = contract.parse_topic(topic)
        try:
            current = json.loads(payload)["current"]
        except (ValueError, KeyError, TypeError):
            return
        if parsed is None or not isinstance(current, dict):
            return
        row = device_status(Shadow(parsed[0], current), self.site.grant_key)
        now = time.time()
        self.history.setdefault(row.device, deque(maxlen=HISTORY)).appendleft((now, row))
        if not self.listeners:
            return  # no page open: nothing to render
        data = json.dumps({"device": row.device, "html": _row(row, now)})
        for q in list(self.listeners):
            try:
                q.put_nowait(data)
            except asyncio.QueueFull:  # a page that stopped reading: its stream ends (it reconnects)
                self.listeners.discard(q)

    async def follow(self) -> None:
        """One subscription for all pages, kept up with backoff while the dashboard runs."""
        delay = 1.0
        while True:
            try:
                async with service_client(self.site, OPERATOR, "dashboard") as client:
                    await client.subscribe(contract.topic("+", contract.UPDATE_DOCUMENTS), qos=0)
                    delay = 1.0
                    async for msg in client.messages:
                        self.publish(str(msg.topic), bytes(msg.payload))
            except (aiomqtt.MqttError, OSError) as e:
                log.warning("broker: %s; following again in %.0f s", e, delay)
                await asyncio.sleep(delay)
                delay = min(30.0, delay * 2)

    def throttled(self, addr: str) -> bool:
        now = time.monotonic()
        recent = [t for t in self.fails.pop(addr, []) if now - t < FAIL_WINDOW_S]
        if recent:
            self.fails[addr] = recent
        return len(recent) >= FAILS_ALLOWED


def _page(title: str, body: str, user: str | None = None, csrf: str | None = None) -> web.Response:
    out = ""
    if user:
        out = (f'<form method="post" action="/logout" class="out"><input type="hidden" name="csrf" value="{csrf}">'
               f'<span>{html.escape(user)}</span> <button type="submit">Sign out</button></form>')
    doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)} - fleet</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1rem; }}
table {{ border-collapse: collapse; width: 100%; }} th, td {{ text-align: left; padding: .25rem .5rem; }}
tr:nth-child(even) {{ background: #f3f3f3; }} .err {{ color: #a00; }} .out {{ float: right; }}
form.filters label {{ margin-right: .75rem; }} progress {{ width: 6rem; }}
</style></head><body>{out}<h1>{html.escape(title)}</h1>{body}<script src="/live.js"></script></body></html>"""
    resp = web.Response(text=doc, content_type="text/html")
    resp.headers["Content-Security-Policy"] = ("default-src 'none'; style-src 'unsafe-inline'; script-src 'self'; "
                                               "connect-src 'self'; form-action 'self'")
    resp.headers["Cache-Control"] = "no-store"
    resp.headers["X-Frame-Options"] = "DENY"
    return resp


def _login_form(token: str, error: str | None = None, status: int = 200) -> web.Response:
    err = f'<p class="err" role="alert">{html.escape(error)}</p>' if error else ""
    resp = _page("Sign in", f"""{err}<form method="post" action="/login">
<input type="hidden" name="csrf" value="{token}">
<p><label for="user">User</label> <input id="user" name="user" autocomplete="username" required></p>
<p><label for="password">Password</label> <input id="password" name="password" type="password"
 autocomplete="current-password" required></p>
<p><button type="submit">Sign in</button></p></form>""")
    resp.set_status(status)
    resp.set_cookie(LOGIN_COOKIE, token, secure=True, httponly=True, samesite="Strict", max_age=600, path="/login")
    return resp


def _filtered(rows: list[DeviceStatus], q: dict[str, str]) -> list[DeviceStatus]:
    state, version, text = q.get("state", ""), q.get("version", ""), q.get("q", "").strip()
    if state:
        rows = [r for r in rows if (r.state or "") == state]
    if version:
        rows = [r for r in rows if r.running == version]
    if text:
        rows = [r for r in rows if text in r.device]
    key = q.get("sort", "device")
    sorts = {"device": lambda r: r.device, "running": lambda r: (_text(r.running), r.device),
             "state": lambda r: (_text(r.state), r.device), "seen": lambda r: (-(_number(r.last_seen) or 0), r.device)}
    return sorted(rows, key=sorts.get(key, sorts["device"]))


def _text(v) -> str:
    """A value a device reported, whatever its JSON type, as escaped text."""
    return "" if v is None else html.escape(v if isinstance(v, str) else json.dumps(v))


def _number(v) -> int | None:
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < 1e9 else None


def _row(r: DeviceStatus, now: float) -> str:
    """One device's row: the page and the live stream write it the same way. Every field is
    what a device reported, of any type: written as text, never trusted to be one."""
    state = _text(r.state) or "-"
    progress = _number(r.progress)
    if r.state == "downloading" and progress is not None:
        state += f' <progress max="100" value="{progress}" aria-label="download {progress}%"></progress>'

    def signed(s):
        return f" [{_text(s)[:8]}]" if s else ""

    seen = _number(r.last_seen)
    seen = "never" if seen is None else f"{max(0, int(now - seen))} s ago"
    attempts = _number(r.attempts)
    return (f'<tr id="row-{html.escape(r.device)}"><td><a href="/device/{quote(r.device)}">{html.escape(r.device)}</a></td>'
            f"<td>{_text(r.running) or '-'}{signed(r.running_signer)}</td>"
            f"<td>{_text(r.desired) or '-'}{signed(r.desired_signer)}</td><td>{state}</td>"
            f"<td>{seen}</td><td>{_text(r.error)}</td>"
            f"<td>{'' if attempts is None else attempts}</td></tr>")


def _fleet_html(rows: list[DeviceStatus], q: dict[str, str], now: float) -> str:
    total = len(rows)
    try:
        page = max(1, int(q.get("page", "1")))
    except ValueError:
        page = 1
    pages = max(1, (total + PAGE - 1) // PAGE)
    page = min(page, pages)
    shown = rows[(page - 1) * PAGE: page * PAGE]

    def opt(name, values):
        cur = q.get(name, "")
        return "".join(f'<option value="{html.escape(v)}"{" selected" if v == cur else ""}>{html.escape(v or "any")}'
                       f"</option>" for v in ("", *values))

    versions = sorted({r.running for r in rows if isinstance(r.running, str) and r.running})
    keep = {k: v for k, v in q.items() if k in ("state", "version", "q", "sort") and v}
    nav = []
    if page > 1:
        nav.append(f'<a href="/fleet?{html.escape(urlencode(dict(keep, page=page - 1)))}" rel="prev">Previous</a>')
    if page < pages:
        nav.append(f'<a href="/fleet?{html.escape(urlencode(dict(keep, page=page + 1)))}" rel="next">Next</a>')
    return f"""<form method="get" action="/fleet" class="filters">
<label>State <select name="state">{opt("state", STATES)}</select></label>
<label>Running <select name="version">{opt("version", versions)}</select></label>
<label>Device <input name="q" value="{html.escape(q.get("q", ""))}" placeholder="id contains"></label>
<label>Sort <select name="sort">{opt("sort", ("device", "running", "state", "seen"))}</select></label>
<button type="submit">Show</button></form>
<p id="count">{total} devices, page {page} of {pages}</p>
<table><thead><tr><th scope="col">Device</th><th scope="col">Running</th><th scope="col">Desired</th>
<th scope="col">State</th><th scope="col">Last seen</th><th scope="col">Last error</th><th scope="col">Attempts</th></tr></thead>
<tbody>{"".join(_row(r, now) for r in shown)}</tbody></table>
<nav>{" ".join(nav)}</nav>"""


def _device_html(device: str, doc: dict, history, releases, csrf: str, said: str | None) -> str:
    """A device's page: its shadow (desired, reported, delta), the documents seen for it
    since the dashboard started, and the form that sets its desired firmware."""
    state = doc.get("state") or {}

    def section(name):
        return (f'<h2>{name.capitalize()}</h2><pre id="{name}">'
                f"{html.escape(json.dumps(state.get(name), indent=1, sort_keys=True))}</pre>")

    note = f'<p role="status" id="said">{html.escape(said)}</p>' if said else ""
    options = "".join(f'<option value="{html.escape(r.version)}">{html.escape(r.version)}'
                      f'{" [" + html.escape(r.signer[:8]) + "]" if r.signer else ""}</option>' for r in reversed(releases))
    seen = "".join(f"<li>{time.strftime('%H:%M:%S', time.gmtime(t))}: {_text(r.running) or '-'}, "
                   f"{_text(r.state) or '-'}{', ' + _text(r.error) if r.error else ''}</li>"
                   for t, r in history) or "<li>nothing yet</li>"
    return f"""{note}<p><a href="/fleet">Fleet</a></p>
<form method="post" action="/device/{quote(device)}/desired"><input type="hidden" name="csrf" value="{csrf}">
<label for="version">Release</label> <select id="version" name="version">{options}</select>
<label><input type="checkbox" name="allow_downgrade"> allow downgrade</label>
<button type="submit">Set desired</button></form>
{section("desired")}{section("reported")}{section("delta")}
<h2>Recent documents</h2><ul id="history">{seen}</ul>"""


def make_app(site: Site) -> web.Application:
    dash = Dashboard(site)

    async def login_page(request: web.Request) -> web.Response:
        return _login_form(secrets.token_urlsafe(24))

    async def login(request: web.Request) -> web.Response:
        form = await request.post()
        addr = request.remote or "?"
        sent, kept = str(form.get("csrf", "")), request.cookies.get(LOGIN_COOKIE, "")
        if not kept or not hmac.compare_digest(sent, kept):
            return _login_form(secrets.token_urlsafe(24), "The form expired: sign in again.", 403)
        if dash.throttled(addr):
            return _login_form(secrets.token_urlsafe(24), "Too many failed sign-ins: wait a minute.", 429)
        user, password = str(form.get("user", "")), str(form.get("password", ""))
        ok = user in OPERATORS and await asyncio.to_thread(site.creds.verify, user, password)
        if not ok:
            dash.fails.setdefault(addr, []).append(time.monotonic())
            return _login_form(secrets.token_urlsafe(24), "Wrong user or password.", 401)
        token = secrets.token_urlsafe(32)
        dash.sessions[token] = Session(user, secrets.token_urlsafe(24), time.time() + SESSION_S)
        resp = web.HTTPSeeOther("/fleet")
        resp.set_cookie(COOKIE, token, secure=True, httponly=True, samesite="Strict", max_age=SESSION_S, path="/")
        resp.del_cookie(LOGIN_COOKIE, path="/login")
        return resp

    async def logout(request: web.Request) -> web.Response:
        s = dash.session(request)
        form = await request.post()
        if s is None or not hmac.compare_digest(str(form.get("csrf", "")), s.csrf):
            return web.Response(status=403, text="forbidden: not signed in, or no CSRF token from this page")
        dash.sessions.pop(request.cookies.get(COOKIE, ""), None)
        resp = web.HTTPSeeOther("/login")
        resp.del_cookie(COOKIE, path="/")
        return resp

    async def fleet_page(request: web.Request) -> web.Response:
        s = dash.session(request)
        if s is None:
            raise web.HTTPSeeOther("/login")
        rows = await asyncio.to_thread(fleet, site.shadow_store, site.grant_key)
        return _page("Fleet", _fleet_html(_filtered(rows, dict(request.query)), dict(request.query), time.time()),
                     s.user, s.csrf)

    async def device_page(request: web.Request) -> web.Response:
        s = dash.session(request)
        if s is None:
            raise web.HTTPSeeOther("/login")
        device = request.match_info["device"]
        try:
            doc = await op.get_shadow(site, device)
        except op.OperatorError as e:
            resp = _page(device, f'<p class="err" role="alert">{html.escape(str(e))}</p>', s.user, s.csrf)
            resp.set_status(404 if "404" in str(e) else 502)
            return resp
        return _page(device, _device_html(device, doc, dash.history.get(device, ()), site.releases.list(), s.csrf,
                                          request.query.get("said")), s.user, s.csrf)

    async def set_desired(request: web.Request) -> web.Response:
        s = dash.session(request)
        form = await request.post()
        if s is None or not hmac.compare_digest(str(form.get("csrf", "")), s.csrf):
            return web.Response(status=403, text="forbidden: not signed in, or no CSRF token from this page")
        device = request.match_info["device"]
        rel = site.releases.get(str(form.get("version", "")))
        if rel is None:
            said = "No such release."
        else:
            try:
                await op.set_desired(site, device, rel, allow_downgrade=form.get("allow_downgrade") == "on")
                said = f"Desired firmware set to {rel.version}."
            except (op.OperatorError, ValueError) as e:
                said = f"Refused: {e}"
        raise web.HTTPSeeOther(f"/device/{quote(device)}?" + urlencode({"said": said}))

    async def root(request: web.Request) -> web.Response:
        raise web.HTTPSeeOther("/fleet")

    async def live_js(request: web.Request) -> web.Response:
        return web.Response(text=LIVE_JS, content_type="text/javascript", headers={"Cache-Control": "no-store"})

    async def events(request: web.Request) -> web.StreamResponse:
        if dash.session(request) is None:
            return web.Response(status=403, text="forbidden: not signed in")
        q: asyncio.Queue = asyncio.Queue(QUEUE)
        dash.listeners.add(q)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"})
        await resp.prepare(request)
        try:
            while q in dash.listeners:
                try:
                    data = await asyncio.wait_for(q.get(), HEARTBEAT_S)
                except TimeoutError:
                    await resp.write(b": still here\n\n")
                    continue
                if data is None:  # the dashboard is stopping
                    break
                await resp.write(f"data: {data}\n\n".encode())
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            dash.listeners.discard(q)
        return resp

    async def close_streams(app: web.Application) -> None:
        for q in list(dash.listeners):  # open event streams end now, not at their next heartbeat
            dash.listeners.discard(q)
            try:
                q.put_nowait(None)
            except asyncio.QueueFull:
                pass

    async def following(app: web.Application):
        task = asyncio.create_task(dash.follow())
        yield
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    app = web.Application()
    app.cleanup_ctx.append(following)
    app.on_shutdown.append(close_streams)
    app.router.add_get("/", root)
    app.router.add_get("/live.js", live_js)
    app.router.add_get("/events", events)
    app.router.add_get("/login", login_page)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_get("/fleet", fleet_page)
    app.router.add_get("/device/{device}", device_page)
    app.router.add_post("/device/{device}/desired", set_desired)
    return app


async def start(site: Site, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve the dashboard over TLS with the site's server certificate; (runner, bound port).
    Stop with `await runner.cleanup()`."""
    from tools.control.store import start_store
    from tools.site.pki import server_ssl_context

    return await start_store(host, port, make_app(site), server_ssl_context(site.pki))
