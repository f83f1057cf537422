# network.py Emulated `network` for the ESP32: a station interface on the host's loopback.
#
# The station "joins" as soon as it is given credentials; sockets are the host's loopback.
# The runner owns the radio: while <ctl>/link says "down" the station is not connected (and
# the runner cuts the board's connections, tools/esp32emu/link.py).

from _emuhw import CTL_DIR


def _link_up():
    try:
        with open(CTL_DIR + "/link") as f:
            return f.read() != "down"
    except OSError:
        return True

STA_IF = 0
AP_IF = 1
STAT_IDLE = 1000
STAT_CONNECTING = 1001
STAT_GOT_IP = 1010


class WLAN:
    def __init__(self, interface_id=STA_IF):
        self._if = interface_id
        self._active = False
        self._ssid = None

    def active(self, *state):
        if state:
            self._active = bool(state[0])
        return self._active

    def connect(self, ssid=None, key=None, **kwargs):
        if not self._active:
            raise OSError("Wifi Not Started")
        self._ssid = ssid

    def disconnect(self):
        self._ssid = None

    def isconnected(self):
        return self._active and self._ssid is not None and _link_up()

    def status(self, *args):
        if args:
            return None
        return STAT_GOT_IP if self.isconnected() else STAT_IDLE

    def ifconfig(self, *args):
        return ("127.0.0.1", "255.0.0.0", "127.0.0.1", "127.0.0.1")

    def config(self, *args, **kwargs):
        if args and args[0] == "mac":
            import machine

            return machine.unique_id()
        return None


def hostname(*args):
    return "esp32emu"
