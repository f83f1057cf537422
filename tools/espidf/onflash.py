# espidf.py ESP-IDF on-flash formats: partition table, otadata, app image check, boot choice.
#
# Written in the CPython/MicroPython common subset. The emulated bootloader and `flash-info`
# (CPython) and the emulated `esp32.Partition` (MicroPython) run this one implementation, so
# what the emulator boots and what the host tools report cannot drift apart.
#
# Sources (ESP-IDF v5.5): bootloader_support/src/bootloader_utility.c (boot choice, fallback,
# first-boot otadata), bootloader_common_loader.c (otadata validity, tie -> entry 0),
# esp_image_format.c (esp_image_verify; verify_load_addresses, v5.4), app_update/esp_ota_ops.c
# (esp_rewrite_ota_data, esp_ota_current_ota_is_workable), esp_flash_partitions.h,
# esp_app_format.h, soc/esp32/include/soc/soc.h, bootloader/subproject/main/ld/esp32/bootloader.ld.
#
# `flash` arguments are objects with read(addr, n) -> bytes, erase(addr, n), write(addr, data)
# (see norflash.py); addresses are absolute flash offsets.

import binascii
import hashlib
import struct
import sys

SECTOR_SIZE = 4096
BOOTLOADER_OFFSET = 0x1000
PARTITION_TABLE_OFFSET = 0x8000
PARTITION_TABLE_MAX_LEN = 0xC00

TYPE_APP = 0x00
TYPE_DATA = 0x01
SUBTYPE_FACTORY = 0x00
SUBTYPE_OTA_0 = 0x10
SUBTYPE_TEST = 0x20
SUBTYPE_DATA_OTA = 0x00

_PT_MAGIC = 0x50AA
_PT_MAGIC_MD5 = 0xEBEB
_PT_ENTRY = "<HBBII16sI"  # magic, type, subtype, offset, size, label, flags

# MicroPython ports/esp32/partitions-4MiB-ota.csv (the ESP32_GENERIC OTA variant).
MICROPYTHON_OTA_4MIB = (
    ("nvs", TYPE_DATA, 0x02, 0x9000, 0x4000),
    ("otadata", TYPE_DATA, SUBTYPE_DATA_OTA, 0xD000, 0x2000),
    ("phy_init", TYPE_DATA, 0x01, 0xF000, 0x1000),
    ("ota_0", TYPE_APP, 0x10, 0x10000, 0x180000),
    ("ota_1", TYPE_APP, 0x11, 0x190000, 0x180000),
)
SLOT_SIZE = MICROPYTHON_OTA_4MIB[3][4]  # an OTA slot of that layout: 1.5 MiB

# esp_ota_img_states_t
OTA_NEW = 0
OTA_PENDING_VERIFY = 1
OTA_VALID = 2
OTA_INVALID = 3
OTA_ABORTED = 4
OTA_UNDEFINED = 0xFFFFFFFF
OTA_STATE_NAMES = {
    OTA_NEW: "NEW",
    OTA_PENDING_VERIFY: "PENDING_VERIFY",
    OTA_VALID: "VALID",
    OTA_INVALID: "INVALID",
    OTA_ABORTED: "ABORTED",
    OTA_UNDEFINED: "UNDEFINED",
}
_OTA_ENTRY = "<I20sII"  # ota_seq, seq_label[20], ota_state, crc
_BLANK32 = 0xFFFFFFFF

IMAGE_MAGIC = 0xE9
APP_DESC_MAGIC = 0xABCD5432
APP_DESC_OFFSET = 0x20  # sizeof(esp_image_header_t) + sizeof(esp_image_segment_header_t)
CHIP_ID_ESP32 = 0
_MAX_SEGMENTS = 16
_SIXTEEN_MB = 0x1000000
_MMU_PAGE = 0x10000
_CHECKSUM_SEED = 0xEF
# Image check reads: small on the device side, where they come out of the board's GC heap;
# large in the host's bootloader model, which runs on every emulated boot.
_CHUNK = 512 if sys.implementation.name == "micropython" else 0x10000
_xor32 = None
if sys.implementation.name == "micropython":
    try:
        from _native import xor32 as _xor32  # the checksum without big ints (see _native.py)
    except ImportError:
        pass
# ESP32 memory map (components/soc/esp32/include/soc/soc.h, v5.x). Flash-mapped windows,
# DROM and IROM, as esp_image_format.c should_map tests them:
_MAPPED = ((0x3F400000, 0x3F800000), (0x400D0000, 0x40400000))
_DRAM = (0x3FFAE000, 0x40000000)  # SOC_DRAM_LOW/HIGH
_IRAM = (0x40080000, 0x400AA000)  # SOC_IRAM_LOW/HIGH (dual core; 0x400A0000 before v5.1)
_DIRAM_DRAM = (0x3FFE0000, 0x40000000)  # the same memory seen as data ...
_DIRAM_IRAM = (0x400A0000, 0x400C0000)  # ... and as code, word order inverted (SOC_DIRAM_INVERTED)
_RTC = ((0x400C0000, 0x400C2000), (0x3FF80000, 0x3FF82000), (0x50000000, 0x50002000))  # IRAM/DRAM fast, slow
_ROM_STACK_START = 0x3FFE3F20  # SOC_ROM_STACK_START: the bootloader runs on the ROM's stack
_STACK_LOAD_HEADROOM = 32768  # esp_image_format.c
# The running bootloader's own memory, _dram_start.._dram_end and _loader_text_start..end:
# bootloader.ld's dram_seg and iram_loader_seg, which they lie in. A segment between the real
# _dram_end and dram_seg's end is refused all the same, as "bad load address range": its IRAM
# alias lies above SOC_IRAM_HIGH.
_BOOT_DRAM = (0x3FFF0000, 0x3FFF6000)
_BOOT_LOADER_TEXT = (0x40078000, 0x40080000)


class Part:
    """One partition table entry."""

    def __init__(self, label, ptype, subtype, offset, size, flags=0):
        self.label = label
        self.type = ptype
        self.subtype = subtype
        self.offset = offset
        self.size = size
        self.flags = flags

    def is_ota_app(self):
        return self.type == TYPE_APP and SUBTYPE_OTA_0 <= self.subtype < SUBTYPE_OTA_0 + 16

    def as_dict(self):
        return {
            "label": self.label,
            "type": self.type,
            "subtype": self.subtype,
            "offset": self.offset,
            "size": self.size,
            "flags": self.flags,
        }


# ---- partition table (gen_esp32part.py output; esp_partition_table_verify) ----


def make_partition_table(rows=MICROPYTHON_OTA_4MIB):
    """Binary partition table: entries, MD5 entry, 0xFF fill to 0xC00 bytes."""
    body = b""
    for label, ptype, subtype, offset, size in rows:
        body += struct.pack(_PT_ENTRY, _PT_MAGIC, ptype, subtype, offset, size, label.encode(), 0)
    md5 = hashlib.md5(body).digest()
    body += b"\xeb\xeb" + b"\xff" * 14 + md5
    return body + b"\xff" * (PARTITION_TABLE_MAX_LEN - len(body))


def parse_partition_table(raw, flash_size=None):
    """Parse and verify a partition table the way the bootloader does.

    Raises ValueError naming the defect (bad magic, MD5 mismatch, no terminator, out of flash).
    """
    parts = []
    md5_seen = False
    n = 0
    while n * 32 < PARTITION_TABLE_MAX_LEN:
        entry = raw[n * 32 : n * 32 + 32]
        magic = entry[0] | entry[1] << 8
        if magic == _PT_MAGIC:
            _, ptype, subtype, offset, size, label, flags = struct.unpack(_PT_ENTRY, entry)
            if flash_size is not None and offset + size > flash_size:
                raise ValueError("partition %d lies outside the flash" % n)
            label = label.split(b"\0")[0].decode()
            parts.append(Part(label, ptype, subtype, offset, size, flags))
        elif magic == _PT_MAGIC_MD5:
            if md5_seen:
                raise ValueError("only one MD5 checksum is allowed")
            md5_seen = True
            if hashlib.md5(raw[: n * 32]).digest() != bytes(entry[16:32]):
                raise ValueError("incorrect MD5 checksum")
        elif entry == b"\xff" * 32:
            if not parts:
                raise ValueError("partition table is empty")
            return parts
        else:
            raise ValueError("partition %d has invalid magic 0x%04x" % (n, magic))
        n += 1
    raise ValueError("partition table has no terminating entry")


def read_partition_table(flash, flash_size=None):
    return parse_partition_table(
        flash.read(PARTITION_TABLE_OFFSET, PARTITION_TABLE_MAX_LEN), flash_size
    )


def find_part(parts, ptype, subtype=None, label=None):
    for p in parts:
        if p.type == ptype and (subtype is None or p.subtype == subtype):
            if label is None or p.label == label:
                return p
    return None


def ota_slots(parts):
    """OTA app partitions ordered by slot number (ota_0, ota_1, ...), as IDF counts them."""
    slots = []
    for i in range(16):
        p = find_part(parts, TYPE_APP, SUBTYPE_OTA_0 + i)
        if p is None:
            break
        slots.append(p)
    return slots


# ---- otadata: esp_ota_select_entry_t, two copies, one per sector ----


def ota_crc(seq):
    # esp_rom_crc32_le(UINT32_MAX, &ota_seq, 4): the CRC covers the sequence number only.
    return binascii.crc32(struct.pack("<I", seq), 0xFFFFFFFF) & 0xFFFFFFFF


def pack_ota_entry(seq, state, label=b"\xff" * 20, crc=None):
    return struct.pack(_OTA_ENTRY, seq, label, state, ota_crc(seq) if crc is None else crc)


class OtaEntry:
    def __init__(self, raw):
        self.seq, self.label, self.state, self.crc = struct.unpack(_OTA_ENTRY, raw[:32])

    def crc_ok(self):
        return self.crc == ota_crc(self.seq)

    def invalid(self):
        # bootloader_common_ota_select_invalid: note that a bad CRC alone is not "invalid"
        return self.seq == _BLANK32 or self.state in (OTA_INVALID, OTA_ABORTED)

    def valid(self):
        return not self.invalid() and self.crc_ok()

    def blank_or_bad_crc(self):
        return self.seq == _BLANK32 or not self.crc_ok()

    def pack(self):
        return struct.pack(_OTA_ENTRY, self.seq, self.label, self.state, self.crc)

    def as_dict(self):
        return {
            "seq": self.seq,
            "state": OTA_STATE_NAMES.get(self.state, "0x%08x" % self.state),
            "crc_ok": self.crc_ok(),
            "valid": self.valid(),
        }


def read_otadata(flash, otadata):
    return [OtaEntry(flash.read(otadata.offset + i * SECTOR_SIZE, 32)) for i in (0, 1)]


def write_otadata(flash, otadata, index, entry):
    # IDF writes an entry as: erase its 4 KiB sector, write 32 bytes.
    addr = otadata.offset + index * SECTOR_SIZE
    flash.erase(addr, SECTOR_SIZE)
    flash.write(addr, entry.pack())


def active_otadata(entries):
    """bootloader_common_get_active_otadata: valid entry with the larger seq, tie -> 0."""
    v0, v1 = entries[0].valid(), entries[1].valid()
    if v0 and v1:
        return 0 if entries[0].seq >= entries[1].seq else 1
    if v0:
        return 0
    if v1:
        return 1
    return -1


def set_boot_slot(flash, parts, slot_index, rollback=True):
    """esp_rewrite_ota_data: make `slot_index` the boot slot (state NEW with rollback)."""
    otadata = find_part(parts, TYPE_DATA, SUBTYPE_DATA_OTA)
    if otadata is None:
        raise OSError(-261, "ESP_ERR_NOT_FOUND")
    n = len(ota_slots(parts))
    if slot_index >= n:
        raise OSError(-258, "ESP_ERR_INVALID_ARG")
    entries = read_otadata(flash, otadata)
    active = active_otadata(entries)
    state = OTA_NEW if rollback else OTA_UNDEFINED
    if active != -1:
        seq = entries[active].seq
        i = 0
        while seq > (slot_index + 1) % n + i * n:
            i += 1
        target, new_seq = (~active) & 1, (slot_index + 1) % n + i * n
    else:
        target, new_seq = 0, slot_index + 1
    entry = entries[target]
    entry.seq, entry.state, entry.crc = new_seq, state, ota_crc(new_seq)
    write_otadata(flash, otadata, target, entry)
    return target


def mark_app_valid(flash, parts):
    """esp_ota_current_ota_is_workable(true); OSError as MicroPython raises it."""
    otadata = find_part(parts, TYPE_DATA, SUBTYPE_DATA_OTA)
    if otadata is None:
        raise OSError(-261, "ESP_ERR_NOT_FOUND")
    entries = read_otadata(flash, otadata)
    active = active_otadata(entries)
    if active == -1 or not ota_slots(parts):
        raise OSError(1, "ESP_FAIL")  # "Running firmware is factory"
    if entries[active].state != OTA_VALID:
        entries[active].state = OTA_VALID
        write_otadata(flash, otadata, active, entries[active])


def boot_partition(flash, parts):
    """esp_ota_get_boot_partition: the slot otadata selects (no image check)."""
    otadata = find_part(parts, TYPE_DATA, SUBTYPE_DATA_OTA)
    if otadata is None:
        return None
    slots = ota_slots(parts)
    entries = read_otadata(flash, otadata)
    active = active_otadata(entries)
    if (entries[0].invalid() and entries[1].invalid()) or not slots or active == -1:
        return find_part(parts, TYPE_APP, SUBTYPE_FACTORY) or (slots[0] if slots else None)
    return slots[(entries[active].seq - 1) % len(slots)]


# ---- app image: esp_image_verify(ESP_IMAGE_VERIFY) ----


def _xor_fold(acc, nbytes):
    # XOR of all bytes of a little-endian big int, by halving: log2(n) big-int operations.
    bits = nbytes * 8
    while bits > 8:
        bits //= 2
        acc = (acc >> bits) ^ (acc & ((1 << bits) - 1))
    return acc


def verify_image(flash, offset, part_size, chip_rev=301):
    """Check an app image in flash as esp_image_verify does.

    Returns a dict: ok (bool), error (str or None), length (bytes, when known), segments,
    sha256 (hex of the appended digest), desc (app descriptor fields, or None) and chip (the
    header's chip id and min/max chip revision, v3.1 as 301; once the magic byte is right).
    """
    res = {"ok": False, "error": None, "length": None, "segments": [], "sha256": None, "desc": None}
    if part_size > _SIXTEEN_MB:
        res["error"] = "partition larger than 16 MB"
        return res
    hdr = flash.read(offset, 24)
    if hdr[0] != IMAGE_MAGIC:
        res["error"] = "image at 0x%x has invalid magic byte 0x%02x" % (offset, hdr[0])
        return res
    nseg = hdr[1]
    chip_id, min_rev_legacy, min_rev, max_rev = struct.unpack("<HBHH", hdr[12:19])
    res["chip"] = {"chip_id": chip_id, "min_chip_rev": min_rev, "max_chip_rev": max_rev}
    hash_appended = hdr[23]
    if chip_id != CHIP_ID_ESP32:
        res["error"] = "mismatch chip ID, expected %d, found %d" % (CHIP_ID_ESP32, chip_id)
        return res
    if chip_rev < min_rev:
        res["error"] = "image needs chip revision >= v%d.%d" % (min_rev // 100, min_rev % 100)
        return res
    if max_rev not in (0, 0xFFFF) and chip_rev > max_rev:
        res["error"] = "image needs chip revision <= v%d.%d" % (max_rev // 100, max_rev % 100)
        return res
    if nseg > _MAX_SEGMENTS:
        res["error"] = "too many segments (%d)" % nseg
        return res
    # One pass, as the bootloader reads the image: the checksum covers the segments' data,
    # the SHA-256 everything from the header to the checksum byte.
    h = hashlib.sha256() if hash_appended else None
    if h is not None:
        h.update(hdr)
    pos = offset + 24
    end = offset + part_size
    acc = 0
    mv = memoryview(bytearray(_CHUNK))
    for i in range(nseg):
        if pos + 8 > end:
            res["error"] = "image runs past the partition end"
            return res
        seg_hdr = flash.read(pos, 8)
        if h is not None:
            h.update(seg_hdr)
        load_addr, data_len = struct.unpack("<II", seg_hdr)
        data_off = pos + 8
        res["segments"].append((load_addr, data_len))
        if data_len & 3 or data_len >= _SIXTEEN_MB:
            res["error"] = "invalid segment length 0x%x" % data_len
            return res
        for lo, hi in _MAPPED:
            if lo <= load_addr < hi and (data_off - offset) % _MMU_PAGE != load_addr % _MMU_PAGE:
                res["error"] = "segment %d load address 0x%08x does not match data 0x%08x" % (
                    i,
                    load_addr,
                    data_off - offset,
                )
                return res
        if data_off + data_len > end:
            res["error"] = "image runs past the partition end"
            return res
        done = 0
        while done < data_len:
            n = min(_CHUNK, data_len - done)
            piece = mv if n == _CHUNK else mv[:n]
            flash.readinto(data_off + done, piece)
            if _xor32 is not None:
                acc ^= _xor32(piece, n)
            else:
                acc ^= int.from_bytes(piece, "little")
            if h is not None:
                h.update(piece)
            done += n
        pos = data_off + data_len
    # Checksum byte ends a 16-byte-aligned block; the SHA-256 (if any) follows it.
    length = ((pos - offset) + 1 + 15) & ~15
    if offset + length + (32 if hash_appended else 0) > end:
        res["error"] = "image length %d does not fit in partition length %d" % (length, part_size)
        return res
    checksum = _xor_fold(acc, 4 if _xor32 is not None else _CHUNK) ^ _CHECKSUM_SEED
    padding = flash.read(pos, offset + length - pos)  # up to the 16-byte boundary: the checksum ends it
    stored = padding[-1]
    if stored != checksum:
        res["error"] = "checksum failed, calculated 0x%02x read 0x%02x" % (checksum, stored)
        return res
    if h is not None:  # IDF tests hash_appended for truth, not == 1
        h.update(padding)
        stored_hash = flash.read(offset + length, 32)
        res["sha256"] = binascii.hexlify(stored_hash).decode()
        if h.digest() != stored_hash:
            res["error"] = "image hash failed: calculated and stored SHA-256 differ"
            return res
        length += 32
    res["length"] = length
    res["desc"] = read_app_desc(flash, offset)
    res["ok"] = True
    return res


def image_kind(head):
    """What an image's first 0x24 bytes say: (an ESP image at all, the chip id it is for, an
    app: it carries the app descriptor at 0x20, which a bootloader image has not). The host's
    one reading of an image's head; the device reads the same three things itself
    (firmware/installer.py check_app_header), in RAM it cannot spare for this module."""
    if len(head) < APP_DESC_OFFSET + 4 or head[0] != IMAGE_MAGIC:
        return False, None, False
    chip_id, desc = struct.unpack_from("<H", head, 12)[0], struct.unpack_from("<I", head, APP_DESC_OFFSET)[0]
    return True, chip_id, desc == APP_DESC_MAGIC


def read_app_desc(flash, offset):
    """esp_ota_get_partition_description: the 256-byte descriptor at image offset 0x20."""
    raw = flash.read(offset + APP_DESC_OFFSET, 256)
    magic, secure_version = struct.unpack("<II", raw[:8])
    if magic != APP_DESC_MAGIC:
        return None

    def text(a, b):
        return bytes(raw[a:b]).split(b"\0")[0].decode()

    return {
        "secure_version": secure_version,
        "version": text(16, 48),
        "project_name": text(48, 80),
        "time": text(80, 96),
        "date": text(96, 112),
        "idf_ver": text(112, 144),
        "app_elf_sha256": binascii.hexlify(raw[144:176]).decode(),
    }


# ---- loading an app at boot: esp_image_format.c verify_load_addresses ----
# Only the bootloader runs these (BOOTLOADER_BUILD): esp_ota_set_boot_partition's
# esp_image_verify does not, so set_boot() accepts an image the chip will then not load.


def _overlap(a0, a1, b0, b1):
    return a1 > b0 and b1 > a0  # bootloader_util_regions_overlap


def _inside(region, p):
    return region[0] <= p < region[1]


def _dram_to_iram(p):  # esp_ptr_diram_dram_to_iram, inverted
    return _DIRAM_IRAM[0] + (_DIRAM_DRAM[1] - p) - 4


def _iram_to_dram(p):  # esp_ptr_diram_iram_to_dram, inverted
    return _DIRAM_DRAM[0] + (_DIRAM_IRAM[1] - p) - 4


def _alias(a, e, own, to):
    """The part of [a, e) inside D/IRAM region `own`, seen through the other bus (`to`)."""
    lo = to(a) if _inside(own, a) else to(own[0])
    hi = to(e) if _inside(own, e - 1) else to(own[1])
    return (hi, lo) if hi < lo else (lo, hi)


def load_refusal(a, e, no_recurse=False):
    """Why the bootloader refuses to load RAM segment [a, e), or None (verify_load_addresses)."""
    if e == a:
        return None
    if _inside(_DRAM, a) and _inside(_DRAM, e - 1):
        if _overlap(_ROM_STACK_START - _STACK_LOAD_HEADROOM, _ROM_STACK_START, a, e):
            return "overlaps bootloader stack"
        if _overlap(_BOOT_DRAM[0], _BOOT_DRAM[1], a, e):
            return "overlaps bootloader data"
        if not no_recurse and _overlap(_DIRAM_DRAM[0], _DIRAM_DRAM[1], a, e):
            lo, hi = _alias(a, e, _DIRAM_DRAM, _dram_to_iram)
            return load_refusal(lo, hi, True)
        return None
    if _inside(_IRAM, a) and _inside(_IRAM, e - 1):
        if _overlap(_BOOT_LOADER_TEXT[0], _BOOT_LOADER_TEXT[1], a, e):
            return "overlaps loader IRAM"
        if not no_recurse and _overlap(_DIRAM_IRAM[0], _DIRAM_IRAM[1], a, e):
            lo, hi = _alias(a, e, _DIRAM_IRAM, _iram_to_dram)
            return load_refusal(lo, hi, True)
        return None
    for region in _RTC:
        if _inside(region, a) and _inside(region, e - 1):
            return None
    return "bad load address range"


def check_load(segments):
    """What process_segment refuses while loading an image's segments [(addr, len)], as the
    bootloader logs it; None if every segment loads. Mapped segments (DROM, IROM) and padding
    (below 0x10000000) are not loaded (should_load), so not checked."""
    for i, (addr, n) in enumerate(segments):
        if addr < 0x10000000 or any(_inside(w, addr) for w in _MAPPED):
            continue
        why = load_refusal(addr, addr + n)
        if why is not None:
            return "Segment %d 0x%08x-0x%08x invalid: %s" % (i, addr, addr + n, why)
    return None


# ---- the second-stage bootloader's choice (rollback enabled, as in every MP build) ----


def _index_to_part(parts, slots, index):
    if index == -1:
        return find_part(parts, TYPE_APP, SUBTYPE_FACTORY)
    return slots[index] if 0 <= index < len(slots) else None


def select_boot(flash, parts, chip_rev=301, commit=True):
    """Run bootloader_utility_get_selected_boot_partition + load_boot_image on `flash`.

    With commit=False nothing is written: flash-info uses that to say what would boot next.
    Returns a dict: part (Part or None), slot (index, -1 = factory), log (list of str, in
    order, otadata rewrites included), writes (the rewrites alone), images ({label: verify}).
    """
    log, writes, images = [], [], {}
    slots = ota_slots(parts)
    otadata = find_part(parts, TYPE_DATA, SUBTYPE_DATA_OTA)
    factory = find_part(parts, TYPE_APP, SUBTYPE_FACTORY)

    def put(index, entry, why):
        line = "otadata[%d] <- seq %d %s (%s)" % (
            index, entry.seq, OTA_STATE_NAMES.get(entry.state, "?"), why)
        writes.append(line)
        log.append(line)
        if commit:
            write_otadata(flash, otadata, index, entry)

    initial = False
    if otadata is None:
        start = -1
        log.append("no otadata partition: factory app")
    else:
        entries = read_otadata(flash, otadata)
        for i in (0, 1):
            if entries[i].state == OTA_PENDING_VERIFY:
                entries[i].state = OTA_ABORTED
                put(i, entries[i], "trial boot was never confirmed")
        if (entries[0].invalid() and entries[1].invalid()) or not slots:
            if factory is not None:
                start = -1
                log.append("otadata empty or no OTA apps: factory app")
            else:
                start = 0
                log.append("otadata has no valid entry and there is no factory app: trying ota_0")
                initial = entries[0].blank_or_bad_crc() and entries[1].blank_or_bad_crc()
        else:
            active = active_otadata(entries)
            if active != -1:
                start = (entries[active].seq - 1) % len(slots)
                log.append("otadata[%d] is active (seq %d, %s): slot ota_%d" % (
                    active, entries[active].seq,
                    OTA_STATE_NAMES.get(entries[active].state, "?"), start))
                if entries[active].state == OTA_NEW:
                    entries[active].state = OTA_PENDING_VERIFY
                    put(active, entries[active], "first boot of a new image")
            else:
                start = -1
                log.append("otadata invalid and no factory app: trying every slot")

    order = list(range(start, -2, -1)) + list(range(start + 1, len(slots)))
    for index in order:
        part = _index_to_part(parts, slots, index)
        if part is None or part.size == 0:
            continue
        res = verify_image(flash, part.offset, part.size, chip_rev)
        if res["ok"]:  # bootloader_load_image: ESP_IMAGE_LOAD checks where segments go too
            res["error"] = check_load(res["segments"])
            res["ok"] = res["error"] is None
        images[part.label] = res
        if res["ok"]:
            if initial and index > -1:
                entry = OtaEntry(pack_ota_entry(index + 1, OTA_VALID))
                put(0, entry, "first boot: otadata was blank")
            log.append("loaded app from %s at 0x%x" % (part.label, part.offset))
            return {"part": part, "slot": index, "log": log, "writes": writes, "images": images}
        log.append("%s is not bootable: %s" % (part.label, res["error"]))
    log.append("no bootable app partition")
    return {"part": None, "slot": None, "log": log, "writes": writes, "images": images}
