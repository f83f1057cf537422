"""The fleet dashboard: an HTTPS page operators keep open (issue 22, first part: sign-in and
the fleet table with filters, sort and paging).

Served by `serve` on its own port with the site's certificate. Sign-in is for operator
identities only (`operator`; a device's credential never signs in, whatever its password),
checked against the site's password file. A session is a random token in a cookie that is
`Secure; HttpOnly; SameSite=Strict`, kept in memory and dropped at logout or after
SESSION_S; every action (sign-in, sign-out) carries a CSRF token that must match the one the
server gave that browser. Failed sign-ins are limited per client address. No JavaScript, and
nothing from elsewhere: plain HTML the server writes, escaped.
"""

from __future__ import annotations

import asyncio
import hmac
import html
import secrets
import time
from dataclasses import dataclass, field
from urllib.parse import urlencode

from aiohttp import web

from tools.operator.status import DeviceStatus, fleet
from tools.site import Site
from tools.site.identities import OPERATOR

SESSION_S = 8 * 3600
COOKIE = "fleet_session"
LOGIN_COOKIE = "fleet_login"  # the sign-in form's CSRF token (double-submit), before a session exists
PAGE = 50  # rows per page
FAILS_ALLOWED = 5  # failed sign-ins per address per FAIL_WINDOW_S
FAIL_WINDOW_S = 60
OPERATORS = (OPERATOR,)  # identities that may sign in
STATES = ("idle", "downloading", "verifying", "rebooting", "trial", "failed")


@dataclass
class Session:
    user: str
    csrf: str
    expires: float


@dataclass
class Dashboard:
    site: Site
    sessions: dict[str, Session] = field(default_factory=dict)
    fails: dict[str, list[float]] = field(default_factory=dict)

    def session(self, request: web.Request) -> Session | None:
        s = self.sessions.get(request.cookies.get(COOKIE, ""))
        if s is None or s.expires < time.time():
            return None
        return s

    def throttled(self, addr: str) -> bool:
        now = time.monotonic()
        recent = [t for t in self.fails.get(addr, []) if now - t < FAIL_WINDOW_S]
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
</style></head><body>{out}<h1>{html.escape(title)}</h1>{body}</body></html>"""
    resp = web.Response(text=doc, content_type="text/html")
    resp.headers["Content-Security-Policy"] = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'"
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
    sorts = {"device": lambda r: r.device, "running": lambda r: (r.running or "", r.device),
             "state": lambda r: (r.state or "", r.device), "seen": lambda r: (-(r.last_seen or 0), r.device)}
    return sorted(rows, key=sorts.get(key, sorts["device"]))


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

    def ago(t):
        return "never" if t is None else f"{int(now - t)} s ago"

    def cell(r: DeviceStatus) -> str:
        state = html.escape(r.state or "-")
        if r.state == "downloading" and r.progress is not None:
            state += f' <progress max="100" value="{int(r.progress)}" aria-label="download {int(r.progress)}%"></progress>'
        signed = lambda s: f" [{html.escape(s[:8])}]" if s else ""  # noqa: E731
        return (f"<tr><td>{html.escape(r.device)}</td><td>{html.escape(r.running or '-')}{signed(r.running_signer)}</td>"
                f"<td>{html.escape(r.desired or '-')}{signed(r.desired_signer)}</td><td>{state}</td>"
                f"<td>{ago(r.last_seen)}</td><td>{html.escape(r.error or '')}</td>"
                f"<td>{'' if r.attempts is None else int(r.attempts)}</td></tr>")

    versions = sorted({r.running for r in rows if r.running})
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
<tbody>{"".join(cell(r) for r in shown)}</tbody></table>
<nav>{" ".join(nav)}</nav>"""


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

    async def root(request: web.Request) -> web.Response:
        raise web.HTTPSeeOther("/fleet")

    app = web.Application()
    app.router.add_get("/", root)
    app.router.add_get("/login", login_page)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_get("/fleet", fleet_page)
    return app


async def start(site: Site, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve the dashboard over TLS with the site's server certificate; (runner, bound port).
    Stop with `await runner.cleanup()`."""
    from tools.control.store import start_store
    from tools.site.pki import server_ssl_context

    return await start_store(host, port, make_app(site), server_ssl_context(site.pki))
