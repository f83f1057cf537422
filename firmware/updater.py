# updater.py Stream an image into the inactive slot, verify it, and switch the boot slot.
#
# One 4096-byte buffer (a flash sector: writeblocks erases per call) is allocated when the
# Updater is made and reused for every block; the loop allocates nothing per block.
# Order of trust: the first block must be an ESP32 app image before anything is erased; the
# SHA-256 of the received bytes must equal the desired sha256 (from the shadow, not from the
# store); the slot is read back and hashed again; only then set_boot(), which runs the
# bootloader's own image check.

import binascii
import hashlib

from firmware import contract, https, slots

BLOCK = 4096


class UpdateError(Exception):
    def __init__(self, code, detail=""):
        super().__init__(code, detail)
        self.code = code
        self.detail = detail


def check_app_header(buf):
    """First block of an OTA image: magic 0xE9, chip id 0 (ESP32), app descriptor at 0x20.
    The combined firmware.bin starts with the bootloader, which has no app descriptor."""
    if buf[0] != 0xE9:
        raise UpdateError(contract.E_NOT_APP, "bad magic byte")
    if buf[12] | buf[13] << 8 != 0:
        raise UpdateError(contract.E_NOT_APP, "image is for another chip")
    # ESP_APP_DESC_MAGIC_WORD 0xABCD5432, little-endian; compared bytewise to allocate nothing
    if buf[0x20] != 0x32 or buf[0x21] != 0x54 or buf[0x22] != 0xCD or buf[0x23] != 0xAB:
        raise UpdateError(contract.E_NOT_APP, "no app descriptor (bootloader or combined image?)")


class Updater:
    def __init__(self, ctx, headers, timeout_s=15, server_hostname=None):
        self.buf = bytearray(BLOCK)
        self.ctx = ctx
        self.headers = headers
        self.timeout_s = timeout_s
        self.server_hostname = server_hostname

    def install(self, fw, progress=None):
        """Download fw (a contract.check_firmware dict) into the inactive slot and make it
        the boot slot. Returns the slot label. Raises UpdateError, or OSError for network."""
        part = slots.next_update()
        size = fw["size"]
        if size > slots.slot_size(part):
            raise UpdateError(contract.E_TOO_BIG, "%d > slot %d" % (size, slots.slot_size(part)))
        resp = https.get(self.ctx, fw["url"], self.headers, self.timeout_s, self.server_hostname)
        try:
            if resp.status != 200:
                raise UpdateError(contract.E_HTTP, str(resp.status))
            if resp.length != size:
                raise UpdateError(contract.E_SIZE, "Content-Length %s, want %d" % (resp.length, size))
            digest = self.stream_to(part, resp.stream, size, progress)
        finally:
            resp.close()
        want = binascii.unhexlify(fw["sha256"])
        if digest != want:
            raise UpdateError(contract.E_HASH, "received bytes do not match sha256")
        if slots.sha256_of(part, size, self.buf) != want:
            raise UpdateError(contract.E_READBACK, "slot content differs from what was written")
        try:
            part.set_boot()
        except OSError as e:
            raise UpdateError(contract.E_VALIDATE, str(e))
        return slots.label(part)

    def stream_to(self, part, stream, size, progress=None):
        """Copy `size` bytes from `stream` into `part` block by block; returns their SHA-256."""
        rem = size % BLOCK
        tail = memoryview(self.buf)[:rem] if rem else self.buf  # made once, before the loop
        h = hashlib.sha256()
        self.copy_blocks(part, stream, (size + BLOCK - 1) // BLOCK, tail, h, progress)
        return h.digest()

    def copy_blocks(self, part, stream, nblocks, tail, h, progress=None):
        # The per-block loop. Allocates nothing (tests run it under micropython.heap_lock()),
        # except through `progress`, which reports only every 10 %.
        buf = self.buf
        rem = len(tail)
        for blk in range(nblocks):
            into = tail if blk == nblocks - 1 else buf
            if into is not buf:
                for i in range(rem, BLOCK):
                    buf[i] = 0xFF  # pad the last sector with the erased value
            n = stream.readinto(into)
            if n != len(into):
                raise UpdateError(contract.E_SIZE, "connection closed after %d bytes" % (blk * BLOCK))
            if blk == 0:
                check_app_header(buf)
            h.update(into)
            part.writeblocks(blk, buf)
            if progress is not None:
                progress(blk + 1, nblocks)
