"""edged's OpenAI-compatible HTTP front: an application switches to VELO by changing its
`base_url` (to `http://<edge>:<port>/v1`) and its `api_key` (a VELO API key, which names the
tenant). The same request path as gRPC's Ask serves it (edged.pipeline).

    POST /v1/chat/completions   streaming (SSE) or not; `messages` before the last user
                                message feed the conversation key (velo.conversation)
    GET  /v1/models             the one model name this edge answers as ([http] model)
    GET  /healthz               200 while the edge is SERVING, else 503 with the reasons

How a request was served is in the response headers (also on streams: the decision is made
before the first byte is sent) and in the `velo` extension field of the body (of the last
chunk of a stream):

    x-velo-action          reuse | forward | augment   (the paper's A, B, C)
    x-velo-similarity      c^s of the cached entry used (A and C)
    x-velo-entry-id        id of the cached QA pair used (A and C)
    x-velo-policy          the policy that decided, e.g. cache-0.5 or onnx:lrs:v3
    x-velo-policy-version  its version (0 for a baseline)
    x-velo-edge, x-request-id, and Age (seconds since the reused answer was cached)

Cache control, per request: the `Cache-Control` header (no-cache, no-store, max-age=N) and
`x-velo-min-similarity`, or the body's `velo.cache` object (`extra_body` in the openai client:
{"velo": {"cache": {"no_cache": true, "no_store": true, "max_age_s": 60,
"min_similarity": 0.9}}}). When both are given, the stricter of each applies.

Sampling options (temperature, top_p, ...) are accepted and ignored: cloudd's [llm] settings
decide them for every tenant, so that a cached answer means the same thing to everyone.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from edged.config import EdgeConfig
from edged.pipeline import EdgePipeline, RequestError
from velo.logs import get_logger
from velo.security import Principal, TokenTable
from velo.v1 import chat_pb2, edge_pb2

log = get_logger("edged.http")

ACTION_NAMES = {edge_pb2.ACTION_REUSE: "reuse", edge_pb2.ACTION_FORWARD: "forward",
                edge_pb2.ACTION_AUGMENT: "augment"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# gRPC status of a refused request -> (HTTP status, OpenAI error type)
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}


class HttpError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.param = status, kind, param

    @classmethod
    def from_request_error(cls, exc: RequestError) -> HttpError:
        status, kind = HTTP_STATUS.get(exc.code, (500, "server_error"))
        return cls(status, str(exc), kind)

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param,
                          "code": self.status}}

    def response(self) -> JSONResponse:
        headers = {"retry-after": "1"} if self.status in (429, 503) else None
        return JSONResponse(self.body(), self.status, headers=headers)


class OpenAIFront:
    def __init__(self, cfg: EdgeConfig, pipeline: EdgePipeline, tokens: TokenTable | None,
                 down_parts: Callable[[], dict[str, str]]) -> None:
        self.cfg, self.pipeline, self.tokens = cfg, pipeline, tokens
        self.down_parts = down_parts
        self.app = Starlette(routes=[
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/healthz", self.health, methods=["GET"]),
        ], exception_handlers={HttpError: _error_response})

    # -- endpoints ------------------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        principal = self._authenticate(request)
        body = await self._json_body(request)
        ask, model, stream = self._ask_request(body, request, principal)
        if stream:
            return await self._stream(ask, model)
        try:
            done = await self.pipeline.ask(ask)
        except RequestError as exc:
            raise HttpError.from_request_error(exc) from None
        completion = {
            "id": f"chatcmpl-{done.request_id}", "object": "chat.completion",
            "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": done.answer}}],
            "velo": served(done),
        }
        return JSONResponse(completion, headers=served_headers(done))

    async def models(self, request: Request) -> Response:
        self._authenticate(request, roles=("tenant", "admin"))
        return JSONResponse({"object": "list", "data": [
            {"id": self.cfg.http.model, "object": "model", "created": 0, "owned_by": "velo"}]})

    async def health(self, _request: Request) -> Response:
        down = self.down_parts()
        if down:
            return JSONResponse({"status": "NOT_SERVING", "down": down}, 503)
        return JSONResponse({"status": "SERVING"})

    # -- streaming ----------------------------------------------------------------------------
    async def _stream(self, ask: edge_pb2.AskRequest, model: str) -> Response:
        """Answer as server-sent events. The response starts once the policy has decided, so
        its headers say how the answer is served; a reuse is replayed in pieces."""
        pieces: asyncio.Queue[str | None] = asyncio.Queue()
        decided: asyncio.Future[edge_pb2.AskResponse] = asyncio.get_running_loop().create_future()

        async def on_decided(head: edge_pb2.AskResponse) -> None:
            decided.set_result(head)

        async def on_text(text: str) -> None:
            await pieces.put(text)

        task = asyncio.create_task(self.pipeline.ask(ask, on_text, on_decided))
        task.add_done_callback(lambda _: pieces.put_nowait(None))
        await asyncio.wait({decided, task}, return_when=asyncio.FIRST_COMPLETED)
        if not decided.done():  # refused before deciding (bad input, at capacity, DB down)
            try:
                task.result()
            except RequestError as exc:
                raise HttpError.from_request_error(exc) from None
            raise HttpError(500, "the edge answered without deciding", "server_error")
        head = decided.result()
        chunk_id, created = f"chatcmpl-{head.request_id}", int(time.time())

        def chunk(delta: dict, finish: str | None = None, **extra: Any) -> str:
            event = {"id": chunk_id, "object": "chat.completion.chunk", "created": created,
                     "model": model,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                     **extra}
            return f"data: {_json(event)}\n\n"

        async def events() -> AsyncIterator[str]:
            try:
                yield chunk({"role": "assistant", "content": ""})
                while (text := await pieces.get()) is not None:
                    yield chunk({"content": text})
                try:
                    done = task.result()
                except RequestError as exc:  # e.g. the LLM failed mid-answer
                    yield f"data: {_json(HttpError.from_request_error(exc).body())}\n\n"
                    return
                yield chunk({}, "stop", velo=served(done))
                yield "data: [DONE]\n\n"
            finally:
                if not task.done():  # the client went away: nothing partial is cached
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers=served_headers(head) | {"cache-control": "no-cache"})

    # -- request parsing -------------------------------------------------------------------------
    def _authenticate(self, request: Request, roles: tuple[str, ...] = ("tenant",),
                      ) -> Principal | None:
        """The caller's API key (`Authorization: Bearer ...`), when this edge has [auth]."""
        if self.tokens is None:
            return None
        header = request.headers.get("authorization", "")
        key = header[len("Bearer "):].strip() if header.startswith("Bearer ") else ""
        principal = self.tokens.lookup(key)
        if principal is None:
            why = "is not a known API key" if key else "is missing"
            raise HttpError(401, f"this edge needs an API key (Authorization: Bearer ...); the "
                                 f"one sent {why}", "authentication_error")
        if principal.role not in roles:
            raise HttpError(403, f"role {principal.role!r} may not call {request.url.path} "
                                 f"(allowed: {', '.join(roles)})", "permission_error")
        return principal

    async def _json_body(self, request: Request) -> dict:
        limit = self.cfg.http.max_body_bytes
        if int(request.headers.get("content-length") or 0) > limit:
            raise HttpError(413, f"request body over {limit} bytes ([http] max_body_bytes)")
        raw = b""
        async for part in request.stream():
            raw += part
            if len(raw) > limit:
                raise HttpError(413, f"request body over {limit} bytes ([http] max_body_bytes)")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise HttpError(400, f"request body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise HttpError(400, "request body must be a JSON object")
        return body

    def _ask_request(self, body: dict, request: Request, principal: Principal | None,
                     ) -> tuple[edge_pb2.AskRequest, str, bool]:
        model = body.get("model", self.cfg.http.model)
        if not isinstance(model, str):
            raise HttpError(400, "model must be a string", param="model")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise HttpError(400, "stream must be true or false", param="stream")
        if body.get("n", 1) != 1:
            raise HttpError(400, "this edge returns one choice per request (n = 1)", param="n")
        prompt, history = _messages(body.get("messages"))
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens", 0))
        if max_tokens is None:
            max_tokens = 0
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
            raise HttpError(400, "max_tokens must be a whole number >= 0", param="max_tokens")
        if max_tokens > self.cfg.limits.max_tokens:
            raise HttpError(400, f"max_tokens must be at most {self.cfg.limits.max_tokens} "
                                 "(edged limits.max_tokens)", param="max_tokens")
        return edge_pb2.AskRequest(
            prompt=prompt, history=history, max_tokens=max_tokens,
            tenant=self._tenant(request, principal),
            request_id=request.headers.get("x-request-id", ""),
            cache=_cache_control(request.headers, body.get("velo")),
        ), model, stream

    def _tenant(self, request: Request, principal: Principal | None) -> str:
        asked = request.headers.get("x-velo-tenant", "")
        if principal is None:  # no [auth]: the header, else the configured default
            return asked or self.cfg.http.tenant
        if asked and asked != principal.name:
            raise HttpError(403, "this API key may not ask as another tenant; drop "
                                 "x-velo-tenant or use the key's own tenant", "permission_error")
        return principal.name


async def _error_response(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HttpError)
    return exc.response()


def _messages(messages: Any) -> tuple[str, list[chat_pb2.ChatMessage]]:
    """The newest user message (the prompt) and the turns before it (the history)."""
    if not isinstance(messages, list) or not messages:
        raise HttpError(400, "messages must be a non-empty list", param="messages")
    turns: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise HttpError(400, f"messages[{i}] must be an object", param="messages")
        role = ROLES.get(message.get("role"))
        if role is None:
            raise HttpError(400, f"messages[{i}].role must be one of {', '.join(ROLES)} (tool "
                                 "calls are not served by this edge)", param="messages")
        turns.append((role, _text(message.get("content"), i)))
    role, prompt = turns[-1]
    if role != "user":
        raise HttpError(400, "the last message must be the user's question", param="messages")
    return prompt, [chat_pb2.ChatMessage(role=r, content=c) for r, c in turns[:-1]]


def _text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text ones can be cached and compared
        texts = [part.get("text") for part in content if isinstance(part, dict)]
        if len(texts) == len(content) and all(
                p.get("type") == "text" and isinstance(t, str) for p, t in zip(content, texts,
                                                                               strict=True)):
            return "".join(texts)
    raise HttpError(400, f"messages[{i}].content must be text (a string or text parts)",
                    param="messages")


def _cache_control(headers: Any, extension: Any) -> edge_pb2.CacheControl:
    """Cache-Control / x-velo-min-similarity headers and the body's velo.cache, the stricter
    of each. Out-of-range values are refused by the edge's own check (INVALID_ARGUMENT)."""
    control = edge_pb2.CacheControl()
    ages: list[float] = []
    for directive in headers.get("cache-control", "").split(","):
        name, _, value = directive.strip().lower().partition("=")
        if name == "no-cache":
            control.no_cache = True
        elif name == "no-store":
            control.no_store = True
        elif name == "max-age":
            ages.append(_number(value, "Cache-Control max-age"))
    floors = [_number(v, "x-velo-min-similarity")
              for v in [headers.get("x-velo-min-similarity")] if v is not None]
    if extension is not None:
        cache = extension.get("cache", {}) if isinstance(extension, dict) else None
        if not isinstance(cache, dict):
            raise HttpError(400, "velo.cache must be an object", param="velo")
        control.no_cache |= cache.get("no_cache") is True
        control.no_store |= cache.get("no_store") is True
        if "max_age_s" in cache:
            ages.append(_number(cache["max_age_s"], "velo.cache.max_age_s"))
        if "min_similarity" in cache:
            floors.append(_number(cache["min_similarity"], "velo.cache.min_similarity"))
    if ages:  # the youngest limit wins; max-age=0 means "only what is fresh now": no reuse
        youngest = min(ages)
        if youngest == 0:
            control.no_cache = True
        control.max_age_s = youngest
    if floors:
        control.min_similarity = max(floors)
    return control


def _number(value: Any, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise HttpError(400, f"{name} must be a number, got {str(value)[:32]!r}") from None
    if not math.isfinite(number):
        raise HttpError(400, f"{name} must be finite")
    return number


def served(done: edge_pb2.AskResponse) -> dict:
    """The `velo` extension field: how this answer was served."""
    info: dict[str, Any] = {
        "action": ACTION_NAMES.get(done.action, "unknown"), "policy": done.policy,
        "policy_version": done.policy_version, "edge_id": done.edge_id,
        "request_id": done.request_id, "stored": done.stored,
        "delay_s": round(done.delay_s, 6),
    }
    if done.cached_entry_id:
        info |= {"similarity": round(done.similarity, 6),
                 "entry_id": str(done.cached_entry_id),  # 61 bits: a string for JavaScript
                 "cached_question": done.cached_question, "age_s": round(done.cached_age_s, 3)}
    return info


def served_headers(head: edge_pb2.AskResponse) -> dict[str, str]:
    headers = {"x-velo-action": ACTION_NAMES.get(head.action, "unknown"),
               "x-velo-policy": head.policy, "x-velo-policy-version": str(head.policy_version),
               "x-velo-edge": head.edge_id, "x-request-id": head.request_id}
    if head.cached_entry_id:
        headers |= {"x-velo-similarity": f"{head.similarity:.6f}",
                    "x-velo-entry-id": str(head.cached_entry_id),
                    "age": str(int(head.cached_age_s))}
    return headers


def _json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
