"""The ESP-IDF on-flash model (target/espidf.py) against known vectors and esptool.

The emulated bootloader, the emulated esp32.Partition and flash-info all run this module, so
these vectors pin what "boots" means everywhere. Values from ESP-IDF v5.5 sources and the
project's facts note (otadata CRC vectors, MicroPython's partition table MD5).
"""

import hashlib
import struct

import pytest
from esptool.bin_image import LoadFirmwareImage

from tools.espidf import onflash
from tools.espidf.images import MemFlash, build_app_image, build_combined_image

OTADATA = 0xD000


class BytesFlash:
    """Writable in-memory NOR flash (erase -> 0xFF, write ANDs)."""

    def __init__(self, size=4 * 1024 * 1024):
        self.data = bytearray(b"\xff" * size)
        table = onflash.make_partition_table()
        self.data[0x8000 : 0x8000 + len(table)] = table
        self.ops = []

    def read(self, addr, n):
        return bytes(self.data[addr : addr + n])

    def readinto(self, addr, buf):
        buf[:] = self.data[addr : addr + len(buf)]

    def erase(self, addr, n):
        self.ops.append(("erase", addr, n))
        self.data[addr : addr + n] = b"\xff" * n

    def write(self, addr, data):
        self.ops.append(("write", addr, len(data)))
        for i, b in enumerate(data):
            self.data[addr + i] &= b

    def put_image(self, slot_offset, image):
        self.data[slot_offset : slot_offset + len(image)] = image

    def put_entry(self, index, seq, state, crc=None):
        e = onflash.pack_ota_entry(seq, state, crc=crc)
        self.data[OTADATA + index * 4096 : OTADATA + index * 4096 + 32] = e

    def entries(self):
        return [(e.seq, e.state) for e in onflash.read_otadata(self, self.otadata)]

    @property
    def parts(self):
        return onflash.read_partition_table(self)

    @property
    def otadata(self):
        return onflash.find_part(self.parts, onflash.TYPE_DATA, onflash.SUBTYPE_DATA_OTA)


def flash_with(ota_0=None, ota_1=None, entries=()):
    """A flash with images in the slots and otadata entries (index, seq, state[, crc])."""
    f = BytesFlash()
    if ota_0:
        f.put_image(0x10000, ota_0)
    if ota_1:
        f.put_image(0x190000, ota_1)
    for e in entries:
        f.put_entry(*e)
    return f


@pytest.fixture(scope="module")
def image_a():
    return build_app_image("1.0.0", 100_000)


@pytest.fixture(scope="module")
def image_b():
    return build_app_image("2.0.0", 120_000)


def test_partition_table_matches_gen_esp32part():
    table = onflash.make_partition_table()
    assert len(table) == 0xC00
    # MD5 of MicroPython's partitions-4MiB-ota.csv as gen_esp32part.py writes it
    assert table[0xA0:0xB0] == b"\xeb\xeb" + b"\xff" * 14
    assert table[0xB0:0xC0].hex() == "6f91ac1bb2b49e61a1daefd12de800a2"
    parts = onflash.parse_partition_table(table)
    assert [(p.label, p.offset, p.size) for p in parts] == [
        ("nvs", 0x9000, 0x4000), ("otadata", 0xD000, 0x2000), ("phy_init", 0xF000, 0x1000),
        ("ota_0", 0x10000, 0x180000), ("ota_1", 0x190000, 0x180000)]


@pytest.mark.parametrize("damage,message", [
    (lambda t: t.__setitem__(0x20, 0x00), "invalid magic"),
    (lambda t: t.__setitem__(0x30, t[0x30] ^ 1), "MD5"),
    (lambda t: t.__setitem__(slice(0, 32), b"\xff" * 32), "empty"),
])
def test_partition_table_defects_are_refused(damage, message):
    table = bytearray(onflash.make_partition_table())
    damage(table)
    with pytest.raises(ValueError, match=message):
        onflash.parse_partition_table(bytes(table))


def test_otadata_crc_covers_seq_only():
    assert onflash.ota_crc(1) == 0x4743989A
    assert onflash.ota_crc(2) == 0x55F63774
    assert onflash.ota_crc(3) == 0xED4A5011
    assert onflash.pack_ota_entry(1, onflash.OTA_NEW).hex() == "01000000" + "ff" * 20 + "00000000" + "9a984347"


def test_active_entry_tie_goes_to_entry_0():
    e = [onflash.OtaEntry(onflash.pack_ota_entry(5, onflash.OTA_VALID)) for _ in range(2)]
    assert onflash.active_otadata(e) == 0
    e[1] = onflash.OtaEntry(onflash.pack_ota_entry(6, onflash.OTA_VALID))
    assert onflash.active_otadata(e) == 1
    e[1] = onflash.OtaEntry(onflash.pack_ota_entry(6, onflash.OTA_ABORTED))
    assert onflash.active_otadata(e) == 0
    e[0] = onflash.OtaEntry(onflash.pack_ota_entry(5, onflash.OTA_VALID, crc=0))
    assert onflash.active_otadata(e) == -1


def test_set_boot_sequence_numbers_follow_esp_rewrite_ota_data():
    f = flash_with(entries=[(0, 1, onflash.OTA_VALID)])
    onflash.set_boot_slot(f, f.parts, 1)  # ota_1: seq 2 into the other sector, state NEW
    assert f.entries() == [(1, onflash.OTA_VALID), (2, onflash.OTA_NEW)]
    onflash.set_boot_slot(f, f.parts, 0)  # back to ota_0: seq 3 into entry 0
    assert f.entries() == [(3, onflash.OTA_NEW), (2, onflash.OTA_NEW)]
    onflash.set_boot_slot(f, f.parts, 0)  # same slot again: same seq, written to entry 1; tie -> 0
    assert f.entries() == [(3, onflash.OTA_NEW), (3, onflash.OTA_NEW)]
    assert onflash.active_otadata(onflash.read_otadata(f, f.otadata)) == 0
    # a write is an erase of the 4 KiB sector and a 32-byte program
    assert f.ops[-2:] == [("erase", OTADATA + 4096, 4096), ("write", OTADATA + 4096, 32)]


def test_first_boot_on_blank_otadata_writes_entry_0(image_a):
    f = flash_with(image_a)
    sel = onflash.select_boot(f, f.parts)
    assert sel["part"].label == "ota_0"
    assert f.entries()[0] == (1, onflash.OTA_VALID)


def test_new_image_gets_one_boot_then_rolls_back(image_a, image_b):
    f = flash_with(image_a, image_b, [(0, 1, onflash.OTA_VALID)])
    onflash.set_boot_slot(f, f.parts, 1)
    assert onflash.select_boot(f, f.parts)["part"].label == "ota_1"
    assert f.entries()[1] == (2, onflash.OTA_PENDING_VERIFY)
    sel = onflash.select_boot(f, f.parts)  # reset without confirming
    assert sel["part"].label == "ota_0"
    assert f.entries() == [(1, onflash.OTA_VALID), (2, onflash.OTA_ABORTED)]


def test_confirmed_image_stays(image_a, image_b):
    f = flash_with(image_a, image_b, [(0, 1, onflash.OTA_VALID)])
    onflash.set_boot_slot(f, f.parts, 1)
    onflash.select_boot(f, f.parts)
    onflash.mark_app_valid(f, f.parts)
    n_ops = len(f.ops)
    onflash.mark_app_valid(f, f.parts)  # already VALID: no flash write
    assert len(f.ops) == n_ops
    for _ in range(3):
        assert onflash.select_boot(f, f.parts)["part"].label == "ota_1"
    assert f.entries()[1] == (2, onflash.OTA_VALID)


def test_both_entries_aborted_boots_ota_0_without_rewriting(image_a, image_b):
    f = flash_with(image_a, image_b, [(0, 1, onflash.OTA_ABORTED), (1, 2, onflash.OTA_ABORTED)])
    sel = onflash.select_boot(f, f.parts)
    assert sel["part"].label == "ota_0" and sel["writes"] == []


def test_bad_crc_on_both_entries_tries_every_slot(image_b):
    f = flash_with(None, image_b, [(0, 1, onflash.OTA_VALID, 0), (1, 2, onflash.OTA_VALID, 0)])  # ota_0 empty
    sel = onflash.select_boot(f, f.parts)
    assert sel["part"].label == "ota_1"
    assert "invalid magic" in sel["images"]["ota_0"]["error"]


def test_corrupted_image_in_selected_slot_falls_back(image_a, image_b):
    bad = bytearray(image_b)
    bad[5000] ^= 0x01
    f = flash_with(image_a, bytes(bad), [(0, 1, onflash.OTA_VALID), (1, 2, onflash.OTA_VALID)])
    sel = onflash.select_boot(f, f.parts)
    assert sel["part"].label == "ota_0"
    assert "checksum" in sel["images"]["ota_1"]["error"] or "hash" in sel["images"]["ota_1"]["error"]


def test_mark_valid_without_otadata_entry_is_esp_fail():
    f = BytesFlash()
    with pytest.raises(OSError) as e:
        onflash.mark_app_valid(f, f.parts)
    assert e.value.args == (1, "ESP_FAIL")


@pytest.mark.parametrize("offset", [0, 1, 12, 23, 24, 40, 0x200, 30000, -40, -33, -1])
def test_verify_image_agrees_with_esptool(image_a, offset):
    """Flip one bit anywhere: our verdict must equal esptool's loader + checksum/digest check."""
    data = bytearray(image_a)
    data[offset] ^= 0x04
    ours = onflash.verify_image(MemFlash(bytes(data)), 0, 0x180000)["ok"]
    try:
        im = LoadFirmwareImage("esp32", bytes(data))
        theirs = im.checksum == im.calculate_checksum() and im.stored_digest == im.calc_digest
        theirs = theirs and im.chip_id == 0
    except Exception:  # noqa: BLE001 - esptool refuses to parse it at all
        theirs = False
    assert ours == theirs
    assert onflash.verify_image(MemFlash(image_a), 0, 0x180000)["ok"]


def test_verify_image_refuses_image_larger_than_slot(image_a):
    res = onflash.verify_image(MemFlash(image_a), 0, 64 * 1024)
    assert not res["ok"] and "partition" in res["error"]


def test_app_descriptor_read_like_esp_ota_get_partition_description(image_a):
    desc = onflash.read_app_desc(MemFlash(image_a), 0)
    assert desc["version"] == "1.0.0" and desc["project_name"] == "micropython"
    assert onflash.verify_image(MemFlash(image_a), 0, 0x180000)["sha256"] == image_a[-32:].hex()
    assert hashlib.sha256(image_a[:-32]).digest() == image_a[-32:]
    assert struct.unpack_from("<I", image_a, 0x20)[0] == onflash.APP_DESC_MAGIC


# ---- where an image's segments may load: verify_load_addresses (ESP-IDF v5.4, bootloader only) ----

ESP_IDF_BOOTLOADER = [(0x3FFF0030, 0x1BDC), (0x40078000, 0x3D20), (0x40080400, 0x4), (0x40080404, 0xF2C)]
"""The segments of ESP-IDF v5.2's own ESP32 bootloader image (esptool's test image
bootloader_esp32_v5_2.bin): .dram0 on dram_seg, .iram_loader.text on iram_loader_seg, .iram.text."""


@pytest.mark.parametrize("segments,refusal", [
    (ESP_IDF_BOOTLOADER, "Segment 0 0x3fff0030-0x3fff1c0c invalid: overlaps bootloader data"),
    (ESP_IDF_BOOTLOADER[1:], "Segment 0 0x40078000-0x4007bd20 invalid: bad load address range"),  # below SOC_IRAM_LOW
    ([(0x3FFE0000, 0x100)], "Segment 0 0x3ffe0000-0x3ffe0100 invalid: overlaps bootloader stack"),
    ([(0x3FFDBF00, 0x20)], None),  # ends where the stack's headroom begins
    ([(0x3FFDBF00, 0x24)], "overlaps bootloader stack"),
    # IRAM whose DRAM alias (inverted on the ESP32) lands on the bootloader's data
    ([(0x40080000, 0x400), (0x400A9F00, 0x100)], "Segment 1 0x400a9f00-0x400aa000 invalid: overlaps bootloader data"),
    ([(0x400A8000, 0x100)], None),
    ([(0x400C2000, 0x100)], "bad load address range"),  # not a flash window, not RAM
    ([(0x400D0020, 0x8000), (0x3F400020, 0x800), (0, 0x1000)], None),  # mapped, or padding: not loaded
    ([(0x50000000, 0x100), (0x400C0000, 0x100), (0x3FF80000, 0x100)], None),  # RTC memory
    ([(0x3FFB0000, 0x200), (0x40080000, 0x400)], None),  # where an app's .dram0.data and .iram0 go
])
def test_the_bootloader_loads_only_segments_clear_of_its_own_memory(segments, refusal):
    got = onflash.check_load(segments)
    assert got == refusal if refusal is None or refusal.startswith("Segment") else refusal in got


def test_a_combined_firmware_bin_in_a_slot_passes_set_boot_but_the_bootloader_refuses_it(image_a):
    """What a chip does with MicroPython's firmware.bin written into ota_0: esp_image_verify
    (set_boot's check) finds the bootloader image at its start and accepts it; the bootloader,
    loading it, finds its first segment on its own data and falls back to the other slot."""
    combined = build_combined_image(image_a)
    f = flash_with(ota_0=combined[:0x180000], ota_1=image_a, entries=[(0, 1, onflash.OTA_VALID)])
    assert onflash.verify_image(f, 0x10000, 0x180000)["ok"]
    sel = onflash.select_boot(f, f.parts, commit=False)
    assert sel["part"].label == "ota_1"
    assert "ota_0 is not bootable: Segment 0 0x3fff0000-0x3fff0404 invalid: overlaps bootloader data" in sel["log"]
