# _emu_boot.py Start-up of the emulated ESP32 port: what MicroPython's ports/esp32/main.c does
# after the bootloader hands over. Runs boot.py, then main.py, from the device filesystem
# (the working directory); an exception is printed and the board drops to the REPL.

import os
import sys

# The firmware's heap, taken first so that it stays in one piece while the emulator loads.
_reserve = [bytearray(int(os.getenv("ESP32EMU_HEAP") or "0"))]
sys.path[:] = [os.getenv("ESP32EMU_ROM"), "", ".frozen", "lib"]

import _emuhw  # noqa: E402

_crumbs = _emuhw.pin_heap(_reserve)
_reserve.clear()
del _reserve
_emuhw.settle(_crumbs)


def _run(name):
    try:
        f = open(name)
    except OSError:
        return
    with f:
        src = f.read()
    try:
        exec(src, {"__name__": "__main__", "__file__": name})
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - the REPL prints whatever main.py raised
        sys.print_exception(e)


_run("boot.py")
if not os.getenv("ESP32EMU_SKIP_MAIN"):  # a soft reset from the raw REPL skips main.py
    _run("main.py")
if not os.getenv("ESP32EMU_REPL"):
    _emuhw.stop(_emuhw.EXIT_REPL, "MicroPython (emulated ESP32): main.py finished, REPL idle")
# With a REPL bridge the process continues into the interactive REPL (micropython -i).
