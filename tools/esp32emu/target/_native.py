# _native.py Native code (viper) for the models' inner loops, which the chip runs in C.
#
# Compiled for this machine (mpy-cross -march) into the emulated ROM, and left out where
# MicroPython has no native emitter; importers then fall back to plain Python.
# The image check's XOR checksum, as Python ints, made ~3 MB of big-int garbage per set_boot()
# of a 1.5 MB image: ~70 collections of the board's heap, as much CPU as its SHA-256.

import micropython


@micropython.viper
def xor32(buf, n: int) -> int:
    """XOR of the first n bytes of buf (n a multiple of 4) as 32-bit words. Allocates nothing."""
    p = ptr32(buf)  # noqa: F821 (a viper builtin)
    acc = 0
    i = 0
    words = n >> 2
    while i < words:
        acc ^= p[i]
        i += 1
    return acc


@micropython.viper
def wear_bump(tab, at: int, erases: int, programs: int, rec):
    """Add erases and programs to the two little-endian u32 counts at tab[at:at+8] (at a
    multiple of 8) and copy them into rec (8 bytes): a sector's wear record. Allocates nothing."""
    t = ptr32(tab)  # noqa: F821
    r = ptr32(rec)  # noqa: F821
    i = at >> 2
    t[i] = t[i] + erases
    t[i + 1] = t[i + 1] + programs
    r[0] = t[i]
    r[1] = t[i + 1]
