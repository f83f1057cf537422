"""The dashboard's HTML: every page and every piece the live stream replaces, written here
and nowhere else, so a row or a rollout looks the same whether the page or the stream wrote
it. Everything a device or a file supplied is escaped; reported fields may be of any JSON
type and are written as text."""

from __future__ import annotations

import html
import json
import time
from urllib.parse import quote, urlencode

from aiohttp import web

from tools.operator import rollout as ro
from tools.operator.status import DeviceStatus

PAGE = 50  # rows per page
STATES = ("idle", "downloading", "verifying", "rebooting", "trial", "failed")
SORTS = ("device", "running", "state", "seen")
# Stands for the session's token in HTML rendered once for every page: escaped text (all a
# device or a file supplies) cannot contain "<", so nothing but our forms has it.
CSRF_MARK = "<csrf>"
STYLE = """
body { font-family: system-ui, sans-serif; margin: 1rem; max-width: 80rem; }
nav.top a { margin-right: 1rem; } .out { float: right; }
.wide { overflow-x: auto; } table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .25rem .5rem; white-space: nowrap; }
tr:nth-child(even) { background: #f3f3f3; } pre { white-space: pre-wrap; overflow-wrap: anywhere; } .err { color: #a00; } progress { width: 6rem; }
form.filters label, form.inline label { margin-right: .75rem; display: inline-block; }
form.inline { display: inline; } section.rollout { border: 1px solid #ccc; padding: .25rem .75rem; margin: .5rem 0; }
section.rollout h2 { font-size: 1.1rem; } section.rollout table { width: auto; }
fieldset { margin: .5rem 0; } fieldset label { display: inline-block; margin: .25rem .75rem .25rem 0; }
input:focus, select:focus, button:focus, a:focus { outline: 2px solid #05a; }
@media (max-width: 40rem) { body { margin: .5rem; } .out { float: none; } h1 { font-size: 1.4rem; } }
"""


def text(v) -> str:
    """A value a device reported, whatever its JSON type, as escaped text."""
    return "" if v is None else html.escape(v if isinstance(v, str) else json.dumps(v))


def number(v) -> int | None:
    """A reported number as an int; None for anything else (another type, NaN, beyond 2**53)."""
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < 2 ** 53 else None


def signed(signer) -> str:
    return f" [{text(signer)[:8]}]" if signer else ""


def page(title: str, body: str, user: str | None = None, csrf: str | None = None, status: int = 200,
         live: bool = False) -> web.Response:
    """A whole page; `live`: its rows and rollouts change as the server pushes them (live.js)."""
    top = ""
    if user:
        top = (f'<form method="post" action="/logout" class="out"><input type="hidden" name="csrf" value="{csrf}">'
               f'<span>{html.escape(user)}</span> <button type="submit">Sign out</button></form>'
               '<nav class="top" aria-label="pages"><a href="/fleet">Fleet</a><a href="/rollouts">Rollouts</a>'
               '<a href="/releases">Releases</a></nav>')
    doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)} - fleet</title><style>{STYLE}</style></head>
<body{" data-live" if live else ""}>{top}<h1>{html.escape(title)}</h1>{body}<script src="/live.js"></script></body></html>"""
    return web.Response(text=doc.replace(CSRF_MARK, csrf or ""), content_type="text/html", status=status)


SECURITY_HEADERS = {  # on every answer (the app's middleware)
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; script-src 'self'; connect-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Strict-Transport-Security": "max-age=31536000",
    "Cache-Control": "no-store",
}


def said(message: str | None) -> str:
    return f'<p role="status" id="said">{html.escape(message)}</p>' if message else ""


def alert(message: str | None) -> str:
    return f'<p class="err" role="alert">{html.escape(message)}</p>' if message else ""


def login_form(token: str, error: str | None = None) -> str:
    return f"""{alert(error)}<form method="post" action="/login">
<input type="hidden" name="csrf" value="{token}">
<p><label for="user">User</label> <input id="user" name="user" autocomplete="username" required></p>
<p><label for="password">Password</label> <input id="password" name="password" type="password"
 autocomplete="current-password" required></p>
<p><button type="submit">Sign in</button></p></form>"""


def csrf_form(action: str, label: str) -> str:
    """A one-button form for an action; its token is filled in per page (CSRF_MARK)."""
    return (f'<form method="post" action="{html.escape(action)}" class="inline">'
            f'<input type="hidden" name="csrf" value="{CSRF_MARK}"><button type="submit">{label}</button></form>')


# -- fleet -----------------------------------------------------------------------------------

def row(r: DeviceStatus, now: float) -> str:
    """One device's row: the page and the live stream write it the same way."""
    state = text(r.state) or "-"
    progress = number(r.progress)
    if r.state == "downloading" and progress is not None:
        state += f' <progress max="100" value="{progress}" aria-label="download {progress}%"></progress>'
    seen = number(r.last_seen)
    seen = "never" if seen is None else f"{max(0, int(now - seen))} s ago"
    attempts = number(r.attempts)
    return (f'<tr id="row-{html.escape(r.device)}"><td><a href="/device/{quote(r.device)}">{html.escape(r.device)}</a></td>'
            f"<td>{text(r.running) or '-'}{signed(r.running_signer)}</td>"
            f"<td>{text(r.desired) or '-'}{signed(r.desired_signer)}</td><td>{state}</td>"
            f"<td>{seen}</td><td>{text(r.error)}</td>"
            f"<td>{'' if attempts is None else attempts}</td></tr>")


def _options(values, current: str, blank: str = "any") -> str:
    return "".join(f'<option value="{html.escape(v)}"{" selected" if v == current else ""}>{html.escape(v or blank)}'
                   f"</option>" for v in ("", *values))


def fleet(rows: list[DeviceStatus], q: dict[str, str], versions: list[str], groups: list[str], now: float,
          running: str = "", problem: str | None = None) -> str:
    """The fleet table, a page of it, with its filters; `running`: the rollouts under way."""
    total = len(rows)
    try:
        number_ = max(1, int(q.get("page", "1")))
    except ValueError:
        number_ = 1
    pages = max(1, (total + PAGE - 1) // PAGE)
    number_ = min(number_, pages)
    shown = rows[(number_ - 1) * PAGE: number_ * PAGE]
    keep = {k: v for k, v in q.items() if k in ("state", "version", "group", "q", "sort") and v}
    nav = []
    if number_ > 1:
        nav.append(f'<a href="/fleet?{html.escape(urlencode(dict(keep, page=number_ - 1)))}" rel="prev">Previous</a>')
    if number_ < pages:
        nav.append(f'<a href="/fleet?{html.escape(urlencode(dict(keep, page=number_ + 1)))}" rel="next">Next</a>')
    return f"""{running}{alert(problem)}<form method="get" action="/fleet" class="filters">
<label>State <select name="state">{_options(STATES, q.get("state", ""))}</select></label>
<label>Running <select name="version">{_options(versions, q.get("version", ""))}</select></label>
<label>Group <select name="group">{_options(groups, q.get("group", ""))}</select></label>
<label>Device <input name="q" value="{html.escape(q.get("q", ""))}" placeholder="id contains"></label>
<label>Sort <select name="sort">{_options(SORTS, q.get("sort", ""), "device")}</select></label>
<button type="submit">Show</button></form>
<p id="count">{total} devices, page {number_} of {pages}</p>
<div class="wide"><table id="fleet"><thead><tr><th scope="col">Device</th><th scope="col">Running</th><th scope="col">Desired</th>
<th scope="col">State</th><th scope="col">Last seen</th><th scope="col">Last error</th><th scope="col">Attempts</th></tr>
</thead><tbody>{"".join(row(r, now) for r in shown)}</tbody></table></div>
<nav aria-label="pages of devices">{" ".join(nav)}</nav>"""


# -- a device ----------------------------------------------------------------------------------

def device(name: str, doc: dict, history, releases, rollouts, message: str | None) -> str:
    """A device's page: its shadow (desired, reported, delta), the documents seen for it since
    the dashboard started, the rollouts that targeted it, and the form that sets its desired
    firmware."""
    state = doc.get("state") or {}

    def section(key):
        return (f'<h2>{key.capitalize()}</h2><pre id="{key}">'
                f"{html.escape(json.dumps(state.get(key), indent=1, sort_keys=True))}</pre>")

    options = "".join(f'<option value="{html.escape(r.version)}">{html.escape(r.version)}{signed(r.signer)}</option>'
                      for r in reversed(releases))
    seen = "".join(f"<li>{time.strftime('%H:%M:%S', time.gmtime(t))}: {text(r.running) or '-'}, "
                   f"{text(r.state) or '-'}{', ' + text(r.error) if r.error else ''}</li>"
                   for t, r in history) or "<li>nothing yet</li>"
    runs = "".join(f'<li><a href="/rollout/{quote(rid)}">{html.escape(rid)}</a>: {t.state}'
                   f"{', ' + html.escape(t.error) if t.error else ''}, was {html.escape(t.prev_version or '-')}"
                   f"{', roll back ' + t.rollback if t.rollback else ''}</li>" for rid, t in rollouts) \
        or "<li>none</li>"
    return f"""{said(message)}
<form method="post" action="/device/{quote(name)}/desired"><input type="hidden" name="csrf" value="{CSRF_MARK}">
<label for="version">Release</label> <select id="version" name="version">{options}</select>
<label><input type="checkbox" name="allow_downgrade"> allow downgrade</label>
<button type="submit">Set desired</button></form>
{section("desired")}{section("reported")}{section("delta")}
<h2>Rollouts</h2><ul id="rollouts">{runs}</ul>
<h2>Recent documents</h2><ul id="history">{seen}</ul>"""


# -- releases ----------------------------------------------------------------------------------

def releases(rels, signing_required: bool, message: str | None = None, error: str | None = None,
             version: str = "") -> str:
    rows = "".join(
        f'<tr id="release-{html.escape(r.version)}"><td>{html.escape(r.version)}</td>'
        f'<td><code title="{r.sha256}">{r.sha256[:16]}</code></td><td>{r.size}</td><td>{html.escape(r.date)}</td>'
        f"<td>{'[' + html.escape(r.signer[:8]) + '] counter ' + str(r.secure_version) if r.signature else 'unsigned'}"
        f"</td></tr>" for r in reversed(rels))
    policy = ("This site installs signed releases only: upload the image with the signature bundle made where "
              "the key is (<code>fleet-ota sign</code>)." if signing_required else
              "This site accepts unsigned releases (<code>fleet-ota trust require</code> to stop).")
    return f"""{said(message)}{alert(error)}<div class="wide"><table><thead><tr><th scope="col">Version</th>
<th scope="col">SHA-256</th><th scope="col">Size</th><th scope="col">Added</th><th scope="col">Signed by</th></tr>
</thead><tbody>{rows or '<tr><td colspan="5">no releases yet</td></tr>'}</tbody></table></div>
<h2>Add a release</h2><p>{policy}</p>
<form method="post" action="/releases" enctype="multipart/form-data">
<input type="hidden" name="csrf" value="{CSRF_MARK}">
<p><label for="image">App image (.bin)</label> <input id="image" name="image" type="file" required></p>
<p><label for="signature">Signature bundle</label> <input id="signature" name="signature" type="file"></p>
<p><label for="rel-version">Version</label> <input id="rel-version" name="version" value="{html.escape(version)}"
 placeholder="the signed manifest's"></p>
<p><button type="submit">Add release</button></p></form>"""


# -- rollouts ----------------------------------------------------------------------------------

def rollout(info: ro.RolloutInfo, targets: list[ro.Target], signer: str | None, driver: str | None) -> str:
    """One rollout: its state, a progress bar per batch and the actions it allows. Rendered
    once for all pages (the live stream): forms carry CSRF_MARK, not a token. `driver`: "here"
    (this dashboard), a process id, or None (nothing sends its desired states)."""
    c = ro.counts(targets)
    batches = []
    start = 0
    for i, end in enumerate(info.ends):
        mine = [t for t in targets if t.batch == i]
        ok = sum(t.state == ro.SUCCEEDED for t in mine)
        bad = sum(t.state == ro.FAILED for t in mine)
        busy = sum(t.state == ro.IN_PROGRESS for t in mine)
        label = f"batch {i + 1}: {ok + bad} of {len(mine)} finished"
        batches.append(f'<tr><th scope="row">{i + 1}</th><td>{start + 1}-{end}</td><td><progress max="{len(mine)}" '
                       f'value="{ok + bad}" aria-label="{label}"></progress></td>'
                       f"<td>{ok} ok, {bad} failed, {busy} updating</td></tr>")
        start = end
    actions = []
    busy = info.state == ro.RUNNING or c["rolling_back"] > 0
    if info.state == ro.RUNNING:
        actions.append(csrf_form(f"/rollout/{quote(info.id)}/cancel", "Cancel"))
    if busy and driver is None:
        actions.append(csrf_form(f"/rollout/{quote(info.id)}/resume", "Drive from here"))
    if any(t.state in (ro.IN_PROGRESS, ro.SUCCEEDED, ro.FAILED) and t.rollback is None for t in targets):
        actions.append(csrf_form(f"/rollout/{quote(info.id)}/rollback", "Roll back"))
    back = (f", rolled back {c['rolled_back']} of {c['rolled_back'] + c['rolling_back']}"
            if c["rolled_back"] or c["rolling_back"] else "")
    reason = f": {html.escape(info.reason)}" if info.reason and info.state != ro.RUNNING else ""
    return f"""<section class="rollout" id="rollout-{html.escape(info.id)}" aria-label="rollout {html.escape(info.id)}">
<h2><a href="/rollout/{quote(info.id)}">{html.escape(info.id)}</a>: {html.escape(info.version)}{signed(signer)}
 to {len(targets)} devices</h2>
<p class="state">{info.state}{reason}{_driven(busy, driver)}</p>
<div class="wide"><table><thead><tr><th scope="col">Batch</th><th scope="col">Devices</th><th scope="col">Progress</th>
<th scope="col">Outcome</th></tr></thead><tbody>{"".join(batches)}</tbody></table></div>
<p>{c[ro.SUCCEEDED]} ok, {c[ro.FAILED]} failed, {c[ro.IN_PROGRESS]} updating, {c[ro.PENDING]} pending
{f", {c[ro.SKIPPED]} skipped" if c[ro.SKIPPED] else ""}{f", {c[ro.STOPPED]} stopped" if c[ro.STOPPED] else ""}{back}</p>
<p>{" ".join(actions)}</p></section>"""


def _driven(busy: bool, driver: str | None) -> str:
    if not busy and driver is None:
        return ""
    if driver == "here":
        return " (driven by the dashboard)"
    if driver is not None:
        return f" (driven by process {html.escape(driver)})"
    return " (not driven: nothing is sent until something drives it)"


def rollout_devices(targets: list[ro.Target]) -> str:
    rows = "".join(f'<tr><td><a href="/device/{quote(t.device)}">{html.escape(t.device)}</a></td><td>{t.batch + 1}</td>'
                   f"<td>{t.state}</td><td>{html.escape(t.error or '')}</td><td>{html.escape(t.prev_version or '-')}</td>"
                   f"<td>{t.rollback or ''}</td></tr>" for t in targets)
    return (f'<h2>Devices</h2><div class="wide"><table id="targets"><thead><tr><th scope="col">Device</th>'
            f'<th scope="col">Batch</th><th scope="col">State</th><th scope="col">Error</th><th scope="col">Ran before</th>'
            f'<th scope="col">Roll back</th></tr></thead><tbody>{rows}</tbody></table></div>')


START_FIELDS = {  # the start form's fields and their defaults: the CLI's
    "version": "", "targets": "devices", "devices": "", "match": "", "group": "", "batches": "1,10%,50%,100%",
    "success": "100", "abort_failures": "", "abort_pct": "", "min_finished": "1", "timeout": "900",
    "max_attempts": "3", "rollback": "on", "ttl": "900", "auth": "url",
}


def start_form(rels, groups: list[str], values: dict[str, str], error: str | None = None) -> str:
    v = dict(START_FIELDS, **values)

    def field(name, label, hint=""):
        return (f'<label for="f-{name}">{label}</label> <input id="f-{name}" name="{name}" '
                f'value="{html.escape(v[name])}"{f" placeholder={chr(34)}{hint}{chr(34)}" if hint else ""}>')

    def choice(value, label, control):
        checked = " checked" if v["targets"] == value else ""
        return (f'<label><input type="radio" name="targets" value="{value}"{checked}> {label}</label> {control}')

    versions = "".join(f'<option value="{html.escape(r.version)}"{" selected" if r.version == v["version"] else ""}>'
                       f"{html.escape(r.version)}{signed(r.signer)}</option>" for r in reversed(rels))
    group_opts = "".join(f'<option{" selected" if g == v["group"] else ""}>{html.escape(g)}</option>' for g in groups)
    auth = "".join(f'<option value="{a}"{" selected" if a == v["auth"] else ""}>{a}</option>' for a in ("url", "token"))
    return f"""<h2>Start a rollout</h2>{alert(error)}
<form method="post" action="/rollouts" id="start"><input type="hidden" name="csrf" value="{CSRF_MARK}">
<p><label for="f-version">Release</label> <select id="f-version" name="version">{versions}</select></p>
<fieldset><legend>Targets</legend>
{choice("devices", "Devices", field("devices", "ids", "dev-1 dev-2"))}
{choice("match", "Ids matching", field("match", "glob", "shelf-*"))}
{choice("group", "Group", f'<select id="f-group" name="group" aria-label="group">{group_opts}</select>')}
{choice("all", "Every known device", "")}</fieldset>
<fieldset><legend>Policy</legend>
{field("batches", "Batches", "1,10%,50%,100%")} {field("success", "Success %")}
{field("abort_failures", "Abort at failures")} {field("abort_pct", "Abort at failed %")}
{field("min_finished", "Thresholds after")} {field("timeout", "Timeout s")} {field("max_attempts", "Attempts")}
<label><input type="checkbox" name="rollback"{" checked" if v["rollback"] == "on" else ""}> roll back on abort</label>
{field("ttl", "URL lifetime s")} <label for="f-auth">Auth</label> <select id="f-auth" name="auth">{auth}</select>
</fieldset><p><button type="submit">Start rollout</button></p></form>"""
