"""ESP32 app images: build test images with esptool, and check images before release.

A release must be a bare app image (MicroPython's `micropython.bin` / `*.app-bin`), never the
combined `firmware.bin` that starts with the bootloader. The check uses esptool's loader for the
structure and compares checksum and digest itself (the loader does not), then runs the same
`esp_image_verify` model the emulated chip uses for `set_boot`, so a released image is one the
device will accept.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from esptool.bin_image import ELFSection, ESP32FirmwareImage, LoadFirmwareImage
from esptool.targets import ESP32ROM
from esptool.util import FatalError

from tools.espidf import onflash

SLOT_SIZE = onflash.SLOT_SIZE


_DROM = 0x3F400020
_IROM = 0x400D0020
_IRAM = 0x40080000
_DRAM = 0x3FFB0000


class ImageError(ValueError):
    """An image that must not be released or written to a slot; `code` is machine-readable."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ImageReport:
    size: int
    sha256: str
    segments: int
    project_name: str
    version: str


class MemFlash:
    """Read-only flash view of an image held in memory (for onflash.verify_image)."""

    def __init__(self, data: bytes):
        self.data = data

    def read(self, addr: int, n: int) -> bytes:
        return self.data[addr : addr + n].ljust(n, b"\xff")

    def readinto(self, addr: int, buf) -> None:
        buf[:] = self.read(addr, len(buf))


def _filler(seed: bytes, n: int) -> bytes:
    out = bytearray()
    block = hashlib.sha256(seed).digest()
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block * 64
    return bytes(out[:n])


def app_descriptor(version: str, project_name: str, secure_version: int = 0) -> bytes:
    """esp_app_desc_t (256 bytes)."""
    desc = struct.pack(
        "<II8s32s32s16s16s32s32sHHB3s72s",
        onflash.APP_DESC_MAGIC,
        secure_version,
        b"",
        version.encode()[:31],
        project_name.encode()[:31],
        b"00:00:00",
        b"Jan  1 2026",
        b"v5.5.2",
        hashlib.sha256(version.encode()).digest(),
        0,
        0,
        16,  # mmu_page_size: log2(64 KiB)
        b"",
        b"",
    )
    assert len(desc) == 256
    return desc


def build_app_image(version: str, size: int = 64 * 1024, project_name: str = "micropython") -> bytes:
    """A valid ESP32 app image of about `size` bytes (rounded up to 16) for `version`.

    Real header, descriptor at 0x20, DROM/IROM/IRAM/DRAM segments, checksum and SHA-256, so
    `esptool image-info` and the bootloader model accept it. Contents are derived from the
    version, so two versions never share bytes by accident.
    """
    seed = f"{project_name}:{version}".encode()
    rodata = app_descriptor(version, project_name) + _filler(seed + b":drom", 2048)
    iram = _filler(seed + b":iram", 1024)
    dram = _filler(seed + b":dram", 512)
    # IROM is the last segment (esptool sorts by address and pads it to a 64 KiB boundary),
    # so growing it grows the file linearly: converge on the wanted length.
    code_len = 4096
    for _ in range(4):
        img = ESP32FirmwareImage()
        img.entrypoint = _IRAM + 0x400
        img.flash_mode = 2  # DIO
        img.flash_size_freq = ESP32ROM.FLASH_SIZES["4MB"] | ESP32ROM.FLASH_FREQUENCY["40m"]
        img.min_rev_full = 0
        img.max_rev_full = 399
        img.segments = [
            ELFSection(b".flash.appdesc", _DROM, rodata, 0),
            ELFSection(b".flash.text", _IROM, _filler(seed + b":irom", code_len), 0),
            ELFSection(b".iram0.text", _IRAM, iram, 0),
            ELFSection(b".dram0.data", _DRAM, dram, 0),
        ]
        data = img.save(None)
        short = size - len(data)
        if short <= 0:
            break
        code_len += (short + 3) & ~3
    return data


def build_bootloader_image(seed: str = "bootloader") -> bytes:
    """A second-stage-bootloader-shaped image (RAM segments only, no app descriptor) for
    test flashes: what sits at 0x1000 on a real board. Not executable code."""
    img = ESP32FirmwareImage()
    img.entrypoint = 0x40080400
    img.flash_mode = 2
    img.flash_size_freq = ESP32ROM.FLASH_SIZES["4MB"] | ESP32ROM.FLASH_FREQUENCY["40m"]
    img.min_rev_full = 0
    img.max_rev_full = 399
    s = seed.encode()
    img.segments = [
        ELFSection(b".dram0.bootdesc", 0x3FFF0000, struct.pack("<BBHI", 0x50, 1, 0, 0) + _filler(s + b":d", 1020), 0),
        ELFSection(b".iram_loader.text", 0x40078000, _filler(s + b":l", 8192), 0),
        ELFSection(b".iram.text", 0x40080400, _filler(s + b":i", 4096), 0),
    ]
    return img.save(None)


COMBINED_OFFSET = 0x1000  # where firmware.bin is written: the bootloader's flash address


def build_combined_image(app: bytes, table_rows=onflash.MICROPYTHON_OTA_4MIB) -> bytes:
    """firmware.bin as MicroPython's makeimg.py writes it (flashed at 0x1000): bootloader,
    the OTA partition table at flash 0x8000, the app at flash 0x10000, 0xFF in the gaps."""
    boot = build_bootloader_image()
    table = onflash.make_partition_table(table_rows)
    out = bytearray(b"\xff" * (0x10000 - COMBINED_OFFSET))
    out[: len(boot)] = boot
    pt = onflash.PARTITION_TABLE_OFFSET - COMBINED_OFFSET
    out[pt : pt + len(table)] = table
    return bytes(out) + app


def check_app_image(data: bytes, slot_size: int = SLOT_SIZE) -> ImageReport:
    """Accept only an ESP32 app image that the bootloader would boot from a slot.

    Raises ImageError with codes: combined_image, not_app_image, wrong_chip, corrupt,
    bad_checksum, bad_digest, too_big, bad_load_address.
    """
    if len(data) < 0x120:
        raise ImageError("not_app_image", "file is too short to be an ESP32 app image")
    if len(data) > 0x7002 and data[0x7000:0x7002] == b"\xaa\x50":
        raise ImageError(
            "combined_image",
            "this is a combined firmware.bin (bootloader + partition table + app) for serial "
            "flashing at 0x1000; release the bare app image (micropython.bin / *.app-bin)",
        )
    is_image, chip_id, is_app = onflash.image_kind(data[: onflash.APP_DESC_OFFSET + 4])
    if not is_image:
        raise ImageError("not_app_image", f"bad magic byte 0x{data[0]:02x}, expected 0xe9")
    if chip_id != onflash.CHIP_ID_ESP32:
        raise ImageError("wrong_chip", f"image is for chip id {chip_id}, not ESP32 (0)")
    if not is_app:
        raise ImageError("not_app_image", "no app descriptor at offset 0x20 (bootloader image?)")
    if len(data) > slot_size:
        raise ImageError("too_big", f"image is {len(data)} bytes, the OTA slot holds {slot_size}")
    try:
        im = LoadFirmwareImage("esp32", data)
    except FatalError as e:
        raise ImageError("corrupt", f"esptool cannot parse the image: {e}") from e
    if im.checksum != im.calculate_checksum():
        raise ImageError("bad_checksum", "image checksum does not match its segments")
    if not im.append_digest or im.stored_digest != im.calc_digest:
        raise ImageError("bad_digest", "appended SHA-256 is missing or does not match")
    res = onflash.verify_image(MemFlash(data), 0, slot_size)
    if not res["ok"]:
        raise ImageError("corrupt", f"bootloader would refuse it: {res['error']}")
    refusal = onflash.check_load(res["segments"])
    if refusal is not None:
        raise ImageError("bad_load_address", f"the bootloader would not load it: {refusal}")
    desc = res["desc"] or {}
    return ImageReport(
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        segments=len(im.segments),
        project_name=desc.get("project_name", ""),
        version=desc.get("version", ""),
    )
