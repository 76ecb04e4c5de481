"""edged's OpenAI-compatible HTTP front: an application switches to VELO by changing its
`base_url` (to `http://<edge>:<port>/v1`) and its `api_key` (a VELO API key, which names the
tenant). The same request path as gRPC's Ask serves it (edged.pipeline); the wire format is
edged.openai_protocol, which lists what each request field becomes.

    POST /v1/chat/completions   streaming (SSE) or not; `usage` on every answer
    GET  /v1/models             the one model name this edge answers as ([http] model)
    GET  /healthz               200 while the edge is SERVING, else 503 with the reasons
    /v1/velo/cache/...          the cache, for operators (edged.admin): role admin with [auth],
                                loopback callers only without it
        GET    entries[?tenant=&limit=&offset=]   newest first
        GET    entries/{id}                       one entry
        DELETE entries/{id}                       delete it
        POST   delete        {"ids", "tenant", "question", "min_similarity", "older_than_s",
                              "dry_run"}: every criterion given must hold
        POST   import?tenant=T   a body of QA JSON lines (the project's data format)
        GET    export[?tenant=]  the entries as QA JSON lines

How a request was served is in the response headers (also on streams: the decision is made
before the first byte is sent) and in the `velo` extension field of the body (of the last
chunk of a stream):

    x-velo-action          reuse | forward | augment   (the paper's A, B, C)
    x-velo-similarity      c^s of the cached entry used (A and C)
    x-velo-entry-id        id of the cached QA pair used (A and C)
    x-velo-policy          the policy that decided, e.g. cache-0.5 or onnx:lrs:v3
                           ("pass-through" when the request's shape bypasses the cache)
    x-velo-policy-version  its version (0 for a baseline)
    x-velo-bypass          why no cached answer could serve it: tools, tool_messages,
                           logprobs, no-cache, max_tokens
    x-velo-keyed-on        request fields in its cache key besides the prompt: history,
                           response_format, stop
    x-velo-edge, x-request-id, and Age (seconds since the reused answer was cached)

Cache control, per request: the `Cache-Control` header (no-cache, no-store, max-age=N) and
`x-velo-min-similarity`, or the body's `velo.edge.cache` object (`extra_body` in the openai client:
{"velo": {"cache": {"no_cache": true, "no_store": true, "max_age_s": 60,
"min_similarity": 0.9}}}). When both are given, the stricter of each applies. no-cache
replaces the entries the request would have been served from with the fresh answer.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from edged.admin import CacheAdmin, Deletion, EntryView
from edged.config import EdgeConfig
from edged.contract import Answered, Decided, EdgeError, EdgeRequest, ErrorKind, Piece
from edged.openai_protocol import BadRequest, Chunks, chat_request, completion, served_headers
from edged.pipeline import EdgePipeline
from velo.core.records import entry_record, importable_pairs
from velo.runtime.logs import get_logger
from velo.runtime.security import Principal, TokenTable, is_loopback

log = get_logger("edged.http")

# The pipeline's refusals -> (HTTP status, OpenAI error type)
HTTP_STATUS = {
    ErrorKind.INVALID_ARGUMENT: (400, "invalid_request_error"),
    ErrorKind.UNAUTHENTICATED: (401, "authentication_error"),
    ErrorKind.PERMISSION_DENIED: (403, "permission_error"),
    ErrorKind.NOT_FOUND: (404, "not_found_error"),
    ErrorKind.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    ErrorKind.FAILED_PRECONDITION: (502, "upstream_error"),
    ErrorKind.UNAVAILABLE: (503, "service_unavailable"),
    ErrorKind.DEADLINE_EXCEEDED: (504, "timeout"),
    ErrorKind.INTERNAL: (500, "server_error"),
}


class HttpError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.param = status, kind, param

    @classmethod
    def of(cls, exc: EdgeError) -> HttpError:
        status, kind = HTTP_STATUS[exc.kind]
        return cls(status, str(exc), kind)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param,
                          "code": self.status}}

    def response(self) -> JSONResponse:
        headers = {"retry-after": "1"} if self.status in (429, 503) else None
        return JSONResponse(self.body(), self.status, headers=headers)


class OpenAIFront:
    def __init__(self, cfg: EdgeConfig, pipeline: EdgePipeline, admin: CacheAdmin,
                 tokens: TokenTable | None, down_parts: Callable[[], dict[str, str]]) -> None:
        self.cfg, self.pipeline, self.admin, self.tokens = cfg, pipeline, admin, tokens
        self.down_parts = down_parts
        cache = "/v1/velo/cache"
        self.app = Starlette(routes=[
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/healthz", self.health, methods=["GET"]),
            Route(f"{cache}/entries", self.list_entries, methods=["GET"]),
            Route(f"{cache}/entries/{{entry_id:int}}", self.entry, methods=["GET", "DELETE"]),
            Route(f"{cache}/delete", self.delete_entries, methods=["POST"]),
            Route(f"{cache}/import", self.import_entries, methods=["POST"]),
            Route(f"{cache}/export", self.export_entries, methods=["GET"]),
        ], exception_handlers={HttpError: _error_response, EdgeError: _edge_error_response,
                               BadRequest: _bad_request_response})

    # -- endpoints ------------------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        principal = self._authenticate(request)
        body = await self._json_body(request)
        chat = chat_request(body, request.headers, self._tenant(request, principal), principal,
                            self.cfg.http.model)
        if chat.stream:
            return await self._stream(chat.edge, chat.model, chat.include_usage)
        done = await self.pipeline.ask(chat.edge)
        return JSONResponse(completion(done, chat.model, int(time.time())),
                            headers=served_headers(done.decided))

    async def models(self, request: Request) -> Response:
        self._authenticate(request, roles=("tenant", "admin"))
        return JSONResponse({"object": "list", "data": [
            {"id": self.cfg.http.model, "object": "model", "created": 0, "owned_by": "velo"}]})

    async def health(self, request: Request) -> Response:
        """Open to load balancers. With [auth] on, only an admin key sees why a part is down:
        the reasons name internal addresses and errors."""
        down = self.down_parts()
        if not down:
            return JSONResponse({"status": "SERVING"})
        if self.tokens is not None:
            header = request.headers.get("authorization", "")
            who = self.tokens.lookup(header.removeprefix("Bearer ").strip())
            if who is None or who.role != "admin":
                down = {part: "down" for part in down}
        return JSONResponse({"status": "NOT_SERVING", "down": down}, 503)

    # -- streaming ----------------------------------------------------------------------------
    async def _stream(self, ask: EdgeRequest, model: str, include_usage: bool) -> Response:
        """Answer as server-sent events. The response starts once the policy has decided, so
        its headers say how the answer is served; a reuse is replayed in pieces."""
        events = self.pipeline.stream(ask)
        try:
            head = await anext(events)  # refused before deciding: an HTTP error, not a stream
        except StopAsyncIteration:
            raise HttpError(500, "the edge answered without deciding", "server_error") from None
        assert isinstance(head, Decided)
        chunks = Chunks(head.request_id, model, int(time.time()), include_usage)
        # The first piece too is awaited before the response starts: a cloud that is down or
        # out of time is then an HTTP 503 / 504 the client can act on, not a 200 whose stream
        # breaks off with an error event.
        try:
            first = [await anext(events)]
        except StopAsyncIteration:
            first = []
        except EdgeError:
            await events.aclose()
            raise

        def render(event: object) -> list[str]:
            if isinstance(event, Piece):
                return [_event(chunks.delta({"content": event.text}, event.logprobs))]
            if isinstance(event, Answered):
                return [_event(chunk) for chunk in chunks.end(event)]
            return []

        async def sse() -> AsyncIterator[str]:
            async with contextlib.aclosing(events):  # the client went away: nothing cached
                yield _event(chunks.delta({"role": "assistant", "content": ""}))
                for line in (line for event in first for line in render(event)):
                    yield line
                try:
                    async for event in events:
                        for line in render(event):
                            yield line
                except EdgeError as exc:  # e.g. the LLM failed mid-answer
                    yield _event(HttpError.of(exc).body())
                    return
                yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers=served_headers(head) | {"cache-control": "no-cache"})

    # -- the cache, for operators -----------------------------------------------------------
    def _operator(self, request: Request) -> str:
        """Who asks (for the audit log): an admin key with [auth]; without, this machine only."""
        principal = self._authenticate(request, roles=("admin",))
        if principal is not None:
            return f"{principal.role}:{principal.name}"
        host = request.client.host if request.client else ""
        if not is_loopback(host):
            raise HttpError(403, "this edge has no [auth]: its cache admin API answers only "
                                 "callers on the edge box itself (set auth.tokens_file and use "
                                 "an admin key)", "permission_error")
        return f"local:{host}"

    async def list_entries(self, request: Request) -> Response:
        self._operator(request)
        q = request.query_params
        views, total = await self.admin.newest(q.get("tenant", ""), _int(q, "limit"),
                                               _int(q, "offset"))
        return JSONResponse({"object": "list", "data": [_entry(v) for v in views],
                             "total": total})

    async def entry(self, request: Request) -> Response:
        who = self._operator(request)
        entry_id = request.path_params["entry_id"]
        if request.method == "GET":
            return JSONResponse(_entry(await self.admin.get(entry_id)))
        ids = await self.admin.delete(Deletion(ids=(entry_id,)), who)
        if not ids:
            raise HttpError(404, f"entry {entry_id} is not cached on this edge",
                            "not_found_error")
        return JSONResponse({"deleted": len(ids), "ids": [str(i) for i in ids]})

    async def delete_entries(self, request: Request) -> Response:
        who = self._operator(request)
        body = await self._json_body(request)
        try:
            deletion = Deletion(ids=tuple(int(i) for i in body.get("ids") or ()),
                                tenant=str(body.get("tenant") or ""),
                                question=str(body.get("question") or ""),
                                min_similarity=float(body.get("min_similarity") or 0.0),
                                older_than_s=float(body.get("older_than_s") or 0.0),
                                dry_run=body.get("dry_run") is True)
        except (TypeError, ValueError) as exc:
            raise HttpError(400, f"ids must be entry ids (numbers or numeric strings), "
                                 f"min_similarity and older_than_s numbers: {exc}") from None
        ids = await self.admin.delete(deletion, who)
        return JSONResponse({"deleted": len(ids), "ids": [str(i) for i in ids[:1000]],
                             "dry_run": deletion.dry_run})

    async def import_entries(self, request: Request) -> Response:
        who = self._operator(request)
        raw = await self._body(request)
        try:
            lines = raw.decode().split("\n")  # not splitlines: answers may hold U+2028
        except UnicodeDecodeError as exc:
            raise HttpError(400, f"the body must be UTF-8 QA JSON lines: {exc}") from None
        pairs, bad = importable_pairs(lines)
        ids, skipped = await self.admin.import_pairs(request.query_params.get("tenant", ""),
                                                     pairs, who)
        return JSONResponse({"imported": len(ids), "skipped": skipped + bad,
                             "ids": [str(i) for i in ids]})

    async def export_entries(self, request: Request) -> Response:
        self._operator(request)
        views = self.admin.export(request.query_params.get("tenant", ""))
        try:
            first = await anext(views)  # a bad tenant is a 400, not a broken stream
        except StopAsyncIteration:
            first = None

        async def lines() -> AsyncIterator[str]:
            if first is not None:
                yield json.dumps(_entry(first), ensure_ascii=False) + "\n"
            async for view in views:
                yield json.dumps(_entry(view), ensure_ascii=False) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

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

    async def _body(self, request: Request) -> bytes:
        limit = self.cfg.http.max_body_bytes
        if int(request.headers.get("content-length") or 0) > limit:
            raise HttpError(413, f"request body over {limit} bytes ([http] max_body_bytes)")
        raw = b""
        async for part in request.stream():
            raw += part
            if len(raw) > limit:
                raise HttpError(413, f"request body over {limit} bytes ([http] max_body_bytes)")
        return raw

    async def _json_body(self, request: Request) -> dict[str, Any]:
        raw = await self._body(request)
        try:
            body = json.loads(raw)
            # A lone surrogate ("\ud800") is valid JSON but no text: nothing downstream
            # (protobuf, the tokenizer, the LLM) can take it.
            json.dumps(body, ensure_ascii=False).encode()
        except (ValueError, UnicodeError, RecursionError) as exc:
            raise HttpError(400, f"request body is not JSON text: {str(exc)[:200]}") from None
        if not isinstance(body, dict):
            raise HttpError(400, "request body must be a JSON object")
        return body

    def _tenant(self, request: Request, principal: Principal | None) -> str:
        asked = request.headers.get("x-velo-tenant", "")
        if principal is None:  # no [auth]: the header, else the configured default
            return asked or self.cfg.http.tenant
        if asked and asked != principal.name:
            raise HttpError(403, "this API key may not ask as another tenant; drop "
                                 "x-velo-tenant or use the key's own tenant", "permission_error")
        return principal.name


def _entry(view: EntryView) -> dict[str, Any]:
    return entry_record(view.proto())


def _int(params: Any, name: str) -> int:
    value = params.get(name, "0")
    try:
        return int(value)
    except ValueError:
        raise HttpError(400, f"{name} must be a whole number, got {value[:32]!r}",
                        param=name) from None


def _event(value: object) -> str:
    return f"data: {json.dumps(value, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _error_response(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HttpError)
    return exc.response()


async def _edge_error_response(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, EdgeError)
    return HttpError.of(exc).response()


async def _bad_request_response(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BadRequest)
    return HttpError(400, str(exc), param=exc.param).response()
