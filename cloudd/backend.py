"""The LLM behind cloudd: any server that speaks the OpenAI chat-completions API over HTTP
(vLLM, llama.cpp server, Ollama, TGI, OpenAI itself).

One `httpx.AsyncClient` is kept, so connections to the LLM server are reused; its pool is as
large as cloudd's concurrency limit. A request waits for a pooled connection at most timeout_s:
a pool that stays full that long holds connections no request uses any more (a request
cancelled at the wrong moment can leave one marked busy: after cloudd was frozen and thawed,
every later request waited on the pool forever), so it is replaced by a fresh one.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from cloudd.config import LLMConfig
from velo.core.conversation import Turn
from velo.core.shape import Shape, estimate_tokens, llm_fields
from velo.runtime.logs import get_logger

log = get_logger("cloudd.backend")

# Longest wait honoured from a 429's Retry-After header; past this we give up sooner.
_MAX_RETRY_AFTER_S = 30.0


@dataclass(frozen=True)
class Completion:
    text: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    llm_s: float  # time spent waiting on the LLM server, retries included
    # Why the LLM stopped ("stop", "length", "tool_calls", ...); inferred from the token count
    # when the server does not say.
    finish_reason: str = "stop"
    tool_calls: list[dict[str, Any]] | None = None  # OpenAI's tool_calls, when it called tools
    logprobs: dict[str, Any] | None = None  # OpenAI's logprobs object, when asked for
    max_tokens: int = 0  # the cap the LLM was given
    usage_estimated: bool = False  # the server reported no usage: counts are estimates


@dataclass(frozen=True)
class Piece:
    """A streamed piece of the answer (and its tokens' logprobs, when asked for)."""

    text: str
    logprobs: dict[str, Any] | None = None


class BackendError(Exception):
    """The LLM server refused the request (HTTP 4xx, `status` set) or answered nonsense."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class BackendUnavailable(BackendError):
    """The LLM server could not be reached or kept failing (5xx/429) through every retry."""


class BackendTimeout(BackendError):
    """The LLM server accepted the request but did not answer in time, through every retry."""


def build_messages(
    cfg: LLMConfig, prompt: str, context: Sequence[tuple[str, str]] = (),
    history: Sequence[Turn] = (),
) -> list[dict[str, Any]]:
    """The chat messages for a prompt: system prompt, the conversation's earlier turns
    (`history`, oldest first; its own system message replaces the configured one), then the
    user message.

    With context (Action C) the user message is `cfg.context_template` filled with the cached
    QA pairs and the prompt; without, it is the prompt itself.
    """
    messages: list[dict[str, Any]] = []
    if cfg.system_prompt and not any(turn.role == "system" for turn in history):
        messages.append({"role": "system", "content": cfg.system_prompt})
    messages += [turn.openai() for turn in history]
    if context:
        items = "\n\n".join(
            cfg.context_item_template.format(question=q, answer=a) for q, a in context
        )
        prompt = cfg.context_template.format(context=items, prompt=prompt)
    if prompt:  # none after tool results: the LLM answers them
        messages.append({"role": "user", "content": prompt})
    return messages


def _reason(exc: BaseException) -> str:
    """The most useful words about a transport error (httpx often says only "All connection
    attempts failed"; the OSError underneath says "Connection refused")."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in errno.errorcode:
            assert seen.errno is not None  # a key of errno.errorcode
            return os.strerror(seen.errno)
        seen = seen.__cause__ or seen.__context__
    return str(exc) or type(exc).__name__


def _server_message(response: httpx.Response) -> str:
    """The error text an OpenAI-compatible server put in its body, shortened."""
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()
    else:
        error = body.get("error", body) if isinstance(body, dict) else body
        if isinstance(error, dict):
            error = error.get("message") or error.get("detail") or error
        text = str(error).strip()
    return (text[:500] + "...") if len(text) > 500 else (text or response.reason_phrase)


def _estimated_tokens(body: dict[str, Any]) -> int:
    """A prompt's tokens when the server does not say, plus a few per message for the chat
    template."""
    return sum(estimate_tokens(str(m.get("content") or "")) + 4 for m in body["messages"])


def _finish(reported: object, tool_calls: object, completion_tokens: int,
            max_tokens: int) -> str:
    """The LLM's finish_reason; when it sent none, what the answer itself says."""
    if isinstance(reported, str) and reported:
        return reported
    if tool_calls:
        return "tool_calls"
    return "length" if completion_tokens >= max_tokens else "stop"


def _join_tool_calls(calls: dict[int, dict[str, Any]], fragments: object) -> None:
    """Add streamed tool-call fragments (OpenAI: by index; the id, type and name come once,
    the arguments in pieces) to the calls joined so far."""
    if not isinstance(fragments, list):
        return
    for fragment in fragments:
        if not isinstance(fragment, dict):
            continue
        index = fragment.get("index", len(calls))
        call = calls.setdefault(index, {"id": "", "type": "function",
                                        "function": {"name": "", "arguments": ""}})
        call["id"] = fragment.get("id") or call["id"]
        call["type"] = fragment.get("type") or call["type"]
        function = fragment.get("function") or {}
        call["function"]["name"] += function.get("name") or ""
        call["function"]["arguments"] += function.get("arguments") or ""


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return min(float(response.headers["retry-after"]), _MAX_RETRY_AFTER_S)
    except (KeyError, ValueError):
        return None


class OpenAIBackend:
    """Chat completions against an OpenAI-compatible server, with retries."""

    def __init__(self, cfg: LLMConfig) -> None:
        self.cfg = cfg
        self.url = cfg.base_url.rstrip("/")
        self._client = self._new_client()
        self.pools_replaced = 0

    def _new_client(self) -> httpx.AsyncClient:
        cfg = self.cfg
        headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        return httpx.AsyncClient(
            base_url=self.url + "/",
            headers=headers,
            # cloudd's own semaphore bounds requests to the pool size: a pool wait that runs
            # out means the pool has stuck connections (see the module docstring).
            timeout=httpx.Timeout(cfg.timeout_s, connect=cfg.connect_timeout_s,
                                  pool=cfg.timeout_s),
            limits=httpx.Limits(
                max_connections=cfg.max_concurrency,
                max_keepalive_connections=cfg.max_concurrency,
            ),
        )

    async def _replace_pool(self) -> None:
        stuck, self._client = self._client, self._new_client()
        self.pools_replaced += 1
        log.warning("no pooled connection to the LLM server came free in time; replaced the "
                    "pool", timeout_s=self.cfg.timeout_s, replaced=self.pools_replaced)
        try:
            await stuck.aclose()
        except Exception as exc:  # its connections are in an unknown state: let them go
            log.info("closing the stuck pool failed", error=str(exc))

    async def aclose(self) -> None:
        await self._client.aclose()

    async def models(self) -> list[str]:
        """The model names the server offers (GET /models); BackendUnavailable if unreachable."""
        try:
            response = await self._client.get("models")
            response.raise_for_status()
            return [m.get("id", "?") for m in response.json().get("data", [])]
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            raise BackendUnavailable(
                f"LLM server at {self.url} is unreachable: {_reason(exc)}"
            ) from exc

    def _body(
        self, prompt: str, context: Sequence[tuple[str, str]], max_tokens: int, stream: bool,
        history: Sequence[Turn] = (), shape: Shape | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.cfg.model,
            "messages": build_messages(self.cfg, prompt, context, history),
            "max_tokens": max_tokens or self.cfg.default_max_tokens,
            "temperature": self.cfg.temperature,
            "stream": stream,
            **llm_fields(shape or Shape()),
        }
        if stream:
            # Ask for token counts in the last chunk (OpenAI, vLLM, Ollama); others ignore it.
            body["stream_options"] = {"include_usage": True}
        return body

    async def generate(
        self, prompt: str, context: Sequence[tuple[str, str]] = (), max_tokens: int = 0,
        history: Sequence[Turn] = (), shape: Shape | None = None,
    ) -> Completion:
        """One completion; `max_tokens=0` means the configured default."""
        started = time.perf_counter()
        body = self._body(prompt, context, max_tokens, False, history, shape)
        response = await self._send(body)
        try:
            answer = response.json()
            choice = answer["choices"][0]
            message = choice.get("message") or {}
            text = message.get("content") or ""
            usage = answer.get("usage") or {}
            completion_tokens = int(usage.get("completion_tokens") or 0)
            tool_calls = message.get("tool_calls") or None
            if tool_calls is not None and not isinstance(tool_calls, list):
                raise TypeError("tool_calls is not a list")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise BackendError(
                f"LLM server at {self.url} sent an unexpected response: {response.text[:200]!r}"
            ) from exc
        return Completion(
            text=text,
            model=answer.get("model") or self.cfg.model,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=completion_tokens,
            llm_s=time.perf_counter() - started,
            finish_reason=_finish(choice.get("finish_reason"), tool_calls, completion_tokens,
                                  body["max_tokens"]),
            tool_calls=tool_calls,
            logprobs=choice.get("logprobs") if isinstance(choice.get("logprobs"), dict)
            else None,
            max_tokens=body["max_tokens"],
        )

    async def stream(
        self, prompt: str, context: Sequence[tuple[str, str]] = (), max_tokens: int = 0,
        history: Sequence[Turn] = (), shape: Shape | None = None,
    ) -> AsyncGenerator[Piece | Completion, None]:
        """Yield the answer's pieces as they arrive, then one `Completion` with all of it.

        Tool calls arrive in fragments (OpenAI's streamed `delta.tool_calls`); they are joined
        and reported whole in the Completion. Only opening the stream is retried: once text has
        been yielded a failure is final. Closing this generator early (e.g. the gRPC client went
        away) closes the HTTP stream, which tells the LLM server to stop generating.
        """
        started = time.perf_counter()
        body = self._body(prompt, context, max_tokens, True, history, shape)
        response = await self._send(body, stream=True)
        parts: list[str] = []
        deltas = 0  # content deltas: servers send one per token (llama.cpp, vLLM, TGI)
        usage: dict[str, Any]  # the server's usage report (JSON)
        model, usage, finish = self.cfg.model, {}, None
        calls: dict[int, dict[str, Any]] = {}
        logprobs: list[Any] = []
        try:
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, SSE comments (": ping"), event names
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                try:
                    event = json.loads(data)
                except ValueError as exc:
                    raise BackendError(
                        f"LLM server at {self.url} sent a malformed stream event: {data[:200]!r}"
                    ) from exc
                if not isinstance(event, dict):
                    continue
                if "error" in event:
                    error = event["error"]
                    message = error.get("message", error) if isinstance(error, dict) else error
                    raise BackendError(f"LLM server at {self.url} failed mid-stream: {message}")
                model = event.get("model") or model
                usage = event.get("usage") or usage
                for choice in event.get("choices") or ():
                    finish = choice.get("finish_reason") or finish
                    delta = choice.get("delta") or {}
                    _join_tool_calls(calls, delta.get("tool_calls"))
                    piece_logprobs = choice.get("logprobs")
                    if isinstance(piece_logprobs, dict):
                        logprobs += piece_logprobs.get("content") or []
                    else:
                        piece_logprobs = None
                    if delta.get("content"):
                        parts.append(delta["content"])
                        deltas += 1
                        yield Piece(delta["content"], piece_logprobs)
        except httpx.TimeoutException as exc:
            raise BackendTimeout(
                f"LLM server at {self.url} sent nothing for {self.cfg.timeout_s:g} s mid-stream"
            ) from exc
        except httpx.TransportError as exc:
            raise BackendUnavailable(
                f"LLM server at {self.url} broke the stream: {_reason(exc)}"
            ) from exc
        finally:
            await response.aclose()
        tool_calls = [calls[i] for i in sorted(calls)] or None
        completion_tokens = int(usage.get("completion_tokens") or deltas)
        yield Completion(
            text="".join(parts),
            model=model,
            prompt_tokens=int(usage.get("prompt_tokens") or _estimated_tokens(body)),
            completion_tokens=completion_tokens,
            usage_estimated=not usage,
            llm_s=time.perf_counter() - started,
            finish_reason=_finish(finish, tool_calls, completion_tokens, body["max_tokens"]),
            tool_calls=tool_calls,
            logprobs={"content": logprobs} if body.get("logprobs") else None,
            max_tokens=body["max_tokens"],
        )

    async def _send(self, body: dict[str, Any], stream: bool = False) -> httpx.Response:
        """POST /chat/completions until a 2xx arrives (an open response when `stream`).

        Connect errors, timeouts, 5xx and 429 are retried with exponential backoff; other 4xx
        raise BackendError at once, since sending the same request again cannot help.
        """
        attempts = self.cfg.max_retries + 1
        for attempt in range(1, attempts + 1):
            wait = self.cfg.retry_backoff_s * 2 ** (attempt - 1)
            request = self._client.build_request("POST", "chat/completions", json=body)
            try:
                response = await self._client.send(request, stream=stream)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                failure: BackendError = BackendUnavailable(
                    f"LLM server at {self.url} is unreachable: {_reason(exc)}"
                )
            except httpx.PoolTimeout:
                await self._replace_pool()
                failure = BackendTimeout(
                    f"no connection to the LLM server at {self.url} came free within "
                    f"{self.cfg.timeout_s:g} s (the pool was replaced)"
                )
                wait = 0.0
            except httpx.TimeoutException:
                failure = BackendTimeout(
                    f"LLM server at {self.url} did not answer within {self.cfg.timeout_s:g} s"
                )
            except httpx.TransportError as exc:
                failure = BackendUnavailable(
                    f"LLM server at {self.url} dropped the connection: {_reason(exc)}"
                )
            else:
                if response.is_success:
                    return response
                if stream:
                    await response.aread()
                    await response.aclose()
                status, message = response.status_code, _server_message(response)
                if status != 429 and status < 500:
                    raise BackendError(
                        f"LLM server at {self.url} rejected the request: HTTP {status}: {message}",
                        status=status,
                    )
                failure = BackendUnavailable(
                    f"LLM server at {self.url} is failing: HTTP {status}: {message}"
                )
                wait = max(wait, _retry_after(response) or 0.0)
            if attempt == attempts:
                break
            log.warning("llm request failed; retrying", error=str(failure), attempt=attempt,
                        retry_in_s=round(wait, 3))
            await asyncio.sleep(wait)
        if attempts > 1:
            failure.args = (f"{failure} (gave up after {attempts} attempts)",)
        raise failure
