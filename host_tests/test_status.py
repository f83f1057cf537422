"""`status`: the fleet table read from the replica's store, as text and as JSON."""

import json
import subprocess
import sys

from conftest import REPO, release, signing_key
from tools.espidf.images import build_app_image
from tools.site.signing import key_digest
from tools.control import grants
from tools.control.replica import Replica
from tools.operator.status import fleet, table


def _feed(replica, device, state):
    out = replica.handle(f"state/{device}/update", json.dumps({"state": state}).encode())
    assert out[0][0].endswith("/update/accepted"), out


def test_status_shows_what_each_device_runs_and_what_is_wanted(site, tmp_path):
    r = Replica(None, site.shadow_store, grant_key=site.grant_key)
    fw = lambda v, sha, **kw: {"firmware": dict(version=v, sha256=sha, **kw)}  # noqa: E731

    def want(device):  # as an operator sets it: granted
        return {"desired": {"firmware": grants.granted(site.grant_key, device, fw("1.1.0", "bb", url="u", size=1)["firmware"])}}

    _feed(r, "a1", {"reported": fw("1.0.0", "aa", state="idle", slot="ota_0")})
    _feed(r, "a2", want("a2"))
    _feed(r, "a2", {"reported": fw("1.0.0", "aa", state="downloading", progress=40)})
    _feed(r, "a3", want("a3"))
    _feed(r, "a3", {"reported": fw("1.0.0", "aa", state="failed", error="rolled_back", attempts=3)})
    _feed(r, "a4", want("a4"))
    _feed(r, "a5", want("a5"))
    _feed(r, "a5", {"reported": fw("1.1.0", "bb", state="idle")})
    key = signing_key()
    rel = release(site, build_app_image("1.2.0", 20_000), "1.2.0", 4)
    signed = {"firmware": grants.granted(site.grant_key, "a7", fw("1.2.0", rel.sha256, url="u", size=rel.size,
                                                                  signer=rel.signer)["firmware"])}
    _feed(r, "a7", {"desired": signed})
    _feed(r, "a7", {"reported": fw("1.1.0", "bb", state="idle", signer="0123456789abcdef", secure_version=3)})
    r.db.close()
    unchecked = Replica(None, site.shadow_store, grant_key=None)  # as if written into the database
    _feed(unchecked, "a6", {"desired": fw("0.9.0", "cc", url="u", size=1)})
    unchecked.db.close()
    rows = {x.device: x for x in fleet(site.shadow_store, site.grant_key)}
    assert (rows["a7"].running_signer, rows["a7"].desired_signer) == ("0123456789abcdef", key_digest(key.public_key())[:16])
    rows.pop("a7")
    assert (rows["a1"].running, rows["a1"].desired, rows["a1"].in_sync) == ("1.0.0", None, True)
    assert (rows["a2"].state, rows["a2"].progress, rows["a2"].in_sync) == ("downloading", 40, False)
    assert (rows["a3"].error, rows["a3"].attempts) == ("rolled_back", 3)
    assert rows["a4"].last_seen is None and rows["a4"].running is None
    assert rows["a5"].in_sync and rows["a5"].last_seen is not None
    assert (rows["a1"].granted, rows["a2"].granted, rows["a6"].granted) == (None, True, False)
    text = table(list(rows.values()))
    assert ("6 devices: 2 in sync, 1 updating, 1 failed, 2 never reported, 1 desiring firmware no operator "
            "granted") in text
    assert "0.9.0 [unsigned] (no grant)" in text
    assert "downloading 40%" in text and "rolled_back (x3)" in text

    out = subprocess.run([sys.executable, "-m", "tools", "status", "--site", str(site.root), "--json"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["summary"] == {"devices": 7, "in_sync": 2, "updating": 2, "failed": 1, "never_reported": 2,
                              "ungranted": 1}
    a7 = next(d for d in doc["devices"] if d["device"] == "a7")
    assert (a7["running_signer"], a7["desired_signer"]) == ("0123456789abcdef", key_digest(key.public_key())[:16])
    out = subprocess.run([sys.executable, "-m", "tools", "status", "--site", str(site.root), "a3"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "a3" in out.stdout and "a1" not in out.stdout


def test_status_of_an_empty_site(site):
    assert fleet(site.shadow_store, site.grant_key) == []
    assert "0 devices" in table([])
