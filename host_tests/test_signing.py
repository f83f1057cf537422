"""Signed releases, piece by piece: keys and digests against espsecure, signing with a key and
with an external signer, the site's checks at `release`, and the device's release check and
commit under MicroPython (the whole path on emulated boards: test_signed_e2e.py; the verifier
against `cryptography`: test_signing_agreement.py)."""

import base64
import hashlib
import json
import subprocess
import sys

import pytest

from conftest import REPO, new_site, run_micropython, signing_key
from firmware import contract
from tools.espidf.images import build_app_image
from tools.site import Site
from firmware.release import check_manifest
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.hashes import SHA256
from tools.site.signing import (PSS, SigningError, check_matches, key_block, key_digest, load_public, manifest_text, public_pem,
                                release_bundle, sign, verify)

BIN = REPO / ".venv" / "bin"


def cli(*argv, cwd=None):
    return subprocess.run([sys.executable, "-m", "tools", *map(str, argv)], cwd=cwd or REPO, capture_output=True,
                          text=True, timeout=120)


def test_a_key_digest_is_the_one_espsecure_writes(tmp_path):
    """Both ways: an espsecure key read by us, our key read by espsecure."""
    esp_key, our_key = tmp_path / "esp.pem", tmp_path / "ours.pem"
    made = subprocess.run([BIN / "espsecure", "generate-signing-key", "--version", "2", "--scheme", "rsa3072",
                           esp_key], capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    out = cli("keygen", our_key)
    assert out.returncode == 0, out.stderr
    assert our_key.stat().st_mode & 0o777 == 0o600
    for key in (esp_key, our_key):
        d = subprocess.run([BIN / "espsecure", "digest-sbv2-public-key", "--keyfile", key, "--output",
                            tmp_path / "d.bin"], capture_output=True, text=True, timeout=120)
        assert d.returncode == 0, d.stderr
        ours = cli("key-digest", key)
        assert ours.stdout.strip() == (tmp_path / "d.bin").read_bytes().hex()
    assert cli("keygen", our_key).returncode == 1  # never overwritten


def test_an_external_signer_signs_what_the_key_would(tmp_path):
    key = tmp_path / "k.pem"
    assert cli("keygen", key).returncode == 0
    image = tmp_path / "app.bin"
    image.write_bytes(build_app_image("2.0.0", 50_000))
    openssl = (f"openssl pkeyutl -sign -inkey {key} -pkeyopt digest:sha256 -pkeyopt rsa_padding_mode:pss "
               f"-pkeyopt rsa_pss_saltlen:32")
    out = cli("sign", image, "--version", "2.0.0", "--secure-version", "3", "--signer", openssl, "--pub-key", key,
              "-o", tmp_path / "b.json")
    assert out.returncode == 0, out.stderr
    v = verify(json.loads((tmp_path / "b.json").read_text()), [key_digest(load_public(key))])
    assert (v.manifest["version"], v.manifest["secure_version"], v.manifest["size"]) == \
        ("2.0.0", 3, image.stat().st_size)

    other = tmp_path / "other.pem"
    assert cli("keygen", other).returncode == 0
    for signer, says in ((openssl.replace(str(key), str(other)), "does not verify"),
                         ("false", "exited 1"), ("echo not-a-signature", "not a 384-byte signature"),
                         ("/nonexistent/hsm-tool", "No such file")):
        out = cli("sign", image, "--version", "2.0.0", "--secure-version", "0", "--signer", signer, "--pub-key", key,
                  "-o", tmp_path / "x.json")
        assert out.returncode == 1 and says in out.stderr and "Traceback" not in out.stderr, (signer, out.stderr)
        assert not (tmp_path / "x.json").exists()


def test_release_takes_only_what_the_devices_would_install(tmp_path):
    site = new_site(tmp_path / "site")
    image, other = build_app_image("1.0.0", 60_000), build_app_image("1.0.1", 60_000)
    (tmp_path / "app.bin").write_bytes(image)

    def release(bundle=None, *extra):
        args = ["release", tmp_path / "app.bin", "--site", site.root, *extra]
        if bundle is not None:
            (tmp_path / "b.json").write_text(json.dumps(bundle))
            args += ["--signature", tmp_path / "b.json"]
        return cli(*args)

    out = release(None, "--version", "1.0.0")
    assert out.returncode == 1 and out.stderr.startswith("error: unsigned: this site installs signed releases only")
    out = release(release_bundle(signing_key("stranger"), image, "1.0.0"))
    assert out.returncode == 1 and f"{contract.E_UNTRUSTED_KEY}: signed by key" in out.stderr
    out = release(release_bundle(signing_key(), other, "1.0.0"))
    assert out.returncode == 1 and f"{contract.E_MANIFEST}: the signed manifest's sha256" in out.stderr
    out = release(release_bundle(signing_key(), image, "1.0.0"), "--version", "1.0.9")
    assert out.returncode == 1 and "version" in out.stderr
    out = release(release_bundle(signing_key(), image, "1.0.0", 5, trust=[key_digest(signing_key("stranger").public_key())]))
    assert out.returncode == 1 and "trust list names keys this site does not trust" in out.stderr
    bundle = release_bundle(signing_key(), image, "1.0.0", 5)
    forged = dict(bundle, manifest=bundle["manifest"].replace('"secure_version":5', '"secure_version":6'))
    out = release(forged)
    assert out.returncode == 1 and f"{contract.E_BAD_SIGNATURE}: the signature does not verify" in out.stderr
    out = release(bundle)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["secure_version"] == 5
    assert site.releases.get("1.0.0").signer == key_digest(signing_key().public_key())[:16]
    assert "signed " + key_digest(signing_key().public_key())[:16] in cli("releases", "--site", site.root).stdout

    # A site made before signed releases (no signing.json) takes unsigned images, and says so.
    old = Site(tmp_path / "old")
    (old.root / "signing.json").unlink()
    out = cli("release", tmp_path / "app.bin", "--version", "1.0.0", "--site", old.root)
    assert out.returncode == 0, out.stderr
    listing = cli("releases", "--site", old.root).stdout
    assert "accepts unsigned releases" in listing and "unsigned" in listing.splitlines()[-1]


def test_the_site_trusts_at_most_what_a_device_holds(tmp_path):
    site = Site(tmp_path / "site")
    assert site.trust.required and site.trust.keys() == []
    digests = [site.trust.add(signing_key(f"k{i}").public_key()) for i in range(3)]
    with pytest.raises(SigningError, match="at most 3"):
        site.trust.add(signing_key("k3").public_key())
    out = cli("trust", "remove", digests[1][:10], "--site", site.root)
    assert out.returncode == 0 and digests[1] not in out.stdout and digests[2] in out.stdout
    assert cli("trust", "remove", "", "--site", site.root).returncode in (1, 2)
    pem = tmp_path / "pub.pem"
    pem.write_text(public_pem(signing_key("k3").public_key()))
    out = cli("trust", "add", pem, "--site", site.root)
    assert out.returncode == 0 and key_digest(signing_key("k3").public_key()) in out.stdout


def test_a_manifest_text_is_canonical_json():
    text = manifest_text("1.2.0", "a" * 64, 1000, 7, ["b" * 64])
    m = json.loads(text)
    assert text == json.dumps(m, sort_keys=True, separators=(",", ":"))
    assert check_manifest(m)["trust"] == ["b" * 64]
    for bad in (dict(m, format="other"), dict(m, size=True), dict(m, secure_version=-1), dict(m, trust=[]),
                dict(m, trust=["b" * 64] * 4), dict(m, sha256="A" * 64), dict(m, chip="")):
        with pytest.raises(ValueError):
            check_manifest(bad)


DEVICE = """
import json
from firmware import release
from firmware.ota import UpdateError
cases = json.loads(open("cases.json").read())
cfg = {"trusted_keys": cases["trusted"]}
out = []
for name, fw, bundle in cases["checks"]:
    body = None if bundle is None else (bundle if isinstance(bundle, str) else json.dumps(bundle)).encode()
    try:
        seal = release.check(cfg, fw, body)
        out.append([name, "ok", seal["signer"], seal["secure_version"], seal.get("trust")])
    except UpdateError as e:
        out.append([name, e.code])
    if name == "commit":
        release.commit(cfg, seal)
    if name == "damage":
        open("signing.json", "w").write("{not json")
    if name == "damaged":  # a trust file that cannot even be opened
        import os
        os.remove("signing.json")
        os.mkdir("signing.json")
print(json.dumps(out))
"""


def test_the_device_checks_a_release_before_anything_else(tmp_path):
    """release.check and release.commit under MicroPython, case by case."""
    k1, k2 = signing_key(), signing_key("second")
    d1, d2 = key_digest(k1.public_key()), key_digest(k2.public_key())
    image = build_app_image("1.1.0", 40_000)
    good = release_bundle(k1, image, "1.1.0", 4, trust=[d1, d2])
    fw = {"url": "https://h/x", "version": "1.1.0", "sha256": hashlib.sha256(image).hexdigest(), "size": len(image)}
    sig = base64.b64decode(good["sig"])
    checks = [
        ("good", fw, good),
        ("unsigned", fw, None),
        ("not json", fw, "<html>404</html>"),
        ("short key", fw, dict(good, key=good["key"][:-4])),
        ("untrusted", fw, release_bundle(signing_key("stranger"), image, "1.1.0", 4)),
        ("flipped", fw, dict(good, sig=base64.b64encode(bytes([sig[0] ^ 0x40]) + sig[1:]).decode())),
        ("version", dict(fw, version="1.1.1"), good),
        ("size", dict(fw, size=len(image) - 16), good),
        ("chip", fw, sign(manifest_text("1.1.0", fw["sha256"], fw["size"], 4, chip="esp32s3"), k1)),
        ("commit", fw, good),  # the device confirms it: counter 4, trust [d1, d2]
        ("below", fw, release_bundle(k2, image, "1.1.0", 3)),
        ("same", fw, release_bundle(k2, image, "1.1.0", 4)),
        ("old trust", fw, release_bundle(k2, image, "1.1.0", 4, trust=[d1])),  # a trust change, same counter
        ("new trust", fw, release_bundle(k2, image, "1.1.0", 5, trust=[d2])),
        ("damage", fw, good),
        ("damaged", fw, good),
        ("unopenable", fw, good),
    ]
    (tmp_path / "cases.json").write_text(json.dumps({"trusted": [d1], "checks": checks}))
    proc = run_micropython(DEVICE, tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = {r[0]: r[1:] for r in json.loads(proc.stdout.strip().splitlines()[-1])}
    assert got["good"] == ["ok", d1[:16], 4, [d1, d2]]
    assert got["unsigned"] == [contract.E_UNSIGNED]
    assert got["not json"] == got["short key"] == [contract.E_BAD_SIGNATURE]
    assert got["untrusted"] == [contract.E_UNTRUSTED_KEY]
    assert got["flipped"] == [contract.E_BAD_SIGNATURE]
    assert got["version"] == got["size"] == got["chip"] == [contract.E_MANIFEST]
    assert got["below"] == [contract.E_ROLLBACK]  # k2 is trusted now, but 3 < 4
    assert got["same"] == ["ok", d2[:16], 4, None]
    assert got["old trust"] == [contract.E_ROLLBACK]
    assert got["new trust"] == ["ok", d2[:16], 5, [d2]]
    assert got["damaged"] == got["unopenable"] == [contract.E_UNTRUSTED_KEY]  # fail closed: trust nothing


BODIES = """
import json
from firmware import release
from firmware.ota import UpdateError
case = json.loads(open("case.json").read())
cfg = {"trusted_keys": case["trusted"]}
codes = {}
accepted = []
escaped = 0
i = 0
with open("bodies.bin", "rb") as f:
    data = f.read()
at = 0
while at < len(data):
    n = int.from_bytes(data[at:at + 4], "little")
    body = data[at + 4:at + 4 + n]
    at += 4 + n
    i += 1
    try:
        release.check(cfg, case["fw"], body)
        accepted.append(i - 1)
    except UpdateError as e:
        codes[e.code] = codes.get(e.code, 0) + 1
    except Exception as e:
        escaped += 1
        print("ESCAPED", repr(e), body[:80])
print(json.dumps({"accepted": accepted, "escaped": escaped, "codes": codes}))
"""


def _raw_bundle(key, text: str) -> dict:
    """A bundle signing `text` as it is (sign() would refuse a manifest that is not valid)."""
    sig = key.sign(hashlib.sha256(text.encode()).digest(), PSS, Prehashed(SHA256()))
    return {"manifest": text, "sig": base64.b64encode(sig).decode(),
            "key": base64.b64encode(key_block(key.public_key())).decode()}


def test_any_bundle_the_store_serves_is_refused_with_a_code_or_accepted_only_if_genuine(tmp_path):
    """Whatever bytes come back as a signature bundle (a hostile store), the device's check
    raises nothing but its refusal, and accepts only the genuine bundle (the control)."""
    import random

    rnd = random.Random(21)
    k = signing_key()
    image = build_app_image("1.1.0", 30_000)
    fw = {"url": "https://h/fw/x.bin", "version": "1.1.0", "sha256": hashlib.sha256(image).hexdigest(),
          "size": len(image)}
    good = json.dumps(release_bundle(k, image, "1.1.0", 2)).encode()
    bodies = [good]
    values = [None, True, 0, -1, 2**70, "", "x" * 600, [], {}, [1, 2], {"a": 1}, 1.5]
    for _ in range(600):
        kind = rnd.randrange(6)
        if kind == 0:  # random bytes
            bodies.append(bytes(rnd.randrange(256) for _ in range(rnd.randrange(0, 3000))))
        elif kind == 1:  # the genuine bundle, cut or with bytes flipped
            b = bytearray(good)
            for _ in range(rnd.randrange(1, 6)):
                i = rnd.randrange(len(b))
                b[i] ^= 1 << rnd.randrange(8)
            bodies.append(bytes(b[:rnd.randrange(len(b) + 1)] if rnd.random() < 0.3 else b))
        elif kind == 2:  # a field replaced by a value of another type
            d = json.loads(good)
            d[rnd.choice(["manifest", "sig", "key", "extra"])] = rnd.choice(values)
            bodies.append(json.dumps(d).encode())
        elif kind == 3:  # a manifest field replaced, the signature kept
            d = json.loads(good)
            m = json.loads(d["manifest"])
            m[rnd.choice(["format", "chip", "version", "sha256", "size", "secure_version", "trust"])] = rnd.choice(values)
            d["manifest"] = json.dumps(m)
            bodies.append(json.dumps(d).encode())
        elif kind == 4:  # a manifest that is signed but wrong: fields of other types or values
            m = json.loads(json.loads(good)["manifest"])
            m[rnd.choice(["format", "chip", "version", "sha256", "size", "secure_version", "trust"])] = rnd.choice(
                values + ["esp32s3", "1.1.1", "0" * 64, 29_999])
            bodies.append(json.dumps(_raw_bundle(k, json.dumps(m))).encode())
        else:  # JSON that is not an object, or not UTF-8
            bodies.append(rnd.choice([b"[]", b"null", b"\"x\"", b"{\"manifest\": \"\\ud800\"}", b"\xff\xfe{}",
                                      b"{" * 500]))
    (tmp_path / "bodies.bin").write_bytes(b"".join(len(b).to_bytes(4, "little") + b for b in bodies))
    (tmp_path / "case.json").write_text(json.dumps({"fw": fw, "trusted": [key_digest(k.public_key())]}))
    proc = run_micropython(BODIES, tmp_path, heapsize="4m", timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["escaped"] == 0, proc.stdout[-3000:]
    # Accepted: exactly what the host's check (cryptography) accepts for this image: the
    # control, mutations that left its fields as they were, and manifests validly signed.
    trusted = [key_digest(k.public_key())]

    def host_accepts(body):
        try:
            check_matches(verify(json.loads(body), trusted), fw["sha256"], fw["size"], fw["version"])
        except (ValueError, SigningError):
            return False
        return True

    assert out["accepted"] == [i for i, b in enumerate(bodies) if host_accepts(b)] and out["accepted"][0] == 0
    assert sum(out["codes"].values()) == len(bodies) - len(out["accepted"])
    assert {contract.E_BAD_SIGNATURE, contract.E_MANIFEST} <= set(out["codes"])
