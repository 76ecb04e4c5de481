"""What both clients share: the answer, the settings, the error, and the pure helpers."""

from __future__ import annotations

import random
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import grpc

from velo.v1 import chat_pb2, edge_pb2

Mode = Literal["nearest", "hedged"]
ActionLetter = Literal["A", "B", "C"]
# One earlier turn: ("user", "Hi") or {"role": "user", "content": "Hi"} (the OpenAI shape).
Message = tuple[str, str] | Mapping[str, str]

_LETTERS: dict[int, ActionLetter] = {edge_pb2.ACTION_REUSE: "A", edge_pb2.ACTION_FORWARD: "B",
                                     edge_pb2.ACTION_AUGMENT: "C"}
_NAMES = {"A": "reuse", "B": "forward", "C": "augment"}


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts: the LLM's for a forward, the cached answer's for a reuse."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated: bool = False  # not the LLM's report (an imported answer, a stream without one)

    @classmethod
    def from_proto(cls, usage: chat_pb2.Usage) -> Usage:
        return cls(usage.prompt_tokens, usage.completion_tokens, usage.estimated)


@dataclass(frozen=True, slots=True)
class Answer:
    """An edge's answer and how it was served."""

    text: str
    # The paper's actions: "A" reused a cached answer, "B" forwarded to the cloud LLM,
    # "C" asked the cloud LLM with the best cached pair as context.
    action: ActionLetter
    # For A and C: the cached question that was used and its similarity to the prompt.
    similarity: float
    cached_question: str
    policy: str  # the policy that decided, e.g. "cache-0.5" or "onnx:v3"
    edge_id: str  # the edge that answered, and the address it was reached at
    edge: str
    request_id: str
    delay_s: float  # delay d (eq. 3) as the edge measured it, and its edge and cloud parts
    edge_s: float
    cloud_s: float
    # Only when the request carried a reference answer: satisfaction q (eq. 2) and reward r.
    satisfaction: float | None
    reward: float | None
    attempts: int  # tries it took, retries included (a hedged fan-out counts once)
    # For A and C: the id of the cached QA pair used and its age in seconds (else 0).
    cached_entry_id: int = 0
    cached_age_s: float = 0.0
    policy_version: int = 0  # version of the learned policy that decided (0: a baseline)
    stored: bool = False  # this answer was cached (B, unless the request said no_store)
    # "stop" (complete), "length" (cut at max_tokens), "tool_calls"; for A the cached one's.
    finish_reason: str = "stop"
    usage: Usage = Usage()
    saved: Usage | None = None  # for A: the LLM tokens the reuse saved
    # Why no cached answer could serve the request: "tools", "tool_messages", "logprobs",
    # "no-cache", "max_tokens" (the nearest cached answer does not fit the token limit).
    bypass: tuple[str, ...] = ()
    stored_entry_id: int = 0  # the cache entry this answer became (velo cache show ID)

    @property
    def action_name(self) -> Literal["reuse", "forward", "augment"]:
        return _NAMES[self.action]  # type: ignore[return-value]

    @classmethod
    def from_response(cls, reply: edge_pb2.AskResponse, edge: str, attempts: int) -> Answer:
        return cls(
            text=reply.answer, action=_LETTERS.get(reply.action, "B"),
            similarity=reply.similarity, cached_question=reply.cached_question,
            policy=reply.policy, edge_id=reply.edge_id, edge=edge, request_id=reply.request_id,
            delay_s=reply.delay_s, edge_s=reply.edge_s, cloud_s=reply.cloud_s,
            satisfaction=reply.satisfaction if reply.has_satisfaction else None,
            reward=reply.reward if reply.has_satisfaction else None, attempts=attempts,
            cached_entry_id=reply.cached_entry_id, cached_age_s=reply.cached_age_s,
            policy_version=reply.policy_version, stored=reply.stored,
            finish_reason=reply.finish_reason, usage=Usage.from_proto(reply.usage),
            saved=Usage.from_proto(reply.saved) if reply.HasField("saved") else None,
            bypass=tuple(reply.bypass), stored_entry_id=reply.stored_entry_id)


@dataclass(frozen=True, slots=True)
class Retry:
    """When and how often a failed call is tried again (on the next edge in nearest mode).

    Only codes that say "try later" are retried: UNAVAILABLE and RESOURCE_EXHAUSTED, and
    DEADLINE_EXCEEDED from an edge's own time limit when `deadline_exceeded` is set. A bad
    request (INVALID_ARGUMENT) or a refused key (UNAUTHENTICATED, PERMISSION_DENIED) fails at
    once. Waits use exponential backoff with full jitter: uniform in [0, min(max_backoff_s,
    backoff_s * 2**(retry - 1))], so that many clients do not come back in step.
    """

    attempts: int = 3  # tries in all, the first included; 1 = never retry
    backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    deadline_exceeded: bool = False

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("Retry.attempts must be >= 1 (1 = no retries)")
        if self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError("Retry.backoff_s and max_backoff_s must be >= 0")

    def retryable(self, code: grpc.StatusCode) -> bool:
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
            return True
        return code == grpc.StatusCode.DEADLINE_EXCEEDED and self.deadline_exceeded

    def delay_s(self, retry: int, rng: random.Random | None = None) -> float:
        """How long to wait before retry number `retry` (1 = the first retry)."""
        cap = min(self.max_backoff_s, self.backoff_s * 2 ** (retry - 1))
        return (rng or random).uniform(0, cap)


@dataclass(frozen=True, slots=True)
class TLS:
    """TLS to the edges. All fields are optional: TLS() checks edges against the system's
    root certificates; root_cert names a CA file instead (as the daemons' [tls] ca_file)."""

    root_cert: str | Path | None = None
    # Mutual TLS: this client's certificate and key, for edges with [tls] client_auth = true.
    client_cert: str | Path | None = None
    client_key: str | Path | None = None
    # The name in the edges' certificates, when it is not the host in the address.
    server_name: str = ""

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("TLS.client_cert and client_key must be given together")

        def read(path: str | Path | None) -> bytes | None:
            return Path(path).read_bytes() if path is not None else None

        return grpc.ssl_channel_credentials(read(self.root_cert), read(self.client_key),
                                            read(self.client_cert))


@dataclass(frozen=True, slots=True)
class CacheControl:
    """Per-request cache control. Each field only makes the edge more careful than its own
    settings. Sent only when given: an edge older than this field answers INVALID_ARGUMENT."""

    no_cache: bool = False  # serve no cached answer (no A, no C); the answer is still cached
    no_store: bool = False  # do not cache this answer
    max_age_s: float = 0.0  # use only cached answers younger than this (0: any age)
    min_similarity: float = 0.0  # raise the similarity floor for this request (never lowers)


class VeloError(Exception):
    """A call that failed for good: after its retries, or at once for a non-retryable code.
    `code` is the gRPC status (grpc.StatusCode), `edge` the address that answered last."""

    def __init__(self, code: grpc.StatusCode, details: str, *, edge: str = "",
                 request_id: str = "", attempts: int = 0) -> None:
        self.code, self.details, self.edge = code, details, edge
        self.request_id, self.attempts = request_id, attempts
        where = f"edge {edge}, " if edge else ""
        super().__init__(f"{code.name}: {details} ({where}request {request_id}, "
                         f"{attempts} attempt{'s' if attempts != 1 else ''})")


def new_request_id() -> str:
    return uuid.uuid4().hex


def ask_request(prompt: str, tenant: str, request_id: str, history: Sequence[Message],
                max_tokens: int, reference_answer: str, cache: CacheControl | None,
                ) -> edge_pb2.AskRequest:
    turns = [(m["role"], m["content"]) if isinstance(m, Mapping) else m for m in history]
    request = edge_pb2.AskRequest(
        prompt=prompt, tenant=tenant, request_id=request_id, max_tokens=max_tokens,
        reference_answer=reference_answer,
        history=[chat_pb2.ChatMessage(role=role, content=content) for role, content in turns])
    if cache is not None:
        request.cache.CopyFrom(edge_pb2.CacheControl(
            no_cache=cache.no_cache, no_store=cache.no_store, max_age_s=cache.max_age_s,
            min_similarity=cache.min_similarity))
    return request
