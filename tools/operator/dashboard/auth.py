"""Who may use the dashboard: the operator identity, with its password from the site's
password file, and the people given an account (`fleet-ota account add`: `<site>/accounts`,
a file no broker or store reads, argon2id). A device's credential never signs in. A session is a random token in a
cookie that is `Secure; HttpOnly; SameSite=Strict`, kept in memory and dropped at sign-out or
after SESSION_S; every action carries a CSRF token that must match the one the server gave
that browser (the sign-in form's by a double-submit cookie, every other by the session's).
Failed sign-ins are limited per client address, refused before the password is looked at."""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
from dataclasses import dataclass
from urllib.parse import parse_qsl

from aiohttp import web

from tools.operator.dashboard.views import login_form, page
from tools.site.identities import OPERATOR, check_account

log = logging.getLogger("dashboard")

SESSION_S = 8 * 3600
COOKIE = "__Host-fleet_session"  # __Host-: only over HTTPS, for this host and every path, never a domain's
LOGIN_COOKIE = "fleet_login"  # the sign-in form's CSRF token (double-submit), before a session exists
FAILS_ALLOWED = 5  # failed sign-ins per address per FAIL_WINDOW_S
FAIL_WINDOW_S = 60
FORM_MAX = 64 * 1024  # a form of ours is far smaller; the release upload has its own limit
CHECKS_AT_ONCE = 2  # password checks running together (argon2id: ~20 ms of CPU and 19 MiB each)


@dataclass
class Session:
    user: str
    csrf: str
    expires: float
    password: str  # the fingerprint of the password it was opened with (Credentials.fingerprint)


def forbidden() -> web.Response:
    return web.Response(status=403, text="forbidden: not signed in, or no CSRF token from this page")


class Auth:
    def __init__(self, site):
        self.site = site
        self.sessions: dict[str, Session] = {}
        self.fails: dict[str, list[float]] = {}  # failed (and pending) sign-ins by address
        self.checking: asyncio.Semaphore | None = None

    def _creds(self, user: str):
        return self.site.creds if user == OPERATOR else self.site.accounts

    def session(self, request: web.Request) -> Session | None:
        return self.valid(request.cookies.get(COOKIE, ""))

    def valid(self, token: str) -> Session | None:
        """The session of `token`, if it has not expired and its password is still the one it
        was opened with (an account removed or given a new password ends its sessions)."""
        s = self.sessions.get(token)
        if s is not None and (s.expires < time.time() or self._creds(s.user).fingerprint(s.user) != s.password):
            del self.sessions[token]
            s = None
        return s

    def signed_in(self, request: web.Request) -> Session:
        """The session of a page request; anyone else is sent to sign in."""
        s = self.session(request)
        if s is None:
            raise web.HTTPSeeOther("/login")
        return s

    async def action(self, request: web.Request):
        """(session, form) of a POST from one of our pages; None if it is not one. The body
        is read only for a session."""
        s = self.session(request)
        if s is None:
            return None
        form = await read_form(request)
        if not same(form.get("csrf", ""), s.csrf):
            return None
        return s, form

    def throttled(self, addr: str, pending: float | None = None) -> bool:
        """FAILS_ALLOWED failed sign-ins from `addr` in the last FAIL_WINDOW_S (besides
        `pending`, the attempt being made)."""
        now = time.monotonic()
        recent = [t for t in self.fails.pop(addr, []) if now - t < FAIL_WINDOW_S]
        if recent:
            self.fails[addr] = recent
        return sum(t != pending for t in recent) >= FAILS_ALLOWED

    def _form(self, error: str | None = None, status: int = 200) -> web.Response:
        token = secrets.token_urlsafe(24)
        resp = page("Sign in", login_form(token, error), status=status)
        resp.set_cookie(LOGIN_COOKIE, token, secure=True, httponly=True, samesite="Strict", max_age=600, path="/login")
        return resp

    async def login_page(self, request: web.Request) -> web.Response:
        return self._form()

    async def login(self, request: web.Request) -> web.Response:
        addr = request.remote or "?"
        if self.throttled(addr):
            return self._form("Too many failed sign-ins: wait a minute.", 429)
        form = await read_form(request)
        sent, kept = str(form.get("csrf", "")), request.cookies.get(LOGIN_COOKIE, "")
        if not kept or not same(sent, kept):
            return self._form("The form expired: sign in again.", 403)
        user, password = str(form.get("user", "")), str(form.get("password", ""))
        # Counted as failed until it succeeds: attempts sent together are limited as well.
        attempt = time.monotonic()
        self.fails.setdefault(addr, []).append(attempt)
        if self.throttled(addr, pending=attempt):
            self.fails[addr].remove(attempt)
            return self._form("Too many failed sign-ins: wait a minute.", 429)
        if self.checking is None:
            self.checking = asyncio.Semaphore(CHECKS_AT_ONCE)
        async with self.checking:
            ok = await asyncio.to_thread(self.verify, user, password)
        if not ok:
            return self._form("Wrong user or password.", 401)
        if attempt in self.fails.get(addr, ()):  # it may have left the window while it waited
            self.fails[addr].remove(attempt)
        self.sessions.pop(request.cookies.get(COOKIE, ""), None)  # a new session, never the old one
        token = secrets.token_urlsafe(32)
        self.sessions[token] = Session(user, secrets.token_urlsafe(24), time.time() + SESSION_S,
                                       self._creds(user).fingerprint(user) or "")
        log.info("%s signed in from %s", user, addr)
        resp = web.HTTPSeeOther("/fleet")
        resp.set_cookie(COOKIE, token, secure=True, httponly=True, samesite="Strict", max_age=SESSION_S, path="/")
        resp.del_cookie(LOGIN_COOKIE, path="/login")
        return resp

    def verify(self, user: str, password: str) -> bool:
        """The operator identity against the site's password file; anyone else against the
        accounts file only (a device's name and password are not in it)."""
        if user == OPERATOR:
            return self.site.creds.verify(user, password)
        try:
            check_account(user)
        except ValueError:
            return False
        return self.site.accounts.verify(user, password)

    async def logout(self, request: web.Request) -> web.Response:
        if await self.action(request) is None:
            return forbidden()
        self.sessions.pop(request.cookies.get(COOKIE, ""), None)
        resp = web.HTTPSeeOther("/login")
        resp.del_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="Strict")  # __Host- needs Secure
        return resp


def same(sent: str, kept: str) -> bool:
    """Token comparison in constant time, for any text sent (compare_digest refuses non-ASCII str)."""
    return hmac.compare_digest(sent.encode(), kept.encode())


async def read_form(request: web.Request) -> dict[str, str]:
    """A urlencoded UTF-8 form of ours, read here rather than by aiohttp so that whatever
    else arrives (another type, charset or encoding, a body without a length) is one answer:
    413 beyond FORM_MAX, 400 for anything that is not such a form."""
    if request.content_type != "application/x-www-form-urlencoded":
        raise web.HTTPBadRequest(text="not a form from this site")
    if request.content_length is not None and request.content_length > FORM_MAX:
        raise web.HTTPRequestEntityTooLarge(FORM_MAX, request.content_length)
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > FORM_MAX:
            raise web.HTTPRequestEntityTooLarge(FORM_MAX, len(body))
    try:
        return dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=64))
    except ValueError:  # not UTF-8 (UnicodeDecodeError), or more fields than any form of ours
        raise web.HTTPBadRequest(text="not a form from this site") from None
