"""Power-cut sweep: the device survives a power cut at any point of an update and never lies.

For each cut point (the N-th flash erase/program after the desired state is set, optionally
torn halfway) a fresh emulated device running 1.0.0 is told to install 1.1.0; the power dies
at that point and comes back. Then, within a bounded time, the device must converge: report
1.1.0 idle, or report a failure code. Afterwards flash.bin is read as the bootloader would:
the board must have a bootable image, and the image it boots must be exactly the one the
device reports (by SHA-256). The cut points cover every block of the download, set_boot()'s
otadata write, the bootloader's NEW -> PENDING_VERIFY write and the confirm.

`pytest --sweep=full` runs every point, clean and torn (>= 200); the default is a spread.
"""

from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import SUMMARY, reported_firmware, wait_until, release
from tools.operator import client as op
from tools.esp32emu.flashinfo import flash_info
from tools.espidf.images import build_app_image

IMAGE_B_SIZE = 200 * 1024  # 50 blocks: 100 download operations, 106 in all
CONVERGE_S = 90


def phase_of(k, nblocks):
    """Which step of the update the k-th flash operation belongs to."""
    d = 2 * nblocks
    if k <= d:
        blk = (k - 1) // 2
        return f"download block {blk} {'erase' if k % 2 else 'program'}"
    return {d + 1: "set_boot otadata erase", d + 2: "set_boot otadata program",
            d + 3: "bootloader PENDING_VERIFY erase", d + 4: "bootloader PENDING_VERIFY program",
            d + 5: "confirm otadata erase", d + 6: "confirm otadata program"}.get(k, "after the update")


def cut_points(mode, nblocks):
    total = 2 * nblocks + 6
    if mode == "full":
        ks = range(1, total + 1)
    else:
        ks = sorted({1, 2, 3, 4, 31, 32, 33, 34, 63, 64, 2 * nblocks - 1, 2 * nblocks} | set(range(total - 5, total + 1)))
    return [(k, tear) for k in ks for tear in (False, True)]


@pytest.fixture(scope="module")
def image_b():
    return build_app_image("1.1.0", IMAGE_B_SIZE)


def run_point(site, services, devices, images, image_b, rel, k, tear):
    dev_id = f"cut{k}{'t' if tear else 'c'}"
    dev = devices(dev_id, images["A"], "1.0.0", max_boots=30)
    wait_until(lambda: reported_firmware(services, site, dev_id)[0].get("version") == "1.0.0", 60,
               f"{dev_id} first report", 0.3)
    dev.runner.arm_power_cut(k, tear)
    services.call(op.set_desired(site, dev_id, rel))

    def settled():
        fw, _ = reported_firmware(services, site, dev_id)
        if fw.get("version") == "1.1.0" and fw.get("state") == "idle":
            return fw
        if fw.get("state") == "failed" and fw.get("attempts", 0) >= 3:
            return fw
        return None

    fw = wait_until(settled, CONVERGE_S, f"{dev_id} to converge", 0.3)
    dev.stop()
    info = flash_info(dev.flash)
    booting = info["next_boot"]["slot"]
    boots = dev.runner.boots
    row = {
        "k": k, "tear": tear, "where": phase_of(k, (IMAGE_B_SIZE + 4095) // 4096),
        "cut": any(b.ended.startswith("power cut") for b in boots),
        "outcome": "updated" if fw.get("state") == "idle" else f"failed:{fw.get('error')}",
        "boots": len(boots), "problems": [],
    }
    if booting is None:
        row["problems"].append("no bootable image")
    elif info["app_slots"][booting]["image_sha256"] != fw.get("sha256"):
        row["problems"].append(f"reports {fw.get('sha256', '')[:8]} but boots {booting}")
    if fw.get("state") == "idle" and fw.get("sha256") != rel.sha256:
        row["problems"].append("idle on the wrong image")
    if any(b.slot is None and not b.ended.startswith("power cut") for b in boots):
        row["problems"].append("a boot found no bootable app")
    return row


def test_power_cut_anywhere_in_an_update(request, site, services, devices, images, image_b):
    mode = request.config.getoption("--sweep")
    release(site, images["A"], "1.0.0")
    rel = release(site, image_b, "1.1.0")
    points = cut_points(mode, (IMAGE_B_SIZE + 4095) // 4096)
    with ThreadPoolExecutor(request.config.getoption("--sweep-workers")) as pool:
        rows = list(pool.map(lambda p: run_point(site, services, devices, images, image_b, rel, *p), points))

    SUMMARY.append(f"power-cut sweep ({mode}): {len(rows)} cut points")
    SUMMARY.append(f"{'op':>4} {'torn':<5} {'where':<34} {'outcome':<22} {'boots':>5}  problems")
    for r in rows:
        SUMMARY.append(f"{r['k']:>4} {str(r['tear']):<5} {r['where']:<34} {r['outcome']:<22} {r['boots']:>5}  "
                       f"{'; '.join(r['problems']) or '-'}")
    bad = [r for r in rows if r["problems"]]
    assert not bad, "\n".join(SUMMARY)
    assert all(r["cut"] for r in rows), "a planned cut never happened"
    if mode == "full":
        assert len(rows) >= 200
