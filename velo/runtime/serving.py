"""What every VELO daemon shares: a grpc.aio server with health and reflection, and a life
that reads top to bottom (as uvicorn's server does):

    serve() = install signal handlers -> startup() -> main_loop() -> shutdown()

A daemon subclasses `Daemon`, opens its resources in `startup()`, registers its services with
`self.grpc.add(...)`, and releases them in `shutdown()` after in-flight RPCs have drained.

Health follows the parts a daemon depends on (its vector database, its cloud, its LLM...):
each part is reported under its own health service name (`velo.part.<name>`), and the
daemon's overall status ("" and each of its services) is SERVING only while every required
part is up. A part going down or coming back is logged once, with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import inspect
import os
import signal
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from velo.core.bad_input import clip
from velo.runtime.logs import get_logger
from velo.runtime.metrics import Metrics, Reading
from velo.runtime.security import AuthConfig, RequireToken, TLSConfig

log = get_logger("velo.serving")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
PART_PREFIX = "velo.part."
# How a component tells its daemon that a part is up or down: (part, up, reason if down).
PartReport = Callable[[str, bool, str], Awaitable[None]]
DOWN_PROBE_S = 1.0  # a part that is down is probed this often, so that it is back up soon


class Undecided(enum.Enum):
    """A probe's answer when it cannot tell yet (one check ran out of time on a loaded box:
    not an outage until it happens again); the part stays as it is."""

    UNDECIDED = "undecided"


UNDECIDED = Undecided.UNDECIDED
# A probe of a part: None when it is up, why not when it is down, or UNDECIDED.
Probe = Callable[[], Awaitable[str | Undecided | None]]


@dataclass
class Part:
    ok: bool
    reason: str
    required: bool


class GrpcServer:
    """A grpc.aio server that also serves grpc.health.v1 and server reflection, and never
    answers grpc's UNKNOWN: undecodable requests get INVALID_ARGUMENT, and an exception no
    handler expected gets INTERNAL with an id that its logged traceback carries."""

    def __init__(self, listen: str, max_message_bytes: int = 8 * 1024 * 1024,
                 credentials: grpc.ServerCredentials | None = None,
                 interceptors: Sequence[grpc.aio.ServerInterceptor] = ()) -> None:
        self.listen = listen
        self.credentials = credentials
        self.server = grpc.aio.server(
            # Innermost: authentication (outer interceptors) decides before anything is decoded.
            interceptors=[*interceptors, NeverUnknown()],
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._service_names = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        self.parts: dict[str, Part] = {}
        self.started = False
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
        if self.credentials is None:
            self.port = self.server.add_insecure_port(self.listen)
        else:
            self.port = self.server.add_secure_port(self.listen, self.credentials)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.listen}")
        await self.server.start()
        self.started = True
        await self._publish_health()
        return self.port

    @property
    def address(self) -> str:
        host = self.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    # -- health -----------------------------------------------------------------------------
    @property
    def serving(self) -> bool:
        """True while every required part is up."""
        return all(p.ok for p in self.parts.values() if p.required)

    def down_parts(self) -> dict[str, str]:
        """The parts that are down, with the reason each is down."""
        return {name: p.reason for name, p in self.parts.items() if not p.ok}

    async def set_part(self, name: str, ok: bool, reason: str = "", *,
                       required: bool = True) -> None:
        """Report one part (e.g. 'vector_db') up or down; logs transitions with the reason."""
        before = self.parts.get(name)
        self.parts[name] = Part(ok, reason, required)
        if before is not None and before.ok == ok:
            return
        if ok:
            if before is not None:  # the first report of a part that is up is not news
                log.info("part up", part=name)
        else:
            log.warning("part down", part=name, reason=reason, required=required)
        if self.started:
            await self._publish_health()

    async def _publish_health(self) -> None:
        for name, part in self.parts.items():
            await self.health.set(PART_PREFIX + name, SERVING if part.ok else NOT_SERVING)
        overall = SERVING if self.serving else NOT_SERVING
        for name in self._service_names:
            await self.health.set(name, overall)
        await self.health.set("", overall)

    async def stop(self, grace_s: float) -> None:
        """Stop accepting RPCs, let in-flight ones finish for up to `grace_s`, then cancel."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)


# -- never UNKNOWN: undecodable requests, unexpected errors ---------------------------------
class _Undecodable:
    """What the request deserializer hands on instead of raising (grpc would say UNKNOWN)."""

    def __init__(self, message: str) -> None:
        self.message = message


def _lenient(deserializer: Callable[[bytes], Any] | None, method: str) -> Callable[[bytes], Any]:
    def deserialize(raw: bytes) -> Any:
        if deserializer is None:
            return raw
        try:
            return deserializer(raw)
        except Exception as exc:  # protobuf's DecodeError (bad wire data, invalid UTF-8)
            return _Undecodable(f"{method}: the request is not a valid protobuf message for "
                                f"this method ({type(exc).__name__}: {clip(str(exc))}); check "
                                "that client and server use the same velo.v1 protos")
    return deserialize


async def _reject(context: grpc.aio.ServicerContext, bad: _Undecodable) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, bad.message)


class NeverUnknown(grpc.aio.ServerInterceptor):
    """grpc answers UNKNOWN, with the exception's text, to what a handler did not foresee.
    This guard, around every handler of every daemon, answers instead: a request that cannot
    be decoded (malformed protobuf, invalid UTF-8 in a string field) is INVALID_ARGUMENT, the
    caller's fault; an exception a handler did not expect is INTERNAL with a logged id."""

    def __init__(self) -> None:
        self._guarded: dict[str, grpc.RpcMethodHandler] = {}  # per method: handlers are fixed

    async def intercept_service(self, continuation: Callable[..., Any],
                                details: grpc.HandlerCallDetails,
                                ) -> grpc.RpcMethodHandler | None:
        guarded = self._guarded.get(details.method)
        if guarded is None:
            handler = await continuation(details)
            if handler is None:
                return None
            guarded = self._guarded[details.method] = _guard(handler, details.method)
        return guarded


def _guard(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    deserialize = _lenient(handler.request_deserializer, method)
    serialize = handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _guard_unary(handler.unary_unary, method), deserialize, serialize)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _guard_unary(handler.unary_stream, method), deserialize, serialize)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            _guard_stream(handler.stream_unary, method), deserialize, serialize)
    return grpc.stream_stream_rpc_method_handler(
        _guard_stream(handler.stream_stream, method), deserialize, serialize)


async def _internal(context: grpc.aio.ServicerContext, method: str) -> None:
    """An exception no handler expected (call inside `except`): logged with its traceback
    under an id, and answered INTERNAL with that id. grpc would answer UNKNOWN and put the
    exception's text in the reply; the caller gets the id to quote, the operator the log."""
    error_id = uuid.uuid4().hex[:12]
    log.exception("rpc failed", method=method, error_id=error_id)
    await context.abort(grpc.StatusCode.INTERNAL,
                        f"internal error in {method} (id {error_id}: the daemon's log has it)")


def _guard_unary(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    # grpc.aio tells a server-streaming async generator from a coroutine by inspection, so
    # the guard must be the same kind of function as the behaviour it wraps.
    if inspect.isasyncgenfunction(behavior):
        @functools.wraps(behavior)
        async def stream(request: Any, context: grpc.aio.ServicerContext,
                         ) -> AsyncIterator[Any]:
            if isinstance(request, _Undecodable):
                await _reject(context, request)
            try:
                async for reply in behavior(request, context):
                    yield reply
            except grpc.aio.AbortError:
                raise  # a deliberate abort(): its status is already set
            except Exception:
                await _internal(context, method)
        return stream

    @functools.wraps(behavior)
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Undecodable):
            await _reject(context, request)
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception:
            await _internal(context, method)
    return unary


def _guard_stream(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    async def checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext,
                      ) -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, _Undecodable):
                await _reject(context, request)
            yield request

    if inspect.isasyncgenfunction(behavior):
        @functools.wraps(behavior)
        async def stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext,
                         ) -> AsyncIterator[Any]:
            try:
                async for reply in behavior(checked(requests, context), context):
                    yield reply
            except grpc.aio.AbortError:
                raise
            except Exception:
                await _internal(context, method)
        return stream

    @functools.wraps(behavior)
    async def unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(checked(requests, context), context)
        except grpc.aio.AbortError:
            raise
        except Exception:
            await _internal(context, method)
    return unary


# -- the daemon -----------------------------------------------------------------------------
class Daemon:
    """Base of edged, cloudd and trainerd. Subclasses override startup() and shutdown()."""

    name = "daemon"

    def __init__(self, listen: str, shutdown_grace_s: float = 10.0,
                 max_message_bytes: int = 8 * 1024 * 1024, *, tls: TLSConfig | None = None,
                 auth: AuthConfig | None = None,
                 roles: dict[str, frozenset[str]] | None = None, metrics_listen: str = "",
                 ) -> None:
        """`tls`: the daemon's [tls] (its port and its links); `auth`: its [auth], with `roles`
        saying which token roles may call each method (velo.runtime.security); `metrics_listen`:
        where Prometheus scrapes /metrics (empty: nowhere)."""
        self.listen, self.max_message_bytes = listen, max_message_bytes
        self.shutdown_grace_s = shutdown_grace_s
        self.tls, self.auth, self.roles = tls, auth, roles or {}
        self.should_exit = asyncio.Event()
        self.log = get_logger(self.name)
        self._grpc: GrpcServer | None = None
        self.metrics_listen = metrics_listen
        self.metrics = Metrics()
        self.metrics.read(self._health_readings)
        self.tasks: list[asyncio.Task[Any]] = []  # background work for the daemon's life (spawn)
        # What startup() opened, to release in reverse order (push as each thing opens): a
        # startup that fails half-way releases what it had opened.
        self.closing = contextlib.AsyncExitStack()

    @property
    def grpc(self) -> GrpcServer:
        """Created on first use, inside the running loop: grpc.aio binds a server to it."""
        if self._grpc is None:
            table = self.auth.table() if self.auth is not None else None
            self._grpc = GrpcServer(
                self.listen, self.max_message_bytes,
                self.tls.server_credentials() if self.tls is not None else None,
                [RequireToken(table, self.roles)] if table is not None else [])
        return self._grpc

    async def startup(self) -> None:
        """Open resources, register services, then start the gRPC server (call super last)."""
        port = await self.grpc.start()
        self.log.info("listening", address=self.grpc.address, port=port,
                      tls=self.grpc.credentials is not None)
        if self.metrics_listen:
            self.metrics_port = self.metrics.start(self.metrics_listen, self.tls)
            self.log.info("metrics served", port=self.metrics_port, path="/metrics")

    def _health_readings(self) -> list[Reading]:
        if self._grpc is None:
            return []
        return [Reading("velo_serving", "1 while every part this daemon needs is up",
                        float(self._grpc.serving), labels={"daemon": self.name}),
                *(Reading("velo_part_up", "1 while this part of the daemon is up", float(p.ok),
                          labels={"daemon": self.name, "part": name})
                  for name, p in self._grpc.parts.items())]

    def spawn(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run `work` in the background for the daemon's life; stop_tasks() ends it."""
        task = asyncio.create_task(work)
        self.tasks.append(task)
        return task

    async def stop_tasks(self) -> None:
        """Cancel the background work and wait until it has ended (the subclass's shutdown
        says when: after the work the tasks serve has drained).

        A task still running RECANCEL_S after its cancel is cancelled again: a cancel that
        arrives as an awaited call completes can be lost (Python 3.11's asyncio.wait_for
        returns the result; grpc.aio's calls do the same), and a loop that lost it would
        hold the shutdown, and the closing of the stores after it, until the shutdown's
        limit. A task that outlives STOP_TASKS_S of cancels is logged and left."""
        tasks, self.tasks = self.tasks, []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_TASKS_S
        pending = set(tasks)
        while pending and loop.time() < deadline:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=RECANCEL_S)
        if pending:
            self.log.error("background tasks did not stop when cancelled",
                           tasks=sorted(task.get_name() for task in pending))
        await asyncio.gather(*(t for t in tasks if t.done()), return_exceptions=True)

    async def report_probe(self, part: str, verdict: str | Undecided | None, *,
                           required: bool = True) -> None:
        """Set `part` up (None) or down (why) as a probe said; UNDECIDED leaves it as it is."""
        if verdict is not UNDECIDED:
            await self.grpc.set_part(part, verdict is None, verdict or "", required=required)

    async def watch_part(self, part: str, probe: Probe, every_s: float, *,
                         required: bool = True) -> None:
        """Probe `part` for the daemon's life (run it with spawn): now, then every `every_s`
        while it is up and every DOWN_PROBE_S while it is down, and report what the probe
        says. The one loop every daemon's health follows."""
        while True:
            await self.report_probe(part, await probe(), required=required)
            now = self.grpc.parts.get(part)
            await asyncio.sleep(every_s if now is None or now.ok else DOWN_PROBE_S)

    async def main_loop(self) -> None:
        await self.should_exit.wait()

    async def shutdown(self) -> None:
        """Drain in-flight RPCs, then release what startup() pushed on `closing` (newest
        first). Subclasses put what must happen before the drain ahead of super()."""
        self.log.info("shutting down", grace_s=self.shutdown_grace_s)
        await self.grpc.stop(self.shutdown_grace_s)
        self.metrics.stop()
        await self.closing.aclose()

    def _on_signal(self) -> None:
        """The first SIGINT/SIGTERM starts a graceful shutdown; a second one exits at once
        (uvicorn's force exit: an operator who asks twice means it)."""
        if self.should_exit.is_set():
            self.log.warning("second signal: exiting now, without finishing the shutdown")
            os._exit(1)
        self.should_exit.set()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal)
        try:
            await self.startup()
        except BaseException:
            # Release what the start had opened (files, ports, threads, child processes)
            # before the error ends the daemon; the start's error is the one to report.
            with contextlib.suppress(Exception):
                await self._bounded_shutdown()
            raise
        sd_notify("READY=1")
        try:
            await self.main_loop()
        finally:
            sd_notify("STOPPING=1")
            await self._bounded_shutdown()

    async def _bounded_shutdown(self) -> None:
        """Whatever the peers do, the shutdown ends: the grace for in-flight work, then a few
        seconds to close files and connections."""
        limit = self.shutdown_grace_s + SHUTDOWN_CLOSE_S
        try:
            async with asyncio.timeout(limit):
                await self.shutdown()
            self.log.info("stopped")
        except TimeoutError:
            self.log.error("shutdown did not finish in time; stopping anyway", limit_s=limit)

    def run(self) -> None:
        """Entry point of a daemon process: serve on uvloop until SIGINT/SIGTERM.

        A failure to start (a dependency down, a port taken) is logged in one line and exits 1,
        so that systemd's restart policy takes over. Threads still stuck in a dead peer's call
        do not hold the exit (asyncio.run would wait for them without end).
        """
        loop = uvloop.new_event_loop()
        code = 0
        try:
            loop.run_until_complete(self.serve())
        except Exception as exc:
            self.log.error("daemon failed", error=f"{type(exc).__name__}: {exc}")
            code = 1
        finally:
            loop.close()
        _exit_past_stuck_threads(code, self.log)


SHUTDOWN_CLOSE_S = 5.0  # after the grace, what closing files and connections may take
STOP_TASKS_S = 3.0  # how long the background tasks are cancelled again before they are left
RECANCEL_S = 0.5  # a task not ended this long after its cancel gets another (room to clean up)


def _exit_past_stuck_threads(code: int, log: Any, wait_s: float = 2.0) -> None:
    """Return (and let the interpreter exit with `code`) when only daemon threads are left;
    otherwise exit with `code` once `wait_s` has passed: a worker thread blocked in a call to
    a frozen peer would keep the process alive at interpreter exit."""
    import threading
    import time

    deadline = time.monotonic() + wait_s
    for thread in threading.enumerate():
        if thread is threading.current_thread() or thread.daemon:
            continue
        thread.join(max(deadline - time.monotonic(), 0))
    stuck = [t.name for t in threading.enumerate()
             if t is not threading.current_thread() and not t.daemon and t.is_alive()]
    if stuck:
        log.warning("threads still busy at exit; leaving without them", threads=stuck[:5])
        os._exit(code)
    if code:
        raise SystemExit(code)


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

    from velo.runtime.config import ConfigError
    from velo.runtime.lifeline import follow_parent
    from velo.runtime.logs import configure_logging

    follow_parent()  # started by a stack: go when it goes
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
