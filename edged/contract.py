"""What the edge's request path takes and gives, whatever the transport: a plain request in,
events out (decided -> pieces of text -> answered), and errors of its own kinds. The gRPC front
(edged.grpc_front) and the OpenAI HTTP front (edged.openai_front) each translate their wire
format into an `EdgeRequest` and the events back, and map `EdgeError` once, as vLLM's OpenAI
layer formats what its engine yields.
"""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from typing import Any

from velo.core.conversation import Turn
from velo.core.qos import Action
from velo.core.shape import Shape
from velo.core.state import CachedRow
from velo.runtime.security import Principal

MAX_AGE_S = 10 * 365 * 86400.0  # largest cache.max_age_s accepted (ten years)


class ErrorKind(enum.Enum):
    """Why a request was refused, as the canonical status codes name it (the gRPC front sends
    the code of the same name; the HTTP front maps each to an HTTP status once)."""

    INVALID_ARGUMENT = enum.auto()  # the caller's request is wrong: fix it
    UNAUTHENTICATED = enum.auto()
    PERMISSION_DENIED = enum.auto()
    NOT_FOUND = enum.auto()
    RESOURCE_EXHAUSTED = enum.auto()  # at capacity: retry shortly
    FAILED_PRECONDITION = enum.auto()  # the LLM server refused what cloudd sent
    UNAVAILABLE = enum.auto()  # a part is down: retry later
    DEADLINE_EXCEEDED = enum.auto()
    INTERNAL = enum.auto()


class EdgeError(Exception):
    """A request the edge cannot serve; the message says what to do about it."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def invalid(message: str) -> EdgeError:
    return EdgeError(ErrorKind.INVALID_ARGUMENT, message)


@dataclass(frozen=True)
class CacheRules:
    """Per-request cache control. Each field only makes the edge more careful than its config."""

    no_cache: bool = False  # serve no cached answer; the fresh one replaces those it would have
    no_store: bool = False  # do not cache this answer
    max_age_s: float = 0.0  # use only answers younger than this (0: any age the edge keeps)
    min_similarity: float = 0.0  # raise the similarity floor for this request

    def problem(self) -> str | None:
        """Why this cache control cannot be honoured, or None."""
        if not (math.isfinite(self.max_age_s) and 0.0 <= self.max_age_s <= MAX_AGE_S):
            return f"cache.max_age_s must be between 0 (any age) and {MAX_AGE_S:.0f} seconds"
        if not 0.0 <= self.min_similarity <= 1.0:  # also false for NaN
            return "cache.min_similarity must be between 0 and 1 (a cosine similarity)"
        return None


@dataclass(frozen=True)
class EdgeRequest:
    prompt: str
    tenant: str = ""  # "" with an API key: the key's tenant
    request_id: str = ""  # "" : the edge makes one
    history: tuple[Turn, ...] = ()  # earlier turns, oldest first
    max_tokens: int = 0  # cap on generated tokens; 0: edged limits.default_max_tokens
    reference_answer: str = ""  # experiments: measure q (eq. 2) against it
    cache: CacheRules = field(default_factory=CacheRules)
    shape: Shape = field(default_factory=Shape)
    principal: Principal | None = None  # who is asking (None when the edge has no [auth])


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated: bool = False  # counted by the edge's tokenizer, not reported by the LLM

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Decided:
    """How the request will be served, known before its answer exists (a stream's headers)."""

    action: Action
    policy: str
    policy_version: int
    request_id: str
    edge_id: str
    row: CachedRow | None = None  # the cached row A or C uses
    bypass: tuple[str, ...] = ()  # why no cached answer could serve it (velo.core.shape)
    keyed_on: tuple[str, ...] = ()  # request fields in its cache key besides the prompt

    @property
    def cached_age_s(self) -> float:
        return max(0.0, time.time() - self.row.created) if self.row is not None else 0.0


@dataclass(frozen=True)
class Piece:
    text: str
    logprobs: dict[str, Any] | None = None  # OpenAI's logprobs of this piece, when asked


@dataclass(frozen=True)
class Answered:
    """The last event: the whole answer and how it was served."""

    decided: Decided
    answer: str
    finish_reason: str  # "stop", "length", "tool_calls", ...
    usage: Usage
    saved: Usage | None = None  # for A: the tokens the reuse saved
    tool_calls: list[dict[str, Any]] | None = None
    logprobs: dict[str, Any] | None = None
    delay_s: float = 0.0  # eq. 3's d, and its edge and cloud parts
    edge_s: float = 0.0
    cloud_s: float = 0.0
    satisfaction: float | None = None  # q (eq. 2) and the reward, with a reference answer
    reward: float | None = None
    stored_entry_id: int = 0  # a B whose answer was cached: the new entry
    superseded: tuple[int, ...] = field(default=())  # entries a no-cache answer replaced

    @property
    def stored(self) -> bool:
        return self.stored_entry_id != 0


Event = Decided | Piece | Answered
