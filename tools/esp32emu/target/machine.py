# machine.py Emulated `machine` for the ESP32: resets, reset cause, watchdog, identity.
#
# Values from MicroPython ports/esp32/modmachine.c and machine_wdt.c. A reset ends the
# MicroPython process with an exit code the runner maps to the next boot's reset cause.

import time

from _emuhw import (
    CTL_DIR,
    DEVICE_ID,
    EXIT_DEEPSLEEP,
    EXIT_RESET,
    EXIT_SOFT_RESET,
    RESET_CAUSE,
    relock,
    stop,
    unlock,
)

PWRON_RESET = 1
HARD_RESET = 2
WDT_RESET = 3
DEEPSLEEP_RESET = 4
SOFT_RESET = 5


def reset():
    # esp_restart(): reset reason SW, which reset_cause() reports as HARD_RESET.
    stop(EXIT_RESET)


def soft_reset():
    stop(EXIT_SOFT_RESET, "MPY: soft reboot")


def reset_cause():
    return RESET_CAUSE


def deepsleep(time_ms=0):
    # Wakes with DEEPSLEEP_RESET after time_ms (0: only an external wake, which the emulator
    # has not got: it stays asleep until stopped). The RTC keeps counting.
    with open(CTL_DIR + "/deepsleep", "w") as f:
        f.write(str(time_ms))
    stop(EXIT_DEEPSLEEP)


def lightsleep(time_ms=0):
    time.sleep_ms(time_ms)


def unique_id():
    # The ESP32 returns its 6-byte base MAC; derive a stable one from the device id.
    import hashlib

    return hashlib.sha256(DEVICE_ID.encode()).digest()[:6]


def freq(*args):
    return 240000000


def idle():
    time.sleep_ms(1)


class RTC:
    # The chip's real-time clock (see time.py): datetime() gets or sets
    # (year, month, day, weekday, hours, minutes, seconds, subseconds).
    def __init__(self, id=0):
        pass

    def datetime(self, dt=None):
        if dt is None:
            t = time.localtime()
            return (t[0], t[1], t[2], t[6], t[3], t[4], t[5], 0)
        time.set_rtc(time.mktime((dt[0], dt[1], dt[2], dt[4], dt[5], dt[6], 0, 0)))

    def init(self, dt):
        self.datetime(dt)


class WDT:
    # Task watchdog with panic: expiry resets the chip with WDT_RESET. There is no way to
    # stop it or read it back (no deinit/timeout_ms on the ESP32 port).
    def __init__(self, id=0, timeout=5000):
        if id != 0:
            raise ValueError("id must be 0")
        if timeout <= 0:
            raise ValueError("WDT timeout too short")
        self._timeout = timeout
        self._path = CTL_DIR + "/wdt"
        self.feed()

    def _touch(self):
        # The runner reads the file's mtime as the last feed and its text as the timeout.
        with open(self._path, "w") as f:
            f.write(str(self._timeout))

    def feed(self):
        locked = unlock()
        try:
            self._touch()
        finally:
            relock(locked)
