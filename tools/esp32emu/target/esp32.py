# esp32.py Emulated `esp32` module: Partition over a raw ESP32 flash image.
#
# Mirrors MicroPython ports/esp32/esp32_partition.c on ESP-IDF: error values are what
# check_esp_err() raises (OSError(-code, name)), block writes erase first, set_boot()
# runs esp_image_verify, and writes into the running app, the bootloader or the partition
# table abort() the chip (CONFIG_SPI_FLASH_DANGEROUS_WRITE_ABORTS).

import espidf
from _emuhw import CHIP_REV, RUNNING_OFFSET, flash, panic, parts, relock, unlock

_NATIVE_BLOCK = 4096
_ENOENT = 2
_EINVAL = 22


def _err(code, name):
    return OSError(-code, name)


_ERR_INVALID_ARG = (0x102, "ESP_ERR_INVALID_ARG")
_ERR_INVALID_SIZE = (0x104, "ESP_ERR_INVALID_SIZE")
_ERR_OTA_VALIDATE_FAILED = (0x1503, "ESP_ERR_OTA_VALIDATE_FAILED")


_run = []  # the running app's partition, once found: a write to the table would panic


def _running():
    if not _run:
        _run.append(None)
        for p in parts():
            if p.type == espidf.TYPE_APP and p.offset == RUNNING_OFFSET:
                _run[0] = p
    return _run[0]


def _check_range(part, offset, size):
    # esp_partition_read/write/erase_range bounds checks, in IDF's order.
    if offset > part.size:
        raise _err(*_ERR_INVALID_ARG)
    if size > part.size - offset:
        raise _err(*_ERR_INVALID_SIZE)


def _check_safe(addr, size):
    # esp_partition_main_flash_region_safe(): bootloader + partition table, running app.
    if addr <= espidf.PARTITION_TABLE_OFFSET + espidf.PARTITION_TABLE_MAX_LEN:
        panic("write to the bootloader/partition table region at 0x%x" % addr)
    run = _running()
    if run is not None and addr < run.offset + run.size and addr + size > run.offset:
        panic("flash write/erase at 0x%x+0x%x overlaps the running app" % (addr, size))


def _erase_checks(part, offset, size):
    _check_range(part, offset, size)
    if size % _NATIVE_BLOCK:
        raise _err(*_ERR_INVALID_SIZE)
    if offset % _NATIVE_BLOCK:
        raise _err(*_ERR_INVALID_ARG)
    _check_safe(part.offset + offset, size)


def _erase(part, offset, size):
    _erase_checks(part, offset, size)
    flash().erase(part.offset + offset, size)


def _write(part, offset, buf):
    _check_range(part, offset, len(buf))
    _check_safe(part.offset + offset, len(buf))
    flash().write(part.offset + offset, buf)


def _rewrite(part, offset, buf):
    # A simple block write: erase, then program the whole of it (esp32_partition_writeblocks).
    _erase_checks(part, offset, len(buf))
    fl = flash()
    addr = part.offset + offset
    if len(buf) == _NATIVE_BLOCK:
        fl.rewrite_sector(addr, buf)
        return
    fl.erase(addr, len(buf))
    fl.write(addr, buf)


def _read(part, offset, buf):
    _check_range(part, offset, len(buf))
    flash().readinto(part.offset + offset, buf)


class Partition:
    BOOT = 0
    RUNNING = 1
    TYPE_APP = 0
    TYPE_DATA = 1

    def __init__(self, id, block_size=_NATIVE_BLOCK):
        if isinstance(id, espidf.Part):  # internal: find() and get_next_update()
            part = id
        elif isinstance(id, str):
            part = espidf.find_part(parts(), espidf.TYPE_APP, None, id) or espidf.find_part(
                parts(), espidf.TYPE_DATA, None, id
            )
            if part is None:
                raise OSError(_ENOENT)
        elif id == Partition.BOOT:
            if espidf.find_part(parts(), espidf.TYPE_DATA, espidf.SUBTYPE_DATA_OTA) is None:
                raise OSError(_ENOENT)
            part = espidf.boot_partition(flash(), parts())
        elif id == Partition.RUNNING:
            part = _running()
        else:
            raise ValueError("unknown Partition id")
        if block_size < 1:
            raise ValueError("invalid block size")
        self._part = part
        self._bs = block_size

    @staticmethod
    def find(type=TYPE_APP, subtype=0xFF, label=None, block_size=_NATIVE_BLOCK):
        out = []
        for p in parts():
            if p.type == type and (subtype == 0xFF or p.subtype == subtype):
                if label is None or p.label == label:
                    out.append(Partition(p, block_size))
        return out

    def info(self):
        p = self._part
        return (p.type, p.subtype, p.offset, p.size, p.label, bool(p.flags & 1))

    def __repr__(self):
        p = self._part
        return "<Partition type=%d, subtype=%d, address=%d, size=%d, label=%s, encrypted=%d>" % (
            p.type, p.subtype, p.offset, p.size, p.label, p.flags & 1)

    # Block I/O is C on the chip and allocates nothing; here each call lifts a heap_lock()
    # around the model (unlock/relock) so firmware can prove its own loops allocation-free.

    def readblocks(self, block_num, buf, offset=0):
        locked = unlock()
        try:
            _read(self._part, block_num * self._bs + offset, buf)
        finally:
            relock(locked)

    def writeblocks(self, block_num, buf, offset=None):
        if self._bs < _NATIVE_BLOCK:
            raise NotImplementedError("block_size < 4096 is not emulated")
        locked = unlock()
        try:
            addr = block_num * self._bs
            if offset is None:
                _rewrite(self._part, addr, buf)
            else:
                _write(self._part, addr + offset, buf)
        finally:
            relock(locked)

    def ioctl(self, cmd, arg):
        if cmd in (1, 2, 3):  # INIT, DEINIT, SYNC
            return 0
        if cmd == 4:  # BLOCK_COUNT
            return self._part.size // self._bs
        if cmd == 5:  # BLOCK_SIZE
            return self._bs
        if cmd == 6:  # BLOCK_ERASE
            if self._bs != _NATIVE_BLOCK:
                return -_EINVAL
            locked = unlock()
            try:
                _erase(self._part, arg * _NATIVE_BLOCK, _NATIVE_BLOCK)
            finally:
                relock(locked)
            return 0
        return None

    def set_boot(self):
        locked = unlock()
        try:
            self._set_boot()
        finally:
            relock(locked)

    def _set_boot(self):
        import gc

        gc.collect()  # the model's image check uses the GC heap; the chip's does not
        p = self._part
        if p.type != espidf.TYPE_APP:
            raise _err(*_ERR_INVALID_ARG)
        res = espidf.verify_image(flash(), p.offset, p.size, CHIP_REV)
        if not res["ok"]:
            print("E esp_image: %s" % res["error"])
            raise _err(*_ERR_OTA_VALIDATE_FAILED)
        slots = espidf.ota_slots(parts())
        for i in range(len(slots)):
            if slots[i].offset == p.offset:
                espidf.set_boot_slot(flash(), parts(), i)
                return
        # Factory app: IDF erases all of otadata.
        od = espidf.find_part(parts(), espidf.TYPE_DATA, espidf.SUBTYPE_DATA_OTA)
        flash().erase(od.offset, od.size)

    def get_next_update(self):
        slots = espidf.ota_slots(parts())
        if not slots:
            raise OSError(_ENOENT)
        for i in range(len(slots)):
            if slots[i].offset == self._part.offset:
                return Partition(slots[(i + 1) % len(slots)])
        return Partition(slots[0])

    @classmethod
    def mark_app_valid_cancel_rollback(cls):
        locked = unlock()
        try:
            espidf.mark_app_valid(flash(), parts())
        finally:
            relock(locked)
