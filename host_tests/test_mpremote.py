"""mpremote works against an emulated board as against a serial port.

The board's REPL is served on a local TCP port (tools/esp32emu/repl.py); these are the
developer-loop commands, each a separate mpremote run, so each one soft-resets the board the
way mpremote does with real hardware.
"""

import subprocess
import sys
import threading

import pytest

from conftest import wait_until
from tools.esp32emu.runner import Runner, make_flash
from tools.espidf.images import build_app_image


@pytest.fixture
def board(tmp_path):
    root = tmp_path / "board"
    (root / "fs").mkdir(parents=True)
    make_flash(root / "flash.bin", build_app_image("1.0.0", 90_000))
    (root / "fs" / "boot.py").write_text('print("boot.py ran")\n')
    (root / "fs" / "main.py").write_text('import time\nprint("main running")\nwhile True:\n    time.sleep_ms(50)\n')
    lines = []
    runner = Runner(root, repl_port=0, on_line=lines.append)
    t = threading.Thread(target=runner.run, daemon=True)
    t.start()
    wait_until(lambda: "main running" in lines, 20, "the board to start")
    yield runner, root, lines
    runner.stop()
    t.join(10)


def mpremote(runner, *args, timeout=30):
    out = subprocess.run([sys.executable, "-m", "mpremote", "connect", runner.repl_address, *args],
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_exec_eval_run(board, tmp_path):
    runner, root, lines = board
    assert "42" in mpremote(runner, "exec", "print(6 * 7)")
    assert mpremote(runner, "eval", "1 + 2").strip() == "3"
    script = tmp_path / "s.py"
    script.write_text('import esp32\nprint("slot", esp32.Partition(esp32.Partition.RUNNING).info()[4])\n')
    assert "slot ota_0" in mpremote(runner, "run", str(script))


def test_filesystem_commands(board, tmp_path):
    runner, root, lines = board
    src = tmp_path / "hello.py"
    src.write_text("x = 5\n" * 10)
    mpremote(runner, "fs", "cp", str(src), ":hello.py")
    assert (root / "fs" / "hello.py").read_text() == src.read_text()
    assert mpremote(runner, "fs", "cat", ":hello.py") == src.read_text()
    listing = mpremote(runner, "fs", "ls")
    assert "60 hello.py" in listing  # sizes, as LittleFS on the ESP32 reports them
    import hashlib

    assert hashlib.sha256(src.read_bytes()).hexdigest() in mpremote(runner, "fs", "sha256sum", ":hello.py")


def test_soft_reset_keeps_the_filesystem_and_skips_main_from_raw_repl(board):
    runner, root, lines = board
    mpremote(runner, "exec", "open('marker', 'w').write('kept')")
    n_boot = lines.count("boot.py ran")
    mpremote(runner, "soft-reset")
    assert lines.count("boot.py ran") > n_boot
    assert "kept" in mpremote(runner, "exec", "print(open('marker').read())")
    assert len(runner.boots) == 1  # no chip reset: the bootloader did not run again


def test_mount_and_reset(board, tmp_path):
    runner, root, lines = board
    (tmp_path / "mnt").mkdir()
    (tmp_path / "mnt" / "mm.py").write_text('print("from the host")\n')
    assert "from the host" in mpremote(runner, "mount", str(tmp_path / "mnt"), "exec", "import mm")
    mpremote(runner, "reset")
    wait_until(lambda: len(runner.boots) == 2, 20, "a chip reset")
    assert runner.boots[1].reset_cause == 2  # machine.reset(): HARD_RESET
    wait_until(lambda: lines.count("main running") >= 2, 20, "main.py after the reset")


def test_machine_reset_from_main_resets_the_chip_with_the_bridge_attached(tmp_path):
    # Under the bridge MicroPython runs with -i, where a SystemExit out of main.py would land at
    # the REPL; a chip resets at once instead (and must not wait for its watchdog).
    root = tmp_path / "board"
    (root / "fs").mkdir(parents=True)
    make_flash(root / "flash.bin", build_app_image("1.0.0", 90_000))
    (root / "fs" / "main.py").write_text(
        "import machine, os\n"
        "machine.WDT(timeout=60000)\n"
        "if 'once' not in os.listdir():\n"
        "    open('once', 'w').close()\n"
        "    machine.reset()\n"
        "print('cause', machine.reset_cause())\n")
    lines = []
    runner = Runner(root, repl_port=0, on_line=lines.append)
    t = threading.Thread(target=runner.run, daemon=True)
    t.start()
    try:
        wait_until(lambda: "cause 2" in lines, 15, "the second boot (HARD_RESET) after machine.reset()")
        assert [b.ended for b in runner.boots][:1] == ["reset"]
    finally:
        runner.stop()
        t.join(10)
