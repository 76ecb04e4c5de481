"""What every VELO daemon shares: a grpc.aio server with health and reflection, and a life
that reads top to bottom (as uvicorn's server does):

    serve() = install signal handlers -> startup() -> main_loop() -> shutdown()

A daemon subclasses `Daemon`, opens its resources in `startup()`, registers its services with
`self.grpc.add(...)`, and releases them in `shutdown()` after in-flight RPCs have drained.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import Callable
from typing import Any

import grpc
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from velo.logs import get_logger

log = get_logger("velo.serving")


class GrpcServer:
    """A grpc.aio server that also serves grpc.health.v1 and server reflection."""

    def __init__(self, listen: str, max_message_bytes: int = 8 * 1024 * 1024) -> None:
        self.listen = listen
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.so_reuseport", 0),
            ]
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._service_names = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        self.port = 0

    def add(self, register: Callable[[Any, grpc.aio.Server], None], servicer: Any,
            name: str) -> None:
        """Register a generated servicer; `name` is its full name, e.g. 'velo.v1.EdgeService'."""
        register(servicer, self.server)
        self._service_names.append(name)

    async def start(self) -> int:
        """Bind and start serving; returns the bound port (useful with port 0)."""
        reflection.enable_server_reflection(
            [*self._service_names, reflection.SERVICE_NAME], self.server
        )
        self.port = self.server.add_insecure_port(self.listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.listen}")
        await self.server.start()
        for name in self._service_names:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        return self.port

    @property
    def address(self) -> str:
        host = self.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def stop(self, grace_s: float) -> None:
        """Stop accepting RPCs, let in-flight ones finish for up to `grace_s`, then cancel."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)


class Daemon:
    """Base of edged, cloudd and trainerd. Subclasses override startup() and shutdown()."""

    name = "daemon"

    def __init__(self, listen: str, shutdown_grace_s: float = 10.0,
                 max_message_bytes: int = 8 * 1024 * 1024) -> None:
        self.listen, self.max_message_bytes = listen, max_message_bytes
        self.shutdown_grace_s = shutdown_grace_s
        self.should_exit = asyncio.Event()
        self.log = get_logger(self.name)
        self._grpc: GrpcServer | None = None

    @property
    def grpc(self) -> GrpcServer:
        """Created on first use, inside the running loop: grpc.aio binds a server to it."""
        if self._grpc is None:
            self._grpc = GrpcServer(self.listen, self.max_message_bytes)
        return self._grpc

    async def startup(self) -> None:
        """Open resources, register services, then start the gRPC server (call super last)."""
        port = await self.grpc.start()
        self.log.info("listening", address=self.grpc.address, port=port)

    async def main_loop(self) -> None:
        await self.should_exit.wait()

    async def shutdown(self) -> None:
        """Drain in-flight RPCs; subclasses then close their own resources."""
        self.log.info("shutting down", grace_s=self.shutdown_grace_s)
        await self.grpc.stop(self.shutdown_grace_s)

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.should_exit.set)
        await self.startup()
        sd_notify("READY=1")
        try:
            await self.main_loop()
        finally:
            sd_notify("STOPPING=1")
            await self.shutdown()
            self.log.info("stopped")

    def run(self) -> None:
        """Entry point of a daemon process: serve on uvloop until SIGINT/SIGTERM.

        A failure to start (a dependency down, a port taken) is logged in one line and exits 1,
        so that systemd's restart policy takes over.
        """
        try:
            uvloop.run(self.serve())
        except Exception as exc:
            self.log.error("daemon failed", error=f"{type(exc).__name__}: {exc}")
            raise SystemExit(1) from exc


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op when not started by systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(state.encode())


def daemon_main(name: str, description: str, example: str, load: Callable[[str | None], Any],
                make: Callable[[Any], Daemon], argv: list[str] | None = None) -> None:
    """The command line of every daemon: `velo-<name> [--config PATH]`.

    A config error prints `velo-<name>: <message naming the key>` and exits 2, before anything
    starts.
    """
    import argparse
    import sys

    from velo.config import ConfigError
    from velo.logs import configure_logging

    env = f"VELO_{name.upper()}"
    parser = argparse.ArgumentParser(
        prog=f"velo-{name}", description=description,
        epilog=f"Every config key can be overridden by the environment, e.g. {example}.")
    parser.add_argument("--config", metavar="PATH", default=os.environ.get(f"{env}_CONFIG"),
                        help=f"TOML config file (default: ${env}_CONFIG, else built-in defaults)")
    args = parser.parse_args(argv)
    try:
        config = load(args.config)
    except ConfigError as exc:
        print(f"velo-{name}: {exc}", file=sys.stderr)
        sys.exit(2)
    configure_logging(config.log_level)
    make(config).run()
