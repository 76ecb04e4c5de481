"""cloudd: the gRPC face of the cloud LLM (velo.v1.CloudService).

Edges call Generate (Action B, and C with context) or GenerateStream; cloudd bounds how many
requests reach the LLM at once, queues a few more, turns every failure into a gRPC status a
client can act on, and never lets one escape as UNKNOWN.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc

from cloudd.backend import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    Completion,
    OpenAIBackend,
)
from cloudd.config import CloudConfig, LLMConfig
from velo.logs import get_logger
from velo.serving import Daemon
from velo.v1 import cloud_pb2, cloud_pb2_grpc

log = get_logger("cloudd")


class AtCapacity(Exception):
    """Every LLM slot is busy and the queue is full."""


def _response(c: Completion) -> cloud_pb2.GenerateResponse:
    return cloud_pb2.GenerateResponse(
        text=c.text,
        model=c.model,
        prompt_tokens=c.prompt_tokens,
        completion_tokens=c.completion_tokens,
        llm_s=c.llm_s,
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
    def __init__(self, backend: OpenAIBackend, cfg: LLMConfig) -> None:
        self.backend = backend
        self.cfg = cfg
        self._slots = asyncio.Semaphore(cfg.max_concurrency)
        self.in_flight = 0  # requests holding a slot (talking to the LLM)
        self.queued = 0  # requests waiting for a slot

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        """Hold one of `max_concurrency` LLM slots, waiting in a queue of `max_queue`."""
        if self._slots.locked() and self.queued >= self.cfg.max_queue:
            raise AtCapacity(
                f"cloudd is at capacity ({self.in_flight} in flight, {self.queued} queued); "
                "retry later"
            )
        self.queued += 1
        try:
            await self._slots.acquire()
        finally:
            self.queued -= 1
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            self._slots.release()

    def _invalid(self, request: cloud_pb2.GenerateRequest) -> str | None:
        """Why the request is invalid, or None."""
        if not request.prompt.strip():
            return "prompt is empty"
        limit = self.cfg.max_tokens_limit
        if not 0 <= request.max_tokens <= limit:
            return (
                f"max_tokens must be between 0 and {limit} "
                f"(0 = the default, {self.cfg.default_max_tokens}); got {request.max_tokens}"
            )
        return None

    async def Generate(
        self, request: cloud_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> cloud_pb2.GenerateResponse:
        if problem := self._invalid(request):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        qa = [(c.question, c.answer) for c in request.context]
        rlog = log.bind(request_id=request.request_id, context=len(qa))
        try:
            async with self._slot():
                completion = await self.backend.generate(request.prompt, qa, request.max_tokens)
        except asyncio.CancelledError:
            rlog.info("generate cancelled by the client")
            raise
        except Exception as exc:
            code, message = _status(exc)
            rlog.warning("generate failed", code=code.name, error=message)
            await context.abort(code, message)
        rlog.info("generated", tokens=completion.completion_tokens,
                  llm_s=round(completion.llm_s, 3))
        return _response(completion)

    async def GenerateStream(
        self, request: cloud_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[cloud_pb2.GenerateChunk]:
        if problem := self._invalid(request):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        qa = [(c.question, c.answer) for c in request.context]
        rlog = log.bind(request_id=request.request_id, context=len(qa), stream=True)
        try:
            async with (
                self._slot(),
                # aclosing: however we leave (client gone, error), the HTTP stream is closed
                # and the LLM server stops generating for nobody.
                contextlib.aclosing(
                    self.backend.stream(request.prompt, qa, request.max_tokens)
                ) as pieces,
            ):
                async for piece in pieces:
                    if isinstance(piece, Completion):
                        rlog.info("generated", tokens=piece.completion_tokens,
                                  llm_s=round(piece.llm_s, 3))
                        yield cloud_pb2.GenerateChunk(done=_response(piece))
                    else:
                        yield cloud_pb2.GenerateChunk(text=piece)
        except asyncio.CancelledError:
            rlog.info("stream cancelled by the client")
            raise
        except Exception as exc:
            code, message = _status(exc)
            rlog.warning("stream failed", code=code.name, error=message)
            await context.abort(code, message)


class Cloudd(Daemon):
    name = "cloudd"

    def __init__(self, cfg: CloudConfig) -> None:
        super().__init__(cfg.listen, cfg.shutdown_grace_s)
        self.cfg = cfg
        self.backend: OpenAIBackend | None = None
        self.servicer: CloudServicer | None = None

    async def startup(self) -> None:
        self.backend = OpenAIBackend(self.cfg.llm)
        self.servicer = CloudServicer(self.backend, self.cfg.llm)
        self.grpc.add(cloud_pb2_grpc.add_CloudServiceServicer_to_server, self.servicer,
                      "velo.v1.CloudService")
        await super().startup()
        await self._check_llm()

    async def _check_llm(self) -> None:
        """Say at start whether the LLM answers, so a wrong base_url shows in the first lines
        of the log. Not fatal: under systemd the LLM server may come up after cloudd."""
        assert self.backend is not None
        try:
            async with asyncio.timeout(self.cfg.llm.connect_timeout_s + 1):
                models = await self.backend.models()
        except (BackendError, TimeoutError) as exc:
            self.log.warning("llm not reachable yet", base_url=self.backend.url,
                             error=str(exc) or "timed out")
            return
        if models and self.cfg.llm.model not in models:
            self.log.warning("configured model not offered by the llm server",
                             model=self.cfg.llm.model, offered=models)
        else:
            self.log.info("llm reachable", base_url=self.backend.url, models=models)

    async def shutdown(self) -> None:
        await super().shutdown()
        if self.backend is not None:
            await self.backend.aclose()
