# power.py The reset seam: chip resets, why we booted, and the watchdog.

import machine

_wdt = None


def reset():
    machine.reset()


def reset_cause():
    return machine.reset_cause()


def arm_watchdog(timeout_ms):
    # The task watchdog cannot be stopped once armed (ESP32 port); feed() it from every loop.
    global _wdt
    if _wdt is None and timeout_ms:
        _wdt = machine.WDT(timeout=timeout_ms)


def feed():
    if _wdt is not None:
        _wdt.feed()
