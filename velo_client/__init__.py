"""Python client for VELO edges (gRPC), blocking and asyncio, with the same small API.

    from velo_client import VeloClient

    with VeloClient(["edge-1:50052", "edge-2:50052"], api_key="velo_...") as velo:
        answer = velo.ask("How do I reset my router?", max_tokens=200)
        print(answer.text, answer.action, answer.similarity, answer.edge_id)

`AsyncVeloClient` is the same with `await` / `async for`. Calls carry a deadline (`timeout_s`,
retries included), are retried with exponential backoff and full jitter only when an edge says
"try later" (UNAVAILABLE, RESOURCE_EXHAUSTED), reuse one request id across their retries, and
go to the nearest serving edge (`mode="nearest"`) or to all edges at once, the first answer
winning (`mode="hedged"`). Failures raise `VeloError` with the gRPC status code. See
docs/sdk.md.
"""

from velo_client._async import AsyncVeloClient
from velo_client._sync import VeloClient
from velo_client._types import (
    TLS,
    Answer,
    CacheControl,
    Message,
    Mode,
    Retry,
    Usage,
    VeloError,
)

__all__ = ["TLS", "Answer", "AsyncVeloClient", "CacheControl", "Message", "Mode", "Retry",
           "Usage", "VeloClient", "VeloError"]
