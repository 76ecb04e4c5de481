"""cloudd: the gRPC face of the cloud LLM (velo.v1.CloudService).

Edges call Generate (Action B, and C with context) or GenerateStream; cloudd bounds how many
requests reach the LLM at once, queues a few more, turns every failure into a gRPC status a
client can act on, and never lets one escape as UNKNOWN.

Its health is the LLM's: NOT_SERVING while the LLM does not answer, with the reason in the
log and in GetCloudStats. With `[local_llm] enabled` cloudd runs the LLM server itself and
restarts it when it dies, quoting its exit code and last log lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
from prometheus_client import Histogram

from cloudd.backend import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    Completion,
    OpenAIBackend,
)
from cloudd.config import CloudConfig, LLMConfig
from cloudd.llm_server import LLMSupervisor, LocalLLMServer
from velo.core.bad_input import clip, request_id_problem
from velo.core.conversation import Turn, history_problem, prompt_problem
from velo.core.load import RunningMean, estimated_wait
from velo.core.shape import Shape, shape_problem, to_json
from velo.runtime.logs import get_logger
from velo.runtime.metrics import Reading
from velo.runtime.serving import UNDECIDED, Daemon, GrpcServer, Undecided
from velo.v1 import cloud_pb2, cloud_pb2_grpc

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

log = get_logger("cloudd")
LLM = "llm"  # the health part
# After the LLM left a request unanswered for llm.timeout_s, a probe that only lists models
# does not bring it back up for this long (a real answer does).
HUNG_HOLD_S = 60.0

_EDGE_ONLY = frozenset({"edge"})
ROLES = {
    "/velo.v1.CloudService/Generate": _EDGE_ONLY,
    "/velo.v1.CloudService/GenerateStream": _EDGE_ONLY,
    "/velo.v1.CloudService/GetCloudStats": frozenset({"edge", "admin"}),
}


class AtCapacity(Exception):
    """Every LLM slot is busy and the queue is full (or, for background work, a slot is not
    free right now)."""


def _response(c: Completion, load: cloud_pb2.CloudLoad,
              queue_s: float) -> cloud_pb2.GenerateResponse:
    return cloud_pb2.GenerateResponse(
        text=c.text,
        model=c.model,
        prompt_tokens=c.prompt_tokens,
        completion_tokens=c.completion_tokens,
        llm_s=c.llm_s,
        finish_reason=c.finish_reason,
        tool_calls_json=to_json(c.tool_calls),
        logprobs_json=to_json(c.logprobs),
        max_tokens=c.max_tokens,
        usage_estimated=c.usage_estimated,
        load=load,
        queue_s=queue_s,
    )



def _status(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The gRPC status for a failed request."""
    match exc:
        case AtCapacity():
            return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
        case BackendUnavailable():
            return grpc.StatusCode.UNAVAILABLE, str(exc)
        case BackendTimeout() | TimeoutError():
            return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc) or "the LLM timed out"
        case BackendError(status=int()):
            # The LLM server refused the request (bad model name, API key, prompt too long):
            # retrying cannot help until the configuration or the request changes.
            return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
        case BackendError():
            return grpc.StatusCode.INTERNAL, str(exc)
    log.exception("unexpected error")
    return grpc.StatusCode.INTERNAL, f"cloudd failed: {type(exc).__name__}: {exc}"


class CloudServicer(cloud_pb2_grpc.CloudServiceServicer):
    def __init__(self, backend: OpenAIBackend, cfg: LLMConfig, server: GrpcServer) -> None:
        self.backend = backend
        self.cfg = cfg
        self.server = server  # its health part "llm" says whether the LLM answers
        self._slots = asyncio.Semaphore(cfg.max_concurrency)
        self.in_flight = 0  # requests holding a slot (talking to the LLM)
        self.hung_at = -1e9  # monotonic time of the last request the LLM left unanswered
        self.queued = 0  # requests waiting for a slot
        self.refused_full = 0  # user requests refused because the queue was full
        self.service = RunningMean()  # how long requests hold a slot, for the load report
        self.background = 0  # background requests holding a slot
        self.stats = cloud_pb2.CloudStats()
        self.supervisor: LLMSupervisor | None = None
        self.tokens = {"prompt": 0, "completion": 0}  # counted from the LLM's usage reports
        self.llm_seconds: Histogram | None = None  # set when metrics are on

    def _generated(self, completion: Completion, rlog: FilteringBoundLogger) -> None:
        self.tokens["prompt"] += completion.prompt_tokens
        self.tokens["completion"] += completion.completion_tokens
        if self.llm_seconds is not None:
            self.llm_seconds.observe(completion.llm_s)
        rlog.info("generated", tokens=completion.completion_tokens,
                  llm_s=round(completion.llm_s, 3))

    def readings(self) -> list[Reading]:
        """Scrape-time values for /metrics (velo.runtime.metrics)."""
        stats = self.stats
        part = self.server.parts.get(LLM)
        return [
            Reading("velo_cloud_requests_total", "Generate requests received", stats.requests,
                    True),
            Reading("velo_cloud_llm_errors_total", "Requests the LLM failed", stats.failures,
                    True),
            Reading("velo_cloud_background_refused_total", "Background (shadow) requests "
                    "refused for want of a free slot", stats.background_refused, True),
            Reading("velo_cloud_in_flight", "Requests talking to the LLM now", self.in_flight),
            Reading("velo_cloud_queued", "Requests waiting for an LLM slot", self.queued),
            # The bounds, so that rules and panels need no copy of this cloudd's config.
            Reading("velo_cloud_slots", "llm.max_concurrency: requests sent to the LLM at once",
                    self.cfg.max_concurrency),
            Reading("velo_cloud_queue_limit", "llm.max_queue: requests that may wait for a slot",
                    self.cfg.max_queue),
            Reading("velo_cloud_refused_full_total", "User requests refused RESOURCE_EXHAUSTED "
                    "because the queue was full", self.refused_full, True),
            Reading("velo_cloud_estimated_wait_seconds", "The wait of a request arriving now "
                    "for an LLM slot (velo.core.load)", self.load().estimated_wait_s),
            Reading("velo_cloud_llm_up", "1 while the LLM answers",
                    float(part is not None and part.ok)),
            Reading("velo_cloud_llm_restarts_total", "Restarts of the local LLM server",
                    self.supervisor.restarts if self.supervisor is not None else 0, True),
            *(Reading("velo_cloud_llm_tokens_total", "Tokens the LLM reported, by kind", n,
                      True, {"kind": kind}) for kind, n in self.tokens.items()),
        ]

    def load(self) -> cloud_pb2.CloudLoad:
        """The load report (velo.core.load): requests holding a slot and waiting for one, and the
        wait a new one would have."""
        return cloud_pb2.CloudLoad(
            in_flight=self.in_flight, queued=self.queued, slots=self.cfg.max_concurrency,
            mean_service_s=self.service.value,
            estimated_wait_s=estimated_wait(self.in_flight, self.queued,
                                            self.cfg.max_concurrency, self.service.value))

    @contextlib.asynccontextmanager
    async def _slot(self, background: bool) -> AsyncIterator[float]:
        """Hold one of `max_concurrency` LLM slots, waiting in a queue of `max_queue`; a
        background request takes a free slot at once or is refused, and never queues.
        Yields how long it waited for the slot."""
        if background:
            if (self.background >= self.cfg.background_max_inflight or self.queued
                    or self._slots.locked()):
                self.stats.background_refused += 1
                raise AtCapacity("no LLM slot is free for background work right now "
                                 f"({self.in_flight} in flight, {self.queued} queued)")
        elif self._slots.locked() and self.queued >= self.cfg.max_queue:
            self.refused_full += 1
            raise AtCapacity(
                f"cloudd is at capacity ({self.in_flight} in flight, {self.queued} queued); "
                "retry later"
            )
        self.queued += not background
        queued_at = time.monotonic()
        try:
            await self._slots.acquire()
        finally:
            self.queued -= not background
        self.in_flight += 1
        self.background += background
        started = time.monotonic()
        try:
            yield started - queued_at
        finally:
            self.service.add(time.monotonic() - started)
            self.in_flight -= 1
            self.background -= background
            self._slots.release()

    def _invalid(self, request: cloud_pb2.GenerateRequest) -> str | None:
        """Why the request is invalid, or None."""
        cfg = self.cfg
        if problem := prompt_problem(request.prompt, _history(request)):
            return problem
        if len(request.prompt) > cfg.max_prompt_chars:
            return (f"prompt is {len(request.prompt)} characters; cloudd accepts at most "
                    f"{cfg.max_prompt_chars} (llm.max_prompt_chars)")
        if len(request.context) > cfg.max_context_items:
            return (f"{len(request.context)} context items; cloudd accepts at most "
                    f"{cfg.max_context_items} (llm.max_context_items)")
        context_chars = sum(len(c.question) + len(c.answer) for c in request.context)
        if context_chars > cfg.max_context_chars:
            return (f"context is {context_chars} characters; cloudd accepts at most "
                    f"{cfg.max_context_chars} (llm.max_context_chars)")
        if problem := history_problem(_history(request), cfg.max_context_chars):
            return f"{problem} (llm.max_context_chars)"
        try:
            if problem := shape_problem(Shape.from_proto(request.shape)):
                return problem
        except ValueError as exc:
            return str(exc)
        limit = cfg.max_tokens_limit
        if not 0 <= request.max_tokens <= limit:
            return (
                f"max_tokens must be between 0 and {limit} "
                f"(0 = the default, {cfg.default_max_tokens}); got {request.max_tokens}"
            )
        return request_id_problem(request.request_id)

    async def _failed(self, exc: Exception, rlog: FilteringBoundLogger,
                      context: grpc.aio.ServicerContext, what: str) -> None:
        code, message = _status(exc)
        self.stats.failures += 1
        part = self.server.parts.get(LLM)
        if isinstance(exc, BackendUnavailable):
            if part is not None and not part.ok and self.supervisor is not None:
                # The local server died or is restarting: say so, not only "refused".
                message = f"{message}; {part.reason.splitlines()[0]}"
            elif self.supervisor is None:
                await self.server.set_part(LLM, False, message)
        rlog.warning(f"{what} failed", code=code.name, error=message)
        await context.abort(code, message)

    async def _generate(self, request: cloud_pb2.GenerateRequest,
                        qa: list[tuple[str, str]]) -> tuple[Completion, float]:
        async with self._slot(request.background) as queue_s:
            try:
                return await self.backend.generate(request.prompt, qa, request.max_tokens,
                                                   _history(request),
                                                   Shape.from_proto(request.shape)), queue_s
            except BackendTimeout as exc:
                await self._hung(exc)
                raise

    async def _hung(self, exc: BackendTimeout) -> None:
        """The LLM took llm.timeout_s (every retry) to say nothing: it is down, whatever its
        health probe says. A local server is restarted (a llama.cpp server was seen to stop
        answering for good after its client froze and thawed)."""
        self.stats.llm_timeouts += 1
        self.hung_at = time.monotonic()
        if self.supervisor is not None:
            self.supervisor.restart(f"it did not answer within llm.timeout_s: {exc}")
        else:
            await self.server.set_part(LLM, False, str(exc))

    def _left_behind(self, done: asyncio.Future[tuple[Completion, float]],
                     rlog: FilteringBoundLogger) -> None:
        """The end of an LLM call whose client had gone: logged, never raised."""
        if done.cancelled():
            return
        if (exc := done.exception()) is not None:
            rlog.info("an abandoned LLM call failed", error=str(exc))

    async def _answered(self) -> None:
        if not self.server.parts[LLM].ok and self.supervisor is None:
            await self.server.set_part(LLM, True)

    async def Generate(
        self, request: cloud_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> cloud_pb2.GenerateResponse:
        if problem := self._invalid(request):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        self.stats.requests += 1
        qa = [(c.question, c.answer) for c in request.context]
        rlog = log.bind(request_id=request.request_id, context=len(qa),
                        background=request.background)
        # The LLM call runs on when the client leaves (a deadline, a frozen edge): the LLM
        # finishes the answer anyway (requests are not interrupted), so the slot stays taken
        # until it does, and an LLM that hangs is found by llm.timeout_s, not hidden by the
        # clients' shorter deadlines.
        call = asyncio.ensure_future(self._generate(request, qa))
        try:
            completion, queue_s = await asyncio.shield(call)
        except asyncio.CancelledError:
            rlog.info("generate cancelled by the client; the LLM call runs to its end")
            call.add_done_callback(lambda done: self._left_behind(done, rlog))
            raise
        except Exception as exc:
            await self._failed(exc, rlog, context, "generate")
        await self._answered()
        self._generated(completion, rlog)
        return _response(completion, self.load(), queue_s)

    async def GenerateStream(
        self, request: cloud_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[cloud_pb2.GenerateChunk]:
        if problem := self._invalid(request):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        self.stats.requests += 1
        qa = [(c.question, c.answer) for c in request.context]
        rlog = log.bind(request_id=request.request_id, context=len(qa), stream=True)
        try:
            async with (
                self._slot(request.background) as queue_s,
                # aclosing: however we leave (client gone, error), the HTTP stream is closed
                # and the LLM server stops generating for nobody.
                contextlib.aclosing(
                    self.backend.stream(request.prompt, qa, request.max_tokens,
                                        _history(request), Shape.from_proto(request.shape))
                ) as pieces,
            ):
                async for piece in pieces:
                    if isinstance(piece, Completion):
                        self._generated(piece, rlog)
                        yield cloud_pb2.GenerateChunk(done=_response(piece, self.load(),
                                                                     queue_s))
                    else:
                        yield cloud_pb2.GenerateChunk(text=piece.text,
                                                      logprobs_json=to_json(piece.logprobs))
        except asyncio.CancelledError:
            rlog.info("stream cancelled by the client")
            raise
        except Exception as exc:
            if isinstance(exc, BackendTimeout):
                await self._hung(exc)
            await self._failed(exc, rlog, context, "stream")
        await self._answered()

    async def GetCloudStats(self, request: cloud_pb2.CloudStatsRequest,
                            context: grpc.aio.ServicerContext) -> cloud_pb2.CloudStats:
        stats = cloud_pb2.CloudStats()
        stats.CopyFrom(self.stats)
        part = self.server.parts.get(LLM)
        stats.llm_up = part is not None and part.ok
        stats.llm_down_reason = "" if part is None or part.ok else part.reason
        stats.llm_restarts = self.supervisor.restarts if self.supervisor is not None else 0
        stats.in_flight, stats.queued = self.in_flight, self.queued
        stats.load.CopyFrom(self.load())
        return stats


class Cloudd(Daemon):
    name = "cloudd"

    def __init__(self, cfg: CloudConfig) -> None:
        super().__init__(cfg.listen, cfg.shutdown_grace_s, tls=cfg.tls, auth=cfg.auth,
                         roles=ROLES, metrics_listen=cfg.metrics_listen)
        self.cfg = cfg
        self.backend: OpenAIBackend | None = None
        self.servicer: CloudServicer | None = None
        self.supervisor: LLMSupervisor | None = None

    async def startup(self) -> None:
        llm_cfg = self.cfg.llm
        local = self.cfg.local_llm
        if local.enabled:
            server = LocalLLMServer(local.model_file or None, port=local.port, n_ctx=local.n_ctx,
                                    n_threads=local.threads, alias=llm_cfg.model,
                                    log_path=local.log_file or None,
                                    startup_timeout_s=local.startup_timeout_s)
            llm_cfg = dataclasses.replace(llm_cfg, base_url=server.base_url)
        self.backend = OpenAIBackend(llm_cfg)
        # Released in the reverse order (Daemon.closing): the watch, the local LLM server,
        # then the HTTP client.
        self.closing.push_async_callback(self.backend.aclose)
        self.servicer = CloudServicer(self.backend, llm_cfg, self.grpc)
        self.servicer.llm_seconds = self.metrics.histogram(
            "velo_cloud_llm_seconds", "Time waiting on the LLM per answered request")
        self.metrics.read(self.servicer.readings)
        self.grpc.add(cloud_pb2_grpc.add_CloudServiceServicer_to_server, self.servicer,
                      "velo.v1.CloudService")
        if local.enabled:
            await self.grpc.set_part(LLM, False, "the local LLM server is starting")
            loop = asyncio.get_running_loop()

            def on_state(up: bool, reason: str) -> None:  # from the supervisor's thread
                asyncio.run_coroutine_threadsafe(self.grpc.set_part(LLM, up, reason), loop)

            self.supervisor = LLMSupervisor(server, on_state,
                                            max_backoff_s=local.max_restart_backoff_s).start()
            self.closing.push_async_callback(asyncio.to_thread, self.supervisor.stop)
            self.servicer.supervisor = self.supervisor
        else:  # an external LLM server: probed here (a local one's supervisor reports it)
            await self._probe()
            self.closing.push_async_callback(self.stop_tasks)
            self.spawn(self.watch_part(LLM, self._llm_problem, self.cfg.llm.health_every_s))
        await super().startup()
        self.log.info("llm", base_url=self.backend.url, model=llm_cfg.model,
                      local=local.enabled)

    async def _probe(self) -> None:
        """Probe the external LLM server once and report it (at start, before SERVING)."""
        await self.report_probe(LLM, await self._llm_problem())

    async def _llm_problem(self) -> str | Undecided | None:
        """GET /models of the external LLM server: why it is down, or None. Probed every
        health_every_s while it answers, every second while it does not (watch_part)."""
        assert self.backend is not None
        try:
            async with asyncio.timeout(self.cfg.llm.connect_timeout_s + 1):
                models = await self.backend.models()
        except (BackendError, TimeoutError) as exc:
            return str(exc) or "the LLM did not answer in time"
        assert self.servicer is not None
        if time.monotonic() - self.servicer.hung_at < HUNG_HOLD_S:
            return UNDECIDED  # /models answers, generation did not: only an answer brings it up
        if models and self.cfg.llm.model not in models:
            self.log.warning("configured model not offered by the llm server",
                             model=self.cfg.llm.model, offered=[clip(m) for m in models[:8]])
        return None



def _history(request: cloud_pb2.GenerateRequest) -> list[Turn]:
    return [Turn.from_proto(m) for m in request.history]
