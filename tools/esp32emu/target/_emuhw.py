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

_flash = None
_parts = None
_ballast = None


def pin_heap():
    """Load the emulated chip's modules, then hold back the extra heap the runner granted,
    so the firmware starts with the nominal free GC heap (ESP32EMU_HEAP bytes). The models'
    small transient allocations (set_boot's image check) then come out of that heap too,
    which is stricter than the chip, never more lenient."""
    global _ballast
    import gc

    import esp32  # noqa: F401
    import machine  # noqa: F401
    import network  # noqa: F401
    import ssl  # noqa: F401
    import time  # noqa: F401

    flash()
    parts()
    gc.collect()
    nominal = int(os.getenv("ESP32EMU_HEAP") or "0")
    extra = gc.mem_free() - nominal
    if nominal and extra > 0:
        _ballast = bytearray(extra)


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


def _heap_locked():
    try:
        bytearray(1)
        return False
    except MemoryError:
        return True


def unlock():
    """Lift micropython.heap_lock() for an emulated hardware operation; returns whether it was
    locked (pass that to relock). Called with no arguments, so it allocates nothing itself."""
    if not _heap_locked():
        return False
    import micropython

    micropython.heap_unlock()
    return True


def relock(was_locked):
    if was_locked:
        import micropython

        micropython.heap_lock()


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
