"""flash-info: what an ESP32 flash image holds and what its bootloader would do next.

Runs the same model the emulated bootloader runs (target/espidf.py), without writing.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

from tools.espidf import onflash


class ReadOnlyFlash:
    def __init__(self, data: bytes):
        self.data = data

    def read(self, addr: int, n: int) -> bytes:
        return self.data[addr : addr + n]

    def readinto(self, addr: int, buf) -> None:
        buf[:] = self.data[addr : addr + len(buf)]

    def erase(self, addr: int, n: int) -> None:
        raise PermissionError("flash-info never writes")

    write = erase


def flash_info(path: Path, chip_rev: int = 301) -> dict:
    data = Path(path).read_bytes()
    least = onflash.PARTITION_TABLE_OFFSET + onflash.PARTITION_TABLE_MAX_LEN
    if len(data) < least:
        raise ValueError(f"{path}: {len(data)} bytes is no ESP32 flash image (its partition table alone "
                         f"ends at 0x{least:x}); an app image is checked with `image-check`")
    flash = ReadOnlyFlash(data)
    out: dict = {"file": str(path), "size": len(data)}
    try:
        parts = onflash.read_partition_table(flash, len(data))
    except ValueError as e:
        out["partition_table"] = {"error": str(e)}
        return out
    out["partition_table"] = [p.as_dict() for p in parts]
    otadata = onflash.find_part(parts, onflash.TYPE_DATA, onflash.SUBTYPE_DATA_OTA)
    if otadata is not None:
        entries = onflash.read_otadata(flash, otadata)
        active = onflash.active_otadata(entries)
        out["otadata"] = {"entries": [e.as_dict() for e in entries], "active": None if active < 0 else active}
    sel = onflash.select_boot(flash, parts, chip_rev, commit=False)
    out["next_boot"] = {
        "slot": sel["part"].label if sel["part"] else None,
        "why": sel["log"],
        "otadata_writes": sel["writes"],
    }
    apps = {}
    for p in parts:
        if p.type != onflash.TYPE_APP:
            continue
        res = onflash.verify_image(flash, p.offset, p.size, chip_rev)
        if res["ok"]:  # what the bootloader checks as it loads the image
            res["error"] = onflash.check_load(res["segments"])
            res["ok"] = res["error"] is None
        apps[p.label] = {
            "valid": res["ok"],
            "error": res["error"],
            "length": res["length"],
            # The image file's SHA-256: what releases are named by and devices report.
            "image_sha256": hashlib.sha256(data[p.offset : p.offset + res["length"]]).hexdigest()
            if res["ok"] else None,
            "chip": res.get("chip"),
            "app_desc": res["desc"],
        }
    out["app_slots"] = apps  # factory, ota_N and test apps alike
    wear_path = Path(str(path) + ".wear")
    if wear_path.exists():
        wear = wear_path.read_bytes()
        out["wear"] = {}
        for p in parts:
            counts = [struct.unpack_from("<II", wear, 8 * s) for s in range(p.offset // 4096, (p.offset + p.size) // 4096)]
            out["wear"][p.label] = {
                "erases": sum(c[0] for c in counts),
                "programs": sum(c[1] for c in counts),
                "max_sector_erases": max((c[0] for c in counts), default=0),
            }
    return out
