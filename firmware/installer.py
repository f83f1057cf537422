# installer.py Stream an image into the inactive slot and verify it there.
#
# An Installer owns one install: the inactive slot, looked up once when it is made, and one
# 4096-byte buffer (a flash sector: writeblocks erases per call), allocated then and reused
# for every block; the loop allocates nothing per block. The install (install.py) ends in
# set_boot() on that same slot, once this module's code and buffer have been given back.
# Order of trust: a device that trusts signing keys has checked the release's signature
# (install.py) before anything is written; the first block must be an ESP32
# app image before anything is erased; the SHA-256 of the received bytes must equal the
# desired sha256 (from the shadow, not from the store; the signed manifest's, when signed);
# the slot is read back and hashed again; only then does the install call set_boot(), which
# runs the bootloader's own image check.
#
# Resume: a download interrupted after `written` bytes (a multiple of 4096, checkpointed by
# the caller) continues with Range: bytes=written-; the prefix already in flash is hashed
# again first. Only a 206 whose Content-Range matches is accepted; a 200 (Range ignored)
# starts over from zero.

import binascii
import hashlib

from firmware import contract, https, slots
from firmware.ota import UpdateError

BLOCK = 4096
CHECKPOINT_BLOCKS = 16  # persist progress every 64 KiB: resumable, without wearing the fs


def check_app_header(buf):
    """First block of an OTA image: magic 0xE9, chip id 0 (ESP32), app descriptor at 0x20.
    The combined firmware.bin starts with the bootloader, which has no app descriptor. (The
    host reads the same with tools/espidf/onflash.py image_kind, too big for a board's RAM.)"""
    if buf[0] != 0xE9:
        raise UpdateError(contract.E_NOT_APP, "bad magic byte")
    if buf[12] | buf[13] << 8 != 0:
        raise UpdateError(contract.E_NOT_APP, "image is for another chip")
    # ESP_APP_DESC_MAGIC_WORD 0xABCD5432, little-endian; compared bytewise to allocate nothing
    if buf[0x20] != 0x32 or buf[0x21] != 0x54 or buf[0x22] != 0xCD or buf[0x23] != 0xAB:
        raise UpdateError(contract.E_NOT_APP, "no app descriptor (bootloader or combined image?)")


class Installer:
    def __init__(self, part, headers, timeout_s=15, ca_file=None, ctx=None, server_hostname=None):
        """`part`: the inactive slot (slots.next_update()); `ctx`: an ssl.SSLContext, or None
        to make one from `ca_file` (trust.load)."""
        self.part = part
        self.buf = bytearray(BLOCK)
        if ctx is None:
            # After the buffer: a hole the CA's parsing leaves below it would split the heap.
            from firmware import trust

            ctx = trust.load(ca_file)
        self.ctx = ctx
        self.headers = headers
        self.timeout_s = timeout_s
        self.server_hostname = server_hostname

    def download(self, fw, written=0, checkpoint=None, progress=None):
        """Fetch fw (a contract.check_firmware dict) into the slot, continuing after `written`
        bytes already there. Returns (SHA-256 of the whole image, resumed?).
        Raises UpdateError, or OSError/ValueError for network and TLS failures."""
        part = self.part
        size = fw["size"]
        if size > slots.slot_size(part):
            raise UpdateError(contract.E_TOO_BIG, "%d > slot %d" % (size, slots.slot_size(part)))
        if written % BLOCK or not 0 <= written < size:
            written = 0
        h = hashlib.sha256()
        headers = self.headers
        if written:
            self.hash_slot(part, written, h)  # the prefix already in flash
            headers = dict(headers)
            headers["Range"] = "bytes=%d-" % written
        resp = https.get(self.ctx, fw["url"], headers, self.timeout_s, self.server_hostname)
        try:
            if written and resp.status == 206:
                want = "bytes %d-%d/%d" % (written, size - 1, size)
                if resp.headers.get("content-range") != want:
                    raise UpdateError(contract.E_HTTP, "Content-Range %s, want %s"
                                      % (resp.headers.get("content-range"), want))
            elif resp.status == 200:
                if written:  # the server ignored Range: start over from zero
                    written = 0
                    h = hashlib.sha256()
            else:
                raise https.refusal(resp)
            if resp.length != size - written:
                raise UpdateError(contract.E_SIZE, "Content-Length %s, want %d" % (resp.length, size - written))
            self.stream_to(part, resp.stream, size, written, h, checkpoint, progress)
        finally:
            resp.close()
        return h.digest(), written > 0

    def read_back(self, fw):
        """Read the whole slot back and hash it again: what set_boot() will switch to must be
        exactly the desired image, whatever the flash did with the writes."""
        if slots.sha256_of(self.part, fw["size"], self.buf) != binascii.unhexlify(fw["sha256"]):
            raise UpdateError(contract.E_READBACK, "slot content differs from the desired image")

    def hash_slot(self, part, nbytes, h):
        """Feed the first nbytes (a multiple of BLOCK) of a slot into h."""
        for blk in range(nbytes // BLOCK):
            part.readblocks(blk, self.buf)
            h.update(self.buf)

    def stream_to(self, part, stream, size, written, h, checkpoint=None, progress=None):
        """Copy bytes written..size from `stream` into `part`, block by block, into h."""
        rem = size % BLOCK
        tail = memoryview(self.buf)[:rem] if rem else self.buf  # made once, before the loop
        nblocks = (size + BLOCK - 1) // BLOCK
        first = written // BLOCK
        while first < nblocks:
            last = min(nblocks, first + CHECKPOINT_BLOCKS)
            self.copy_blocks(part, stream, first, last, nblocks, tail, h, progress)
            first = last
            if checkpoint is not None and first < nblocks:
                checkpoint(first * BLOCK)

    def copy_blocks(self, part, stream, first, last, nblocks, tail, h, progress=None):
        # The per-block loop. Allocates nothing (tests run it under micropython.heap_lock()),
        # except through `progress`, which reports only every 10 %.
        buf = self.buf
        rem = len(tail)
        for blk in range(first, last):
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
