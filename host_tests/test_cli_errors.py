"""Every command, in its failure cases, as a user meets them: one line on stderr saying what
is wrong, exit status 1 (argparse's usage errors: 2), and never a traceback."""

import json
import socket
import subprocess
import sys

import pytest

from conftest import REPO, release, new_site
from tools.espidf.images import build_app_image, build_combined_image
from tools.site import Endpoints
from tools.site.signing import generate_key, load_private, release_bundle


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A site whose services are not running (endpoints.json names closed ports), a release,
    and files of every wrong kind."""
    root = tmp_path_factory.mktemp("cli")
    site = new_site(root / "site")
    app = build_app_image("1.0.0", 64 * 1024)
    files = {"app": app, "combined": build_combined_image(app), "garbage": b"\x00" * 4096,
             "truncated": app[:-100], "big": build_app_image("9.9.9", 0x190000)}
    for name, data in files.items():
        (root / f"{name}.bin").write_bytes(data)
    release(site, app, "1.0.0")
    generate_key(root / "key.pem")  # a key the site does not trust
    (root / "stranger.json").write_text(json.dumps(release_bundle(load_private(root / "key.pem"), app, "3.0.0")))
    (site.root / "groups.json").write_text('{"bad": "not a list"}')
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    site.write_endpoints(Endpoints("127.0.0.1", closed, closed, closed))
    busy = socket.socket()  # a port something else holds
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    yield {"root": root, "site": str(site.root), "busy": busy.getsockname()[1]}
    busy.close()


CASES = [
    # (what, argv with {root} {site} {busy})
    ("image-check: no such file", "image-check {root}/missing.bin"),
    ("image-check: not an image", "image-check {root}/garbage.bin"),
    ("image-check: combined firmware.bin", "image-check {root}/combined.bin"),
    ("image-check: truncated", "image-check {root}/truncated.bin"),
    ("image-build: folder missing", "image-build --version 1 -o {root}/no/such/dir/a.bin"),
    ("release: no such file", "release {root}/missing.bin --version 2 --site {site}"),
    ("release: combined", "release {root}/combined.bin --version 2 --site {site}"),
    ("release: too big", "release {root}/big.bin --version 9.9.9 --site {site}"),
    ("release: version taken by other bytes", "release {root}/truncated.bin --version 1.0.0 --site {site}"),
    ("release: unsigned, on a site that signs", "release {root}/app.bin --version 3.0.0 --site {site}"),
    ("release: no such signature", "release {root}/app.bin --signature {root}/missing.json --site {site}"),
    ("release: signature not JSON", "release {root}/app.bin --signature {root}/garbage.bin --site {site}"),
    ("release: signed by a key the site does not trust", "release {root}/app.bin --signature {root}/stranger.json "
     "--site {site}"),
    ("keygen: the file exists", "keygen {root}/key.pem"),
    ("key-digest: not a key", "key-digest {root}/garbage.bin"),
    ("key-digest: no such file", "key-digest {root}/missing.pem"),
    ("sign: neither key nor signer", "sign {root}/app.bin --version 1 --secure-version 0 -o {root}/s1.json"),
    ("sign: not an app image", "sign {root}/combined.bin --version 1 --secure-version 0 --key {root}/key.pem -o {root}/s2.json"),
    ("sign: the key is not a key", "sign {root}/app.bin --version 1 --secure-version 0 --key {root}/garbage.bin -o {root}/s3.json"),
    ("sign: the signer fails", "sign {root}/app.bin --version 1 --secure-version 0 --signer false --pub-key {root}/key.pem "
     "-o {root}/s4.json"),
    ("sign: a trust digest that is not one", "sign {root}/app.bin --version 1 --secure-version 1 --key {root}/key.pem --trust abc "
     "-o {root}/s5.json"),
    ("sign: a version a release cannot have", "sign {root}/app.bin --version a/b --secure-version 0 --key "
     "{root}/key.pem -o {root}/s6.json"),
    ("sign: an unquoted signer", "sign {root}/app.bin --version 1 --secure-version 0 --signer ' --pub-key "
     "{root}/key.pem -o {root}/s7.json"),
    ("keygen: no such folder", "keygen {root}/no/such/dir/k.pem"),
    ("trust add: not a key", "trust add {root}/garbage.bin --site {site}"),
    ("trust add: no key named", "trust add --site {site}"),
    ("trust remove: no such key", "trust remove ffff --site {site}"),
    ("provision: combined image", "provision d1 --image {root}/combined.bin --version 1 --site {site}"),
    ("provision: garbage image", "provision d1 --image {root}/garbage.bin --version 1 --site {site}"),
    ("provision: no such image", "provision d1 --image {root}/missing.bin --version 1 --site {site}"),
    ("provision: bad id", "provision a/b --image {root}/app.bin --version 1 --site {site}"),
    ("provision: site without services", "provision d1 --image {root}/app.bin --version 1 --site {root}/nosite"),
    ("provision-board: loopback", "provision-board b1 --out {root}/b1 --wifi-ssid x --site {site}"),
    ("provision-board: no services", "provision-board b1 --out {root}/b1 --wifi-ssid x --site {root}/nosite2"),
    ("revoke: unknown device", "revoke nobody --site {site}"),
    ("emulate: no such folder", "emulate {root}/noboard --max-boots 1"),
    ("emulate --new: combined image", "emulate {root}/newboard --new {root}/combined.bin --max-boots 1"),
    ("emulate --new: no such image", "emulate {root}/newboard2 --new {root}/missing.bin --max-boots 1"),
    ("flash-info: no such file", "flash-info {root}/missing.bin"),
    ("flash-info: not a flash image", "flash-info {root}/garbage.bin"),
    ("flash: no such firmware", "flash --port /dev/null --firmware {root}/missing.bin"),
    ("flash: no such port", "flash --port /dev/ttyNOPE --firmware {root}/combined.bin"),
    ("deploy: no such port", "deploy --port /dev/ttyNOPE"),
    ("desired: services not running", "desired d1 1.0.0 --site {site}"),
    ("desired: no such release", "desired d1 7.7.7 --site {site}"),
    ("desired: ttl too long", "desired d1 1.0.0 --ttl 99999 --site {site}"),
    ("shadow: services not running", "shadow d1 --site {site}"),
    ("rollout start: no such release", "rollout start 7.7.7 --devices d1 --site {site}"),
    ("rollout start: bad batches", "rollout start 1.0.0 --devices d1 --batches x,y --site {site}"),
    ("rollout start: bad group file", "rollout start 1.0.0 --group bad --site {site}"),
    ("rollout start: services not running", "rollout start 1.0.0 --devices d1 --site {site}"),
    ("rollout show: no such rollout", "rollout show nope --site {site}"),
    ("rollout cancel: no such rollout", "rollout cancel nope --site {site}"),
    ("account add: a service identity", "account add operator --password-stdin --site {site}"),
    ("account add: a short password", "account add alice --password-stdin --site {site}"),
    ("account add: no terminal for the password", "account add alice --site {site}"),
    ("account remove: no such account", "account remove nobody --site {site}"),
    ("serve: port taken", "serve --site {site} --mqtt-port {busy} --https-port 0 --ntp-port 0"),
    ("replica: bad store URL", "replica --mqtt-port 1 --db postgresql://nobody@127.0.0.1:1/x --site {site}"),
]


@pytest.mark.parametrize("what,argv", CASES, ids=[c[0] for c in CASES])
def test_a_failing_command_says_why_in_one_line(world, what, argv):
    args = argv.format(**world).split()
    out = subprocess.run([sys.executable, "-m", "tools", *args], cwd=REPO, capture_output=True, text=True,
                         timeout=60, stdin=subprocess.DEVNULL)
    assert "Traceback" not in out.stderr, out.stderr
    assert out.returncode == 1, (out.returncode, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr


def test_a_usage_error_is_argparses_exit_2():
    out = subprocess.run([sys.executable, "-m", "tools", "desired"], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "usage:" in out.stderr and "Traceback" not in out.stderr


def test_status_of_a_fresh_site_is_not_an_error(world, tmp_path):
    out = subprocess.run([sys.executable, "-m", "tools", "status", "--json", "--site", str(tmp_path / "s")],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and json.loads(out.stdout)["summary"]["devices"] == 0
