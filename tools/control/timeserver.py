"""A minimal SNTP server (RFC 4330, server side) for devices on the test network.

Devices set their clock before TLS (a cold ESP32 starts at 2000-01-01 and every certificate
would be "not yet valid"). In production they use any NTP server; the services run this one on
loopback so the emulated fleet needs nothing outside the machine.
"""

from __future__ import annotations

import asyncio
import struct
import time

_NTP_DELTA = 2208988800


def _ntp_stamp(t: float) -> bytes:
    secs = int(t) + _NTP_DELTA
    frac = int((t % 1) * 2**32)
    return struct.pack("!II", secs & 0xFFFFFFFF, frac)


class _SNTP(asyncio.DatagramProtocol):
    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        if len(data) < 48 or data[0] & 7 != 3:  # only client requests
            return
        now = time.time()
        version = (data[0] >> 3) & 7
        resp = bytearray(48)
        resp[0] = (version << 3) | 4  # LI 0, the client's version, mode 4 (server)
        resp[1] = 2  # stratum: secondary
        resp[2], resp[3] = data[2], 0xEC  # poll as asked, precision ~2^-20 s
        resp[12:16] = b"LOCL"
        resp[16:24] = _ntp_stamp(now)  # reference
        resp[24:32] = data[40:48]  # originate = the client's transmit
        resp[32:40] = _ntp_stamp(now)  # receive
        resp[40:48] = _ntp_stamp(time.time())  # transmit
        self.transport.sendto(bytes(resp), addr)


async def start_time_server(host: str, port: int = 0):
    """Serve SNTP on UDP host:port; returns (transport, bound port). Close the transport."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(_SNTP, local_addr=(host, port))
    return transport, transport.get_extra_info("sockname")[1]
