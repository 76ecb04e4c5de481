"""edged's client of cloudd (Actions B and C, shadow verification), and its watch on cloudd's
health: the edge reports its `cloud` part down while cloudd is unreachable or says its LLM is
down, with cloudd's own reason."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edged.contract import EdgeError, ErrorKind, Piece, Usage
from velo.core.bad_input import clip
from velo.core.conversation import Turn
from velo.core.load import RunningMean, load_vector, wait_after
from velo.core.shape import Shape
from velo.runtime.security import TLSConfig, dial
from velo.runtime.serving import UNDECIDED, Undecided
from velo.v1 import cloud_pb2, cloud_pb2_grpc

PieceSink = Callable[[Piece], Awaitable[None]]
CHECK_TIMEOUT_S = 3.0
SLOW_CHECKS = 3  # health checks that time out in a row before the cloud counts as down


class CloudError(EdgeError):
    """cloudd could not answer; `kind` is what the edge tells its caller (cloudd's status)."""


@dataclass(frozen=True)
class Generation:
    """The cloud LLM's answer and what it reported of it."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    max_tokens: int  # the cap the LLM was given
    cloud_s: float  # the whole call, as the edge saw it
    tool_calls: list[dict[str, Any]] | None = None
    logprobs: dict[str, Any] | None = None
    usage_estimated: bool = False  # the LLM reported no counts: cloudd estimated them

    @classmethod
    def from_response(cls, done: cloud_pb2.GenerateResponse, cloud_s: float) -> Generation:
        return cls(done.text, done.finish_reason or "stop", done.prompt_tokens,
                   done.completion_tokens, done.max_tokens, cloud_s,
                   json.loads(done.tool_calls_json) if done.tool_calls_json else None,
                   json.loads(done.logprobs_json) if done.logprobs_json else None,
                   done.usage_estimated)

    @property
    def usage(self) -> Usage:
        return Usage(self.prompt_tokens, self.completion_tokens, self.usage_estimated)


class CloudLoadView:
    """What this edge sees of the cloud's load (velo.core.load): cloudd's latest report (on every
    answer, and polled with each health check) plus the forwards this edge sent since, and
    the edge's own recent forward latency."""

    def __init__(self) -> None:
        self.last: cloud_pb2.CloudLoad = cloud_pb2.CloudLoad()
        # This edge's forwards sent after the last report and not yet answered: the report
        # did not count them, and in a burst they are most of the queue.
        self.unreported = 0
        self._report_number = 0
        self.forward = RunningMean()
        # None until cloudd first answered; False when it answers without a load report (an
        # older cloudd): a load-aware policy then cannot be filled.
        self.reported: bool | None = None

    def report(self, message: cloud_pb2.GenerateResponse | cloud_pb2.CloudStats) -> None:
        self.reported = message.HasField("load")
        if self.reported:
            self.last = message.load
            self.unreported = 0
            self._report_number += 1

    def sent(self) -> int:
        """A forward left for the cloud; returns the token `done` takes."""
        self.unreported += 1
        return self._report_number

    def done(self, token: int) -> None:
        """That forward ended; a report since then already counted it (or its end)."""
        if token == self._report_number:
            self.unreported = max(0, self.unreported - 1)

    @property
    def cloud_wait_s(self) -> float:
        last = self.last
        return wait_after(last.in_flight, last.queued, last.slots, last.mean_service_s,
                          self.unreported)

    def vector(self) -> np.ndarray:
        """The `load` part of a state, in velo.core.load.LOAD_FEATURES order."""
        return load_vector(self.cloud_wait_s, self.forward.value)


class CloudClient:
    def __init__(self, address: str, timeout_s: float, tls: TLSConfig | None = None,
                 token: str = "") -> None:
        self.address, self.timeout_s = address, timeout_s
        self.load = CloudLoadView()
        self._slow_checks = 0  # health checks in a row that ran out of time (probe)
        self.channel = dial(address, tls, token) if address else None
        self.stub = (cloud_pb2_grpc.CloudServiceStub(self.channel)
                     if self.channel else None)
        self.health = health_pb2_grpc.HealthStub(self.channel) if self.channel else None

    async def generate(self, prompt: str, context: list[tuple[str, str]], max_tokens: int,
                       request_id: str, on_piece: PieceSink | None = None,
                       background: bool = False, history: list[Turn] | tuple[Turn, ...] = (),
                       shape: Shape | None = None) -> Generation:
        """Ask the cloud LLM. Streams the answer's pieces to `on_piece` if given."""
        if self.stub is None:
            raise CloudError(ErrorKind.UNAVAILABLE,
                             "this edge has no cloud configured (edged `cloud` is empty)")
        request = cloud_pb2.GenerateRequest(
            prompt=prompt, max_tokens=max_tokens, request_id=request_id, background=background,
            context=[cloud_pb2.ContextQA(question=q, answer=a) for q, a in context],
            history=[turn.proto() for turn in history],
            shape=shape.proto() if shape is not None else None,
        )
        start = time.perf_counter()
        sent = self.load.sent() if not background else None
        try:
            if on_piece is None:
                response = await self.stub.Generate(request, timeout=self.timeout_s)
                return self._answered(response, time.perf_counter() - start, background)
            done = None
            async for chunk in self.stub.GenerateStream(request, timeout=self.timeout_s):
                if chunk.text:
                    await on_piece(Piece(chunk.text, json.loads(chunk.logprobs_json)
                                         if chunk.logprobs_json else None))
                if chunk.HasField("done"):
                    done = chunk.done
            if done is None:
                raise CloudError(ErrorKind.UNAVAILABLE, f"cloudd at {self.address} ended the "
                                 "stream without its summary")
            return self._answered(done, time.perf_counter() - start, background)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                # cloudd (or its LLM) is frozen or swamped: a dependency that is not there.
                raise CloudError(ErrorKind.UNAVAILABLE, f"cloud LLM unavailable: cloudd at "
                                 f"{self.address} did not answer within {self.timeout_s} s "
                                 "(edged cloud_timeout_s)") from exc
            kind = ErrorKind[exc.code().name] if exc.code().name in ErrorKind.__members__ \
                else ErrorKind.INTERNAL
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                raise CloudError(kind, f"cloud LLM unavailable (cloudd at {self.address}): "
                                 f"{exc.details()}") from exc
            raise CloudError(kind, f"cloud LLM failed: {exc.details()}") from exc
        finally:
            if sent is not None:
                self.load.done(sent)

    def _answered(self, done: cloud_pb2.GenerateResponse, cloud_s: float,
                  background: bool) -> Generation:
        self.load.report(done)
        if not background:  # a user's forward: what forward_s follows
            self.load.forward.add(cloud_s)
        return Generation.from_response(done, cloud_s)

    async def poll_load(self) -> None:
        """Refresh the load report from cloudd's stats (quiet edges see the load too)."""
        assert self.stub is not None
        # A failed poll keeps the last report: the health check says what is wrong.
        with contextlib.suppress(grpc.aio.AioRpcError):
            self.load.report(await self.stub.GetCloudStats(cloud_pb2.CloudStatsRequest(),
                                                           timeout=CHECK_TIMEOUT_S))

    async def probe(self) -> str | Undecided | None:
        """Why cloudd cannot serve (unreachable, or its own account of why its LLM is down),
        None when it can; the edge's daemon runs it every second (Daemon.watch_part). While
        cloudd is up, the load report is refreshed too (quiet edges see the load).

        A check that only ran out of time counts after SLOW_CHECKS in a row: on a loaded box
        one slow answer is not an outage, and health that flaps takes edges out of rotation.
        """
        ok, reason, timed_out = await self._check()
        self._slow_checks = self._slow_checks + 1 if timed_out else 0
        if ok:
            await self.poll_load()
        if timed_out and self._slow_checks < SLOW_CHECKS:
            return UNDECIDED
        return None if ok else reason

    async def check(self) -> tuple[bool, str]:
        """(up, why not) of cloudd and its LLM."""
        ok, reason, _ = await self._check()
        return ok, reason

    async def _check(self) -> tuple[bool, str, bool]:
        assert self.health is not None and self.stub is not None
        try:
            reply = await self.health.Check(health_pb2.HealthCheckRequest(),
                                            timeout=CHECK_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            return False, (f"cloudd at {self.address} is unreachable: {exc.code().name}: "
                           f"{clip(exc.details() or '', 200)}"), \
                exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        if reply.status == health_pb2.HealthCheckResponse.SERVING:
            return True, "", False
        try:
            stats = await self.stub.GetCloudStats(cloud_pb2.CloudStatsRequest(),
                                                  timeout=CHECK_TIMEOUT_S)
            why = stats.llm_down_reason.splitlines()[0] if stats.llm_down_reason else "?"
        except grpc.aio.AioRpcError as exc:
            why = f"(cannot ask why: {exc.code().name})"
        return False, (f"cloudd at {self.address} is not serving: its LLM is down: "
                       f"{clip(why, 300)}"), False

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()
