"""OpenAI's chat-completions wire format on the edge: a request body -> `ChatRequest` (the
pipeline's EdgeRequest and how to answer), and the pipeline's events -> OpenAI's completion,
chunk and usage objects. The routes are in edged.openai_front.

What each request field becomes (docs/openai.md lists the same):

    honoured     messages (system/developer, user, assistant with tool_calls, tool),
                 max_tokens / max_completion_tokens (the answer's fit: velo.core.shape.fits),
                 stream, stream_options.include_usage, n = 1
    keyed        stop, response_format (json_object, json_schema): passed to the LLM, and a
                 cached answer is reused only for the same ones
    pass-through tools, tool_choice, logprobs, top_logprobs, and tool turns in messages:
                 passed to the LLM; never served from the cache, never stored
    ignored      temperature, top_p, seed, presence_penalty, frequency_penalty, logit_bias,
                 parallel_tool_calls, user, metadata, store, service_tier, reasoning_effort:
                 cloudd's [llm] settings decide sampling for every tenant, so that a cached
                 answer means the same to all
    refused      n > 1, functions / function_call (use tools), audio output, non-text content
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, cast

from edged.contract import Answered, CacheRules, Decided, EdgeRequest
from velo.core.conversation import Turn
from velo.core.qos import Action
from velo.core.shape import Shape
from velo.runtime.security import Principal

ACTION_NAMES = {Action.REUSE: "reuse", Action.FORWARD: "forward", Action.AUGMENT: "augment"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
         "tool": "tool"}
REFUSED = {"functions": "functions is OpenAI's old form of tools: send tools instead",
           "function_call": "function_call is OpenAI's old form of tool_choice: send "
                            "tool_choice instead",
           "audio": "this edge answers in text only (no audio output)"}


class BadRequest(ValueError):
    """A request body OpenAI's API would refuse: 400 with the message and the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ChatRequest:
    edge: EdgeRequest
    model: str
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage


def chat_request(body: dict[str, Any], headers: Any, tenant: str, principal: Principal | None,
                 default_model: str) -> ChatRequest:
    """Parse a chat-completions body (BadRequest naming the field when it is wrong); `tenant`
    is the one the front resolved from the headers or its default."""
    model = _typed(body, "model", str, default_model)
    stream = _typed(body, "stream", bool, False)
    n = body.get("n")  # 1.0 and true equal 1 in Python: only the integer 1 is one choice
    if n is not None and (type(n) is not int or n != 1):
        raise BadRequest("this edge returns one choice per request (n = 1)", "n")
    for name, why in REFUSED.items():
        if body.get(name) is not None:
            raise BadRequest(why, name)
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise BadRequest("this edge answers in text only: modalities must be [\"text\"]",
                         "modalities")
    options = _typed(body, "stream_options", dict, None)
    if options is not None and not stream:
        raise BadRequest("stream_options needs stream = true", "stream_options")
    include_usage = (options or {}).get("include_usage") is True
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = 0
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
        raise BadRequest("max_tokens must be a whole number >= 0", "max_tokens")
    prompt, history = _messages(body.get("messages"))
    edge = EdgeRequest(
        prompt=prompt, tenant=tenant, request_id=headers.get("x-request-id", ""),
        history=history, max_tokens=max_tokens, cache=_cache_rules(headers, body.get("velo")),
        shape=_shape(body), principal=principal)
    return ChatRequest(edge, model, stream, include_usage)


def _typed(body: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise BadRequest(f"{name} must be {_KINDS[kind]}", name)
    return value


_KINDS = {str: "a string", bool: "true or false", dict: "an object", list: "a list",
          int: "a whole number"}


def _shape(body: dict[str, Any]) -> Shape:
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str)
                                                                  for s in stop)):
        raise BadRequest("stop must be a string or a list of strings", "stop")
    logprobs = _typed(body, "logprobs", bool, False)
    top = _typed(body, "top_logprobs", int, 0)
    tools = _typed(body, "tools", list, None)
    choice = body.get("tool_choice")
    if choice is not None and not isinstance(choice, str | dict):
        raise BadRequest("tool_choice must be a string or an object", "tool_choice")
    return Shape(stop=tuple(stop or ()),
                 response_format=_typed(body, "response_format", dict, None),
                 tools=tools or None, tool_choice=choice,
                 logprobs=logprobs, top_logprobs=top)


def _messages(messages: Any) -> tuple[str, tuple[Turn, ...]]:
    """The newest user message (the prompt) and the turns before it (the history). A
    conversation that ends with tool results (the LLM is to answer them) has no prompt: all
    of it is history."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", "messages")
    turns = [_turn(message, i) for i, message in enumerate(messages)]
    last = turns[-1]
    if last.role == "tool":
        return "", tuple(turns)
    if last.role != "user":
        raise BadRequest("the last message must be the user's question (or tool results)",
                         "messages")
    return last.content, tuple(turns[:-1])


def _turn(message: Any, i: int) -> Turn:
    if not isinstance(message, dict):
        raise BadRequest(f"messages[{i}] must be an object", "messages")
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise BadRequest(f"messages[{i}].role must be one of {', '.join(ROLES)}", "messages")
    role = ROLES[role]
    calls = message.get("tool_calls")
    if calls is not None and (role != "assistant" or not isinstance(calls, list)):
        raise BadRequest(f"messages[{i}].tool_calls must be a list, on an assistant message",
                         "messages")
    content = message.get("content")
    if content is None and (calls or role == "assistant"):
        content = ""
    call_id = message.get("tool_call_id")
    if role == "tool" and not isinstance(call_id, str):
        raise BadRequest(f"messages[{i}] is a tool result: it needs the tool_call_id it "
                         "answers", "messages")
    name = message.get("name")
    return Turn(role, _text(content, i), json.dumps(calls) if calls else "",
                cast(str, call_id) if role == "tool" else "", name if isinstance(name, str) else "")


def _text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text ones can be cached and compared
        texts = [part.get("text") if isinstance(part, dict) else None for part in content]
        if all(isinstance(p, dict) and p.get("type") == "text" and isinstance(t, str)
               for p, t in zip(content, texts, strict=True)):
            return "".join(cast(list[str], texts))  # all str: checked just above
    raise BadRequest(f"messages[{i}].content must be text (a string or text parts)",
                     "messages")


def _cache_rules(headers: Any, extension: Any) -> CacheRules:
    """Cache-Control / x-velo-min-similarity headers and the body's velo.edge.cache, the stricter
    of each. Out-of-range values are refused by the pipeline's own check."""
    no_cache = no_store = False
    ages: list[float] = []
    for directive in headers.get("cache-control", "").split(","):
        name, _, value = directive.strip().lower().partition("=")
        if name == "no-cache":
            no_cache = True
        elif name == "no-store":
            no_store = True
        elif name == "max-age":
            ages.append(_number(value, "Cache-Control max-age"))
    floors = [_number(v, "x-velo-min-similarity")
              for v in [headers.get("x-velo-min-similarity")] if v is not None]
    if extension is not None:
        cache = extension.get("cache", {}) if isinstance(extension, dict) else None
        if not isinstance(cache, dict):
            raise BadRequest("velo.edge.cache must be an object", "velo")
        no_cache |= _flag(cache, "no_cache")
        no_store |= _flag(cache, "no_store")
        for key, into in (("max_age_s", ages), ("min_similarity", floors)):
            if key in cache:
                if isinstance(cache[key], bool) or not isinstance(cache[key], int | float):
                    raise BadRequest(f"velo.edge.cache.{key} must be a number", "velo")
                into.append(_number(cache[key], f"velo.edge.cache.{key}"))
    youngest = min(ages) if ages else 0.0
    # max-age=0 means "only what is fresh now": no reuse.
    return CacheRules(no_cache=no_cache or (bool(ages) and youngest == 0), no_store=no_store,
                      max_age_s=youngest, min_similarity=max(floors) if floors else 0.0)


def _flag(cache: dict[str, Any], key: str) -> bool:
    """A velo.edge.cache switch: true, false or absent. "yes" is refused, not read as false (an
    answer the caller asked to refresh must not be reused because of a spelling)."""
    value = cache.get(key, False)
    if not isinstance(value, bool):
        raise BadRequest(f"velo.edge.cache.{key} must be true or false, got {str(value)[:32]!r}",
                         "velo")
    return value


def _number(value: Any, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise BadRequest(f"{name} must be a number, got {str(value)[:32]!r}") from None
    if not math.isfinite(number):
        raise BadRequest(f"{name} must be finite")
    return number


# -- responses ---------------------------------------------------------------------------------
def usage(done: Answered) -> dict[str, Any]:
    """OpenAI's usage object. A reuse reports the cached answer's counts, its prompt tokens as
    cached (prompt_tokens_details.cached_tokens, which cost trackers read as a cache read)."""
    u = done.usage
    body: dict[str, Any] = {"prompt_tokens": u.prompt_tokens,
                            "completion_tokens": u.completion_tokens,
                            "total_tokens": u.total_tokens}
    if done.saved is not None:
        body["prompt_tokens_details"] = {"cached_tokens": u.prompt_tokens}
    return body


def served(done: Answered) -> dict[str, Any]:
    """The `velo` extension field: how this answer was served."""
    head = done.decided
    info: dict[str, Any] = {
        "action": ACTION_NAMES[head.action], "policy": head.policy,
        "policy_version": head.policy_version, "edge_id": head.edge_id,
        "request_id": head.request_id, "stored": done.stored,
        "delay_s": round(done.delay_s, 6), "bypass": list(head.bypass),
        "keyed_on": list(head.keyed_on), "usage_estimated": done.usage.estimated,
    }
    if head.row is not None:
        info |= {"similarity": round(head.row.similarity, 6),
                 "entry_id": str(head.row.pair_id),  # 61 bits: a string for JavaScript
                 "cached_question": head.row.question, "age_s": round(head.cached_age_s, 3)}
    if done.saved is not None:
        info |= {"saved_prompt_tokens": done.saved.prompt_tokens,
                 "saved_completion_tokens": done.saved.completion_tokens}
    if done.stored_entry_id:
        info["stored_entry_id"] = str(done.stored_entry_id)
    if done.superseded:
        info["superseded_entry_ids"] = [str(i) for i in done.superseded]
    return info


def served_headers(head: Decided) -> dict[str, str]:
    headers = {"x-velo-action": ACTION_NAMES[head.action], "x-velo-policy": head.policy,
               "x-velo-policy-version": str(head.policy_version), "x-velo-edge": head.edge_id,
               "x-request-id": head.request_id}
    if head.row is not None:
        headers |= {"x-velo-similarity": f"{head.row.similarity:.6f}",
                    "x-velo-entry-id": str(head.row.pair_id),
                    "age": str(int(head.cached_age_s))}
    if head.bypass:
        headers["x-velo-bypass"] = ",".join(head.bypass)
    if head.keyed_on:
        headers["x-velo-keyed-on"] = ",".join(head.keyed_on)
    return headers


def completion(done: Answered, model: str, created: int) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": done.answer}
    if done.tool_calls:
        message |= {"tool_calls": done.tool_calls, "content": done.answer or None}
    return {"id": f"chatcmpl-{done.decided.request_id}", "object": "chat.completion",
            "created": created, "model": model,
            "choices": [{"index": 0, "finish_reason": done.finish_reason, "message": message,
                         "logprobs": done.logprobs}],
            "usage": usage(done), "velo": served(done)}


class Chunks:
    """The chunk objects of one streamed completion (OpenAI's chat.completion.chunk)."""

    def __init__(self, request_id: str, model: str, created: int, include_usage: bool) -> None:
        self.id, self.model, self.created = f"chatcmpl-{request_id}", model, created
        self.include_usage = include_usage

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                 "model": self.model, "choices": choices, **extra}
        if self.include_usage:  # OpenAI: null on every chunk but the last
            chunk.setdefault("usage", None)
        return chunk

    def delta(self, delta: dict[str, Any], logprobs: dict[str, Any] | None = None,
              ) -> dict[str, Any]:
        return self._chunk([{"index": 0, "delta": delta, "logprobs": logprobs,
                             "finish_reason": None}])

    def end(self, done: Answered) -> list[dict[str, Any]]:
        """The last chunks: the tool calls (whole, in one delta), the finish reason with the
        `velo` field, and with include_usage the usage chunk."""
        chunks = []
        if done.tool_calls:
            calls = [{"index": i, **call} for i, call in enumerate(done.tool_calls)]
            chunks.append(self.delta({"tool_calls": calls}))
        chunks.append(self._chunk([{"index": 0, "delta": {}, "logprobs": None,
                                    "finish_reason": done.finish_reason}], velo=served(done)))
        if self.include_usage:
            chunks.append(self._chunk([], usage=usage(done)))
        return chunks

