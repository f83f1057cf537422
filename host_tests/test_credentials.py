"""Temporary credentials, the seed's second option: the desired firmware names a bare URL
(`auth: token`), the device asks on state/<id>/credentials/get for a short-lived token bound to
its id and that one image, and the store accepts it as a bearer credential."""

import json
import ssl
import time
import urllib.error
import urllib.request

from conftest import MQTTProbe, device_on_a, wait_reported, release
from firmware import contract
from tools.operator import client as op
from tools.control import presign
from tools.espidf.images import build_app_image

DEV = "tok-1"
BLOCK_OPS = 2  # flash operations per 4 KiB block (erase + program)


def _updated(fw, doc):
    return fw.get("version") == "1.1.0" and fw.get("state") == "idle"


def test_device_downloads_with_a_temporary_credential_and_resumes_with_a_new_one(
        site, services, recorder, devices, images):
    rec = recorder(DEV)
    dev, rel = device_on_a(site, services, devices, images, DEV)
    dev.runner.arm_power_cut(20 * BLOCK_OPS)  # mid-download: the resumed attempt needs a token again
    accepted = services.call(op.set_desired(site, DEV, rel, token=True))
    url = accepted["state"]["desired"]["firmware"]["url"]
    assert "?" not in url and url.endswith(presign.artifact_path(rel.sha256))  # nothing in the URL grants access

    fw, doc = wait_reported(services, site, DEV, _updated, "1.1.0 over a bearer token")
    assert fw["sha256"] == rel.sha256 and fw["auth"] == contract.AUTH_TOKEN
    assert "delta" not in doc["state"]
    asks = [m for m in rec.messages if m.topic.endswith("/" + contract.CREDENTIALS)]
    answers = [m for m in rec.messages if m.topic.endswith("/" + contract.CREDENTIALS_ACCEPTED)]
    assert len(asks) == len(answers) == 2 and services.services.renewer.issued == 2
    assert all(a.payload["sha256"] == rel.sha256 for a in asks)
    assert all(presign.verify_token(site.store_key, a.payload["token"], rel.sha256) == DEV for a in answers)
    assert "installing 1.1.0 into ota_1 from 65536" in dev.output()  # resumed with Range + the new token
    assert dev.flash.read_bytes()[0x190000:0x190000 + rel.size] == images["B"]


def test_credentials_are_issued_only_for_the_image_the_device_is_told_to_install(site, services, images):
    release(site, images["A"], "1.0.0")
    rel = release(site, images["B"], "1.1.0")
    other = release(site, build_app_image("2.0.0", 64 * 1024), "2.0.0")
    device = MQTTProbe(site, "tok-2", site.creds.set("tok-2"))
    try:
        assert device.connected() == 0
        assert device.subscribe(contract.topic("tok-2", contract.CREDENTIALS + "/+")) == [1]

        def ask(body):
            device.publish(contract.topic("tok-2", contract.CREDENTIALS), json.dumps(body))
            msg = device.next_message(10)
            assert msg is not None, "no answer"
            return msg[0].rsplit("/", 1)[1], json.loads(msg[1])

        outcome, doc = ask({"sha256": rel.sha256, "clientToken": "c1"})  # nothing desired yet
        assert (outcome, doc["code"], doc["clientToken"]) == ("rejected", 403, "c1")
        services.call(op.set_desired(site, "tok-2", rel, token=True))
        outcome, doc = ask({"sha256": other.sha256, "clientToken": "c2"})  # released, but not desired
        assert (outcome, doc["code"]) == ("rejected", 403)
        outcome, doc = ask({"sha256": "xyz", "clientToken": "c3"})
        assert (outcome, doc["code"]) == ("rejected", 400)
        outcome, doc = ask({"sha256": rel.sha256, "clientToken": "c4"})
        assert outcome == "accepted" and doc["clientToken"] == "c4" and doc["sha256"] == rel.sha256
        token = doc["token"]
    finally:
        device.close()

    ctx = ssl.create_default_context(cafile=str(site.pki.ca_cert))

    def fetch(sha):
        req = urllib.request.Request(site.endpoints().store_url + presign.artifact_path(sha),
                                     headers={"Authorization": "Bearer " + token})
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    assert fetch(rel.sha256) == (200, images["B"])
    status, body = fetch(other.sha256)  # the same token replayed for another artifact
    assert status == 403 and b"another artifact" in body


def test_a_token_that_expires_before_the_download_is_asked_for_again(site, services, recorder, devices, images):
    # The renewer's clock runs 20 minutes behind the store's, so every token it issues has
    # expired by the time the device uses it: the store says 403 "expired". That is not the
    # URL's fault: the device reports token_expired (transient, no need_url), asks for
    # another token, and finishes once the tokens are good again.
    rec = recorder(DEV)
    dev, rel = device_on_a(site, services, devices, images, DEV)
    renewer = services.services.renewer
    renewer.clock = lambda: time.time() - 20 * 60  # 15-minute tokens, expired on arrival
    services.call(op.set_desired(site, DEV, rel, token=True))
    fw, _ = wait_reported(services, site, DEV, lambda fw, d: fw.get("error") == contract.E_TOKEN_EXPIRED,
                          "a token_expired report")
    assert fw["state"] == "failed" and fw.get("need_url") is None and fw["version"] == "1.0.0"
    renewer.clock = time.time
    fw, doc = wait_reported(services, site, DEV, _updated, "1.1.0 with a fresh token")
    assert fw["sha256"] == rel.sha256 and "delta" not in doc["state"]
    answers = [m for m in rec.messages if m.topic.endswith("/" + contract.CREDENTIALS_ACCEPTED)]
    assert len(answers) >= 2 and renewer.renewed == 0  # new tokens, never a new URL
    assert dev.flash.read_bytes()[0x190000:0x190000 + rel.size] == images["B"]


def test_a_credential_request_nobody_answers_is_made_again(site, services, devices, images, mqtt_probe):
    """The renewer is restarting (a deploy) when the board asks for its download token: the
    broker drops the request, as nobody is subscribed. The board asks again within its
    window instead of spending an attempt, and installs once the renewer is back."""
    dev, rel = device_on_a(site, services, devices, images, DEV)
    probe = mqtt_probe("operator", site.service_password("operator"))
    assert probe.subscribe(contract.topic(DEV, contract.CREDENTIALS)) == [1]
    services.call(services.services.stop_renewer())
    services.call(op.set_desired(site, DEV, rel, token=True))
    assert probe.next_message(30) is not None, "the board did not ask for a token"
    services.call(services.services.start_renewer())
    fw, _ = wait_reported(services, site, DEV, _updated, "1.1.0 once the renewer answers", 60)
    assert fw["sha256"] == rel.sha256
    assert "no download credential" not in dev.output()  # no attempt spent on the silence
