# wifi.py The network seam: join the configured Wi-Fi network within a deadline.

import time

import network


def connect(ssid, password, timeout_ms=20000):
    """Join `ssid`; returns the station. Raises OSError(ETIMEDOUT) past the deadline."""
    sta = network.WLAN(network.STA_IF)
    sta.active(True)
    if sta.isconnected():
        return sta
    sta.connect(ssid, password)
    t0 = time.ticks_ms()
    while not sta.isconnected():
        if time.ticks_diff(time.ticks_ms(), t0) > timeout_ms:
            sta.disconnect()
            raise OSError(110, "Wi-Fi join timed out")
        time.sleep_ms(100)
    return sta
