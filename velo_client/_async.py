"""AsyncVeloClient: the one implementation of calls, retries and edge selection (VeloClient
runs it on a private event loop)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from velo.runtime.security import FAST_RECONNECT
from velo.v1 import edge_pb2, edge_pb2_grpc
from velo_client._types import (
    TLS,
    Answer,
    CacheControl,
    Message,
    Mode,
    Retry,
    VeloError,
    ask_request,
    new_request_id,
)

_SERVING = health_pb2.HealthCheckResponse.SERVING
T = TypeVar("T")
R = TypeVar("R")


@dataclass(eq=False)
class _Edge:
    address: str
    channel: grpc.aio.Channel
    stub: edge_pb2_grpc.EdgeServiceStub
    health: health_pb2_grpc.HealthStub
    up: bool = True  # until a probe or a call says otherwise
    rtt_s: float = math.inf


@dataclass
class _Failure:
    code: grpc.StatusCode
    details: str
    edge: str


@dataclass
class _Attempts:
    """One call's tries: the request id they share and the errors they met."""

    request_id: str
    deadline: float
    count: int = 0
    last: _Failure | None = field(default=None)

    def remaining_s(self) -> float:
        return self.deadline - time.monotonic()

    def error(self) -> VeloError:
        assert self.last is not None
        return VeloError(self.last.code, self.last.details, edge=self.last.edge,
                         request_id=self.request_id, attempts=self.count)

    def deadline_passed(self) -> VeloError:
        why = f"; the last try failed with {self.last.code.name}: {self.last.details}" \
            if self.last else ""
        return VeloError(grpc.StatusCode.DEADLINE_EXCEEDED, "the call's deadline passed" + why,
                         edge=self.last.edge if self.last else "", request_id=self.request_id,
                         attempts=self.count)


class AsyncVeloClient:
    """Ask VELO edges over gRPC from asyncio code.

        async with AsyncVeloClient(["edge-1:50052", "edge-2:50052"], api_key=KEY) as velo:
            answer = await velo.ask("How do I reset my router?")
            print(answer.text, answer.action, answer.similarity)

    `mode="nearest"` (default) measures the round trip to each edge with a gRPC health check
    and sends each call to the fastest edge that is serving, falling over to the next one on
    UNAVAILABLE. `mode="hedged"` sends every call to all edges at once, returns the first
    answer and cancels the others (the paper's all-servers mode: lowest latency, N times the
    load). `timeout_s` is the whole call's deadline, retries included; each try is sent with
    the time that is left as its gRPC deadline.
    """

    def __init__(self, edges: Sequence[str], *, api_key: str = "", tenant: str = "",
                 timeout_s: float = 30.0, mode: Mode = "nearest", retry: Retry | None = None,
                 tls: TLS | None = None, probe_timeout_s: float = 0.5,
                 reprobe_s: float = 30.0) -> None:
        if isinstance(edges, str) or not edges:
            raise ValueError("edges must be a non-empty list of 'host:port' addresses")
        if mode not in ("nearest", "hedged"):
            raise ValueError(f"mode must be 'nearest' or 'hedged', not {mode!r}")
        self.edges = list(edges)
        self.tenant, self.timeout_s, self.mode = tenant, timeout_s, mode
        self.retry = retry or Retry()
        self.probe_timeout_s, self.reprobe_s = probe_timeout_s, reprobe_s
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._tls = tls
        self._pool: list[_Edge] | None = None  # channels bind to the loop: made on first use
        self._probed_at = -math.inf
        self._probing: asyncio.Task[None] | None = None

    # -- calls --------------------------------------------------------------------------------
    async def ask(self, prompt: str, *, history: Sequence[Message] = (), max_tokens: int = 0,
                  request_id: str | None = None, reference_answer: str = "",
                  cache: CacheControl | None = None, timeout_s: float | None = None,
                  ) -> Answer:
        """Answer one prompt. `history`: earlier turns, oldest first; `max_tokens`: cap on
        generated tokens (0 = the edge's default); `request_id`: an id of your own for the
        edges' logs (one is made otherwise; every retry sends the same one); `cache`: this
        request's cache control; `timeout_s`: this call's deadline, retries included."""
        request = ask_request(prompt, self.tenant, request_id or new_request_id(), history,
                              max_tokens, reference_answer, cache)
        edge, reply, tries = await self._unary(
            lambda e, t: e.stub.Ask(request, timeout=t, metadata=self._metadata),
            request.request_id, timeout_s)
        return Answer.from_response(reply, edge.address, tries)

    async def stream(self, prompt: str, *, history: Sequence[Message] = (),
                     max_tokens: int = 0, request_id: str | None = None,
                     reference_answer: str = "", cache: CacheControl | None = None,
                     timeout_s: float | None = None) -> AsyncIterator[str | Answer]:
        """Like ask(), but yields the answer text piece by piece as the edge produces it, then
        the Answer (whose text is the whole answer). A failure before the first piece is
        retried as ask() is; once text has been yielded, it is raised."""
        request = ask_request(prompt, self.tenant, request_id or new_request_id(), history,
                              max_tokens, reference_answer, cache)
        tries = _Attempts(request.request_id, time.monotonic() + (timeout_s or self.timeout_s))
        edge, call, first = await self._retrying(
            lambda edges, left_s: self._open_stream(edges, request, left_s), tries)
        try:
            message = first
            while message is not grpc.aio.EOF:
                if message.HasField("done"):
                    yield Answer.from_response(message.done, edge.address, tries.count)
                    return
                if message.text:
                    yield message.text
                message = await call.read()
            raise VeloError(grpc.StatusCode.INTERNAL, "the stream ended without its summary",
                            edge=edge.address, request_id=tries.request_id,
                            attempts=tries.count)
        except grpc.aio.AioRpcError as exc:
            raise VeloError(exc.code(), exc.details() or "", edge=edge.address,
                            request_id=tries.request_id, attempts=tries.count) from None
        finally:
            call.cancel()  # the caller stopped reading: the edge stops working for nobody

    async def stats(self, edge: str | None = None, *,
                    timeout_s: float | None = None) -> edge_pb2.EdgeStats:
        """Counters of one edge: `edge` (an address from `edges`), else the one calls go to.
        Needs an admin key when the edges check keys."""
        if edge is not None and edge not in self.edges:
            raise ValueError(f"{edge!r} is not one of this client's edges {self.edges}")
        request = edge_pb2.GetStatsRequest()
        pinned = None if edge is None else self._edges()[self.edges.index(edge)]
        _, reply, _ = await self._unary(
            lambda e, t: e.stub.GetStats(request, timeout=t, metadata=self._metadata),
            "", timeout_s, only=pinned)
        return reply

    async def close(self) -> None:
        if self._probing is not None:
            self._probing.cancel()
        for edge in self._pool or ():
            await edge.channel.close()
        self._pool = None

    async def __aenter__(self) -> AsyncVeloClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- retries ------------------------------------------------------------------------------
    async def _unary(self, call: Callable[[_Edge, float], Awaitable[T]], request_id: str,
                     timeout_s: float | None, only: _Edge | None = None,
                     ) -> tuple[_Edge, T, int]:
        tries = _Attempts(request_id, time.monotonic() + (timeout_s or self.timeout_s))

        async def attempt(edges: list[_Edge], left_s: float) -> tuple[_Edge, T]:
            async def one(edge: _Edge) -> T:
                return await call(edge, left_s)
            return await self._race(edges, one)

        edge, reply = await self._retrying(attempt, tries, only)
        return edge, reply, tries.count

    async def _retrying(self, attempt: Callable[[list[_Edge], float], Awaitable[R]],
                        tries: _Attempts, only: _Edge | None = None) -> R:
        """Run `attempt(edges, seconds left)` until it succeeds, meets a non-retryable error,
        runs out of tries or of time. Nearest mode walks the edges fastest first (a retry goes
        to the next edge); hedged mode sends every try to all of them."""
        ranked = [only] if only is not None else await self._ranked()
        while True:
            left_s = tries.remaining_s()
            if left_s <= 0:
                raise tries.deadline_passed()
            hedged = self.mode == "hedged" and only is None
            targets = ranked if hedged else [ranked[tries.count % len(ranked)]]
            tries.count += 1
            try:
                return await attempt(targets, left_s)
            except _Failed as failed:
                tries.last = failed.failure
            if not self.retry.retryable(tries.last.code) or tries.count >= self.retry.attempts:
                raise tries.error()
            await asyncio.sleep(min(self.retry.delay_s(tries.count), max(tries.remaining_s(), 0)))

    async def _race(self, edges: list[_Edge], start: Callable[[_Edge], Awaitable[T]],
                    ) -> tuple[_Edge, T]:
        """Send to every edge in `edges` at once; the first success wins and the others are
        cancelled. All failed: raise the failure that says most (a non-retryable one)."""
        calls = {asyncio.ensure_future(start(edge)): edge for edge in edges}
        pending = set(calls)
        failures: list[_Failure] = []
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    exc = task.exception()
                    if exc is None:
                        return calls[task], task.result()
                    failures.append(self._failure(calls[task], exc))
        finally:
            for task in pending:
                task.cancel()  # cancelling the awaiting task cancels the RPC at the edge
        raise _Failed(_decisive(failures, self.retry))

    async def _open_stream(self, edges: list[_Edge], request: edge_pb2.AskRequest,
                           left_s: float) -> tuple[_Edge, Any, Any]:
        """Open AskStream on `edges`; the first edge to send a message wins."""
        streams: dict[_Edge, Any] = {}

        async def first(edge: _Edge) -> Any:
            call = streams[edge] = edge.stub.AskStream(request, timeout=left_s,
                                                       metadata=self._metadata)
            return await call.read()

        try:
            edge, message = await self._race(edges, first)
        except BaseException:
            for call in streams.values():
                call.cancel()
            raise
        for other, call in streams.items():
            if other is not edge:
                call.cancel()
        if message is grpc.aio.EOF:  # the edge closed the stream without a word
            raise _Failed(_Failure(grpc.StatusCode.INTERNAL, "empty stream", edge.address))
        return edge, streams[edge], message

    def _failure(self, edge: _Edge, exc: BaseException) -> _Failure:
        if not isinstance(exc, grpc.aio.AioRpcError):
            raise exc
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            edge.up = False  # later calls try the others first, until the next probe
        return _Failure(exc.code(), exc.details() or "", edge.address)

    # -- edge selection ---------------------------------------------------------------------
    def _edges(self) -> list[_Edge]:
        if self._pool is None:
            options = list(FAST_RECONNECT)  # a restarted edge is reachable again within ~1 s
            if self._tls is not None and self._tls.server_name:
                options.append(("grpc.ssl_target_name_override", self._tls.server_name))
            credentials = self._tls.credentials() if self._tls is not None else None
            self._pool = []
            for address in self.edges:
                channel = (grpc.aio.secure_channel(address, credentials, options=options)
                           if credentials is not None
                           else grpc.aio.insecure_channel(address, options=options))
                self._pool.append(_Edge(address, channel, edge_pb2_grpc.EdgeServiceStub(channel),
                                        health_pb2_grpc.HealthStub(channel)))
        return self._pool

    async def _ranked(self) -> list[_Edge]:
        """The edges, serving ones first, fastest first; edges that are down come last (a
        last resort rather than left out: a probe may be wrong, an answer is not)."""
        edges = self._edges()
        if self.mode == "hedged":
            return edges
        age_s = time.monotonic() - self._probed_at
        if self._probed_at == -math.inf:
            await self.probe()  # the first call needs an order to start with
        elif age_s > self.reprobe_s and (self._probing is None or self._probing.done()):
            self._probing = asyncio.create_task(self.probe())  # later: refresh off the path
        return sorted(edges, key=lambda e: (not e.up, e.rtt_s))

    async def probe(self) -> dict[str, float | None]:
        """Measure each edge now: its health-check round trip in seconds, or None when it is
        unreachable or not serving. Calls in nearest mode prefer the fastest serving edge."""
        edges = self._edges()
        await asyncio.gather(*(self._probe(edge) for edge in edges))
        self._probed_at = time.monotonic()
        return {e.address: e.rtt_s if e.up else None for e in edges}

    async def _probe(self, edge: _Edge) -> None:
        request = health_pb2.HealthCheckRequest(service="")
        best = math.inf
        # The first check may pay for connecting; the second measures the round trip alone.
        for _ in range(2):
            start = time.perf_counter()
            try:
                reply = await edge.health.Check(request, timeout=self.probe_timeout_s)
            except grpc.aio.AioRpcError:
                edge.up, edge.rtt_s = False, math.inf
                return
            best = min(best, time.perf_counter() - start)
            if reply.status != _SERVING:
                edge.up, edge.rtt_s = False, best
                return
        edge.up, edge.rtt_s = True, best


class _Failed(Exception):
    def __init__(self, failure: _Failure) -> None:
        self.failure = failure


def _decisive(failures: list[_Failure], retry: Retry) -> _Failure:
    """Of all edges' failures, the one to act on: a non-retryable one explains the call
    (a bad request is bad everywhere); else the last."""
    final = [f for f in failures if not retry.retryable(f.code)]
    return final[0] if final else failures[-1]
