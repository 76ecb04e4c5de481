"""What a request asks of its answer besides its meaning, and which cached answers fit it.

A cached answer is served only to a request it fits (SPEC §6). Three rules, each in one place:

* **Keyed**: `stop` and a non-text `response_format` change what a right answer looks like
  but not whether one can be reused: they are part of the cache key (`shape_key`, folded into
  the scope by velo.core.conversation.cache_scope), so a JSON-mode request is only ever served a
  JSON-mode answer, and an answer cut at a stop sequence only to requests with the same ones.
* **Pass-through** (`bypass_reasons`): `tools` / `tool_choice` (a tool call's arguments come
  from the very words of the prompt: "weather in Paris" must not get "weather in Lyon"'s
  call), `logprobs` (a cached answer has none) and tool turns in the history (their results
  are live data). Such a request goes to the LLM and is neither served from nor stored in
  the cache.
* **Fit** (`fits`): an answer the LLM finished ("stop") of T tokens fits a request allowing
  M >= T tokens; an answer cut at its limit ("length") fits only a request allowing exactly
  that many tokens, since one allowing more would get more and the edge cannot cut an answer
  where the LLM's tokenizer would (it does not have it): a request allowing fewer than a
  cached answer's tokens is forwarded.

All fields are passed to the LLM as they are (cloudd, `llm_fields`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from velo.core.conversation import Turn
from velo.v1 import chat_pb2

MAX_STOP = 4  # OpenAI's limit
MAX_STOP_CHARS = 256
MAX_TOOLS = 128
MAX_TOP_LOGPROBS = 20
FORMATS = ("text", "json_object", "json_schema")
TOOL_CHOICES = ("none", "auto", "required")
# finish_reason values a cached answer may carry: only the two that say where a text ends.
STORED_FINISH = ("stop", "length")


@dataclass(frozen=True)
class Shape:
    """The answer-shape fields of a request, parsed (JSON values as OpenAI sends them)."""

    stop: tuple[str, ...] = ()
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    logprobs: bool = False
    top_logprobs: int = 0

    @classmethod
    def from_proto(cls, shape: chat_pb2.AnswerShape) -> Shape:
        """The shape of a gRPC request; ValueError naming the field whose JSON is not JSON."""
        return cls(stop=tuple(shape.stop),
                   response_format=_json(shape.response_format_json, "response_format_json"),
                   tools=_json(shape.tools_json, "tools_json"),
                   tool_choice=_json(shape.tool_choice_json, "tool_choice_json"),
                   logprobs=shape.logprobs, top_logprobs=shape.top_logprobs)

    def proto(self) -> chat_pb2.AnswerShape:
        return chat_pb2.AnswerShape(
            stop=list(self.stop), response_format_json=to_json(self.response_format),
            tools_json=to_json(self.tools), tool_choice_json=to_json(self.tool_choice),
            logprobs=self.logprobs, top_logprobs=self.top_logprobs)

    @property
    def wants_json(self) -> bool:
        return self.response_format is not None and self.response_format.get("type") != "text"


def to_json(value: object) -> str:
    """A JSON value as the protos carry it ("" for none)."""
    return "" if value is None else json.dumps(value, separators=(",", ":"))


def _json(text: str, name: str) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
        raise ValueError(f"shape.{name} is not JSON: {str(exc)[:120]}") from None


def shape_problem(shape: Shape) -> str | None:
    """Why an answer shape cannot be asked of the LLM, or None (the edge and cloudd both ask)."""
    if len(shape.stop) > MAX_STOP:
        return f"stop holds {len(shape.stop)} sequences; at most {MAX_STOP} are accepted"
    if any(not s or len(s) > MAX_STOP_CHARS for s in shape.stop):
        return f"each stop sequence must be 1-{MAX_STOP_CHARS} characters"
    rf = shape.response_format
    if rf is not None:
        if not isinstance(rf, dict) or rf.get("type") not in FORMATS:
            return f"response_format must be an object whose type is one of {', '.join(FORMATS)}"
        if rf["type"] == "json_schema" and not (
                isinstance(rf.get("json_schema"), dict) and isinstance(
                    rf["json_schema"].get("name"), str)):
            return "response_format json_schema needs a json_schema object with a name"
    if shape.tools is not None and (
            not isinstance(shape.tools, list) or len(shape.tools) > MAX_TOOLS
            or not all(_function_tool(t) for t in shape.tools)):
        return (f"tools must be a list of at most {MAX_TOOLS} objects of type function, "
                "each with function.name")
    choice = shape.tool_choice
    if choice is not None and choice not in TOOL_CHOICES and not (
            isinstance(choice, dict) and _function_tool(choice)):
        return ("tool_choice must be none, auto, required or {\"type\": \"function\", "
                "\"function\": {\"name\": ...}}")
    if choice is not None and choice != "none" and not shape.tools:
        return "tool_choice needs tools"
    if not 0 <= shape.top_logprobs <= MAX_TOP_LOGPROBS:
        return f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}"
    if shape.top_logprobs and not shape.logprobs:
        return "top_logprobs needs logprobs = true"
    return None


def _function_tool(tool: object) -> bool:
    return (isinstance(tool, dict) and tool.get("type") == "function"
            and isinstance(tool.get("function"), dict)
            and isinstance(tool["function"].get("name"), str) and bool(tool["function"]["name"]))


def bypass_reasons(shape: Shape, history: list[Turn] | tuple[Turn, ...]) -> list[str]:
    """Why a request must go to the LLM and not be cached, whatever the policy says."""
    reasons = []
    if shape.tools:
        reasons.append("tools")
    if any(turn.uses_tools for turn in history):
        reasons.append("tool_messages")
    if shape.logprobs:
        reasons.append("logprobs")
    return reasons


def keyed_fields(shape: Shape) -> list[str]:
    """The shape fields that are part of this request's cache key."""
    return [name for name, value in (("response_format", shape.wants_json),
                                     ("stop", bool(shape.stop))) if value]


def shape_key(shape: Shape) -> str:
    """The cache-key part of a shape: "" for a plain-text answer without stop sequences."""
    if not keyed_fields(shape):
        return ""
    keyed = {"stop": list(shape.stop),
             "response_format": shape.response_format if shape.wants_json else None}
    return json.dumps(keyed, sort_keys=True, separators=(",", ":"))


def llm_fields(shape: Shape) -> dict[str, Any]:
    """The OpenAI request fields for this shape, to add to a chat-completions body."""
    body: dict[str, Any] = {}
    if shape.stop:
        body["stop"] = list(shape.stop)
    if shape.response_format is not None:
        body["response_format"] = shape.response_format
    if shape.tools:
        body["tools"] = shape.tools
    if shape.tool_choice is not None:
        body["tool_choice"] = shape.tool_choice
    if shape.logprobs:
        body["logprobs"] = True
        if shape.top_logprobs:
            body["top_logprobs"] = shape.top_logprobs
    return body


@dataclass(frozen=True)
class AnswerFacts:
    """What is known of a cached answer besides its text: where and why it ends, and what it
    cost. An entry cached before VELO kept these is taken as complete, of unknown length."""

    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    max_tokens: int = 0  # the cap the LLM was given (0: unknown)
    estimated: bool = False  # token counts from the edge's tokenizer (imported), not the LLM


def fits(facts: AnswerFacts, max_tokens: int) -> bool:
    """Whether a cached answer fits a request allowing `max_tokens` tokens (module doc)."""
    if facts.finish_reason == "stop":
        return facts.completion_tokens <= max_tokens
    if facts.finish_reason == "length":
        return (facts.max_tokens or facts.completion_tokens) == max_tokens
    return False


def estimate_tokens(text: str) -> int:
    """Tokens of a text when no tokenizer of the LLM's says: about 4 characters a token
    (English text, BPE tokenizers). Used only where the LLM reported no count."""
    return -(-len(text) // 4)


def storable(finish_reason: str) -> bool:
    """Only answers whose end is known to be a complete text or a token-limit cut are cached
    (not tool calls, not a content filter's cut)."""
    return finish_reason in STORED_FINISH
