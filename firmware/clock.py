# clock.py The clock seam: certificate checks need the wall clock set (a cold ESP32 starts
# at 2000-01-01). Set it over NTP when it is clearly wrong.

import time

_VALID_AFTER = 1704067200  # 2024-01-01: a clock earlier than this was never set
_EPOCH_2000 = 946684800  # MicroPython's ESP32 port counts from 2000-01-01


def unix_time():
    t = time.time()
    return t + _EPOCH_2000 if time.gmtime(0)[0] == 2000 else t


def ensure(ntp_host=None, attempts=3):
    """Make sure the clock is set; returns True if it is. Uses ntptime when available."""
    if unix_time() >= _VALID_AFTER:
        return True
    try:
        import ntptime
    except ImportError:
        return False
    if ntp_host:
        ntptime.host = ntp_host
    for _ in range(attempts):
        try:
            ntptime.settime()
            return unix_time() >= _VALID_AFTER
        except OSError:
            time.sleep_ms(500)
    return False
