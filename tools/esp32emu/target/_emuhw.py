# _emuhw.py Glue between the emulated ESP32 modules and the host runner (not a chip API).
#
# The runner passes the chip's state in environment variables and reads back how the
# MicroPython process ended; a control folder carries live signals (watchdog feeds).
# Emulated hardware runs outside the firmware's heap discipline: real flash and watchdog
# calls allocate nothing on the GC heap, so unlock()/relock() lift a heap_lock() around them.

import os
import sys

# Process exit codes the runner understands (see tools/esp32emu/runner.py).
EXIT_REPL = 0  # boot.py/main.py finished: the board idles at the REPL
EXIT_SOFT_RESET = 80  # machine.soft_reset(): MicroPython restarts, no chip reset
EXIT_RESET = 81  # machine.reset(): esp_restart(), reset reason SW
EXIT_PANIC = 82  # abort()/panic: reset reason PANIC
EXIT_DEEPSLEEP = 83  # machine.deepsleep()

FLASH_PATH = os.getenv("ESP32EMU_FLASH")
CTL_DIR = os.getenv("ESP32EMU_CTL") or "."
RUNNING_OFFSET = int(os.getenv("ESP32EMU_RUNNING") or "65536")
RESET_CAUSE = int(os.getenv("ESP32EMU_RESET_CAUSE") or "1")
CHIP_REV = int(os.getenv("ESP32EMU_CHIP_REV") or "301")
DEVICE_ID = os.getenv("ESP32EMU_DEVICE_ID") or "esp32emu"
# Benchmarks only (tools/bench/memory.py): a file that collects the peak live heap of the
# firmware, sampled after a collection at every emulated hardware call (see heap_probe).
HEAP_PROBE = os.getenv("ESP32EMU_HEAP_PROBE")

_flash = None
_parts = None
_ballast = None
_probe_base = 0  # heap held by the emulator itself when the firmware starts
_probe_peak = 0


def _load_models():
    import esp32  # noqa: F401
    import machine  # noqa: F401
    import network  # noqa: F401
    import select  # noqa: F401
    import ssl  # noqa: F401
    import time  # noqa: F401

    flash()
    parts()


def pin_heap(reserve):
    """Load the emulated chip's modules, then hold back the extra heap the runner granted,
    leaving the firmware the nominal GC heap (ESP32EMU_HEAP bytes) mostly in one piece, as a
    chip's freshly started heap is. `reserve` holds one bytearray of that size, allocated
    before anything else: the modules load around it and ballast takes every other free
    block. Returns the free bytes ballast could not take (holes too small for an object);
    after the caller lets the reserve go, settle() takes that many from the reserve's room,
    so the free total is the nominal size. (Taking one ballast block from a heap the modules
    had already fragmented left the firmware part of its bytes in their holes, so whether a
    whole update fit in 64 KiB changed with the emulator's own code.) The models' small
    transient allocations (set_boot's image check) come out of the firmware's heap, which is
    stricter than the chip, never more lenient."""
    global _ballast
    import gc

    _load_models()  # in its own call: what loading left on the C stack is gone once it returns
    _ballast = []
    if not len(reserve[0]):
        return 0  # no nominal size: no ballast
    for _ in range(3):  # again for what the previous pass left as garbage (list growth)
        gc.collect()
        size = gc.mem_free()
        while size:
            try:
                _ballast.append(bytearray(size))
            except MemoryError:
                size //= 2  # no hole that big: take smaller pieces, down to the last crumbs
                continue
            size = min(size, gc.mem_free())
    gc.collect()
    return gc.mem_free()


def settle(crumbs):
    """Second half of pin_heap, once the reserve is gone: ballast `crumbs` bytes (from the
    start of the reserve's room, first fit), then note the baseline for heap_probe."""
    global _probe_base
    import gc

    gc.collect()
    if crumbs > 64:
        _ballast.append(bytearray(crumbs - 32))  # less the bytearray's own header
    gc.collect()
    if HEAP_PROBE:
        _probe_base = gc.mem_alloc()
        with open(HEAP_PROBE, "a") as f:
            f.write("boot\n")


def heap_probe():
    """Record the firmware's live heap if it is a new peak for this boot. Collecting first
    makes it the live data, not garbage; it perturbs timing and GC, so it is for benchmarks.
    Appends one line per new peak: bytes above what the emulator held at start."""
    global _probe_peak
    import gc

    gc.collect()
    live = gc.mem_alloc() - _probe_base
    if live > _probe_peak:
        _probe_peak = live
        with open(HEAP_PROBE, "a") as f:
            f.write("%d\n" % live)


def flash():
    global _flash
    if _flash is None:
        from norflash import NorFlash, PowerPlan

        # The plan file is looked up on every operation: a cut can be armed at any moment.
        _flash = NorFlash(FLASH_PATH, power=PowerPlan(CTL_DIR + "/powercut", power_cut))
    return _flash


def power_cut():
    """The planned power cut: tell the runner and stop dead. The runner kills this process,
    so nothing after the cut (finally blocks, file writes) ever runs."""
    import time

    with open(CTL_DIR + "/cut", "w") as f:
        f.write("cut")
    while True:
        time.sleep(1)


def parts():
    global _parts
    if _parts is None:
        import espidf

        _parts = espidf.read_partition_table(flash())
    return _parts


try:
    from micropython import heap_lock as _heap_lock
    from micropython import heap_unlock as _heap_unlock
except ImportError:  # CPython: the runner reads this module's constants
    _heap_lock = _heap_unlock = None


def unlock():
    """Lift micropython.heap_lock() for an emulated hardware operation; returns whether it was
    locked (pass that to relock). Allocates nothing: heap_unlock() tells the depth it leaves."""
    _heap_lock()
    locked = _heap_unlock() > 0
    if locked:
        _heap_unlock()
    if HEAP_PROBE:
        heap_probe()
    return locked


def relock(was_locked):
    if was_locked:
        _heap_lock()


def stop(code, message=None):
    """End this run of the chip; the runner resets or idles it according to `code`."""
    unlock()  # the chip resets whatever the heap was doing
    if message:
        print(message)
    try:
        sys.stdout.flush()
    except AttributeError:
        pass
    if code != EXIT_REPL:
        # Under `micropython -i` (REPL bridge) a SystemExit out of main.py lands at the REPL
        # instead of ending the process; this file tells the runner to end the run with `code`.
        with open(CTL_DIR + "/exit.tmp", "w") as f:
            f.write(str(code))
        os.rename(CTL_DIR + "/exit.tmp", CTL_DIR + "/exit")
    raise SystemExit(code)


def panic(reason):
    stop(EXIT_PANIC, "abort() was called: %s\nRebooting..." % reason)
