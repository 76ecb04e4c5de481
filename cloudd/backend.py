"""The LLM behind cloudd: any server that speaks the OpenAI chat-completions API over HTTP
(vLLM, llama.cpp server, Ollama, TGI, OpenAI itself).

One `httpx.AsyncClient` lives as long as the process, so connections to the LLM server are
reused; its pool is as large as cloudd's concurrency limit.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from cloudd.config import LLMConfig
from velo.logs import get_logger

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
    history: Sequence[tuple[str, str]] = (),
) -> list[dict[str, str]]:
    """The chat messages for a prompt: system prompt, the conversation's earlier turns
    (`history`, (role, content) oldest first; its own system message replaces the configured
    one), then the user message.

    With context (Action C) the user message is `cfg.context_template` filled with the cached
    QA pairs and the prompt; without, it is the prompt itself.
    """
    messages = []
    if cfg.system_prompt and not any(role == "system" for role, _ in history):
        messages.append({"role": "system", "content": cfg.system_prompt})
    messages += [{"role": role, "content": content} for role, content in history]
    if context:
        items = "\n\n".join(
            cfg.context_item_template.format(question=q, answer=a) for q, a in context
        )
        prompt = cfg.context_template.format(context=items, prompt=prompt)
    messages.append({"role": "user", "content": prompt})
    return messages


def _reason(exc: BaseException) -> str:
    """The most useful words about a transport error (httpx often says only "All connection
    attempts failed"; the OSError underneath says "Connection refused")."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in errno.errorcode:
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
        headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        self._client = httpx.AsyncClient(
            base_url=self.url + "/",
            headers=headers,
            # No pool timeout: cloudd's own semaphore already bounds requests to the pool size.
            timeout=httpx.Timeout(cfg.timeout_s, connect=cfg.connect_timeout_s, pool=None),
            limits=httpx.Limits(
                max_connections=cfg.max_concurrency,
                max_keepalive_connections=cfg.max_concurrency,
            ),
        )

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
        history: Sequence[tuple[str, str]] = (),
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.cfg.model,
            "messages": build_messages(self.cfg, prompt, context, history),
            "max_tokens": max_tokens or self.cfg.default_max_tokens,
            "temperature": self.cfg.temperature,
            "stream": stream,
        }
        if stream:
            # Ask for token counts in the last chunk (OpenAI, vLLM, Ollama); others ignore it.
            body["stream_options"] = {"include_usage": True}
        return body

    async def generate(
        self, prompt: str, context: Sequence[tuple[str, str]] = (), max_tokens: int = 0,
        history: Sequence[tuple[str, str]] = (),
    ) -> Completion:
        """One completion; `max_tokens=0` means the configured default."""
        started = time.perf_counter()
        response = await self._send(self._body(prompt, context, max_tokens, False, history))
        try:
            body = response.json()
            choice = body["choices"][0]
            text = (choice.get("message") or {}).get("content") or ""
            usage = body.get("usage") or {}
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise BackendError(
                f"LLM server at {self.url} sent an unexpected response: {response.text[:200]!r}"
            ) from exc
        return Completion(
            text=text,
            model=body.get("model") or self.cfg.model,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            llm_s=time.perf_counter() - started,
        )

    async def stream(
        self, prompt: str, context: Sequence[tuple[str, str]] = (), max_tokens: int = 0,
        history: Sequence[tuple[str, str]] = (),
    ) -> AsyncIterator[str | Completion]:
        """Yield the answer's text deltas as they arrive, then one `Completion` with all of it.

        Only opening the stream is retried: once text has been yielded a failure is final.
        Closing this generator early (e.g. the gRPC client went away) closes the HTTP stream,
        which tells the LLM server to stop generating.
        """
        started = time.perf_counter()
        response = await self._send(self._body(prompt, context, max_tokens, True, history),
                                    stream=True)
        parts: list[str] = []
        model, usage = self.cfg.model, {}
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
                    delta = (choice.get("delta") or {}).get("content")
                    if delta:
                        parts.append(delta)
                        yield delta
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
        yield Completion(
            text="".join(parts),
            model=model,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            # Without usage in the stream (llama-cpp-python sends none) the prompt count stays 0
            # (unknown), and servers send one delta per token (llama.cpp, vLLM, TGI).
            completion_tokens=int(usage.get("completion_tokens") or len(parts)),
            llm_s=time.perf_counter() - started,
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
