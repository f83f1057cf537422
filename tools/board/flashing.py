"""Put MicroPython on a board with esptool: check the file first, then erase and write.

The file must be the combined `firmware.bin` of the ESP32_GENERIC OTA variant (bootloader +
partition table + app, written at 0x1000), never the bare app image meant for OTA, and the
board must be an ESP32 whose flash holds every partition of that table.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tools.espidf import onflash
from tools.espidf.images import COMBINED_OFFSET


class FlashError(Exception):
    """Refused or failed; `code` is machine-readable."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class CombinedImage:
    size: int
    partitions: list
    flash_needed: int  # bytes of flash the partition table covers


def check_combined_image(data: bytes) -> CombinedImage:
    """Accept only a combined ESP32 image with an OTA partition table. Raises FlashError."""
    pt = onflash.PARTITION_TABLE_OFFSET - COMBINED_OFFSET
    app = 0x10000 - COMBINED_OFFSET
    head = onflash.APP_DESC_OFFSET + 4
    is_image, chip_id, is_app = onflash.image_kind(data[:head])
    if len(data) < app + 0x120 or not is_image:
        raise FlashError("not_combined", "not a combined firmware.bin (no bootloader image at the start)")
    if is_app:
        raise FlashError("app_image", "this is an app image (micropython.bin / *.app-bin), the file to "
                                      "release for OTA; flash the combined firmware.bin instead")
    if chip_id != onflash.CHIP_ID_ESP32:
        raise FlashError("wrong_chip", f"bootloader is for chip id {chip_id}, not ESP32 (0)")
    try:
        parts = onflash.parse_partition_table(data[pt : pt + onflash.PARTITION_TABLE_MAX_LEN])
    except ValueError as e:
        raise FlashError("no_partition_table", f"no valid partition table at 0x8000: {e}") from None
    slots = onflash.ota_slots(parts)
    if len(slots) < 2 or onflash.find_part(parts, onflash.TYPE_DATA, onflash.SUBTYPE_DATA_OTA) is None:
        raise FlashError("not_ota_variant", "partition table has no OTA slots: flash the ESP32_GENERIC "
                                            "OTA variant (firmware built with BOARD_VARIANT=OTA)")
    app_is_image, _, app_is_app = onflash.image_kind(data[app : app + head])
    if not (app_is_image and app_is_app):
        raise FlashError("no_app", "no app image at 0x10000")
    return CombinedImage(len(data), parts, max(p.offset + p.size for p in parts))


def _esptool(port: str, *args: str, baud: int = 460800, stub: bool = True) -> str:
    cmd = [sys.executable, "-m", "esptool", "--chip", "esp32", "--port", port, "--baud", str(baud)]
    cmd += ([] if stub else ["--no-stub"]) + list(args)
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        raise FlashError("esptool", f"esptool {args[0]} did not finish in 15 minutes") from None
    if out.returncode != 0:
        raise FlashError("esptool", f"esptool {args[0]} failed: {_esptool_reason(out.stdout + out.stderr)}")
    return out.stdout


def _esptool_reason(output: str) -> str:
    """The line of esptool's output that says why it failed (its "fatal error" line)."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for ln in lines:
        if "fatal error" in ln.lower() or ln.startswith("ERROR"):
            return ln
    return lines[-1] if lines else "no output"


def flash_size(port: str, baud: int = 460800) -> int:
    """Bytes of flash the board reports (esptool flash-id)."""
    out = _esptool(port, "flash-id", baud=baud)
    m = re.search(r"Detected flash size:\s*(\d+)(MB|KB)", out)
    if not m:
        raise FlashError("flash_size", f"esptool did not report a flash size:\n{out[-1000:]}")
    return int(m.group(1)) * (1024 * 1024 if m.group(2) == "MB" else 1024)


def flash(port: str, firmware: Path, baud: int = 460800, erase: bool = True, verify_read: bool = False) -> CombinedImage:
    """Check `firmware`, check the board, erase (all of otadata and the filesystem go), write
    it at 0x1000. With verify_read, read it back and compare (esptool also checks MD5)."""
    data = Path(firmware).read_bytes()
    info = check_combined_image(data)
    size = flash_size(port, baud)
    if size < info.flash_needed:
        raise FlashError("flash_too_small", f"the board has {size // 1024} KiB of flash; this "
                                            f"partition table needs {info.flash_needed // 1024} KiB")
    if erase:
        _esptool(port, "erase-flash", baud=baud)
    _esptool(port, "write-flash", hex(COMBINED_OFFSET), str(firmware), baud=baud)
    if verify_read:
        # Independent of esptool's own MD5 check: read it back through the ROM loader.
        back = Path(str(firmware) + ".readback")
        _esptool(port, "read-flash", hex(COMBINED_OFFSET), str(len(data)), str(back), baud=baud, stub=False)
        if back.read_bytes() != data:
            raise FlashError("readback", "what the board holds differs from the file")
        back.unlink()
    return info
