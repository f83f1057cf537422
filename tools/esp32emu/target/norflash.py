# norflash.py File-backed NOR flash with the chip's erase/program rules.
#
# Common subset of CPython and MicroPython: the emulated bootloader (host) and the emulated
# esp32.Partition (device) both go through this class. NOR rules: erase sets whole 4 KiB
# sectors to 0xFF; programming can only clear bits, so new = old AND data. Writing over
# unerased data corrupts it exactly as the chip would.

SECTOR = 4096


class NorFlash:
    def __init__(self, path, size=None):
        self._f = open(path, "r+b")
        if size is None:
            self._f.seek(0, 2)
            size = self._f.tell()
        self.size = size
        self._old = bytearray(SECTOR)  # reused for read-modify-write; no per-call allocation
        self._ff = b"\xff" * SECTOR
        self.erases = 0
        self.writes = 0

    def close(self):
        self._f.close()

    def _check(self, addr, n):
        if addr < 0 or n < 0 or addr + n > self.size:
            raise ValueError("flash access 0x%x+%d outside %d bytes" % (addr, n, self.size))

    def read(self, addr, n):
        self._check(addr, n)
        self._f.seek(addr)
        return self._f.read(n)

    def readinto(self, addr, buf):
        self._check(addr, len(buf))
        self._f.seek(addr)
        self._f.readinto(buf)

    def erase(self, addr, n):
        if addr % SECTOR or n % SECTOR:
            raise ValueError("erase 0x%x+%d is not sector aligned" % (addr, n))
        self._check(addr, n)
        self._f.seek(addr)
        while n:
            self._f.write(self._ff)
            n -= SECTOR
            self.erases += 1

    def write(self, addr, data):
        n = len(data)
        self._check(addr, n)
        self.writes += 1
        done = 0
        while done < n:
            # One sector-bounded piece at a time, ANDed into what the flash holds.
            take = min(n - done, SECTOR - (addr + done) % SECTOR)
            piece = data[done : done + take] if (done or take != n) else data
            self._f.seek(addr + done)
            if take == SECTOR:
                self._f.readinto(self._old)
                erased = self._old == self._ff
            else:
                erased = False
            if not erased:
                self._f.seek(addr + done)
                old = self._f.read(take)
                if old != self._ff[:take]:
                    a = int.from_bytes(old, "little") & int.from_bytes(piece, "little")
                    piece = a.to_bytes(take, "little")
            self._f.seek(addr + done)
            self._f.write(piece)
            done += take
