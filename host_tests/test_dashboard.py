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
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
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

    _sign_in(browser, dash, OPERATOR, site.service_password(OPERATOR))
    assert browser.current_url.endswith("/fleet")
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
    browser.get(dash + "/fleet")
    assert browser.current_url.endswith("/login")


def _post(base, site, path, form, cookies=""):
    host, port = base[8:].split(":")
    conn = http.client.HTTPSConnection(host, int(port), timeout=10,
                                       context=ssl.create_default_context(cafile=str(site.pki.ca_cert)))
    try:
        conn.request("POST", path, urlencode(form), {"Content-Type": "application/x-www-form-urlencoded",
                                                     "Cookie": cookies})
        r = conn.getresponse()
        return r.status, r.getheader("Set-Cookie") or "", r.read()
    finally:
        conn.close()


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
