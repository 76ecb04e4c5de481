"""A private network for the embedded Milvus: its own Linux network namespace, whose only door is
a relay listening on one loopback port of the host.

Milvus 2.3 has no setting for the address it listens on: its API, webservice and internal gRPC
ports listen on every interface, and its embedded etcd on the fixed ports 2379/2380, so only one
could run per machine. In a network namespace of its own, "every interface" is that namespace's
loopback: nothing of Milvus is reachable from the host or the network, and each embedded Milvus
has its own ports 2379, 19530... This module's relay is the one way in: a process that listens on
the host's 127.0.0.1:<port> and then moves into a new network namespace, where it connects each
accepted connection to Milvus's API port. Milvus is started inside the relay's namespace
(`enter`), so the namespace lives as long as the relay does.

Making a network namespace needs CAP_SYS_ADMIN (root); `python -m velo.ops.private_network` exits
with UNAVAILABLE_EXIT where the kernel refuses, and the caller decides what to do without one.
Run as: python -m velo.ops.private_network <host port> <inner port>; it prints "ready" once both
its listener and the namespace exist, and exits on SIGTERM or when its stdin closes (its owner
exited: not PR_SET_PDEATHSIG, which fires when the owner's *thread* that started it ends).
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import os
import signal
import socket
import struct
import sys
import threading
from collections.abc import Callable
from typing import TypeVar, cast

LOOPBACK = "127.0.0.1"
CLONE_NEWNET = 0x40000000  # <linux/sched.h>
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1  # <linux/sockios.h>, <net/if.h>
READY = "ready"
PORT_TAKEN_EXIT = 2  # the host port is in use
UNAVAILABLE_EXIT = 3  # the kernel refused a network namespace (not root, or no CAP_SYS_ADMIN)
HIGH_WATER = 1 << 20  # bytes buffered for a slow side before the other side stops being read

_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def enter(namespace_fd: int) -> None:
    """Move the calling thread (a fresh child process: all of it) into the namespace open at fd.
    Safe in a subprocess preexec_fn: one foreign call, no allocation, no lock."""
    _check(_libc.setns(namespace_fd, CLONE_NEWNET), "setns")


def namespace_path(pid: int) -> str:
    return f"/proc/{pid}/ns/net"


def call_inside(pid: int, fn: Callable[[], T]) -> T:
    """Run fn in a thread of this process moved into `pid`'s network namespace (a network
    namespace is a per-thread property): what it connects to is that namespace's loopback."""
    result: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            fd = os.open(namespace_path(pid), os.O_RDONLY)
            try:
                enter(fd)
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as exc:  # re-raised in the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=run, name="in-private-network", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def _new_namespace() -> None:
    """Unshare this (single-threaded) process's network namespace and bring its loopback up:
    a new namespace has only `lo`, and it starts down."""
    _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))


class _Pipe(asyncio.Protocol):
    """One side of a relayed connection: what it receives, the other side writes (kept until
    the other side is connected). Reading stops while the other side's write buffer is full, so
    a slow reader costs memory only up to HIGH_WATER; an end of stream is passed on as a
    half-close."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Pipe | None = None
        self._early: list[bytes] = []  # received before the peer was connected
        self._early_eof = False

    def join(self, peer: _Pipe) -> None:
        self.peer = peer
        for data in self._early:
            self.data_received(data)
        self._early.clear()
        if self._early_eof:
            self.eof_received()

    def _other(self) -> asyncio.Transport | None:
        return self.peer.transport if self.peer is not None else None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.set_write_buffer_limits(high=HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        if (other := self._other()) is None:
            self._early.append(data)
        else:
            other.write(data)

    def eof_received(self) -> bool:
        if (other := self._other()) is None:
            self._early_eof = True
        elif other.can_write_eof():
            other.write_eof()
        return True  # keep the other direction open until the peer closes too

    def connection_lost(self, exc: Exception | None) -> None:
        if (other := self._other()) is not None:
            other.close()

    def pause_writing(self) -> None:
        if (other := self._other()) is not None:
            other.pause_reading()

    def resume_writing(self) -> None:
        if (other := self._other()) is not None:
            other.resume_reading()


async def _relay(listener: socket.socket, inner_port: int) -> None:
    loop = asyncio.get_running_loop()

    async def accepted(client: socket.socket) -> None:
        outer = _Pipe()
        try:
            await loop.connect_accepted_socket(lambda: outer, client)
        except OSError:
            client.close()
            return
        try:
            _, inner = await loop.create_connection(_Pipe, LOOPBACK, inner_port)
        except OSError:  # Milvus not (yet) listening: the client sees its connection close
            if outer.transport is not None:
                outer.transport.close()
            return
        if outer.transport is None or outer.transport.is_closing():  # the client left meanwhile
            if inner.transport is not None:
                inner.transport.close()
            return
        inner.join(outer)
        outer.join(inner)

    listener.setblocking(False)
    tasks: set[asyncio.Task[None]] = set()
    while True:
        client, _ = await loop.sock_accept(listener)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = loop.create_task(accepted(client))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


def _exit_when_stdin_closes() -> None:
    sys.stdin.buffer.read()
    os._exit(0)


def main(argv: list[str]) -> int:
    host_port, inner_port = int(argv[0]), int(argv[1])
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((LOOPBACK, host_port))  # in the host's namespace: created before unshare
        listener.listen(512)
    except OSError as exc:
        print(f"cannot listen on {LOOPBACK}:{host_port}: {exc}", flush=True)
        return PORT_TAKEN_EXIT
    try:
        _new_namespace()
    except OSError as exc:
        print(f"no private network namespace: {exc}", flush=True)
        return UNAVAILABLE_EXIT
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    threading.Thread(target=_exit_when_stdin_closes, daemon=True).start()
    print(READY, flush=True)
    try:
        import uvloop
        uvloop.run(_relay(listener, inner_port))
    except ImportError:
        asyncio.run(_relay(listener, inner_port))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
