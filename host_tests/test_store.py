"""The firmware store serves an artifact only to the device its pre-signed URL names."""

import base64
import ssl
import time

import pytest

from conftest import https_get, release
from tools.control import presign
from tools.espidf.images import build_app_image


@pytest.fixture
def store(site, services):
    image = build_app_image("1.0.0", 100_000)
    rel = release(site, image, "1.0.0")
    creds = {"dev1": site.creds.set("dev1"), "dev2": site.creds.set("dev2")}

    def get(url, device="dev1", password=None, headers=None):
        h = dict(headers or {})
        if device:
            token = base64.b64encode(f"{device}:{password or creds[device]}".encode()).decode()
            h["Authorization"] = "Basic " + token
        return https_get(site, url, h)

    def url(device="dev1", ttl=60, now=None):
        return presign.sign(site.store_key, site.endpoints().store_url, rel.sha256, device, ttl, now)

    return image, rel, get, url


def test_full_download(store):
    image, rel, get, url = store
    status, headers, body = get(url())
    assert status == 200 and body == image


def test_range_request_gets_206_with_the_right_bytes(store):
    image, rel, get, url = store
    status, headers, body = get(url(), headers={"Range": "bytes=40960-"})
    assert status == 206
    assert body == image[40960:]
    assert headers["Content-Range"] == f"bytes 40960-{len(image) - 1}/{len(image)}"


@pytest.mark.parametrize("case,reason", [
    ("other device's credential", b"another device"),
    ("wrong password", b"bad device credential"),
    ("no credential", b"credential required"),
    ("expired", b"expired"),
    ("tampered signature", b"signature"),
    ("tampered path", b"signature"),
    ("tampered device", b"signature"),
    ("unsigned", b"not a pre-signed URL"),
])
def test_refusals_are_403_with_a_reason(store, site, case, reason):
    image, rel, get, url = store
    u = url()
    kwargs = {}
    if case == "other device's credential":
        kwargs = {"device": "dev2"}
    elif case == "wrong password":
        kwargs = {"password": "nope"}
    elif case == "no credential":
        kwargs = {"device": None}
    elif case == "expired":
        u = url(ttl=60, now=time.time() - 120)
    elif case == "tampered signature":
        u = u[:-1] + ("0" if u[-1] != "0" else "1")
    elif case == "tampered path":
        other = release(site, build_app_image("2.0.0", 100_000), "2.0.0")
        u = u.replace(rel.sha256, other.sha256)
    elif case == "tampered device":
        u = u.replace("device=dev1", "device=dev2")
        kwargs = {"device": "dev2"}
    elif case == "unsigned":
        u = u.split("?")[0]
    status, _, body = get(u, **kwargs)
    assert status == 403
    assert reason in body


def test_presign_refuses_long_lifetimes(site):
    with pytest.raises(ValueError):
        presign.sign(site.store_key, "https://h", "a" * 64, "dev1", ttl=presign.MAX_TTL + 1)


# -- temporary credentials: Authorization: Bearer, bound to one device and one artifact ------

@pytest.mark.parametrize("case,status,reason", [
    ("valid", 200, None),
    ("valid, resumed", 206, None),
    ("expired", 403, b"token expired"),
    ("for another artifact", 403, b"another artifact"),
    ("from another key", 403, b"signature"),
    ("device name changed", 403, b"signature"),
    ("revoked device", 403, b"revoked"),
    ("garbage", 403, b"not a download token"),
])
def test_bearer_tokens(store, site, case, status, reason):
    image, rel, get, url = store
    bare = site.endpoints().store_url + presign.artifact_path(rel.sha256)
    token, _ = presign.issue_token(site.store_key, "dev1", rel.sha256, 60)
    headers = {}
    if case == "valid, resumed":
        headers["Range"] = "bytes=4096-"
    elif case == "expired":
        token, _ = presign.issue_token(site.store_key, "dev1", rel.sha256, 60, now=time.time() - 120)
    elif case == "for another artifact":  # replayed: a token for 2.0.0 presented for 1.0.0
        other = release(site, build_app_image("2.0.0", 100_000), "2.0.0")
        token, _ = presign.issue_token(site.store_key, "dev1", other.sha256, 60)
    elif case == "from another key":
        token, _ = presign.issue_token(b"k" * 32, "dev1", rel.sha256, 60)
    elif case == "device name changed":
        token = "dev2" + token[4:]
    elif case == "revoked device":
        site.creds.remove("dev1")
    elif case == "garbage":
        token = "abc"
    headers["Authorization"] = "Bearer " + token
    got, _, body = get(bare, device=None, headers=headers)
    assert got == status, body
    if status == 200:
        assert body == image
    elif status == 206:
        assert body == image[4096:]
    else:
        assert reason in body


def test_serve_in_a_child_process_serves_and_stops(site):
    """ServicesProcess (the fleet benchmark's services): `serve` as a child, up when it says
    so, serving a device's download, and gone, port closed, when the block ends."""
    import socket

    from tools.control.services import ServicesProcess

    image = build_app_image("1.0.0", 50_000)
    rel = release(site, image, "1.0.0")
    password = site.creds.set("dev1")
    with ServicesProcess(site, broker="amqtt") as svc:
        ep = svc.endpoints
        url = presign.sign(site.store_key, ep.store_url, rel.sha256, "dev1", 60)
        token = base64.b64encode(f"dev1:{password}".encode()).decode()
        status, _, body = https_get(site, url, {"Authorization": "Basic " + token})
        assert status == 200 and body == image
        proc = svc.proc
    assert proc.returncode is not None
    with pytest.raises(OSError):
        socket.create_connection((ep.host, ep.https_port), timeout=2).close()


def test_a_device_that_hangs_up_mid_download_costs_no_error(site, services, caplog):
    """Boards drop their download all the time (Wi-Fi, power, a newer desired image): the
    store ends that response quietly, logs no error, and serves the next request."""
    import logging
    import socket

    image = build_app_image("1.0.0", 1_500_000)  # more than the socket buffers hold
    rel = release(site, image, "1.0.0")
    ep = site.endpoints()
    url = presign.sign(site.store_key, ep.store_url, rel.sha256, "dev1", 60)
    path = url.split(str(ep.https_port), 1)[1]
    token = base64.b64encode(f"dev1:{site.creds.set('dev1')}".encode()).decode()
    ctx = ssl.create_default_context(cafile=str(site.pki.ca_cert))
    caplog.set_level(logging.INFO)
    for _ in range(3):
        with socket.create_connection((ep.host, ep.https_port)) as raw:
            with ctx.wrap_socket(raw, server_hostname=ep.host) as tls:
                tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {ep.host}\r\nAuthorization: Basic {token}\r\n\r\n".encode())
                assert tls.recv(16).startswith(b"HTTP/1.1 200")
                tls.recv(4096)
        time.sleep(0.3)  # the store notices the closed connection
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    status, headers, body = https_get(site, url, {"Authorization": "Basic " + token})
    assert status == 200 and body == image


def test_a_release_signature_is_served_beside_its_image_to_whom_the_image_is(store, site):
    """The signature bundle at the image's URL with .sig and the version: the same URL's
    authorization, the release's own bundle, and nothing for another version or device."""
    import json

    from firmware import bundle

    image, rel, get, url = store
    status, _, body = get(bundle.url(url(), "1.0.0"))
    assert status == 200 and json.loads(body) == rel.signature
    assert get(bundle.url(url(), "9.9.9"))[0] == 404  # no such release of this image
    other = release(site, build_app_image("2.0.0", 50_000), "2.0.0")
    assert get(bundle.url(url(), other.version))[0] == 404  # a release of another image
    assert get(bundle.url(url(), "1.0.0"), device="dev2")[0] == 403  # the URL names dev1
    assert get(bundle.url(url(device="dev2"), "1.0.0"), device="dev2")[0] == 200
    token, _ = presign.issue_token(site.store_key, "dev1", rel.sha256)
    bare = site.endpoints().store_url + presign.artifact_path(rel.sha256)
    assert get(bundle.url(bare, "1.0.0"), device=None, headers={"Authorization": "Bearer " + token})[0] == 200
    assert get(bundle.url(bare, "1.0.0"), device=None)[0] == 403
