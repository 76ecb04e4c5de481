"""An LLM server that answers GET /v1/models but dies of SIGSEGV in its first decode, as
llama-cpp-python 0.3.36 did on AVX-512/AMX CPUs. Run by LocalLLMServer(launcher=...)."""

from __future__ import annotations

import argparse
import json
import os
import signal
from http.server import BaseHTTPRequestHandler, HTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"object": "list", "data": [{"id": "smollm2"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        print("decode: about to crash", flush=True)
        os.kill(os.getpid(), signal.SIGSEGV)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args, _ = parser.parse_known_args()
    print(f"listening on {args.port}", flush=True)
    HTTPServer(("127.0.0.1", args.port), Handler).serve_forever()
