"""The emulated ESP32 fails where the chip fails: esp32.Partition, resets, watchdog, rollback.

Device code here is small MicroPython programs run on the emulated chip, either once
(run_micropython + chip_env) or through the power/reset loop (Runner).
"""

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import chip_env, last_json_line, run_micropython
from tools.esp32emu.flashinfo import flash_info
from tools.esp32emu.runner import (HARD_RESET, PANIC_ON_BOOT, PWRON_RESET, WDT_RESET, Runner, make_flash,
                                   make_fresh_board, rom_dir)
from tools.espidf import onflash
from tools.espidf.images import MemFlash, build_app_image
from tools.board.mpy import native_arch


@pytest.fixture(scope="module")
def app_a():
    return build_app_image("1.0.0", 90_000)


def make_device(tmp_path, image, main_py):
    root = tmp_path / "dev"
    (root / "fs").mkdir(parents=True)
    make_flash(root / "flash.bin", image)
    (root / "fs" / "main.py").write_text(textwrap.dedent(main_py))
    return root


# MicroPython: write_next(path) streams a file into the next OTA slot, 0xFF-padded, and returns
# that Partition. Prepended to the device programs below.
WRITE_NEXT = """
import esp32
def write_next(path):
    nxt = esp32.Partition(esp32.Partition.RUNNING).get_next_update()
    f = open(path, "rb")
    buf = bytearray(4096)
    blk = 0
    while True:
        for i in range(4096):
            buf[i] = 0xFF
        if not f.readinto(buf):
            return nxt
        nxt.writeblocks(blk, buf)
        blk += 1
"""


def run_device(root, max_boots):
    lines = []
    runner = Runner(root, max_boots=max_boots, on_line=lines.append)
    boots = runner.run()
    return boots, "\n".join(lines)


# MicroPython's tests/ports/esp32/partition_ota.py flow, as our own program: copy the
# running app into the next slot, set_boot, reset unconfirmed (must come back), then again
# confirming (must stay).
PARTITION_OTA = """
import esp32, machine
try:
    step = int(open("step").read())
except OSError:
    step = 0
run = esp32.Partition(esp32.Partition.RUNNING)
print("STEP", step, run.info()[4], machine.reset_cause())
def copy_and_set_boot():
    nxt = run.get_next_update()
    buf = bytearray(4096)
    for blk in range(run.ioctl(4, 0)):
        run.readblocks(blk, buf)
        nxt.writeblocks(blk, buf)
    nxt.set_boot()
if step in (0, 2):
    copy_and_set_boot()
elif step == 3:
    esp32.Partition.mark_app_valid_cancel_rollback()
open("step", "w").write(str(step + 1))
if step < 4:
    machine.reset()
"""


def test_partition_ota_flow_rolls_back_unless_confirmed(tmp_path, app_a):
    root = make_device(tmp_path, app_a, PARTITION_OTA)
    boots, out = run_device(root, max_boots=6)
    assert [b.slot for b in boots] == ["ota_0", "ota_1", "ota_0", "ota_1", "ota_1"], out
    assert [b.reset_cause for b in boots] == [PWRON_RESET] + [HARD_RESET] * 4
    assert "STEP 1 ota_1 2" in out and "STEP 2 ota_0 2" in out and "STEP 4 ota_1 2" in out
    assert any("ABORTED" in w for w in boots[2].writes)  # unconfirmed trial aborted
    info = flash_info(root / "flash.bin")
    assert info["next_boot"]["slot"] == "ota_1"
    assert info["otadata"]["entries"][1]["state"] == "VALID"


def test_write_into_running_slot_panics_and_resets(tmp_path, app_a):
    root = make_device(tmp_path, app_a, """
        import esp32
        esp32.Partition(esp32.Partition.RUNNING).writeblocks(3, bytearray(4096))
        print("NOT REACHED")
    """)
    boots, out = run_device(root, max_boots=2)
    assert boots[0].ended == "panic" and boots[1].reset_cause == HARD_RESET
    assert "overlaps the running app" in out and "NOT REACHED" not in out
    # the running image is untouched
    assert (root / "flash.bin").read_bytes()[0x10000 : 0x10000 + len(app_a)] == app_a


def test_watchdog_resets_a_hung_board(tmp_path, app_a):
    root = make_device(tmp_path, app_a, """
        import machine, time
        wdt = machine.WDT(timeout=300)
        print("CAUSE", machine.reset_cause())
        while True:
            time.sleep_ms(50)
    """)
    boots, out = run_device(root, max_boots=2)
    assert boots[0].ended == "watchdog" and boots[1].reset_cause == WDT_RESET
    assert "CAUSE 3" in out


def test_image_that_crashes_at_start_is_rolled_back(tmp_path, app_a):
    crashing = build_app_image("9.9.9", 90_000, PANIC_ON_BOOT)
    root = make_device(tmp_path, app_a, WRITE_NEXT + textwrap.dedent("""
        import machine
        try:
            open("done").read()
        except OSError:
            write_next("../crash.bin").set_boot()
            open("done", "w").write("1")
            machine.reset()
        print("RUNNING", esp32.Partition(esp32.Partition.RUNNING).info()[4])
    """))
    (root / "crash.bin").write_bytes(crashing)
    boots, out = run_device(root, max_boots=3)
    assert [(b.slot, b.ended) for b in boots[:2]] == [("ota_0", "reset"), ("ota_1", "panic")]
    assert boots[2].slot == "ota_0" and "RUNNING ota_0" in out


API_CHECKS = """
import esp32, json
P = esp32.Partition
out = {}
def err(fn):
    try:
        fn()
        return None
    except Exception as e:
        return [type(e).__name__] + list(e.args)
run = P(P.RUNNING)
nxt = run.get_next_update()
out["running"] = list(run.info())
out["next"] = list(nxt.info())
out["boot"] = P(P.BOOT).info()[4]
out["otadata"] = list(P("otadata").info())
out["find"] = [p.info()[4] for p in P.find(P.TYPE_APP)]
out["find_data"] = [p.info()[4] for p in P.find(P.TYPE_DATA, label="nvs")]
out["ioctl"] = [nxt.ioctl(4, 0), nxt.ioctl(5, 0), nxt.ioctl(1, 0), nxt.ioctl(99, 0)]
out["no_label"] = err(lambda: P("nope"))
out["bad_id"] = err(lambda: P(7))
out["short_write"] = err(lambda: nxt.writeblocks(0, bytearray(100)))
out["at_end"] = err(lambda: nxt.readblocks(384, bytearray(4096)))
out["past_end"] = err(lambda: nxt.readblocks(385, bytearray(4096)))
out["set_boot_blank"] = err(lambda: nxt.set_boot())
# NOR: extended writes do not erase; data is ANDed into what is there
nxt.writeblocks(1, b"\\x0f" * 4096)
nxt.writeblocks(1, b"\\xf3" * 4096, 0)
b = bytearray(4)
nxt.readblocks(1, b)
out["nor_and"] = list(b)
nxt.ioctl(6, 1)
nxt.readblocks(1, b)
out["erased"] = list(b)
out["mark_valid_blank_otadata"] = err(lambda: P.mark_app_valid_cancel_rollback())
print(json.dumps(out))
"""


def test_nor_flash_programs_only_clear_bits_whatever_was_erased_last(tmp_path):
    """NorFlash skips reading back a sector it has just erased; every other program is ANDed
    into what the flash holds, including the second program of a freshly erased sector."""
    from tools.esp32emu.target.norflash import SECTOR, NorFlash

    path = tmp_path / "flash.bin"
    path.write_bytes(b"\x00" * (4 * SECTOR))  # unerased: programming cannot set bits
    f = NorFlash(str(path))
    try:
        f.write(0, b"\xff" * SECTOR)
        assert f.read(0, 4) == b"\x00" * 4
        f.erase(SECTOR, 2 * SECTOR)  # sectors 1 and 2; the last one is remembered blank
        f.write(SECTOR, b"\x0f" * 16)  # part of sector 1
        f.write(SECTOR, b"\xf3" * 16)  # again, without an erase
        f.write(2 * SECTOR, b"\x3c" * SECTOR)
        f.write(2 * SECTOR, b"\xf0" * SECTOR)
        f.write(3 * SECTOR - 8, b"\x55" * 16)  # across sectors 2 and 3
    finally:
        f.close()
    data = path.read_bytes()
    assert data[SECTOR:SECTOR + 16] == b"\x03" * 16 and data[SECTOR + 16:2 * SECTOR] == b"\xff" * (SECTOR - 16)
    assert data[2 * SECTOR:3 * SECTOR - 8] == b"\x30" * (SECTOR - 8)
    assert data[3 * SECTOR - 8:3 * SECTOR] == b"\x10" * 8  # 0x30 & 0x55
    assert data[3 * SECTOR:3 * SECTOR + 8] == b"\x00" * 8  # never erased


@pytest.mark.parametrize("cut_at_op,left", [(None, "data"), (1, "erased"), (2, "data")])
def test_block_rewrite_is_an_erase_and_a_program_even_when_fused(tmp_path, cut_at_op, left):
    """rewrite_sector (a block write) goes from old contents to new in one file write when no
    cut is planned; a planned cut still falls between its erase and its program."""
    from tools.esp32emu.target.norflash import SECTOR, NorFlash, PowerCut, PowerPlan, arm_power_cut

    def cut():
        raise PowerCut()

    path = tmp_path / "flash.bin"
    path.write_bytes(b"\x00" * (2 * SECTOR))
    plan = tmp_path / "powercut"
    f = NorFlash(str(path), power=PowerPlan(str(plan), cut))
    if cut_at_op is not None:
        arm_power_cut(str(plan), cut_at_op)
    try:
        f.rewrite_sector(SECTOR, b"\x5a" * SECTOR)
    except PowerCut:
        assert cut_at_op is not None
    finally:
        f.close()
    f = NorFlash(str(path))
    try:
        assert f.wear(0) == (0, 0)
        assert f.wear(1) == ((1, 1) if left == "data" else (1, 0))
    finally:
        f.close()
    data = path.read_bytes()
    assert data[:SECTOR] == b"\x00" * SECTOR
    assert data[SECTOR:] == (b"\x5a" if left == "data" else b"\xff") * SECTOR


def test_partition_api_values_match_micropython_on_esp_idf(tmp_path, app_a):
    make_flash(tmp_path / "flash.bin", app_a)
    proc = run_micropython(API_CHECKS, tmp_path, chip_env(tmp_path / "flash.bin"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = last_json_line(proc.stdout)
    assert out["running"] == [0, 16, 65536, 1572864, "ota_0", False]
    assert out["next"] == [0, 17, 1638400, 1572864, "ota_1", False]
    assert out["otadata"] == [1, 0, 53248, 8192, "otadata", False]
    assert out["boot"] == "ota_0"
    assert out["find"] == ["ota_0", "ota_1"] and out["find_data"] == ["nvs"]
    assert out["ioctl"] == [384, 4096, 0, None]
    assert out["no_label"] == ["OSError", 2]
    assert out["bad_id"][0] == "ValueError"
    assert out["short_write"] == ["OSError", -260, "ESP_ERR_INVALID_SIZE"]
    # esp_partition_read: offset > size -> INVALID_ARG; offset + len > size -> INVALID_SIZE
    assert out["at_end"] == ["OSError", -260, "ESP_ERR_INVALID_SIZE"]
    assert out["past_end"] == ["OSError", -258, "ESP_ERR_INVALID_ARG"]
    assert out["set_boot_blank"] == ["OSError", -5379, "ESP_ERR_OTA_VALIDATE_FAILED"]
    assert out["nor_and"] == [0x03] * 4
    assert out["erased"] == [0xFF] * 4
    assert out["mark_valid_blank_otadata"] == ["OSError", 1, "ESP_FAIL"]


def test_a_board_dies_with_its_runner(tmp_path, app_a):
    # A runner killed outright (a CI timeout, kill -9) must leave no MicroPython process
    # behind. Boards start under setpriv --pdeathsig (a preexec_fn would make each boot fork
    # the whole runner); this checks the signal really reaches the board.
    root = tmp_path / "dev"
    make_fresh_board(root, app_a)
    (root / "fs" / "main.py").write_text("import time\nprint('up')\nwhile True:\n    time.sleep(1)\n")
    repo = Path(__file__).resolve().parents[1]
    runner = subprocess.Popen([sys.executable, "-c", "import sys; from tools.esp32emu.runner import Runner; "
                               "Runner(sys.argv[1], on_line=lambda s: print(s, flush=True)).run()", str(root)],
                              cwd=repo, stdout=subprocess.PIPE, text=True)
    board = None
    try:
        for line in runner.stdout:
            if line.strip() == "up":
                break
        board = next(int(p) for p in os.listdir("/proc") if p.isdigit()
                     and _cwd(p) == str(root / "fs"))
        runner.kill()
        runner.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(board):
            time.sleep(0.05)
        assert not _alive(board), "the board outlived its runner"
    finally:
        runner.kill()
        runner.wait(10)
        if board is not None and _alive(board):
            os.kill(board, signal.SIGKILL)


def _cwd(pid: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has died
    except OSError:
        return False


def test_block_writes_allocate_nothing(tmp_path, app_a):
    # A chip's flash driver uses no GC heap, so the emulated one must not either: what the
    # firmware's download loop allocates is then what gc.mem_alloc() shows, with nothing to
    # subtract (the driver's heap-lock check used to allocate 64 bytes a block).
    make_flash(tmp_path / "flash.bin", app_a)
    proc = run_micropython("""
import esp32, gc, json
nxt = esp32.Partition(esp32.Partition.RUNNING).get_next_update()
buf = bytearray(4096)
nxt.writeblocks(0, buf)  # first use: anything made once is made here
blk = a0 = a1 = 0  # every global made before: a new one grows the module's dict
blk = 1
gc.collect()
gc.disable()
a0 = gc.mem_alloc()
while blk < 65:  # not a for loop: its iterator is an allocation
    nxt.writeblocks(blk, buf)
    blk += 1
a1 = gc.mem_alloc()
print(json.dumps([a1 - a0, list(esp32.Partition(esp32.Partition.RUNNING).get_next_update().info()[:3])]))
""", tmp_path, chip_env(tmp_path / "flash.bin"))
    grew, info = last_json_line(proc.stdout)
    assert grew == 0, proc.stdout + proc.stderr
    assert info == [0, 17, 0x190000]
    data = (tmp_path / "flash.bin").read_bytes()
    assert data[0x190000:0x190000 + 65 * 4096] == bytes(65 * 4096)  # every block landed


@pytest.mark.parametrize("damage, error", [
    ("none", None),
    ("checksum", "checksum failed"),  # digest recomputed: only the XOR checksum can tell
    ("digest", "image hash failed"),  # two flips that cancel in the checksum
])
def test_set_boot_checks_checksum_and_digest_as_the_host_model_does(tmp_path, app_a, damage, error):
    if native_arch() is not None:  # the checksum runs as native code where the port has it
        assert (rom_dir() / "_native.mpy").exists()
    b = bytearray(build_app_image("2.0.0", 300_000))
    if damage != "none":
        b[40000] ^= 0x80
    if damage == "checksum":
        b[-32:] = hashlib.sha256(b[:-32]).digest()
    if damage == "digest":
        b[40004] ^= 0x80
    host = onflash.verify_image(MemFlash(bytes(b)), 0, 0x180000)["error"]  # CPython, big ints
    assert host == error if error is None else host.startswith(error)
    make_flash(tmp_path / "flash.bin", app_a)
    proc = _write_next_and_set_boot(tmp_path, b)
    if error is None:
        assert last_json_line(proc.stdout) == "accepted", proc.stdout + proc.stderr
    else:
        assert last_json_line(proc.stdout) == [-5379, "ESP_ERR_OTA_VALIDATE_FAILED"], proc.stdout + proc.stderr
        assert "E esp_image: " + host in proc.stdout  # the same words, the same calculated value


def test_the_models_plain_python_agrees_with_their_native_code(tmp_path, app_a):
    # Where MicroPython has no native emitter, the image checksum and the wear counts run as
    # plain Python (_native.py is left out of the ROM): the same counts and verdicts either way.
    b = bytearray(build_app_image("2.0.0", 100_000))
    b[40000] ^= 0x80
    b[-32:] = hashlib.sha256(b[:-32]).digest()  # only the checksum is wrong
    (tmp_path / "b.bin").write_bytes(b)
    make_flash(tmp_path / "flash.bin", app_a)
    proc = run_micropython(WRITE_NEXT + """
import json, espidf, norflash, _emuhw
write_next("b.bin")
fl = _emuhw.flash()
out = [norflash._wear_bump is not None and espidf._xor32 is not None]
for native in (True, False):
    if not native:
        espidf._xor32 = None
        norflash._wear_bump = None
    fl.rewrite_sector(0x300000, bytearray(4096))  # past the image, inside ota_1
    out.append([list(fl.wear(0x300)), espidf.verify_image(fl, 0x10000, 0x180000)["ok"],
                espidf.verify_image(fl, 0x190000, 0x180000)["error"]])
print(json.dumps(out))
""", tmp_path, chip_env(tmp_path / "flash.bin"))
    had_native, native, plain = last_json_line(proc.stdout)
    assert had_native == (native_arch() is not None)
    assert native[0] == [1, 1] and plain[0] == [2, 2]
    assert native[1] is plain[1] is True  # the running image
    assert native[2] == plain[2] and native[2].startswith("checksum failed")
    wear = (tmp_path / "flash.bin.wear").read_bytes()
    assert struct.unpack_from("<II", wear, 0x300 * 8) == (2, 2)  # written through, both ways
    assert struct.unpack_from("<II", wear, 0x190 * 8) == (1, 1)  # write_next's block


def _write_next_and_set_boot(tmp_path, image):
    """Write `image` into the next slot of the board in tmp_path and set_boot() it; the last
    line printed is "accepted" or the OSError's args."""
    (tmp_path / "b.bin").write_bytes(image)
    return run_micropython(WRITE_NEXT + """
import json
nxt = write_next("b.bin")
try:
    nxt.set_boot()
    print(json.dumps("accepted"))
except OSError as e:
    print(json.dumps(list(e.args)))
""", tmp_path, chip_env(tmp_path / "flash.bin"))


def test_set_boot_refuses_one_flipped_byte_and_leaves_otadata(tmp_path, app_a):
    b = bytearray(build_app_image("2.0.0", 90_000))
    b[40000] ^= 0x80
    make_flash(tmp_path / "flash.bin", app_a)
    before = (tmp_path / "flash.bin").read_bytes()[0xD000:0xF000]
    proc = _write_next_and_set_boot(tmp_path, b)
    assert last_json_line(proc.stdout) == [-5379, "ESP_ERR_OTA_VALIDATE_FAILED"], proc.stdout + proc.stderr
    assert (tmp_path / "flash.bin").read_bytes()[0xD000:0xF000] == before


def test_flash_info_reports_slots_and_next_boot(tmp_path, app_a):
    make_flash(tmp_path / "flash.bin", app_a)
    info = flash_info(tmp_path / "flash.bin")
    assert info["next_boot"]["slot"] == "ota_0"
    assert info["next_boot"]["otadata_writes"] == ["otadata[0] <- seq 1 VALID (first boot: otadata was blank)"]
    assert info["app_slots"]["ota_0"]["valid"] and info["app_slots"]["ota_0"]["app_desc"]["version"] == "1.0.0"
    assert not info["app_slots"]["ota_1"]["valid"]
    assert json.dumps(info)  # serialisable for the CLI
    # flash-info never writes
    assert info["otadata"]["entries"][0]["seq"] == 0xFFFFFFFF
    assert info["app_slots"]["ota_0"]["chip"] == {"chip_id": 0, "min_chip_rev": 0, "max_chip_rev": 399}


def test_flash_info_gives_a_factory_app_its_verdict_and_a_combined_image_in_a_slot_the_bootloaders(tmp_path, app_a):
    """MicroPython's non-OTA layout (nvs, phy_init, factory, vfs): the app is factory's; and
    firmware.bin written into a slot, which set_boot's check would pass, is shown refused as
    the bootloader refuses it (esp_image_format.c verify_load_addresses)."""
    from tools.espidf import onflash
    from tools.espidf.images import build_combined_image

    factory_layout = [("nvs", onflash.TYPE_DATA, 0x02, 0x9000, 0x6000), ("phy_init", onflash.TYPE_DATA, 0x01, 0xF000, 0x1000),
                      ("factory", onflash.TYPE_APP, onflash.SUBTYPE_FACTORY, 0x10000, 0x1F0000),
                      ("vfs", onflash.TYPE_DATA, 0x81, 0x200000, 0x200000)]
    flash = bytearray(b"\xff" * 0x400000)
    table = onflash.make_partition_table(factory_layout)
    flash[0x8000 : 0x8000 + len(table)] = table
    flash[0x10000 : 0x10000 + len(app_a)] = app_a
    (tmp_path / "factory.bin").write_bytes(flash)
    info = flash_info(tmp_path / "factory.bin")
    assert info["next_boot"]["slot"] == "factory"
    factory = info["app_slots"]["factory"]
    assert factory["valid"] and factory["app_desc"]["version"] == "1.0.0" and factory["chip"]["chip_id"] == 0

    make_flash(tmp_path / "flash.bin", app_a)
    data = bytearray((tmp_path / "flash.bin").read_bytes())
    combined = build_combined_image(app_a)
    data[0x190000 : 0x190000 + len(combined)] = combined
    (tmp_path / "flash.bin").write_bytes(data)
    slot = flash_info(tmp_path / "flash.bin")["app_slots"]["ota_1"]
    assert not slot["valid"] and slot["error"] == "Segment 0 0x3fff0000-0x3fff0404 invalid: overlaps bootloader data"


# ---- power cuts -------------------------------------------------------------------------

UPDATE_ONCE = WRITE_NEXT + textwrap.dedent("""
    import machine
    try:
        open("started").read()  # one attempt only, even if the power dies during it
    except OSError:
        open("started", "w").write("1")
        write_next("../b.bin").set_boot()
        machine.reset()
    print("RUNNING", esp32.Partition(esp32.Partition.RUNNING).info()[4])
""")


def _power_device(tmp_path, app_a, image_b):
    root = make_device(tmp_path, app_a, UPDATE_ONCE)
    (root / "b.bin").write_bytes(image_b)
    return root


def _ops_before_set_boot(image):
    # power-on on blank otadata writes entry 0 (erase + program), then each 4 KiB block is
    # one erase + one program
    return 2 + 2 * ((len(image) + 4095) // 4096)


@pytest.mark.parametrize("which,tear,expect_slot,entry1", [
    ("erase", True, "ota_0", (0xFFFFFFFF, "UNDEFINED")),  # otadata[1] sector half erased
    ("program", True, "ota_0", (2, "UNDEFINED")),  # seq written, state and CRC not: invalid
    ("program", False, "ota_1", (2, "PENDING_VERIFY")),  # set_boot done, reset never came
])
def test_power_cut_during_set_boot(tmp_path, app_a, which, tear, expect_slot, entry1):
    image_b = build_app_image("2.0.0", 90_000)
    root = _power_device(tmp_path, app_a, image_b)
    runner = Runner(root, max_boots=2, on_line=lambda s: None)
    n = _ops_before_set_boot(image_b) + (1 if which == "erase" else 2)
    runner.arm_power_cut(n, tear)
    boots = runner.run()
    assert boots[0].ended == "power cut" and boots[1].reset_cause == PWRON_RESET
    assert boots[1].slot == expect_slot
    e1 = flash_info(root / "flash.bin")["otadata"]["entries"][1]
    assert (e1["seq"], e1["state"]) == entry1
    if tear:
        assert not e1["valid"]


def test_power_cut_while_the_bootloader_rewrites_otadata(tmp_path, app_a):
    # Cut the bootloader's NEW -> PENDING_VERIFY write halfway: the entry is destroyed and the
    # chip comes back on the old image.
    image_b = build_app_image("2.0.0", 90_000)
    root = _power_device(tmp_path, app_a, image_b)
    runner = Runner(root, max_boots=3, on_line=lambda s: None)
    runner.arm_power_cut(_ops_before_set_boot(image_b) + 2 + 1, tear=True)
    boots = runner.run()
    assert boots[0].ended == "reset" and boots[1].ended == "power cut in bootloader"
    assert boots[2].slot == "ota_0" and boots[2].reset_cause == PWRON_RESET


def test_power_cut_at_a_wall_clock_moment(tmp_path, app_a):
    root = make_device(tmp_path, app_a, """
        import time
        try:
            open("looped").read()  # second boot: finish, the board idles at the REPL
        except OSError:
            open("looped", "w").write("1")
            while True:
                time.sleep_ms(20)
    """)
    runner = Runner(root, max_boots=2, cut_at=0.8, on_line=lambda s: None)
    boots = runner.run()
    assert boots[0].ended == "power cut" and boots[1].reset_cause == PWRON_RESET


def test_wear_is_counted_per_sector(tmp_path, app_a):
    image_b = build_app_image("2.0.0", 90_000)
    root = _power_device(tmp_path, app_a, image_b)
    boots, _ = run_device(root, max_boots=2)
    wear = flash_info(root / "flash.bin")["wear"]
    nblocks = (len(image_b) + 4095) // 4096
    assert wear["ota_1"]["erases"] == nblocks and wear["ota_1"]["max_sector_erases"] == 1
    assert wear["ota_0"]["erases"] == 0  # the running image was never touched
    # otadata: first boot (entry 0), set_boot (entry 1), NEW -> PENDING_VERIFY (entry 1)
    assert wear["otadata"]["erases"] == 3


# ---- resources ----------------------------------------------------------------------------

TLS_BUDGET = """
import socket, ssl, json
ca = open("ca.der", "rb").read()
def connect():
    s = socket.socket()
    s.connect(socket.getaddrinfo("127.0.0.1", PORT)[0][-1])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=ca)
    try:
        return ctx.wrap_socket(s, server_hostname="127.0.0.1"), None
    except OSError as e:
        s.close()
        return None, e.args[0]
a, _ = connect()
b, _ = connect()
c, err3 = connect()
b.close()
d, err4 = connect()
print(json.dumps({"third": err3, "after_close": err4, "open": ssl.open_connections()}))
"""


def test_tls_budget_fails_wrap_socket_with_enomem(tmp_path, app_a, site):
    import socket
    import ssl
    import threading

    from tools.site.pki import server_ssl_context

    ctx = server_ssl_context(site.pki)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    held = []

    def serve():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            try:
                held.append(ctx.wrap_socket(c, server_side=True))
            except (OSError, ssl.SSLError):
                c.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        make_flash(tmp_path / "flash.bin", app_a)
        (tmp_path / "ca.der").write_bytes(site.pki.ca_der.read_bytes())
        code = TLS_BUDGET.replace("PORT", str(srv.getsockname()[1]))
        env = dict(chip_env(tmp_path / "flash.bin"), ESP32EMU_TLS_BUDGET="2")
        proc = run_micropython(code, tmp_path, env)
        assert last_json_line(proc.stdout) == {"third": 12, "after_close": None, "open": 2}, proc.stderr
    finally:
        srv.close()
        for s in held:
            s.close()


TLS_POLL = """
import socket, ssl, json, select, time
ca = open("ca.der", "rb").read()
s = socket.socket()
s.connect(socket.getaddrinfo("127.0.0.1", PORT)[0][-1])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.verify_mode = ssl.CERT_REQUIRED
ctx.load_verify_locations(cadata=ca)
t = ctx.wrap_socket(s, server_hostname="127.0.0.1")
p = select.poll()
p.register(t, select.POLLIN)
out = {"emulated": hasattr(p, "_wait")}
out["first"] = len(p.poll(5000))
out["a"] = t.read(5).decode()  # one record of 10 bytes: 5 stay in the TLS layer
out["pending"] = len(p.poll(0))  # the raw socket is empty: only the TLS layer has them
out["b"] = t.read(5).decode()
t0 = time.ticks_ms()
out["quiet"] = len(p.poll(150))
out["quiet_ms"] = time.ticks_diff(time.ticks_ms(), t0)
out["later"] = len(p.poll(5000))
out["c"] = t.read(5).decode()
print(json.dumps(out))
"""


def test_poll_on_a_tls_socket_sees_pending_bytes_and_waits_in_the_kernel(tmp_path, app_a, site):
    # The emulated select.poll (target/select.py) must answer as MicroPython's: ready when
    # the TLS layer holds bytes even though the socket underneath is empty, quiet until the
    # timeout, ready again when the peer sends.
    import socket
    import threading

    from tools.site.pki import server_ssl_context

    ctx = server_ssl_context(site.pki)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    done = threading.Event()

    def serve():
        c, _ = srv.accept()
        with ctx.wrap_socket(c, server_side=True) as tc:
            tc.sendall(b"helloworld")
            time.sleep(0.6)
            tc.sendall(b"later")
            done.wait(30)

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    try:
        make_flash(tmp_path / "flash.bin", app_a)
        (tmp_path / "ca.der").write_bytes(site.pki.ca_der.read_bytes())
        proc = run_micropython(TLS_POLL.replace("PORT", str(srv.getsockname()[1])), tmp_path,
                               chip_env(tmp_path / "flash.bin"))
        out = last_json_line(proc.stdout)
        assert out is not None, proc.stderr
        assert out.pop("quiet_ms") >= 150
        assert out == {"emulated": True, "first": 1, "a": "hello", "pending": 1, "b": "world",
                       "quiet": 0, "later": 1, "c": "later"}
    finally:
        done.set()
        th.join(10)
        srv.close()


# ---- the clock ------------------------------------------------------------------------------

CLOCK = """
import time, machine
try:
    step = int(open("step").read())
except OSError:
    step = 0
print("STEP", step, "YEAR", time.gmtime()[0], "INT", isinstance(time.time(), int))
open("step", "w").write(str(step + 1))
if step == 0:
    machine.RTC().datetime((2030, 6, 1, 5, 12, 0, 0, 0))
    machine.reset()  # a software reset keeps the RTC
elif step == 1:
    print("RTC", machine.RTC().datetime()[:3])
    time.sleep(30)  # the test cuts the power here
"""


def test_clock_starts_unset_survives_resets_and_not_power_loss(tmp_path, app_a):
    root = make_device(tmp_path, app_a, CLOCK)
    lines = []
    runner = Runner(root, max_boots=3, on_line=lines.append)
    import threading

    t = threading.Thread(target=runner.run, daemon=True)
    t.start()
    from conftest import wait_until

    wait_until(lambda: any("RTC" in ln for ln in lines), 20, "the second boot")
    runner.cut_power()
    wait_until(lambda: any("STEP 2" in ln for ln in lines), 20, "the boot after the power cut")
    runner.stop()
    t.join(10)
    out = "\n".join(lines)
    assert "STEP 0 YEAR 2000 INT True" in out  # a cold ESP32
    assert "STEP 1 YEAR 2030" in out and "RTC (2030, 6, 1)" in out
    assert "STEP 2 YEAR 2000" in out  # power loss reset the RTC


def test_tls_refuses_certificates_while_the_clock_is_unset(tmp_path, app_a, site):
    make_flash(tmp_path / "flash.bin", app_a)
    (tmp_path / "ca.der").write_bytes(site.pki.ca_der.read_bytes())
    env = chip_env(tmp_path / "flash.bin")
    (tmp_path / "run" / "rtc").write_text(str(946684800 - int(__import__("time").time())))
    proc = run_micropython("""
import socket, ssl, json
s = socket.socket()
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.verify_mode = ssl.CERT_REQUIRED
ctx.load_verify_locations(cadata=open("ca.der", "rb").read())
try:
    ctx.wrap_socket(s, server_hostname="127.0.0.1")
    print(json.dumps("wrapped"))
except ValueError as e:
    print(json.dumps(str(e).strip()))
""", tmp_path, env)
    assert last_json_line(proc.stdout) == "The certificate validity starts in the future", proc.stderr


def test_deep_sleep_wakes_on_the_remembered_slot_not_the_new_boot_slot(tmp_path, app_a):
    # CONFIG_BOOTLOADER_SKIP_VALIDATE_IN_DEEP_SLEEP: waking from deep sleep boots the slot the
    # RTC remembers without reading otadata; only a reset makes set_boot() take effect.
    root = make_device(tmp_path, app_a, WRITE_NEXT + textwrap.dedent("""
        import machine
        run = esp32.Partition(esp32.Partition.RUNNING).info()[4]
        print("RUN", run, "CAUSE", machine.reset_cause())
        try:
            step = int(open("step").read())
        except OSError:
            step = 0
        open("step", "w").write(str(step + 1))
        if step == 0:
            write_next("../b.bin").set_boot()
            machine.deepsleep(200)
        elif step == 1:
            machine.reset()
    """))
    (root / "b.bin").write_bytes(build_app_image("2.0.0", 90_000))
    boots, out = run_device(root, max_boots=3)
    assert [(b.slot, b.reset_cause) for b in boots] == [("ota_0", 1), ("ota_0", 4), ("ota_1", 2)], out
    assert "RUN ota_0 CAUSE 4" in out and "RUN ota_1 CAUSE 2" in out
    assert boots[1].writes == []  # otadata untouched by the wake-up
