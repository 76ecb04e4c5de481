"""edged's client of cloudd (Actions B and C, shadow verification), and its watch on cloudd's
health: the edge reports its `cloud` part down while cloudd is unreachable or says its LLM is
down, with cloudd's own reason."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from velo.security import TLSConfig, dial
from velo.serving import clip
from velo.v1 import chat_pb2, cloud_pb2, cloud_pb2_grpc

PartReport = Callable[[str, bool, str], Awaitable[None]]
CHECK_TIMEOUT_S = 3.0
SLOW_CHECKS = 3  # health checks that time out in a row before the cloud counts as down


class CloudError(Exception):
    """cloudd could not answer; `code` is the gRPC status the edge passes on to its caller."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class CloudClient:
    def __init__(self, address: str, timeout_s: float, tls: TLSConfig | None = None,
                 token: str = "") -> None:
        self.address, self.timeout_s = address, timeout_s
        self.channel = dial(address, tls, token) if address else None
        self.stub = cloud_pb2_grpc.CloudServiceStub(self.channel) if self.channel else None
        self.health = health_pb2_grpc.HealthStub(self.channel) if self.channel else None

    async def generate(self, prompt: str, context: list[tuple[str, str]], max_tokens: int,
                       request_id: str, on_text: Callable[[str], Awaitable[None]] | None = None,
                       background: bool = False, history: list[tuple[str, str]] | None = None,
                       ) -> tuple[str, float]:
        """Ask the cloud LLM; returns (answer, seconds). Streams pieces to `on_text` if given."""
        if self.stub is None:
            raise CloudError(grpc.StatusCode.UNAVAILABLE,
                             "this edge has no cloud configured (edged `cloud` is empty)")
        request = cloud_pb2.GenerateRequest(
            prompt=prompt, max_tokens=max_tokens, request_id=request_id, background=background,
            context=[cloud_pb2.ContextQA(question=q, answer=a) for q, a in context],
            history=[chat_pb2.ChatMessage(role=r, content=c) for r, c in history or ()],
        )
        start = time.perf_counter()
        try:
            if on_text is None:
                response = await self.stub.Generate(request, timeout=self.timeout_s)
                return response.text, time.perf_counter() - start
            pieces = []
            async for chunk in self.stub.GenerateStream(request, timeout=self.timeout_s):
                if chunk.text:
                    pieces.append(chunk.text)
                    await on_text(chunk.text)
            return "".join(pieces), time.perf_counter() - start
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise CloudError(exc.code(), f"cloud LLM unavailable (cloudd at {self.address}): "
                                 f"{exc.details()}") from exc
            raise CloudError(exc.code(), f"cloud LLM failed: {exc.details()}") from exc

    async def watch(self, report: PartReport, part: str, every_s: float = 1.0) -> None:
        """Check cloudd's health every `every_s` and report `part` up or down with the reason
        (cloudd unreachable, or cloudd's own account of why its LLM is down).

        A check that only ran out of time counts after SLOW_CHECKS in a row: on a loaded box
        one slow answer is not an outage, and health that flaps takes edges out of rotation.
        """
        assert self.health is not None
        slow = 0
        while True:
            ok, reason, timed_out = await self._check()
            slow = slow + 1 if timed_out else 0
            if not timed_out or slow >= SLOW_CHECKS:
                await report(part, ok, reason)
            await asyncio.sleep(every_s)

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
