"""Conversation-aware cache keys.

"What famous landmark is there?" means one thing after "What is the capital of France?" and
another after "... of Italy?". A cache keyed on the last message alone serves the wrong one.
So a turn with history is cached and looked up inside a scope of its own: its tenant plus a
fingerprint of its context (the system prompt and the earlier user messages, normalised for
case and spacing; assistant messages are left out, because the same question asked again gets
a differently worded answer). The same follow-up after the same context finds its answer; after
any other context it finds nothing, never a wrong answer.

The scope is what the vector cache filters on (its `tenant` field): a plain tenant name for a
turn without history, "~" + 32 hex digits for a conversation turn (or a turn that asks for an
answer shape of its own: stop sequences, a response format; velo.core.shape). "~" is outside
the tenant alphabet (velo.core.names), so a scope never collides with a tenant, and the hash
covers the tenant, so two tenants never share a scope. Restating the first turn in other words
starts a new scope (a miss, not a wrong answer).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from velo.v1 import chat_pb2

ROLES = ("system", "user", "assistant", "tool")
_KEYED_ROLES = frozenset({"system", "user"})


@dataclass(frozen=True)
class Turn:
    """One earlier message of a conversation, in OpenAI's chat roles. A tool-calling assistant
    turn carries its `tool_calls` (OpenAI's array, as JSON); a "tool" turn answers one of them
    (`tool_call_id`)."""

    role: str
    content: str
    tool_calls: str = ""
    tool_call_id: str = ""
    name: str = ""

    @classmethod
    def from_proto(cls, message: chat_pb2.ChatMessage) -> Turn:
        return cls(message.role, message.content, message.tool_calls_json,
                   message.tool_call_id, message.name)

    def proto(self) -> chat_pb2.ChatMessage:
        return chat_pb2.ChatMessage(role=self.role, content=self.content,
                                    tool_calls_json=self.tool_calls,
                                    tool_call_id=self.tool_call_id, name=self.name)

    @property
    def uses_tools(self) -> bool:
        return self.role == "tool" or bool(self.tool_calls)

    def openai(self) -> dict[str, Any]:
        """The message as an OpenAI-compatible LLM server takes it."""
        message: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = json.loads(self.tool_calls)
            message["content"] = self.content or None
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        if self.name:
            message["name"] = self.name
        return message
_SPACE = re.compile(r"\s+")
SCOPE_PREFIX = "~"
_SCOPE = re.compile(r"~[0-9a-f]{32}")


def context_key(history: Iterable[Turn]) -> str:
    """The fingerprint of a conversation's context; "" for none."""
    parts = [f"{turn.role}:{_SPACE.sub(' ', turn.content).strip().lower()}"
             for turn in history if turn.role in _KEYED_ROLES]
    if not parts:
        return ""
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def cache_scope(tenant: str, context: str, shape: str = "") -> str:
    """Where a turn is cached: the tenant itself without context (`context_key`) and answer
    shape (velo.core.shape.shape_key), else a scope of its own."""
    if not context and not shape:
        return tenant
    material = f"{tenant}\0{context}" + (f"\0{shape}" if shape else "")
    return SCOPE_PREFIX + hashlib.sha256(material.encode()).hexdigest()[:32]


def is_scope(name: str) -> bool:
    return bool(_SCOPE.fullmatch(name))


MAX_HISTORY_MESSAGES = 64


def prompt_problem(prompt: str, history: list[Turn] | tuple[Turn, ...]) -> str | None:
    """Why a turn has nothing to answer, or None. A turn without a prompt of its own is
    valid only after tool results (the LLM is to answer them)."""
    if prompt.strip() or (history and history[-1].role == "tool"):
        return None
    return "prompt is empty"


def history_problem(history: list[Turn], max_chars: int) -> str | None:
    """Why a conversation history is unusable, or None."""
    if len(history) > MAX_HISTORY_MESSAGES:
        return f"history has {len(history)} messages; at most {MAX_HISTORY_MESSAGES} are accepted"
    for n, turn in enumerate(history):
        if turn.role not in ROLES:
            return (f"history message {n} has role {turn.role[:20]!r}; use one of "
                    f"{', '.join(ROLES)}")
        if turn.tool_calls and (turn.role != "assistant" or not _json_list(turn.tool_calls)):
            return (f"history message {n}: tool_calls must be a JSON array of tool calls, on an "
                    "assistant message")
        if turn.role == "tool" and not turn.tool_call_id:
            return f"history message {n}: a tool message needs the tool_call_id it answers"
    chars = sum(len(t.content) + len(t.tool_calls) for t in history)
    if chars > max_chars:
        return f"history is {chars} characters; at most {max_chars} are accepted"
    return None


def _json_list(text: str) -> bool:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested too deep
        return False
    return isinstance(value, list) and all(isinstance(v, dict) for v in value)
