# select.py Emulated `select`: MicroPython's poll, waiting in the host kernel instead of a spin.
#
# The unix port polls an object without a file descriptor (a TLS socket) by asking it in a
# loop with 0.5 ms sleeps, as the ESP32 port does between FreeRTOS ticks. On the chip that loop
# is the idle task's business; here every idle board would burn ~3 % of a host core, and a
# fleet of 200 emulated boards spent all of two cores doing nothing. This poll answers exactly
# as MicroPython's does (a TLS socket is ready when its record layer has bytes or its socket
# is readable), but sleeps in the kernel on the raw sockets under the TLS ones in between.

import uselect
from uselect import POLLERR, POLLHUP, POLLIN, POLLOUT  # noqa: F401 - re-exported API

import ssl
import time


class poll:
    def __init__(self):
        self._p = uselect.poll()  # what the firmware registered: answers every question
        self._wait = uselect.poll()  # the same, with raw sockets in place of TLS ones: blocks
        self._raw = {}  # id(registered object) -> what _wait holds for it
        self._mine = {}  # id(MicroPython's TLS socket) -> the emulated one registered (ssl.py)

    def register(self, obj, eventmask=POLLIN | POLLOUT):
        nat = ssl.native(obj)
        if nat is not obj:
            self._mine[id(nat)] = obj
        self._p.register(nat, eventmask)
        raw = ssl.raw_socket(obj)
        if raw is None:
            raw = obj
        old = self._raw.get(id(obj))
        if old is not None and old is not raw:
            self._wait.unregister(old)
        self._raw[id(obj)] = raw
        self._wait.register(raw, eventmask)

    def modify(self, obj, eventmask):
        self._p.modify(ssl.native(obj), eventmask)
        self._wait.modify(self._raw[id(obj)], eventmask)

    def unregister(self, obj):
        nat = ssl.native(obj)
        self._mine.pop(id(nat), None)
        self._p.unregister(nat)
        raw = self._raw.pop(id(obj), None)
        if raw is not None:
            self._wait.unregister(raw)

    def _ready(self, timeout):
        # MicroPython's own answer first (pending TLS bytes count); then sleep in the kernel
        # until a socket underneath has something, and ask again.
        ev = self._p.poll(0)
        if ev or timeout == 0:
            return ev
        t0 = time.ticks_ms()
        while True:
            left = -1 if timeout < 0 else timeout - time.ticks_diff(time.ticks_ms(), t0)
            if timeout >= 0 and left <= 0:
                return self._p.poll(0)
            if self._wait.poll(left):
                ev = self._p.poll(0)
                if ev:
                    return ev
                time.sleep_ms(1)  # a partial TLS record: more is on its way

    def _theirs(self, ev):
        # answers name what the firmware registered, not what stands behind it
        if not self._mine:
            return ev
        return [(self._mine.get(id(e[0]), e[0]),) + tuple(e[1:]) for e in ev]

    def poll(self, timeout=-1):
        return self._theirs(self._ready(timeout))

    def ipoll(self, timeout=-1, flags=0):
        if not self._ready(timeout):
            return iter(())
        return iter(self._theirs(list(self._p.ipoll(0, flags))))
