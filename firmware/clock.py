# clock.py The clock seam: certificate checks need the wall clock set, and a cold ESP32 starts
# at 2000-01-01. When the clock reads before 2024, ask an SNTP server (RFC 4330) and set the
# RTC. Without a configured ntp_host, the frozen `ntptime` of ESP32 builds is used.

import time

_VALID_AFTER = 1704067200  # the first second of 2024 (unix): a clock earlier than this was never set
_NTP_DELTA = 2208988800  # 1900-01-01 (NTP era 0) to 1970-01-01
_EPOCH_2000 = 946684800


def _epoch_offset():
    # MicroPython ports count time() from 1970, or from 2000 on some builds.
    return _EPOCH_2000 if time.gmtime(0)[0] == 2000 else 0


def unix_time():
    return time.time() + _epoch_offset()


def sntp(host, port=123, timeout_s=2):
    """Unix time from an SNTP server. Raises OSError on no or a bad answer."""
    import socket

    addr = socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM)[0][-1]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.settimeout(timeout_s)
        req = bytearray(48)
        req[0] = 0x1B  # LI 0, version 3, mode 3 (client)
        s.sendto(req, addr)
        resp = s.recv(48)
    finally:
        s.close()
    if len(resp) < 48 or resp[0] & 7 != 4:  # mode 4: server
        raise OSError(5, "not an SNTP answer")
    secs = resp[40] << 24 | resp[41] << 16 | resp[42] << 8 | resp[43]
    if not secs:
        raise OSError(5, "SNTP server refused (kiss-o'-death)")
    return secs - _NTP_DELTA


def set_rtc(unix):
    import machine

    t = time.gmtime(unix - _epoch_offset())
    machine.RTC().datetime((t[0], t[1], t[2], t[6], t[3], t[4], t[5], 0))


def ensure(ntp_host=None, ntp_port=123, attempts=3):
    """Make sure the clock is set. Returns 1 if it already was, 2 if it was set now, 0 if it
    could not be set."""
    if unix_time() >= _VALID_AFTER:
        return 1
    for _ in range(attempts):
        try:
            if ntp_host:
                set_rtc(sntp(ntp_host, ntp_port))
            else:
                import ntptime  # frozen into ESP32 builds (micropython-lib)

                ntptime.settime()
            if unix_time() >= _VALID_AFTER:
                return 2
        except (OSError, ImportError):
            pass
        time.sleep_ms(500)
    return 0
