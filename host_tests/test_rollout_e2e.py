"""A staged rollout over 20 emulated ESP32s running the real firmware, driven by the CLI.

The release crashes at start-up on older chips (revision < 3.0), as builds without an
errata workaround do: those boards' bootloaders roll back and the devices report it. The
rollout must abort at its failure threshold, roll back every device it touched, and never
touch the batches it did not reach.
"""

import json
import subprocess
import sys
import time

from conftest import REPO, wait_until, release
from tools.control import shadow
from tools.esp32emu.runner import PANIC_BELOW_REV
from tools.espidf.images import build_app_image
from tools.control import shadows

N = 20
OLD_CHIPS = {"dev-04", "dev-05", "dev-06", "dev-07", "dev-15"}  # v1.0 silicon; dev-15 is in the last batch


def cli(site, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "tools", *args, "--site", str(site.root)] if args[0] != "rollout"
                          else [sys.executable, "-m", "tools", "rollout", "--site", str(site.root), *args[1:]],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_rollout_aborts_at_the_threshold_rolls_back_and_leaves_the_rest_untouched(site, services, devices, images):
    a = release(site, images["A"], "1.0.0")
    bad = release(site, build_app_image("1.1.0", 160 * 1024, PANIC_BELOW_REV + "300"), "1.1.0")
    ids = [f"dev-{i:02d}" for i in range(N)]
    fleet = {d: devices(d, images["A"], "1.0.0", chip_rev=100 if d in OLD_CHIPS else 301, max_boots=30)
             for d in ids}

    def all_reported():
        read = shadows.read(site.shadow_store, ids)
        return len(read) == N and all(s.reported.get("state") == "idle" for s in read.values())
    wait_until(all_reported, 120, "20 devices reporting 1.0.0", interval=0.5)
    before = shadows.read(site.shadow_store, ids)

    t0 = time.monotonic()
    out = cli(site, "rollout", "start", "1.1.0", "--match", "dev-*", "--batches", "1,10%,50%,100%",
              "--abort-failures", "3", "--min-finished", "3", "--timeout", "240")
    took = time.monotonic() - t0
    print(out.stdout, out.stderr)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "aborted" in out.stderr and "devices failed (threshold 3)" in out.stderr

    rid = out.stdout.split(":")[0]
    show = json.loads(cli(site, "rollout", "show", rid, "--json").stdout)
    t = {d["device"]: d for d in show["devices"]}
    touched, untouched = ids[:10], ids[10:]
    # Batches 1 and 2 (dev-00, dev-01) succeeded before batch 3 opened; batch 3 is where
    # the old chips are: at least three of them failed, each because its bootloader went back.
    assert t["dev-00"]["state"] == t["dev-01"]["state"] == "succeeded"
    failed = [d for d in touched if t[d]["state"] == "failed"]
    assert len(failed) >= 3 and set(failed) <= OLD_CHIPS
    assert all(t[d]["error"] == "rolled_back" for d in failed)
    assert all(t[d]["state"] in ("succeeded", "stopped") for d in touched if d not in failed)
    assert all(t[d]["state"] == "skipped" for d in untouched)
    # Every touched device was set back to 1.0.0 and reports running it, idle.
    assert all(t[d]["rollback"] == "done" for d in touched), {d: t[d]["rollback"] for d in touched}
    after = shadows.read(site.shadow_store, ids)
    for d in touched:
        fw = after[d].reported
        assert (fw["version"], fw["sha256"], fw["state"]) == ("1.0.0", a.sha256, "idle"), (d, fw)
        assert after[d].desired["sha256"] == a.sha256
        assert shadow.delta(after[d].doc["state"]["desired"], after[d].doc["state"]["reported"]) == {}  # in sync
    for d in failed:  # the crash really happened on the chip, and the device said so
        assert any(b.ended == "panic" for b in fleet[d].runner.boots)
        assert "did not confirm" in fleet[d].output()
    for d in ("dev-00", "dev-01"):  # succeeded on 1.1.0, then went back to 1.0.0
        assert [b.slot for b in fleet[d].runner.boots][-3:] == ["ota_0", "ota_1", "ota_0"]
    # Untouched: no desired firmware ever, one boot, and not a byte of the release in flash.
    for d in untouched:
        assert not after[d].desired, after[d].doc
        assert len(fleet[d].runner.boots) == 1
        assert site.releases.path_of(bad.sha256).read_bytes()[:4096] not in fleet[d].flash.read_bytes()
        assert after[d].doc["state"]["reported"] == before[d].doc["state"]["reported"]

    status = cli(site, "status")
    assert status.returncode == 0
    last = status.stdout.strip().splitlines()[-1]
    assert rid in last and "aborted" in last and "10 skipped" in last and "rolled back 10/10" in last
    print(f"rollout to abort and roll back: {took:.1f}s")


def test_detached_rollout_resumes_and_completes_with_temporary_credentials(site, services, devices, images):
    release(site, images["A"], "1.0.0")
    rel = release(site, images["B"], "1.1.0")
    ids = ["tk-0", "tk-1", "tk-2"]
    for d in ids:
        devices(d, images["A"], "1.0.0")
    wait_until(lambda: len(shadows.read(site.shadow_store, ids)) == 3, 60, "3 devices reporting", interval=0.5)

    (site.root / "groups.json").write_text(json.dumps({"tokens": ["tk-*"], "other": ["x-1"]}))
    out = cli(site, "rollout", "start", "1.1.0", "--group", "nope", "--detach")
    assert out.returncode == 1 and "no group 'nope'" in out.stderr
    out = cli(site, "rollout", "start", "1.1.0", "--group", "tokens", "--batches", "1,100%", "--auth", "token",
              "--detach")
    assert out.returncode == 0, out.stderr
    assert "to 3 devices" in out.stdout
    rid = out.stdout.split(":")[0]
    time.sleep(2)  # created, not driven: nothing may have been sent
    assert all(not s.desired for s in shadows.read(site.shadow_store, ids).values())

    out = cli(site, "rollout", "resume", rid)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "completed" in out.stdout.strip().splitlines()[-1]
    for d, s in shadows.read(site.shadow_store, ids).items():
        fw = s.reported
        assert (fw["sha256"], fw["state"], fw["auth"]) == (rel.sha256, "idle", "token"), d
        assert "?" not in s.desired["url"]  # a bare URL: the token did it
    assert services.services.renewer.issued >= 3
    assert cli(site, "rollout", "resume", rid).returncode == 0  # a finished rollout: nothing to do
