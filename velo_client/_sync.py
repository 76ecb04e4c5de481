"""VeloClient: the blocking face of AsyncVeloClient.

It runs an AsyncVeloClient on a private event loop in a daemon thread, so that both clients
share one implementation of retries, deadlines, nearest-edge selection and hedging, and the
blocking client works the same from scripts, threads and web frameworks of either kind.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from typing import Any, TypeVar

from velo.v1 import edge_pb2
from velo_client._async import AsyncVeloClient
from velo_client._types import TLS, Answer, CacheControl, Message, Mode, Retry

T = TypeVar("T")
_END = object()


class VeloClient:
    """Ask VELO edges over gRPC, blocking. Same arguments and behaviour as AsyncVeloClient:

        with VeloClient(["edge-1:50052", "edge-2:50052"], api_key=KEY) as velo:
            answer = velo.ask("How do I reset my router?")
            for piece in velo.stream("And my modem?"):
                print(piece if isinstance(piece, str) else f"\\n[{piece.action}]")

    Safe to share between threads.
    """

    def __init__(self, edges: Sequence[str], *, api_key: str = "", tenant: str = "",
                 timeout_s: float = 30.0, mode: Mode = "nearest", retry: Retry | None = None,
                 tls: TLS | None = None, probe_timeout_s: float = 0.5,
                 reprobe_s: float = 30.0) -> None:
        self._client = AsyncVeloClient(
            edges, api_key=api_key, tenant=tenant, timeout_s=timeout_s, mode=mode, retry=retry,
            tls=tls, probe_timeout_s=probe_timeout_s, reprobe_s=reprobe_s)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="velo-client",
                                        daemon=True)
        self._thread.start()

    @property
    def edges(self) -> list[str]:
        return self._client.edges

    def ask(self, prompt: str, *, history: Sequence[Message] = (), max_tokens: int = 0,
            request_id: str | None = None, reference_answer: str = "",
            cache: CacheControl | None = None, timeout_s: float | None = None) -> Answer:
        """Answer one prompt (see AsyncVeloClient.ask)."""
        return self._run(self._client.ask(
            prompt, history=history, max_tokens=max_tokens, request_id=request_id,
            reference_answer=reference_answer, cache=cache, timeout_s=timeout_s))

    def stream(self, prompt: str, *, history: Sequence[Message] = (), max_tokens: int = 0,
               request_id: str | None = None, reference_answer: str = "",
               cache: CacheControl | None = None,
               timeout_s: float | None = None) -> Iterator[str | Answer]:
        """Yield the answer text piece by piece, then the Answer (see AsyncVeloClient.stream).
        Leaving the loop early cancels the stream at the edge."""
        pieces = self._client.stream(
            prompt, history=history, max_tokens=max_tokens, request_id=request_id,
            reference_answer=reference_answer, cache=cache, timeout_s=timeout_s)
        try:
            while (piece := self._run(_next(pieces))) is not _END:
                yield piece  # type: ignore[misc]
        finally:
            if not self._loop.is_closed():
                self._run(pieces.aclose())

    def stats(self, edge: str | None = None, *,
              timeout_s: float | None = None) -> edge_pb2.EdgeStats:
        """Counters of one edge (see AsyncVeloClient.stats)."""
        return self._run(self._client.stats(edge, timeout_s=timeout_s))

    def probe(self) -> dict[str, float | None]:
        """Measure each edge's round trip now (see AsyncVeloClient.probe)."""
        return self._run(self._client.probe())

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> VeloClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop.is_closed():
            coro.close()
            raise RuntimeError("this VeloClient is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt while waiting: stop the call too
            raise


async def _next(pieces: AsyncIterator[Any]) -> Any:
    # run_coroutine_threadsafe takes coroutines only, and StopAsyncIteration cannot cross it.
    try:
        return await anext(pieces)
    except StopAsyncIteration:
        return _END
