"""The fleet dashboard in a real browser: headless Chromium from the distribution's packages,
driven by Selenium, against the dashboard `serve` runs, over HTTPS with the site's
certificate (pinned for the browser by its public key, not by ignoring certificate errors).
The fleet is seeded through the replica's own request handling."""

import base64
import hashlib
import http.client
import json
import shutil
import ssl
import tempfile
from urllib.parse import urlencode

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tools.control.replica import Replica
from tools.espidf.images import build_app_image
from tools.operator import dashboard
from tools.operator.dashboard import auth
from tools.site.identities import OPERATOR

webdriver = pytest.importorskip("selenium.webdriver")
if not (shutil.which("chromium") and shutil.which("chromedriver")):
    pytest.skip("needs chromium and chromedriver (make system-deps installs them)", allow_module_level=True)

N = 120  # three pages of 50


def _seed(site):
    r = Replica(None, site.shadow_store, grant_key=None)
    for i in range(N):
        state = "failed" if i % 10 == 3 else "downloading" if i % 10 == 5 else "idle"
        fw = {"version": "1.1.0" if i % 2 else "1.0.0", "sha256": "ab" * 32, "state": state, "slot": "ota_0",
              "error": "rolled_back" if state == "failed" else None, "attempts": 3 if state == "failed" else None,
              "progress": 40 if state == "downloading" else None}
        if i == N - 2:  # the mark the server fills with a page's CSRF token, as a device's text
            fw["error"] = "<csrf>"
        if i == N - 1:  # a hostile device: any JSON type in any field; the page must still be served
            fw = {"version": {"x": "<b>"}, "state": 5, "progress": "70", "attempts": "z", "error": ["<script>"],
                  "signer": 7}
        out = r.handle(f"state/dev{i:03d}/update", json.dumps({"state": {"reported": {"firmware": fw}}}).encode())
        assert out[0][0].endswith("/update/accepted"), out
    r.db.close()


@pytest.fixture
def dash(site, services):
    _seed(site)
    runner, port = services.call(dashboard.start(site, "127.0.0.1", 0))
    yield f"https://127.0.0.1:{port}"
    services.call(runner.cleanup())


@pytest.fixture
def browser(site):
    cert = x509.load_pem_x509_certificate(site.pki.server_cert.read_bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    profile = tempfile.mkdtemp(prefix="chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--window-size=1200,900", "--no-sandbox", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                "--ignore-certificate-errors-spki-list=" + base64.b64encode(hashlib.sha256(spki).digest()).decode()):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _submit(browser, button):
    """Click a form's button and wait until the page it leads to has replaced this one."""
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    def gone(_):
        # The page that held the button is gone: Chrome says so in one of two ways.
        try:
            button.is_enabled()
        except StaleElementReferenceException:
            return True
        except WebDriverException as e:
            if "does not belong to the document" in str(e):
                return True
            raise
        return False

    try:
        button.click()
    except StaleElementReferenceException:
        pass  # the click's navigation replaced the page before the driver's reply
    except WebDriverException as e:
        if "does not belong to the document" not in str(e):
            raise
    WebDriverWait(browser, 15).until(gone)
    WebDriverWait(browser, 15).until(lambda d: d.execute_script("return document.readyState") == "complete")


def _click_live(browser, css):
    """Click a button in a part of the page the live stream may replace at any moment: if it
    was replaced between finding and clicking, find it again and click the new one (as a
    person would)."""
    import time

    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    browser.execute_script("window.samePage = true")
    for _ in range(5):
        try:
            browser.find_element(By.CSS_SELECTOR, css).click()
        except StaleElementReferenceException:
            continue
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                if browser.execute_script("return window.samePage") is None and \
                        browser.execute_script("return document.readyState") == "complete":
                    return
            except Exception:  # between two documents
                pass
            time.sleep(0.05)
    raise AssertionError(f"clicking {css} led nowhere")


def _sign_in(browser, base, user, password):
    from selenium.webdriver.common.by import By

    browser.get(base + "/login")
    browser.find_element(By.ID, "user").send_keys(user)
    browser.find_element(By.ID, "password").send_keys(password)
    _submit(browser, browser.find_element(By.CSS_SELECTOR, "button[type=submit]"))


def test_an_operator_signs_in_and_pages_through_the_fleet(site, dash, browser):
    from selenium.webdriver.common.by import By

    browser.get(dash + "/fleet")
    assert browser.current_url.endswith("/login")  # anonymous: sent to sign in
    _sign_in(browser, dash, OPERATOR, "not the password")
    assert "Wrong user or password." in browser.find_element(By.CSS_SELECTOR, "[role=alert]").text
    device_password = site.creds.set("dev000")  # a device's own credential never signs in
    _sign_in(browser, dash, "dev000", device_password)
    assert "Wrong user or password." in browser.find_element(By.CSS_SELECTOR, "[role=alert]").text

    # With the keyboard alone: Tab to the user field, type, Tab, type, Enter.
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(dash + "/login")
    ActionChains(browser).send_keys(Keys.TAB, OPERATOR, Keys.TAB, site.service_password(OPERATOR),
                                    Keys.ENTER).perform()
    WebDriverWait(browser, 15).until(lambda d: d.current_url.endswith("/fleet"))
    assert browser.find_element(By.ID, "count").text == f"{N} devices, page 1 of 3"
    rows = browser.find_elements(By.CSS_SELECTOR, "tbody tr")
    assert len(rows) == 50 and rows[0].find_elements(By.TAG_NAME, "td")[0].text == "dev000"
    bars = browser.find_elements(By.CSS_SELECTOR, "tbody progress")
    assert bars and bars[0].get_attribute("value") == "40"
    cookie = next(c for c in browser.get_cookies() if c["name"] == auth.COOKIE)
    assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Strict"

    _submit(browser, browser.find_element(By.CSS_SELECTOR, "a[rel=next]"))
    assert browser.find_element(By.ID, "count").text == f"{N} devices, page 2 of 3"
    assert browser.find_elements(By.CSS_SELECTOR, "tbody tr")[0].find_elements(By.TAG_NAME, "td")[0].text == "dev050"
    browser.get(dash + "/fleet?page=3&sort=running")  # the hostile device's row, written as text
    cells = [c.text for c in browser.find_element(By.ID, "row-dev119").find_elements(By.TAG_NAME, "td")]
    assert cells[1] == '{"x": "<b>"} [7]' and cells[3] == "5" and cells[5] == '["<script>"]'
    browser.get(dash + "/fleet?q=dev118")  # its error is the CSRF mark: shown as text, never filled in
    assert browser.find_element(By.ID, "row-dev118").find_elements(By.TAG_NAME, "td")[5].text == "<csrf>"

    # Filters: the form's own controls, as a user would.
    from selenium.webdriver.support.ui import Select

    browser.get(dash + "/fleet")
    Select(browser.find_element(By.NAME, "state")).select_by_value("failed")
    browser.find_element(By.NAME, "q").send_keys("dev01")
    _submit(browser, browser.find_element(By.CSS_SELECTOR, "form.filters button"))
    assert browser.find_element(By.ID, "count").text == "1 devices, page 1 of 1"  # dev013 alone
    cells = browser.find_elements(By.CSS_SELECTOR, "tbody td")
    assert [c.text for c in cells[:1] + cells[3:4] + cells[5:]] == ["dev013", "failed", "rolled_back", "3"]

    _submit(browser, browser.find_element(By.CSS_SELECTOR, "form.out button"))  # sign out
    assert browser.current_url.endswith("/login")
    assert not any(c["name"] == auth.COOKIE for c in browser.get_cookies())  # the browser dropped it too
    browser.get(dash + "/fleet")
    assert browser.current_url.endswith("/login")


def _request(base, site, method, path, body=None, headers=None):
    host, port = base[8:].split(":")
    conn = http.client.HTTPSConnection(host, int(port), timeout=10,
                                       context=ssl.create_default_context(cafile=str(site.pki.ca_cert)))
    try:
        headers = headers or {}
        conn.request(method, path, body, headers, encode_chunked=headers.get("Transfer-Encoding") == "chunked")
        r = conn.getresponse()
        return r.status, {k: r.getheader(k) for k, _ in r.getheaders()}, r.read()  # repeated ones joined
    finally:
        conn.close()


def _post(base, site, path, form, cookies=""):
    """A form POSTed as a page would: (status, Set-Cookie, body)."""
    status, headers, body = _request(base, site, "POST", path, urlencode(form),
                                     {"Content-Type": "application/x-www-form-urlencoded", "Cookie": cookies})
    return status, headers.get("Set-Cookie") or "", body


def test_every_action_needs_its_csrf_token_and_failed_sign_ins_are_limited(site, dash):
    pw = site.service_password(OPERATOR)
    # Sign-in without the token the form set (a page elsewhere posting to ours): refused.
    status, _, _ = _post(dash, site, "/login", {"user": OPERATOR, "password": pw, "csrf": "x"})
    assert status == 403
    token = "t" * 32
    login = f"{auth.LOGIN_COOKIE}={token}"
    status, cookie, _ = _post(dash, site, "/login", {"user": OPERATOR, "password": pw, "csrf": token}, login)
    assert status == 303 and cookie.startswith(auth.COOKIE + "=")
    for flag in ("Secure", "HttpOnly", "SameSite=Strict"):
        assert flag in cookie
    session = cookie.split(";")[0]
    # Sign-out without the session's CSRF token: refused, and the session still works.
    status, _, _ = _post(dash, site, "/logout", {"csrf": "wrong"}, session)
    assert status == 403
    # Failed sign-ins from one address: the sixth within a minute is refused before checking.
    codes = [_post(dash, site, "/login", {"user": OPERATOR, "password": "no", "csrf": token}, login)[0]
             for _ in range(auth.FAILS_ALLOWED + 1)]
    assert codes == [401] * auth.FAILS_ALLOWED + [429]
    assert _post(dash, site, "/login", {"user": OPERATOR, "password": pw, "csrf": token}, login)[0] == 429

    # Every action, signed in but without the page's token: refused, and nothing done.
    for path, form in (("/device/dev005/desired", {"version": "1.0.0"}), ("/rollouts", {"version": "1.0.0",
                       "targets": "all"}), ("/rollout/r-x/cancel", {}), ("/rollout/r-x/rollback", {}),
                       ("/rollout/r-x/resume", {})):
        for csrf in ({}, {"csrf": "wrong"}):
            assert _post(dash, site, path, dict(form, **csrf), session)[0] == 403, path
    body = b"\r\n".join([b"--b", b'Content-Disposition: form-data; name="image"; filename="a.bin"', b"",
                          b"\xe9" * 64, b"--b--", b""])
    assert _request(dash, site, "POST", "/releases", body, {"Content-Type": "multipart/form-data; boundary=b",
                                                             "Cookie": session})[0] == 403
    assert not site.rollouts_path.exists() and site.releases.list() == []
    # Every page, anonymous: sent to sign in; the event stream: refused.
    for path in ("/fleet", "/device/dev005", "/releases", "/rollouts", "/rollout/r-x"):
        status, headers, _ = _request(dash, site, "GET", path)
        assert (status, headers.get("Location")) == (303, "/login"), path
    assert _request(dash, site, "GET", "/events")[0] == 403


def test_rows_change_as_devices_report_without_a_reload(site, dash, browser, mqtt_probe):
    """A device's report goes through the broker and the replica; the page, open all along,
    shows it: the server's one subscription pushes the row, the page swaps it in."""
    import time

    from selenium.webdriver.common.by import By

    _sign_in(browser, dash, OPERATOR, site.service_password(OPERATOR))
    browser.execute_script("window.notReloaded = true")
    dev = mqtt_probe("dev005", site.creds.set("dev005"))
    assert dev.connected() == 0

    def report(**fw):
        dev.publish("state/dev005/update", json.dumps({"state": {"reported": {"firmware": fw}}}))

    def row():
        # Read in one script: the page replaces the row whenever a report comes in.
        return browser.execute_script("""const r = document.getElementById("row-dev005");
            const p = r.querySelector("progress");
            return {cells: [...r.cells].map(c => c.textContent.trim()), progress: p ? p.value : null};""")

    # Until the dashboard's subscription is up, a report can pass unseen: report until it shows.
    deadline = time.monotonic() + 20
    while True:
        report(state="downloading", progress=70)
        time.sleep(0.5)
        if row()["progress"] == 70:
            break
        assert time.monotonic() < deadline, row()
    report(state="idle", progress=None, version="1.2.0")
    deadline = time.monotonic() + 10
    while row()["cells"][1] != "1.2.0":
        assert time.monotonic() < deadline, row()
        time.sleep(0.2)
    assert row()["cells"][3] == "idle" and row()["progress"] is None
    assert browser.execute_script("return window.notReloaded") is True
    assert len(browser.find_elements(By.CSS_SELECTOR, "tbody tr")) == 50  # the other rows stay


def test_a_device_page_shows_its_shadow_and_sets_its_desired_firmware(site, services, dash, browser, images):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from conftest import release
    from tools.control import grants
    from tools.operator import client as op

    rel = release(site, images["B"], "2.0.0")
    _sign_in(browser, dash, OPERATOR, site.service_password(OPERATOR))
    _submit(browser, browser.find_element(By.LINK_TEXT, "dev005"))
    assert browser.current_url.endswith("/device/dev005")
    assert json.loads(browser.find_element(By.ID, "reported").text)["firmware"]["version"] == "1.1.0"
    assert browser.find_element(By.ID, "desired").text == "null"

    Select(browser.find_element(By.ID, "version")).select_by_value("2.0.0")
    _submit(browser, browser.find_element(By.CSS_SELECTOR, "form[action$='/desired'] button"))
    assert browser.find_element(By.ID, "said").text == "Desired firmware set to 2.0.0."
    assert json.loads(browser.find_element(By.ID, "desired").text)["firmware"]["version"] == "2.0.0"
    # What the replica holds: an operator's desired firmware, granted for this device.
    fw = services.call(op.get_shadow(site, "dev005"))["state"]["desired"]["firmware"]
    assert (fw["sha256"], fw["signer"]) == (rel.sha256, rel.signer)
    assert grants.issued(site.grant_key, "dev005", fw) is not None

    # The page lists the documents the dashboard has seen for the device (the desired update).
    import time

    deadline = time.monotonic() + 10
    while "nothing yet" in browser.find_element(By.ID, "history").text:
        assert time.monotonic() < deadline
        time.sleep(0.3)
        browser.get(dash + "/device/dev005")
    assert "1.1.0, downloading" in browser.find_element(By.ID, "history").text  # as dev005 was seeded

    # The form's action needs the session's CSRF token too.
    session = next(c for c in browser.get_cookies() if c["name"] == auth.COOKIE)
    status, _, _ = _post(dash, site, "/device/dev005/desired", {"version": "2.0.0", "csrf": "wrong"},
                         f"{auth.COOKIE}={session['value']}")
    assert status == 403


@pytest.fixture
def bare_dash(site, services):
    """The dashboard over a fleet with nothing seeded: what emulated boards report is all."""
    runner, port = services.call(dashboard.start(site, "127.0.0.1", 0))
    yield f"https://127.0.0.1:{port}"
    services.call(runner.cleanup())


def _screenshot(browser, name):
    """With DASHBOARD_SCREENSHOTS=<dir> (make screenshots), the docs' pictures are taken here."""
    import os

    folder = os.environ.get("DASHBOARD_SCREENSHOTS")
    if folder:
        browser.save_screenshot(os.path.join(folder, name + ".png"))


def _cli(site, *args, stdin=None):
    import subprocess
    import sys

    from conftest import REPO

    return subprocess.run([sys.executable, "-m", "tools", *args, "--site", str(site.root)], cwd=REPO,
                          input=stdin, capture_output=True, text=True, timeout=60)


def test_a_rollout_started_on_the_page_moves_live_and_one_cancelled_there_is_cancelled_for_the_cli(
        site, services, devices, images, bare_dash, browser):
    """Three emulated boards running the real firmware. A rollout started from the page's form
    is driven by the dashboard; the fleet page, never reloaded, shows its batches' bars fill and
    the boards' rows change until it completes. A second one, cancelled from the page while it
    runs, is cancelled for `fleet-ota rollout` too, and the boards it never reached untouched."""
    import re
    import time

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from conftest import release, wait_until
    from tools.control import shadows

    release(site, images["A"], "1.0.0")
    b = release(site, images["B"], "1.1.0")
    c = release(site, build_app_image("1.2.0", 240 * 1024), "1.2.0")
    ids = ["board-1", "board-2", "board-3"]
    for d in ids:
        devices(d, images["A"], "1.0.0", tls_slots=2)  # MQTT stays up: progress is reported live
    wait_until(lambda: all(s.reported.get("state") == "idle" for s in shadows.read(site.shadow_store, ids).values())
               and len(shadows.read(site.shadow_store, ids)) == 3, 120, "three boards reporting 1.0.0", 0.5)

    _sign_in(browser, bare_dash, OPERATOR, site.service_password(OPERATOR))

    def start(version, batches, how="match", value="board-*"):
        browser.get(bare_dash + "/rollouts")
        Select(browser.find_element(By.ID, "f-version")).select_by_value(version)
        browser.find_element(By.CSS_SELECTOR, f"input[name=targets][value={how}]").click()
        if value:
            field = browser.find_element(By.ID, f"f-{how}")
            field.clear()
            field.send_keys(value)
        batch = browser.find_element(By.ID, "f-batches")
        batch.clear()
        batch.send_keys(batches)
        _submit(browser, browser.find_element(By.CSS_SELECTOR, "#start button[type=submit]"))
        said = browser.find_element(By.ID, "said").text
        return re.match(r"Started (\S+)\.", said).group(1)

    # The form refuses what the CLI refuses, and says why on the page.
    browser.get(bare_dash + "/rollouts")
    field = browser.find_element(By.ID, "f-batches")
    field.clear()
    field.send_keys("0,x")
    browser.find_element(By.CSS_SELECTOR, "input[name=targets][value=all]").click()
    _submit(browser, browser.find_element(By.CSS_SELECTOR, "#start button[type=submit]"))
    assert "batch '0'" in browser.find_element(By.CSS_SELECTOR, "[role=alert]").text
    assert not site.rollouts_path.exists() or "r-" not in _cli(site, "rollout", "list").stdout

    rid = start("1.1.0", "1,100%")
    browser.get(bare_dash + "/fleet")  # the page an operator keeps open
    browser.execute_script("window.notReloaded = true")
    seen = []

    def look():
        return browser.execute_script("""const s = document.getElementById(arguments[0]);
            return {bars: s ? [...s.querySelectorAll("progress")].map(p => p.value + "/" + p.max) : null,
                    state: s ? s.querySelector(".state").textContent : null,
                    rows: [...document.querySelectorAll("#fleet tbody tr")].map(
                        r => r.cells[1].textContent.trim() + " " + r.cells[3].textContent.trim())};""",
                                      f"rollout-{rid}")

    deadline = time.monotonic() + 240
    while True:
        now = look()
        if not seen or now != seen[-1]:
            seen.append(now)
            if now["state"] and now["state"].startswith("running"):  # the last one running is kept
                _screenshot(browser, "fleet-during-rollout")
        if now["state"] is None or now["state"].startswith("completed"):
            break
        assert time.monotonic() < deadline, seen
        time.sleep(0.2)
    assert browser.execute_script("return window.notReloaded") is True
    print(seen)
    # A running rollout's section is on the fleet page: its bars went from empty to full, and
    # the boards' rows went through the update, all without a reload.
    bars = [s["bars"] for s in seen if s["bars"]]
    assert bars[0] != ["1/1", "2/2"] and bars[-1] == ["1/1", "2/2"] and len({tuple(x) for x in bars}) >= 2, seen
    # Boards 2 and 3 (the second batch) ran 1.0.0 when the page opened; then every row changed.
    assert all(r.startswith("1.0.0 ") for r in seen[0]["rows"][1:]), seen
    assert seen[-1]["rows"] == ["1.1.0 [" + b.signer[:8] + "] idle"] * 3, seen
    assert all(c.text.endswith(" s ago") for c in browser.find_elements(By.CSS_SELECTOR, "#fleet tbody td:nth-child(5)"))
    browser.get(bare_dash + f"/rollout/{rid}")
    assert browser.find_element(By.CSS_SELECTOR, f"#rollout-{rid} .state").text.startswith("completed")
    assert [p.get_attribute("value") for p in browser.find_elements(By.CSS_SELECTOR, "progress")] == ["1", "2"]
    for s in shadows.read(site.shadow_store, ids).values():
        assert (s.reported["version"], s.reported["sha256"], s.reported["state"]) == ("1.1.0", b.sha256, "idle")
    shown = json.loads(_cli(site, "rollout", "show", rid, "--json").stdout)
    assert shown["state"] == "completed" and shown["counts"]["succeeded"] == 3

    # The second rollout: cancelled on the page while its first batch updates.
    rid2 = start("1.2.0", "1,100%")
    browser.get(bare_dash + f"/rollout/{rid2}")
    wait_until(lambda: "1 updating" in browser.execute_script(
        "return document.getElementById(arguments[0]).textContent", f"rollout-{rid2}"), 30, "batch 1 under way")
    _screenshot(browser, "rollout-running")
    _click_live(browser, f"form[action='/rollout/{rid2}/cancel'] button")
    assert browser.find_element(By.ID, "said").text.startswith(f"{rid2} cancelled")
    shown = json.loads(_cli(site, "rollout", "show", rid2, "--json").stdout)
    assert shown["state"] == "cancelled" and shown["reason"] == "cancelled by the operator"
    assert shown["counts"]["skipped"] == 2 and shown["counts"]["pending"] == 0
    listed = _cli(site, "rollout", "list").stdout
    assert any(line.startswith(rid2) and line.endswith("cancelled: cancelled by the operator")
               for line in listed.splitlines()), listed
    first = next(d["device"] for d in shown["devices"] if d["state"] != "skipped")
    # The board it reached finishes its update; the two it never reached are not touched.
    wait_until(lambda: shadows.read(site.shadow_store, [first])[first].reported.get("sha256") == c.sha256, 120,
               "the first board on 1.2.0", 0.5)
    for d in set(ids) - {first}:
        s = shadows.read(site.shadow_store, [d])[d]
        assert s.desired["sha256"] == b.sha256 and s.reported["sha256"] == b.sha256
    browser.get(bare_dash + f"/device/{first}")
    assert rid2 in browser.find_element(By.ID, "rollouts").text
    _screenshot(browser, "device")

    # Rolled back from the page: the board it reached goes back to 1.1.0, and the CLI says so.
    browser.get(bare_dash + f"/rollout/{rid2}")
    _click_live(browser, f"form[action='/rollout/{rid2}/rollback'] button")
    assert browser.find_element(By.ID, "said").text.startswith(f"{rid2}: rolling back 1 devices.")
    wait_until(lambda: json.loads(_cli(site, "rollout", "show", rid2, "--json").stdout)["counts"]["rolled_back"] == 1,
               120, "the roll back done", 0.5)
    s = shadows.read(site.shadow_store, [first])[first]
    assert (s.reported["sha256"], s.reported["state"]) == (b.sha256, "idle")

    # A rollout the CLI created (and nothing drives) is on the page, which cancels it.
    out = _cli(site, "rollout", "start", "1.2.0", "--devices", *sorted(set(ids) - {first}), "--detach")
    assert out.returncode == 0, out.stderr
    rid3 = out.stdout.split(":")[0]
    browser.get(bare_dash + "/rollouts")
    section = browser.find_element(By.ID, f"rollout-{rid3}")
    assert "not driven" in section.find_element(By.CLASS_NAME, "state").text
    assert section.find_elements(By.CSS_SELECTOR, f"form[action='/rollout/{rid3}/resume'] button")
    _click_live(browser, f"form[action='/rollout/{rid3}/cancel'] button")
    assert browser.find_element(By.ID, "said").text.startswith(f"{rid3} cancelled")
    assert json.loads(_cli(site, "rollout", "show", rid3, "--json").stdout)["state"] == "cancelled"
    for d in set(ids) - {first}:  # never targeted: nothing was sent
        assert shadows.read(site.shadow_store, [d])[d].desired["sha256"] == b.sha256


def test_a_release_is_uploaded_with_the_checks_of_release_and_refusals_are_shown(site, bare_dash, browser, images,
                                                                                 tmp_path):
    """The page adds releases the way `fleet-ota release` does: a damaged image, an unsigned one
    on a site that installs signed releases only and a signature of other bytes are refused on
    the page, and nothing is added; an image with its bundle is listed with its signer."""
    from selenium.webdriver.common.by import By

    from conftest import signing_key
    from tools.site.signing import release_bundle

    good = tmp_path / "app.bin"
    good.write_bytes(images["B"])
    bad = tmp_path / "damaged.bin"
    bad.write_bytes(images["B"][:1000] + bytes([images["B"][1000] ^ 1]) + images["B"][1001:])
    bundle = tmp_path / "app.sig.json"
    bundle.write_text(json.dumps(release_bundle(signing_key(), images["B"], "1.1.0", 2)))
    other = tmp_path / "other.sig.json"
    other.write_text(json.dumps(release_bundle(signing_key(), images["A"], "1.1.0", 2)))

    _sign_in(browser, bare_dash, OPERATOR, site.service_password(OPERATOR))

    def upload(image, signature=None, version=""):
        browser.get(bare_dash + "/releases")
        browser.find_element(By.ID, "image").send_keys(str(image))
        if signature:
            browser.find_element(By.ID, "signature").send_keys(str(signature))
        if version:
            browser.find_element(By.ID, "rel-version").send_keys(version)
        _submit(browser, browser.find_element(By.CSS_SELECTOR, "form[action='/releases'] button"))
        alerts = browser.find_elements(By.CSS_SELECTOR, "[role=alert]")
        return alerts[0].text if alerts else browser.find_element(By.ID, "said").text

    said = upload(bad, bundle)
    assert said == "Refused: damaged.bin: bad_checksum: image checksum does not match its segments", said
    assert upload(good, version="1.1.0").startswith("Refused: unsigned: this site installs signed releases only")
    assert upload(good, other).startswith("Refused: other.sig.json: manifest_mismatch: ")
    assert site.releases.list() == []
    assert "no releases yet" in browser.find_element(By.CSS_SELECTOR, "tbody").text

    assert upload(good, bundle) == "Release 1.1.0 added."
    rel = site.releases.get("1.1.0")
    assert rel is not None and site.releases.path_of(rel.sha256).read_bytes() == images["B"]
    cells = [c.text for c in browser.find_element(By.ID, "release-1.1.0").find_elements(By.TAG_NAME, "td")]
    assert cells[0] == "1.1.0" and cells[1] == rel.sha256[:16] and cells[2] == str(len(images["B"]))
    assert cells[4] == f"[{rel.signer[:8]}] counter 2"
    # The CLI sees the same registry.
    assert _cli(site, "releases").stdout.split()[:2] == ["1.1.0", rel.sha256]


def test_filters_and_paging_stay_usable_over_ten_thousand_devices_and_on_a_phone(site, services, browser):
    """10,000 devices seeded through the replica's request handling; the page filters by state,
    version and group and pages to the end; on a phone-sized window nothing but the table
    scrolls sideways."""
    from selenium.webdriver.common.by import By

    r = Replica(None, site.shadow_store, grant_key=None)
    for i in range(10_000):
        fw = {"version": "1.1.0" if i % 4 else "1.0.0", "sha256": "ab" * 32, "slot": "ota_0",
              "state": "failed" if i % 100 == 7 else "idle", "error": "hash_mismatch" if i % 100 == 7 else None}
        r.handle(f"state/shelf-{i:05d}/update", json.dumps({"state": {"reported": {"firmware": fw}}}).encode())
    r.db.close()
    (site.root / "groups.json").write_text(json.dumps({"aisle-3": ["shelf-03*"], "two": ["shelf-00007", "shelf-09907"]}))
    runner, port = services.call(dashboard.start(site, "127.0.0.1", 0))
    base = f"https://127.0.0.1:{port}"
    try:
        _sign_in(browser, base, OPERATOR, site.service_password(OPERATOR))
        assert browser.find_element(By.ID, "count").text == "10000 devices, page 1 of 200"
        browser.get(base + "/fleet?page=200")
        rows = browser.find_elements(By.CSS_SELECTOR, "#fleet tbody tr")
        assert len(rows) == 50 and rows[-1].get_attribute("id") == "row-shelf-09999"
        import re

        assert re.fullmatch(r"\d+ s ago", rows[-1].find_elements(By.TAG_NAME, "td")[4].text)  # its report's time
        browser.get(base + "/fleet?state=failed&version=1.1.0")
        assert browser.find_element(By.ID, "count").text == "100 devices, page 1 of 2"  # i % 100 == 7: odd, so 1.1.0
        browser.get(base + "/fleet?group=aisle-3&version=1.0.0")
        assert browser.find_element(By.ID, "count").text == "250 devices, page 1 of 5"
        browser.get(base + "/fleet?group=two&state=failed")
        assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#fleet tbody td:first-child")] == \
            ["shelf-00007", "shelf-09907"]
        browser.get(base + "/fleet?group=nope")
        assert "no group 'nope'" in browser.find_element(By.CSS_SELECTOR, "[role=alert]").text

        browser.set_window_size(390, 844)  # a phone
        browser.get(base + "/fleet")
        _screenshot(browser, "fleet-phone")
        widths = browser.execute_script("""const t = document.querySelector(".wide");
            return [document.documentElement.scrollWidth, window.innerWidth, t.scrollWidth, t.clientWidth];""")
        assert widths[0] <= widths[1], widths  # the page itself does not scroll sideways ...
        assert widths[2] > widths[3], widths  # ... the table does, inside its box
        for name in ("state", "version", "group", "q", "sort"):  # every control is labelled
            assert browser.find_element(By.NAME, name).find_element(By.XPATH, "ancestor::label")
    finally:
        services.call(runner.cleanup())


def test_people_sign_in_with_accounts_of_their_own_which_removing_ends(site, dash):
    """`fleet-ota account add` gives a person a dashboard account (no broker or store knows
    it); a device's credential under the same name does not sign in; removing the account
    ends its session at the next request."""
    def sign_in(user, password):
        token = "t" * 32
        return _post(dash, site, "/login", {"user": user, "password": password, "csrf": token},
                     f"{auth.LOGIN_COOKIE}={token}")

    assert _cli(site, "account", "add", "alice", "--password-stdin", stdin="correct horse battery\n").returncode == 0
    assert _cli(site, "account", "list").stdout.split() == ["alice"]
    assert not site.creds.known("alice")  # the broker's and store's file: untouched
    assert sign_in("alice", "wrong horse battery")[0] == 401
    device_password = site.creds.set("alice")  # a device that happens to share the name
    assert sign_in("alice", device_password)[0] == 401
    status, cookie, _ = sign_in("alice", "correct horse battery")
    assert status == 303
    session = cookie.split(";")[0]
    status, _, body = _request(dash, site, "GET", "/fleet", headers={"Cookie": session})
    assert status == 200 and b"<span>alice</span>" in body

    out = _cli(site, "account", "remove", "alice")
    assert out.returncode == 0, out.stderr
    status, headers, _ = _request(dash, site, "GET", "/fleet", headers={"Cookie": session})
    assert (status, headers.get("Location")) == (303, "/login")
    assert sign_in("alice", "correct horse battery")[0] == 401


def test_what_no_page_of_ours_sends_is_refused_in_one_line_and_sessions_end_with_their_password(
        site, dash, mqtt_probe):
    """Bodies that are not our forms get 400 or 413, never a 500; an odd device id is 404;
    every answer carries the security headers; sign-ins sent at once are limited as if sent
    one by one; a new password ends the sessions opened with the old one, and signing out
    ends the page's event stream before it carries another row."""
    import threading

    token = "t" * 32
    login = f"{auth.LOGIN_COOKIE}={token}"
    status, cookie, _ = _post(dash, site, "/login", {"user": OPERATOR, "password": site.service_password(OPERATOR),
                                                     "csrf": token}, login)
    session = cookie.split(";")[0]
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    for path in ("/login", "/logout", "/rollouts", "/device/dev005/desired"):
        got = _request(dash, site, "POST", path, b"\xff=1", dict(form, Cookie=session + "; " + login))
        assert got[0] in (400, 403), (path, got)
    big = _request(dash, site, "POST", "/rollouts", b"a=" + b"x" * 100_000, dict(form, Cookie=session))
    assert big[0] == 413
    chunked = _request(dash, site, "POST", "/login", iter([b"a=" + b"x" * 60_000] * 20),
                       dict(form, Cookie=login, **{"Transfer-Encoding": "chunked"}))
    assert chunked[0] == 413  # a body with no length is counted as it comes
    for ctype, code in (("application/x-www-form-urlencoded; charset=bogus", 403),  # read as UTF-8: no token
                        ("multipart/form-data; boundary=b", 400), ("text/plain", 400)):
        got = _request(dash, site, "POST", "/rollouts", b"csrf=x", {"Content-Type": ctype, "Cookie": session})
        assert got[0] == code, (ctype, got[:2])
    got = _request(dash, site, "POST", "/login", "csrf=\u00e9&user=a&password=b".encode(), dict(form, Cookie=login))
    assert got[0] == 403  # a token of any text is compared, not a crash
    for body, ctype in ((b"a=1", "application/x-www-form-urlencoded"),
                        (b"--b\r\nContent-Type: multipart/mixed; boundary=c\r\n\r\n--c\r\n\r\nx\r\n--c--\r\n--b--\r\n",
                         "multipart/form-data; boundary=b"),
                        (b"--b\r\nContent-Disposition: form-data; name=\"image\"\r\n", "multipart/form-data; boundary=b")):
        got = _request(dash, site, "POST", "/releases", body, {"Content-Type": ctype, "Cookie": session})
        # not a form (400), or a form without the page's token (403): never a 500
        assert got[0] == 400 and b"Not a form this page sends." in got[2] or got[0] == 403, got[:2]
    for odd in ("%2B", "%23", "a%2Fb", "x" * 100):
        status, headers, _ = _request(dash, site, "GET", f"/device/{odd}", headers={"Cookie": session})
        assert status == 404, odd
    for path in ("/fleet", "/live.js", "/nothing-here", "/login"):
        headers = _request(dash, site, "GET", path, headers={"Cookie": session})[1]
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"], path
        assert headers["X-Content-Type-Options"] == "nosniff" and "Server-Timing" in headers, path

    # An account given a new password: its old session ends.
    _cli(site, "account", "add", "bob", "--password-stdin", stdin="first password here\n")
    status, cookie, _ = _post(dash, site, "/login", {"user": "bob", "password": "first password here",
                                                     "csrf": token}, login)
    bob = cookie.split(";")[0]
    assert _request(dash, site, "GET", "/fleet", headers={"Cookie": bob})[0] == 200
    _cli(site, "account", "add", "bob", "--password-stdin", stdin="second password here\n")
    assert _request(dash, site, "GET", "/fleet", headers={"Cookie": bob})[1].get("Location") == "/login"

    # Ten wrong passwords at once: five are checked, the others refused unchecked.
    codes = []
    threads = [threading.Thread(target=lambda: codes.append(
        _post(dash, site, "/login", {"user": "alice", "password": "wrong password!", "csrf": token}, login)[0]))
        for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [401] * 5 + [429] * 5, codes

    # Signing out ends the page's event stream: the next row is not sent to it.
    host, port = dash[8:].split(":")
    stream = http.client.HTTPSConnection(host, int(port), timeout=30,  # beyond a heartbeat
                                         context=ssl.create_default_context(cafile=str(site.pki.ca_cert)))
    stream.request("GET", "/events", headers={"Cookie": session})
    events = stream.getresponse()
    assert events.status == 200
    page = _request(dash, site, "GET", "/fleet", headers={"Cookie": session})[2].decode()
    csrf = page.split('name="csrf" value="')[1].split('"')[0]
    assert _post(dash, site, "/logout", {"csrf": csrf}, session)[0] == 303
    dev = mqtt_probe("dev007", site.creds.set("dev007"))
    assert dev.connected() == 0
    dev.publish("state/dev007/update", json.dumps({"state": {"reported": {"firmware": {"version": "secret-7"}}}}))
    got = events.read()  # returns when the server ends the stream
    assert b"secret-7" not in got
    stream.close()


def test_a_rollout_started_on_the_page_is_cancelled_by_the_cli_and_the_open_page_shows_it(
        site, services, dash, browser, images):
    """The other direction: `fleet-ota rollout cancel` stops a rollout the dashboard drives, and
    the rollouts page, open all along, shows it cancelled without a reload. The seeded devices
    never answer, so the rollout would otherwise run until its timeout."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from conftest import release, wait_until

    release(site, images["B"], "2.0.0")
    _sign_in(browser, dash, OPERATOR, site.service_password(OPERATOR))
    browser.get(dash + "/rollouts")
    Select(browser.find_element(By.ID, "f-version")).select_by_value("2.0.0")
    browser.find_element(By.CSS_SELECTOR, "input[name=targets][value=match]").click()
    browser.find_element(By.ID, "f-match").send_keys("dev00*")
    _submit(browser, browser.find_element(By.CSS_SELECTOR, "#start button[type=submit]"))
    rid = browser.find_element(By.ID, "said").text.split()[1].rstrip(".")
    browser.execute_script("window.notReloaded = true")

    def state():
        return browser.execute_script("const s = document.getElementById(arguments[0]);"
                                      "return s && s.querySelector('.state').textContent", f"rollout-{rid}")
    assert state() == "running (driven by the dashboard)"
    listed = _cli(site, "rollout", "list").stdout
    assert any(line.startswith(rid) and "2.0.0" in line and line.endswith("running") for line in listed.splitlines())
    out = _cli(site, "rollout", "cancel", rid)
    assert out.returncode == 0, out.stderr
    wait_until(lambda: (state() or "").startswith("cancelled: cancelled by the operator"), 15, "the page to show it")
    assert browser.execute_script("return window.notReloaded") is True
    shown = json.loads(_cli(site, "rollout", "show", rid, "--json").stdout)
    assert shown["state"] == "cancelled" and shown["counts"]["skipped"] == 9  # dev000-dev009: batch 1 had one
