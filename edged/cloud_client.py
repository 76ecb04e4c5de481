"""edged's client of cloudd (Actions B and C)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import grpc

from velo.v1 import cloud_pb2, cloud_pb2_grpc


class CloudError(Exception):
    """cloudd could not answer; `code` is the gRPC status the edge passes on to its caller."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class CloudClient:
    def __init__(self, address: str, timeout_s: float) -> None:
        self.address, self.timeout_s = address, timeout_s
        self.channel = grpc.aio.insecure_channel(address) if address else None
        self.stub = cloud_pb2_grpc.CloudServiceStub(self.channel) if self.channel else None

    async def generate(self, prompt: str, context: list[tuple[str, str]], max_tokens: int,
                       request_id: str, on_text: Callable[[str], Awaitable[None]] | None = None,
                       ) -> tuple[str, float]:
        """Ask the cloud LLM; returns (answer, seconds). Streams pieces to `on_text` if given."""
        if self.stub is None:
            raise CloudError(grpc.StatusCode.UNAVAILABLE,
                             "this edge has no cloud configured (edged `cloud` is empty)")
        request = cloud_pb2.GenerateRequest(
            prompt=prompt, max_tokens=max_tokens, request_id=request_id,
            context=[cloud_pb2.ContextQA(question=q, answer=a) for q, a in context],
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
                                 f"{exc.details()}; cached answers are still served") from exc
            raise CloudError(exc.code(), f"cloud LLM failed: {exc.details()}") from exc

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()
