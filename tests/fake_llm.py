"""A real OpenAI-compatible HTTP server standing in for the LLM in fast tests (deterministic
answers, can be told to fail or hang). Tests that need real generation use SmolLM2 (marked llm)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FAKE_MODEL = "fake-model"


def fake_tokens(max_tokens: int) -> list[str]:
    """What the fake LLM answers: exactly `max_tokens` tokens, "ok 1 2 3 ..."."""
    return ["ok"] + [f" {i}" for i in range(1, max_tokens)]


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
        try:
            if failing:
                return self._json(500, {"error": {"message": "fake overload"}})
            if body["model"] != FAKE_MODEL:
                return self._json(404, {"error": {"message": f"model '{body['model']}' not found"}})
            tokens = fake_tokens(body["max_tokens"])
            usage = {
                "prompt_tokens": sum(len(m["content"].split()) for m in body["messages"]),
                "completion_tokens": len(tokens),
            }
            if not body.get("stream"):
                message = {"role": "assistant", "content": "".join(tokens)}
                return self._json(200, {"model": FAKE_MODEL, "usage": usage,
                                        "choices": [{"index": 0, "message": message}]})
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()  # HTTP/1.0: the body ends when we close the connection
            events = [{"choices": [{"index": 0, "delta": {"content": t}}]} for t in tokens]
            events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
            events.append({"choices": [], "usage": usage})
            for event in events:
                self.wfile.write(f"data: {json.dumps({'model': FAKE_MODEL, **event})}\n\n".encode())
                self.wfile.flush()
                time.sleep(fake.chunk_delay_s)
            self.wfile.write(b"data: [DONE]\n\n")
        except (BrokenPipeError, ConnectionResetError):
            with fake._lock:
                fake.disconnects += 1
