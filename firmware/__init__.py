# The device code. Two helpers every module of it may use: the console log, and dropping a
# module's bytecode from RAM once it is no longer needed (RAM is tight on an ESP32).

import gc


def log(*args):
    print("[ota]", *args)


def unload(*names):
    """Drop modules from RAM until they are imported again (bytecode is ~2x its .mpy size in
    RAM). The parent package holds a reference to each submodule too, so that goes as well."""
    import sys

    for name in names:
        sys.modules.pop(name, None)
        parent, _, child = name.rpartition(".")
        if parent in sys.modules:
            try:
                delattr(sys.modules[parent], child)
            except (AttributeError, KeyError):  # MicroPython raises KeyError
                pass
    gc.collect()
