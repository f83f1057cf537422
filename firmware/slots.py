# slots.py The flash seam: the only firmware module that touches esp32.Partition.
#
# MicroPython has no API for the OTA state of the running image, so pending_verify() reads
# otadata itself (ESP-IDF esp_ota_select_entry_t: seq u32, label[20], state u32, crc u32;
# one copy at the start of each of the two sectors; the valid one with the larger seq wins).

import struct

import esp32

_SECTOR = 4096
_PENDING_VERIFY = 1
_INVALID = 3
_ABORTED = 4


def running():
    return esp32.Partition(esp32.Partition.RUNNING)


def label(part):
    return part.info()[4]


def next_update():
    """The inactive OTA slot the bootloader would switch to."""
    return running().get_next_update()


def slot_size(part):
    return part.info()[3]


def _crc_ok(seq, crc):
    import binascii

    return binascii.crc32(struct.pack("<I", seq), 0xFFFFFFFF) & 0xFFFFFFFF == crc


def pending_verify():
    """True when this boot is a trial of a new image that must still confirm itself."""
    try:
        od = esp32.Partition("otadata")
    except OSError:
        return False
    raw = bytearray(32)
    best = None
    for i in (0, 1):
        od.readblocks(i, raw)
        seq, _, state, crc = struct.unpack("<I20sII", raw)
        if seq == 0xFFFFFFFF or state in (_INVALID, _ABORTED) or not _crc_ok(seq, crc):
            continue
        if best is None or seq > best[0]:
            best = (seq, state)
    return best is not None and best[1] == _PENDING_VERIFY


def confirm():
    """Cancel rollback for the running image (no-op when it is already VALID)."""
    esp32.Partition.mark_app_valid_cancel_rollback()


def sha256_of(part, size, buf):
    """SHA-256 of the first `size` bytes of a slot, read through `buf` (4096 bytes)."""
    import hashlib

    h = hashlib.sha256()
    mv = memoryview(buf)
    blk = 0
    while size > 0:
        part.readblocks(blk, buf)
        n = min(size, len(buf))
        h.update(buf if n == len(buf) else mv[:n])
        size -= n
        blk += 1
    return h.digest()
