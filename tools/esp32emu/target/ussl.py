# ussl.py Alias for umqtt.simple 1.3.4 (PyPI), which imports `ussl`; frozen umqtt >= 1.6 on a
# real ESP32 imports `ssl` directly.
from ssl import *  # noqa: F401,F403
