# norflash.py File-backed NOR flash with the chip's erase/program rules, wear counts and
# power-cut injection.
#
# Common subset of CPython and MicroPython: the emulated bootloader (host) and the emulated
# esp32.Partition (device) both go through this class. NOR rules: erase sets whole 4 KiB
# sectors to 0xFF; programming can only clear bits, so new = old AND data. Writing over
# unerased data corrupts it exactly as the chip would.
#
# Wear: `<flash>.wear` holds, per sector, two little-endian u32: erases and program
# operations. Power cuts: see PowerPlan.

import json
import struct
import sys

SECTOR = 4096
_wear_bump = None
if sys.implementation.name == "micropython":
    try:
        from _native import wear_bump as _wear_bump  # a count without bytecode (see _native.py)
    except ImportError:
        pass


class PowerCut(Exception):
    """Raised on the host side when a planned power cut happens (the device side never
    returns: the runner kills the MicroPython process)."""


class PowerPlan:
    """Cut the power at the N-th flash operation counted from when the plan was armed.

    An operation is one sector erase or one program call. The plan file holds
    {"after": N, "tear": bool, "done": count}, or nothing while disarmed; it is created empty
    and overwritten in place, so it can be armed at any moment. Without tear the N-th
    operation completes and the power dies right after it; with tear it dies halfway: a
    sector half erased (first half 0xFF, the rest as it was) or a program with only the
    first half of its bytes.
    """

    def __init__(self, path, on_cut):
        self.path = path
        self.on_cut = on_cut
        self._peek = bytearray(1)
        try:
            self._f = open(path, "rb", buffering=0)  # unbuffered: every peek reads the file
        except OSError:
            with open(path, "wb"):
                pass
            self._f = open(path, "rb", buffering=0)

    def close(self):
        self._f.close()

    def armed(self):
        """Whether a cut is planned: one small read, which leaves the position at 0 while the
        file is empty (it is, but for a planned cut). Allocates nothing."""
        if self._f.readinto(self._peek):
            self._f.seek(0)
            return True
        return False

    def step(self):
        """Count one operation; returns None (carry on), "after" or "tear". While disarmed
        this allocates nothing: the chip's flash driver uses no GC heap either."""
        if not self.armed():
            return None
        try:
            with open(self.path) as f:
                plan = json.load(f)
        except (OSError, ValueError):
            return None
        plan["done"] = plan.get("done", 0) + 1
        with open(self.path, "w") as f:
            json.dump(plan, f)
        if plan["done"] < plan["after"]:
            return None
        if plan["done"] > plan["after"]:
            return None  # already cut (the runner removes the plan on power-on)
        return "tear" if plan.get("tear") else "after"


def arm_power_cut(path, after, tear=False):
    with open(path, "w") as f:
        json.dump({"after": after, "tear": bool(tear), "done": 0}, f)


def disarm_power_cut(path):
    with open(path, "w"):
        pass


def _bump(rec, o):
    # rec[o:o+4] += 1, little-endian
    for i in range(o, o + 4):
        rec[i] = (rec[i] + 1) & 0xFF
        if rec[i]:
            break


class NorFlash:
    def __init__(self, path, size=None, power=None):
        self._f = open(path, "r+b")
        if size is None:
            self._f.seek(0, 2)
            size = self._f.tell()
        self.size = size
        self.power = power
        # Where rewrite_sector left the files' positions (-1: anything else moved them). A
        # slot written block after block then needs no seeks: each seek is a system call.
        self._pos = -1
        self._wpos = -1
        self._old = bytearray(SECTOR)  # reused for read-modify-write; no per-call allocation
        self._ff = b"\xff" * SECTOR
        self._wear_rec = bytearray(8)
        # The sector this object erased last, if nothing has programmed it since: it holds
        # 0xFF, so programming it needs no read-back (the usual erase-then-write of a block).
        self._blank = -1
        nsect = size // SECTOR
        try:
            self._wear = open(path + ".wear", "r+b")
        except OSError:
            with open(path + ".wear", "wb") as w:
                w.write(bytes(8 * nsect))
            self._wear = open(path + ".wear", "r+b")
        # The counts, held here and written through to the file: a count needs no read-back.
        # One process at a time has a board's flash open (the bootloader between boots).
        self._wear_tab = bytearray(8 * nsect)
        self._wear.readinto(self._wear_tab)

    def close(self):
        self._f.close()
        self._wear.close()
        if self.power is not None:
            self.power.close()

    def _check(self, addr, n):
        if addr < 0 or n < 0 or addr + n > self.size:
            raise ValueError("flash access 0x%x+%d outside %d bytes" % (addr, n, self.size))

    def _count(self, sector, erases, programs):
        # Add to a sector's erase and program counts (0 or 1 each) and write its record
        # through. Byte arithmetic on preallocated buffers: no allocation per operation.
        rec = self._wear_rec
        tab = self._wear_tab
        at = sector * 8
        if _wear_bump is not None:
            _wear_bump(tab, at, erases, programs, rec)
        else:
            if erases:
                _bump(tab, at)
            if programs:
                _bump(tab, at + 4)
            for i in range(8):
                rec[i] = tab[at + i]
        w = self._wear
        if self._wpos != at:
            w.seek(at)
        w.write(rec)
        self._wpos = at + 8

    def wear(self, sector):
        """(erases, program operations) of one sector."""
        return struct.unpack_from("<II", self._wear_tab, sector * 8)

    def _step(self):
        return self.power.step() if self.power is not None else None

    def read(self, addr, n):
        self._check(addr, n)
        self._pos = -1
        self._f.seek(addr)
        return self._f.read(n)

    def readinto(self, addr, buf):
        self._check(addr, len(buf))
        self._pos = -1
        self._f.seek(addr)
        self._f.readinto(buf)

    def erase(self, addr, n):
        if addr % SECTOR or n % SECTOR:
            raise ValueError("erase 0x%x+%d is not sector aligned" % (addr, n))
        self._check(addr, n)
        self._pos = -1
        while n:
            cut = self._step()
            self._f.seek(addr)
            if cut == "tear":
                self._f.write(self._ff[: SECTOR // 2])
            else:
                self._f.write(self._ff)
                self._blank = addr // SECTOR
            self._count(addr // SECTOR, 1, 0)
            if cut:
                self.power.on_cut()
            addr += SECTOR
            n -= SECTOR

    def rewrite_sector(self, addr, data):
        """Erase one sector and program all of it with `data` (4096 bytes): the block write
        of esp32.Partition. Both operations are counted and wear the sector. With no cut
        planned, the sector goes from its old contents to `data` in one file write: the
        erased state in between lasts microseconds here and only a planned cut can stop
        there, which takes the two-step path below."""
        if addr % SECTOR or len(data) != SECTOR:
            raise ValueError("rewrite 0x%x+%d is not one sector" % (addr, len(data)))
        self._check(addr, SECTOR)
        if self.power is not None and self.power.armed():
            self.erase(addr, SECTOR)
            self.write(addr, data)
            return
        if self._pos != addr:
            self._f.seek(addr)
        self._f.write(data)
        self._pos = addr + SECTOR
        self._count(addr // SECTOR, 1, 1)
        if self._blank == addr // SECTOR:
            self._blank = -1

    def write(self, addr, data):
        n = len(data)
        self._check(addr, n)
        self._pos = -1
        cut = self._step()
        if cut == "tear":
            n //= 2
        done = 0
        while done < n:
            # One sector-bounded piece at a time, ANDed into what the flash holds.
            take = min(n - done, SECTOR - (addr + done) % SECTOR)
            piece = data[done : done + take] if (done or take != len(data)) else data
            sector = (addr + done) // SECTOR
            if sector == self._blank:
                erased = True
                self._blank = -1  # programmed from here on
            elif take == SECTOR:
                self._f.seek(addr + done)
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
            self._count(sector, 0, 1)
            done += take
        if cut:
            self.power.on_cut()
