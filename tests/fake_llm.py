"""A real OpenAI-compatible HTTP server standing in for the LLM in fast tests (deterministic
answers, can be told to fail or hang). Tests that need real generation use SmolLM2 (marked llm).

It answers as an LLM would: a complete answer of `answer_tokens` tokens ("ok 1 2 ...") with
finish_reason "stop", or one cut at max_tokens ("length"), or at a stop sequence; JSON that
fits the requested response_format; a tool call (finish_reason "tool_calls") when given tools
(unless tool_choice is "none" or the last message is a tool result, which it answers in
text); logprobs when asked; usage on every answer, and in a stream's last chunk when
stream_options.include_usage is set."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FAKE_MODEL = "fake-model"


ANSWER_TOKENS = 8  # the length of the fake LLM's complete answer


def fake_tokens(max_tokens: int) -> list[str]:
    """The first `max_tokens` tokens of the fake LLM's answers, "ok 1 2 3 ..."."""
    return ["ok"] + [f" {i}" for i in range(1, max_tokens)]


def instance(schema: dict[str, Any]) -> Any:
    """A minimal value that fits a JSON schema (what a constrained LLM would write)."""
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type", "object")
    if kind == "object":
        return {name: instance(sub) for name, sub in (schema.get("properties") or {}).items()}
    if kind == "array":
        return [instance(schema.get("items") or {"type": "string"})]
    return {"string": "ok", "integer": 1, "number": 1.5, "boolean": True}.get(kind)


def answer(body: dict[str, Any]) -> tuple[list[str], str, list[dict] | None]:
    """What the fake LLM says to a request: (tokens, finish_reason, tool_calls)."""
    tools, choice = body.get("tools"), body.get("tool_choice", "auto")
    if tools and choice != "none" and body["messages"][-1]["role"] != "tool":
        tool = tools[0]["function"]
        if isinstance(choice, dict):
            tool = next(t["function"] for t in tools
                        if t["function"]["name"] == choice["function"]["name"])
        arguments = json.dumps(instance(tool.get("parameters") or {}))
        return [], "tool_calls", [{"id": f"call_{len(arguments)}", "type": "function",
                                   "function": {"name": tool["name"], "arguments": arguments}}]
    limit = body["max_tokens"]
    tokens = fake_tokens(min(limit, ANSWER_TOKENS))
    finish = "stop" if limit >= ANSWER_TOKENS else "length"
    text = "".join(tokens)
    for stop in body.get("stop") or ():
        if stop in text:
            text, finish = text[: text.index(stop)], "stop"
            tokens = [text]
    fmt = (body.get("response_format") or {}).get("type")
    if fmt == "json_object":
        tokens = [json.dumps({"answer": text})]
    elif fmt == "json_schema":
        tokens = [json.dumps(instance(body["response_format"]["json_schema"].get("schema")
                                      or {}))]
    return tokens, finish, None


def logprobs(tokens: list[str]) -> dict[str, Any]:
    return {"content": [{"token": t, "logprob": -0.25, "bytes": list(t.encode()),
                         "top_logprobs": []} for t in tokens]}


class FakeLLM:
    """A real OpenAI-compatible HTTP server (stdlib, on its own thread) that answers
    /v1/chat/completions deterministically and can be told to fail or to hang."""

    def __init__(self, port: int = 0) -> None:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), _FakeHandler)
        self._httpd.daemon_threads = True
        self._httpd.fake = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._httpd.server_port}/v1"
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.requests: list[dict[str, Any]] = []  # bodies received, in order
        self.fail_next = 0  # answer HTTP 500 to this many requests
        self.chunk_delay_s = 0.0  # pause between streamed tokens
        self.delay_s = 0.0  # pause before answering (an LLM takes its time)
        self.disconnects = 0  # streams the client closed before the end
        self.gate = threading.Event()  # cleared: requests hang until it is set
        self.gate.set()

    def record(self, body: dict[str, Any]) -> bool:
        """Note a request; True when it should fail with HTTP 500."""
        with self._lock:
            self.requests.append(body)
            if self.fail_next > 0:
                self.fail_next -= 1
                return True
            return False

    def start(self) -> FakeLLM:
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.gate.set()
        self._httpd.shutdown()
        self._httpd.server_close()


class _FakeHandler(BaseHTTPRequestHandler):
    server: ThreadingHTTPServer

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass

    def _json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": FAKE_MODEL}]})
        else:
            self._json(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:
        fake: FakeLLM = self.server.fake  # type: ignore[attr-defined]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/v1/chat/completions":
            return self._json(404, {"error": {"message": f"no route {self.path}"}})
        failing = fake.record(body)
        fake.gate.wait(timeout=30)
        time.sleep(fake.delay_s)
        try:
            if failing:
                return self._json(500, {"error": {"message": "fake overload"}})
            if body["model"] != FAKE_MODEL:
                return self._json(404, {"error": {"message": f"model '{body['model']}' not found"}})
            tokens, finish, calls = answer(body)
            usage = {
                "prompt_tokens": sum(len((m["content"] or "").split())
                                     for m in body["messages"]),
                "completion_tokens": max(len(tokens), len(calls or ())),
            }
            probs = body.get("logprobs") is True
            if not body.get("stream"):
                message = {"role": "assistant", "content": "".join(tokens) if not calls
                           else None}
                if calls:
                    message["tool_calls"] = calls
                return self._json(200, {"model": FAKE_MODEL, "usage": usage, "choices": [
                    {"index": 0, "message": message, "finish_reason": finish,
                     "logprobs": logprobs(tokens) if probs else None}]})
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()  # HTTP/1.0: the body ends when we close the connection
            events: list[dict[str, Any]] = [
                {"choices": [{"index": 0, "delta": {"content": t},
                              "logprobs": logprobs([t]) if probs else None}]} for t in tokens]
            for i, call in enumerate(calls or ()):  # as OpenAI streams them: in fragments
                head = {"index": i, "id": call["id"], "type": "function",
                        "function": {"name": call["function"]["name"], "arguments": ""}}
                arguments = call["function"]["arguments"]
                events += [{"choices": [{"index": 0, "delta": {"tool_calls": [head]}}]}] + [
                    {"choices": [{"index": 0, "delta": {"tool_calls": [
                        {"index": i, "function": {"arguments": arguments[j : j + 5]}}]}}]}
                    for j in range(0, len(arguments), 5)]
            events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
            if (body.get("stream_options") or {}).get("include_usage"):
                events.append({"choices": [], "usage": usage})
            for event in events:
                self.wfile.write(f"data: {json.dumps({'model': FAKE_MODEL, **event})}\n\n".encode())
                self.wfile.flush()
                time.sleep(fake.chunk_delay_s)
            self.wfile.write(b"data: [DONE]\n\n")
        except (BrokenPipeError, ConnectionResetError):
            with fake._lock:
                fake.disconnects += 1
