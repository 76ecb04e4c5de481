"""An HTTP server (uvicorn) that runs inside a daemon's own event loop, next to its gRPC server.

The daemon owns the process's life (signals, readiness, drain), so uvicorn's own signal
handling is switched off; the socket is bound before serving so that a taken port fails the
start with a clear message and port 0 tells its real port at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Iterator
from typing import Any, ClassVar

import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

from velo.runtime.security import TLSConfig


class _GuardedProtocol(H11Protocol):
    """h11 with two guards against slow clients (slow-loris), which uvicorn lacks: a new
    connection's request headers must be complete within `header_timeout_s`, and open
    connections are capped at `max_connections`, so that half-open connections cannot take
    every file descriptor of the daemon (its gRPC port needs them too). At the cap a new
    connection takes the place of the oldest one still waiting for its headers (so a flood of
    half-open connections does not lock out real clients); only when none waits is it
    closed at once."""

    header_timeout_s = 10.0
    max_connections = 1000
    # The server's connections that have not sent a whole request yet, oldest first (a dict
    # as an ordered set); one per server, set by HttpServer.
    awaiting_headers: ClassVar[dict[_GuardedProtocol, None]] = {}

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.max_connections:
            if not self.awaiting_headers:
                transport.close()  # not counted: connection_lost discards what was never added
                return
            oldest = next(iter(self.awaiting_headers))
            oldest._forget_headers()
            oldest.transport.close()
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = self.loop.call_later(
            self.header_timeout_s, self._headers_late)
        self.awaiting_headers[self] = None

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and self._header_timer is not None:  # a request began
            self._forget_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._forget_headers()
        if getattr(self, "transport", None) is not None:
            super().connection_lost(exc)

    def _forget_headers(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self.awaiting_headers.pop(self, None)

    def _headers_late(self) -> None:
        self._forget_headers()
        if self.cycle is None and not self.transport.is_closing():
            self.transport.close()


class _QuietServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # the daemon handles SIGINT / SIGTERM
        yield


class HttpServer:
    def __init__(self, app: ASGIApp, listen: str, tls: TLSConfig | None = None,
                 grace_s: float = 10.0, header_timeout_s: float = 10.0,
                 max_connections: int = 1000) -> None:
        self.app, self.listen, self.tls, self.grace_s = app, listen, tls, grace_s
        # One protocol class per server: its guards are this server's settings.
        self._protocol = type("GuardedProtocol", (_GuardedProtocol,), {
            "header_timeout_s": header_timeout_s, "max_connections": max_connections,
            "awaiting_headers": {}})
        self.port = 0
        self._server: _QuietServer | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None and self.tls.cert_file else "http"

    @property
    def address(self) -> str:
        host = self.listen.rsplit(":", 1)[0].strip("[]") or "127.0.0.1"
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.address}"

    async def start(self) -> int:
        host, _, port = self.listen.rpartition(":")
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, int(port)))
        except (OSError, ValueError) as exc:
            sock.close()
            raise RuntimeError(f"cannot listen for HTTP on {self.listen}: {exc}") from None
        sock.listen(1024)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off",
                                http=self._protocol,
                                # uvicorn annotates it int, but only passes it on to
                                # asyncio.wait_for(timeout=...), where a float works
                                timeout_graceful_shutdown=self.grace_s,  # type: ignore[arg-type]
                                **self._tls_options())
        self._server = _QuietServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():  # it failed to start: say why
                self._task.result()
                raise RuntimeError(f"HTTP server on {self.listen} stopped while starting")
            await asyncio.sleep(0.01)
        return self.port

    def _tls_options(self) -> dict[str, Any]:
        tls = self.tls
        if tls is None or not tls.cert_file:
            return {}
        options: dict[str, Any] = {"ssl_certfile": tls.cert_file, "ssl_keyfile": tls.key_file}
        if tls.client_auth:
            options |= {"ssl_ca_certs": tls.ca_file, "ssl_cert_reqs": ssl.CERT_REQUIRED}
        return options

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish (up to the grace period), close."""
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        try:
            async with asyncio.timeout(self.grace_s + 5):
                await self._task
        except TimeoutError:
            self._server.force_exit = True
            await asyncio.gather(self._task, return_exceptions=True)
