# time.py Emulated `time` for the ESP32: the chip's RTC, which a power-on resets.
#
# A cold ESP32 starts its clock at 2000-01-01 00:00:00; it keeps counting through soft and
# software resets, and firmware sets it (NTP, machine.RTC().datetime()). The runner writes the
# RTC's offset from the host clock to <ctl>/rtc at power-on; machine.RTC rewrites it. time()
# returns an int, as on the ESP32 (the unix port's returns a float).

from utime import *  # noqa: F401,F403 - sleep, ticks_*, gmtime, localtime, mktime, ...
import utime

from _emuhw import CTL_DIR

_RTC = CTL_DIR + "/rtc"


def rtc_offset():
    try:
        with open(_RTC) as f:
            return int(f.read() or "0")
    except (OSError, ValueError):
        return 0


def set_rtc(unix_seconds):
    with open(_RTC, "w") as f:
        f.write(str(int(unix_seconds) - int(utime.time())))


def time():
    return int(utime.time()) + rtc_offset()


def time_ns():
    return utime.time_ns() + rtc_offset() * 1000000000


def gmtime(secs=None):
    return utime.gmtime(time() if secs is None else secs)


def localtime(secs=None):
    return utime.localtime(time() if secs is None else secs)
