"""Free TCP ports on loopback for the real servers tests start (Redis, Label Studio, the backend, stubs)."""
from __future__ import annotations

import socket


def free_port() -> int:
    """A port nobody listens on right now on 127.0.0.1 (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
