"""Loopback ports for daemons that a parent starts: picked here, bound later by the child.

Between the pick and the child's bind, the port is free for anyone. A port from the kernel's
ephemeral range (what bind(0) and every outgoing connection draw from) could then go to another
process's bind(0) (cloudd's llama.cpp server picks its own that way) or become the local end of a
client connection, and the child fails to listen. So ports are picked below that range, where
only a process that names a port takes one, and never the same one twice in a process.
"""

from __future__ import annotations

import itertools
import random
import socket
from pathlib import Path
from typing import cast

LOOPBACK = "127.0.0.1"
LOWEST = 10000  # below: the well-known and registered ports services name by default
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
EPHEMERAL_LOW_DEFAULT = 32768  # Linux's default when the range cannot be read


def _ephemeral_low() -> int:
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return EPHEMERAL_LOW_DEFAULT


_HIGH = max(_ephemeral_low(), LOWEST + 1)
# Every port of [LOWEST, _HIGH) in turn from a random start: a process never picks one twice,
# and two processes rarely start at the same place.
_START = random.randrange(LOWEST, _HIGH)
_next_port: itertools.cycle[int] = itertools.cycle([*range(_START, _HIGH), *range(LOWEST, _START)])


def free_port() -> int:
    """A loopback port nothing is bound to now, outside the ephemeral range (see above)."""
    for _ in range(_HIGH - LOWEST):
        port = next(_next_port)
        with socket.socket() as sock:
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                continue  # in use, or its last connection lingers in TIME_WAIT
            return port
    with socket.socket() as sock:  # all taken: let the kernel choose, race and all
        sock.bind((LOOPBACK, 0))
        return cast(int, sock.getsockname()[1])  # getsockname() is Any to mypy
