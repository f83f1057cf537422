"""`flash`: esptool puts a combined firmware.bin on a board, after checks that refuse the wrong file.

The board is esp32-mock-bootloader's emulated ROM loader on a loopback socket (4 MiB flash): the
same serial protocol esptool speaks to a real ESP32. What it holds afterwards is read back with
the ROM's own read command (no stub), independent of the path that wrote it.
"""

import subprocess
import sys

import pytest
from esp32_mock_bootloader import mock_bootloader

from tools.espidf import onflash
from tools.board.flashing import FlashError, check_combined_image, flash
from tools.espidf.images import COMBINED_OFFSET, build_app_image, build_combined_image

APP = build_app_image("1.25.0", 40 * 1024)
FIRMWARE = build_combined_image(APP)


def test_a_combined_ota_image_is_accepted():
    info = check_combined_image(FIRMWARE)
    assert [p.label for p in info.partitions][-2:] == ["ota_0", "ota_1"]
    assert info.flash_needed == 0x310000


@pytest.mark.parametrize("case, code", [
    ("app image", "app_image"),
    ("random bytes", "not_combined"),
    ("truncated", "not_combined"),
    ("ESP32-S3 bootloader", "wrong_chip"),
    ("no OTA slots", "not_ota_variant"),
    ("broken table", "no_partition_table"),
    ("no app", "no_app"),
])
def test_the_wrong_file_is_refused_with_a_reason(case, code):
    data = {
        "app image": APP,  # micropython.bin: the file to release for OTA, not to flash
        "random bytes": bytes(range(256)) * 400,
        "truncated": FIRMWARE[:0x8000],
        "ESP32-S3 bootloader": FIRMWARE[:12] + (9).to_bytes(2, "little") + FIRMWARE[14:],
        "no OTA slots": build_combined_image(APP, (("nvs", onflash.TYPE_DATA, 2, 0x9000, 0x6000),
                                                   ("factory", onflash.TYPE_APP, 0, 0x10000, 0x1F0000))),
        "broken table": FIRMWARE[:0x7000] + b"\x00" * 32 + FIRMWARE[0x7020:],
        "no app": FIRMWARE[:0xF000] + b"\xff" * len(APP),
    }[case]
    with pytest.raises(FlashError) as e:
        check_combined_image(data)
    assert e.value.code == code, str(e.value)


def _read_flash(port: str, offset: int, size: int, out) -> bytes:
    subprocess.run([sys.executable, "-m", "esptool", "--chip", "esp32", "--port", port, "--no-stub",
                    "read-flash", hex(offset), str(size), str(out)], check=True, capture_output=True, timeout=240)
    return out.read_bytes()


@pytest.mark.timeout(400)
def test_flash_writes_the_file_at_0x1000_and_reads_back_identical(tmp_path):
    fw = tmp_path / "firmware.bin"
    fw.write_bytes(FIRMWARE)
    with mock_bootloader(chip="esp32") as board:
        info = flash(board.url(), fw)
        assert info.size == len(FIRMWARE)
        back = _read_flash(board.url(), COMBINED_OFFSET, len(FIRMWARE), tmp_path / "back.bin")
    assert back == FIRMWARE


@pytest.mark.timeout(200)
def test_a_table_bigger_than_the_boards_flash_is_refused_before_erasing(tmp_path):
    big = build_combined_image(APP, (("nvs", onflash.TYPE_DATA, 2, 0x9000, 0x4000),
                                     ("otadata", onflash.TYPE_DATA, onflash.SUBTYPE_DATA_OTA, 0xD000, 0x2000),
                                     ("ota_0", onflash.TYPE_APP, 0x10, 0x10000, 0x3F0000),
                                     ("ota_1", onflash.TYPE_APP, 0x11, 0x400000, 0x3F0000)))
    fw = tmp_path / "firmware-8mb.bin"
    fw.write_bytes(big)
    with mock_bootloader(chip="esp32") as board:
        first = tmp_path / "before.bin"
        fw_prev = tmp_path / "prev.bin"
        fw_prev.write_bytes(FIRMWARE)
        flash(board.url(), fw_prev)
        with pytest.raises(FlashError) as e:
            flash(board.url(), fw)
        assert e.value.code == "flash_too_small"
        # Nothing was erased: the board still holds what it held.
        assert _read_flash(board.url(), COMBINED_OFFSET, 0x100, first) == FIRMWARE[:0x100]
