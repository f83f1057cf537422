"""A free TCP port on an address, for services started with port 0 in mind."""

import socket


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
