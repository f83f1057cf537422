# os.py Emulated `os` for the ESP32: the unix port's os, with ilistdir() entries as the
# ESP32's LittleFS gives them: (name, type, inode, size). The unix port's entries have no
# size, so `mpremote fs ls` would show 0 for every file.

from uos import *  # noqa: F401,F403
import uos

_DIR = 0x4000


def ilistdir(path="."):
    base = path.rstrip("/") + "/" if path not in ("", ".") else ""
    for entry in uos.ilistdir(path):
        name, kind = entry[0], entry[1]
        size = 0
        if kind != _DIR:
            try:
                size = uos.stat(base + name)[6]
            except OSError:
                pass
        yield (name, kind, 0, size)
