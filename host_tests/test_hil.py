"""Hardware in the loop: deploy to a board with mpremote, then let it update itself over the air.

    pytest host_tests/test_hil.py                                   # an emulated board the suite starts
    pytest host_tests/test_hil.py --port socket://127.0.0.1:7000    # an emulated board you started
    pytest host_tests/test_hil.py --port /dev/ttyUSB0 --host 192.168.1.20 \\
        --wifi-ssid lab --wifi-password ... --ota-image micropython.bin   # a real ESP32

The board is reached only through mpremote (deploy) and MQTT (everything it reports), the same
way for all three, so what passes here on the emulated board is what a real board is asked to
do. The board resets during these tests (after deploy, after an update): those are expected
events, observed through the shadow. Tests that need a serial port skip on the emulated board.
"""

from __future__ import annotations

import hashlib
import threading
import time

import pytest

from conftest import wait_reported, wait_until, release, new_site
from firmware import contract
from tools.operator import client as op
from tools.control import grants
from tools.control import presign
from tools.board.deploy import deploy
from tools.esp32emu.flashinfo import flash_info
from tools.esp32emu.runner import PANIC_ON_BOOT, Runner, make_fresh_board
from tools.espidf.images import build_app_image
from tools.board.provision import provision_board
from tools.control.services import ServicesThread

FACTORY = build_app_image("1.0.0", 120 * 1024)


def _serial(port: str | None) -> bool:
    return bool(port) and not port.startswith("socket://")


@pytest.fixture(scope="module")
def hil(request, tmp_path_factory):
    """(site, services, board port, device id, emulated runner or None, config dir)."""
    opt = request.config.getoption
    port, host, device = opt("--port"), opt("--host"), opt("--device-id")
    if _serial(port) and not opt("--wifi-ssid"):
        pytest.skip("a real board needs --wifi-ssid/--wifi-password (or $WIFI_SSID/$WIFI_PASSWORD)")
    tmp = tmp_path_factory.mktemp("hil")
    site = new_site(tmp / "site", names=(host, "127.0.0.1", "localhost"))
    runner = thread = None
    lines: list[str] = []
    with ServicesThread(site, host) as services:
        if port is None:
            root = tmp / "board"
            make_fresh_board(root, FACTORY)  # what `make flash` leaves
            t0 = time.monotonic()
            runner = Runner(root, repl_port=0, on_line=lambda s: lines.append(f"{time.monotonic() - t0:7.2f} {s}"))
            thread = threading.Thread(target=runner.run, daemon=True, name="hil-board")
            thread.start()
            wait_until(lambda: runner.repl_address, 20, "the emulated board's REPL bridge")
            port = runner.repl_address
        config = provision_board(site, device, tmp / "config", opt("--wifi-ssid") or "emulated",
                                 opt("--wifi-password"), host=host,
                                 # the image record is true only for the board made here
                                 image=FACTORY if runner is not None else None, version="1.0.0",
                                 allow_loopback=not _serial(port))
        try:
            yield site, services, port, device, runner, config
        finally:
            if runner is not None:
                runner.stop()
                thread.join(15)
                print("--- console of the emulated board ---\n" + "\n".join(lines))


def _idle(fw, doc):
    return fw.get("state") == "idle"


def _settled(fw, doc):
    return fw.get("state") in ("idle", "failed")


@pytest.fixture(scope="module")
def deployed(hil):
    """The first deploy onto the board and its first report after the reset deploy does."""
    site, services, port, device, runner, config = hil
    report = deploy(port, config)
    fw, _ = wait_reported(services, site, device, _idle, "the deployed board to report", timeout=240)
    return report, fw


@pytest.mark.timeout(300)
def test_deploy_then_the_board_reports_itself(hil, deployed):
    site, services, port, device, runner, config = hil
    report, fw = deployed
    assert {"boot.py", "main.py", "config.json", "secrets.json", "ca.der"} <= set(report.copied)
    assert any(p.startswith("firmware/agent.") for p in report.copied)
    assert fw["slot"] == "ota_0"
    if runner is not None:
        fs = runner.root / "fs"
        suffix = ".mpy" if report.compiled else ".py"
        assert report.compiled  # mpy-cross and the emulated board's MicroPython agree on v6.3
        assert (fs / "firmware" / f"agent{suffix}").read_bytes() == _compiled("agent")
        assert (fs / "config.json").read_bytes() == (config / "config.json").read_bytes()
        # The board's own proof of what it runs: the SHA-256 it hashed from its running slot.
        assert fw["sha256"] == hashlib.sha256(FACTORY).hexdigest() and fw["version"] == "1.0.0"


def _compiled(module: str) -> bytes:
    from tools.board.mpy import compile_tree, tree
    from tools.board.provision import CACHE, REPO

    built = compile_tree(tree(REPO, (REPO / "firmware").glob("*.py")), CACHE / "firmware-mpy")
    return (built / "firmware" / f"{module}.mpy").read_bytes()


@pytest.mark.timeout(300)
def test_deploy_again_copies_nothing_and_removes_stale_twins(hil, deployed):
    site, services, port, device, runner, config = hil
    from tools.board.deploy import mpremote

    # A stale source next to a compiled module would shadow it (MicroPython imports .py first).
    report = deploy(port, config, reset=False)
    twin = "firmware/agent.py" if report.compiled else "firmware/agent.mpy"
    mpremote(port, "exec", f"open({twin!r}, 'w').write('raise SystemExit')")
    _, before = wait_reported(services, site, device, _idle, "the board's report")
    again = deploy(port, config)
    assert again.copied == [] and twin in again.removed
    assert "secrets.json" in again.unchanged
    # A report newer than any before the reset: the board restarted on what is on its filesystem.
    wait_reported(services, site, device, lambda fw, doc: _idle(fw, doc) and doc["version"] > before["version"],
                  "the board to come back after the reset", timeout=240)


@pytest.mark.timeout(300)
def test_wrong_bytes_are_refused_and_the_board_stays_as_it_was(hil, deployed):
    site, services, port, device, runner, config = hil
    before, _ = wait_reported(services, site, device, _settled, "the board's report")
    boots = len(runner.boots) if runner is not None else None
    claimed = build_app_image("9.0.0", 200 * 1024)
    imposter = release(site, build_app_image("6.6.6", len(claimed)), "6.6.6")
    # Desired names one image's hash and size; the URL serves another, valid, image.
    url = presign.sign(site.store_key, site.endpoints().store_url, imposter.sha256, device)
    fw = grants.granted(site.grant_key, device, {"url": url, "version": "9.0.0",
                                                 "sha256": hashlib.sha256(claimed).hexdigest(), "size": len(claimed)})
    outcome, _ = services.call(op.request(site, device, contract.UPDATE, {"state": {"desired": {"firmware": fw}}}))
    assert outcome == "accepted"
    fw, _ = wait_reported(services, site, device, lambda fw, doc: fw.get("state") == "failed",
                          "the board to refuse the download", timeout=240)
    assert fw["error"] == contract.E_UNSIGNED  # no signature of 9.0.0 for the imposter's bytes
    same = ("version", "sha256", "slot")  # sha256 is absent for an image the board has no record of
    assert [fw.get(k) for k in same] == [before.get(k) for k in same]
    if runner is not None:
        assert len(runner.boots) == boots  # it never rebooted
        assert flash_info(runner.root / "flash.bin")["next_boot"]["slot"] == before["slot"]


@pytest.mark.timeout(400)
def test_an_image_that_never_confirms_is_rolled_back(hil, deployed, request):
    site, services, port, device, runner, config = hil
    bad_path = request.config.getoption("--bad-image")
    if bad_path is None and _serial(port):
        pytest.skip("a real board needs --bad-image: a valid app image that does not run this firmware "
                    "(so it never confirms), e.g. a MicroPython build without it on the filesystem")
    before, _ = wait_reported(services, site, device, _settled, "the board's report")
    bad = release(site, bad_path.read_bytes() if bad_path else build_app_image("1.2.0", 150 * 1024, PANIC_ON_BOOT),
                            "1.2.0")
    services.call(op.set_desired(site, device, bad, 900))
    fw, doc = wait_reported(services, site, device,
                            lambda fw, d: fw.get("state") == "failed" and fw.get("error") == contract.E_ROLLED_BACK,
                            "the board to come back on its old image and report rolled_back", timeout=360)
    assert fw.get("version") == before.get("version") and fw["slot"] == before["slot"] and fw["target"] == "1.2.0"
    if runner is not None:
        info = flash_info(runner.root / "flash.bin")
        assert info["next_boot"]["slot"] == before["slot"]
        assert "ABORTED" in [e["state"] for e in info["otadata"]["entries"]]


@pytest.mark.timeout(400)
def test_board_updates_itself_over_the_air(hil, deployed, request):
    site, services, port, device, runner, config = hil
    image_path = request.config.getoption("--ota-image")
    if image_path is None and _serial(port):
        pytest.skip("a real board needs --ota-image: a MicroPython app image (micropython.bin) to update to")
    image = image_path.read_bytes() if image_path else build_app_image("1.1.0", 300 * 1024)
    rel = release(site, image, "1.1.0")
    services.call(op.set_desired(site, device, rel, 900))
    fw, doc = wait_reported(services, site, device,
                            lambda fw, doc: fw.get("state") == "idle" and fw.get("sha256") == rel.sha256,
                            "the board to install, reboot into and confirm 1.1.0", timeout=360)
    assert fw["version"] == "1.1.0" and fw["slot"] == "ota_1" and not fw.get("error")
    if runner is not None:
        info = flash_info(runner.root / "flash.bin")
        assert info["next_boot"]["slot"] == "ota_1"
        ended = [b.ended for b in runner.boots]
        # It rebooted itself into the new image (machine.reset()), not by its watchdog biting.
        assert "reset" in ended and "watchdog" not in ended, ended


@pytest.mark.timeout(120)
def test_serial_board_flash_is_big_enough_for_the_ota_layout(hil):
    site, services, port, device, runner, config = hil
    if not _serial(port):
        pytest.skip("needs a board on a serial port (--port /dev/ttyUSB0): reads the flash chip's id with esptool")
    from tools.board.flashing import flash_size

    assert flash_size(port) >= 4 * 1024 * 1024
