"""A real local LLM: SmolLM2-135M-Instruct served by llama.cpp's OpenAI-compatible server.

This is the embedded default of the one-machine stack (`velo up`, the demo, the cloudd tests).
cloudd talks to it exactly as it talks to vLLM in production: over HTTP at `base_url`.

    with LocalLLMServer() as llm:
        print(llm.base_url)  # http://127.0.0.1:PORT/v1

The server is a child process (`python -m llama_cpp.server`); its output goes to a log file whose
tail is quoted when it fails to start.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from velo.logs import get_logger
from velo.models import smollm2_gguf

log = get_logger("velo.llm")

DEFAULT_ALIAS = "smollm2"

# Loaded before any fork: the pre-exec hook below must not import or allocate much.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
_PR_SET_PDEATHSIG = 1


class LLMServerError(RuntimeError):
    """The local LLM server could not be started; the message quotes its log."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when its parent dies, so a killed test run or
    `velo up` leaves no server behind (atexit does not run on SIGTERM/SIGKILL). Linux ties this
    to the thread that started the child: call start() from a thread that outlives the server."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.strip().splitlines()[-lines:]) or "(empty log)"


class LocalLLMServer:
    """Start and stop `python -m llama_cpp.server` for a GGUF model (SmolLM2 by default)."""

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        port: int = 0,
        n_ctx: int = 2048,
        n_threads: int = 2,
        alias: str = DEFAULT_ALIAS,
        log_path: str | Path | None = None,
        startup_timeout_s: float = 120.0,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.model = Path(model) if model is not None else None
        self.port = port
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.alias = alias
        self.startup_timeout_s = startup_timeout_s
        self.extra_args = extra_args
        self._log_path = Path(log_path) if log_path is not None else None
        self._own_log = log_path is None
        self._proc: subprocess.Popen[bytes] | None = None
        self.startup_s: float | None = None  # measured by start(): spawn -> /v1/models answers

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible API root, e.g. http://127.0.0.1:8080/v1."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def log_path(self) -> Path | None:
        return self._log_path

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> LocalLLMServer:
        """Spawn the server and block until `GET /v1/models` answers."""
        if self._proc is not None:
            return self
        model = self.model or smollm2_gguf()
        if not model.is_file():
            raise LLMServerError(f"model file {model} does not exist")
        self.port = self.port or _free_port()
        if self._log_path is None:
            fd, name = tempfile.mkstemp(prefix="velo-llm-", suffix=".log")
            os.close(fd)
            self._log_path = Path(name)
        cmd = [
            sys.executable, "-m", "llama_cpp.server",
            "--model", str(model),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--n_ctx", str(self.n_ctx),
            "--n_threads", str(self.n_threads),
            "--n_threads_batch", str(self.n_threads),
            "--model_alias", self.alias,
            *self.extra_args,
        ]  # fmt: skip
        log.info("starting llm server", model=str(model), base_url=self.base_url,
                 log=str(self._log_path))
        started = time.perf_counter()
        with open(self._log_path, "wb") as out:
            # The child keeps its own copy of the file descriptor.
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if _LIBC is not None else None,
            )
        # Stop it on a normal interpreter exit too, even if nobody called stop().
        atexit.register(self.stop)
        try:
            self._wait_ready(started)
        except BaseException:
            self._terminate()
            raise
        self.startup_s = time.perf_counter() - started
        log.info("llm server ready", base_url=self.base_url, startup_s=round(self.startup_s, 2))
        return self

    def _wait_ready(self, started: float) -> None:
        assert self._proc is not None and self._log_path is not None
        deadline = started + self.startup_timeout_s
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while True:
                code = self._proc.poll()
                if code is not None:
                    raise LLMServerError(
                        f"the LLM server exited with code {code} while starting; "
                        f"last lines of {self._log_path}:\n{_tail(self._log_path)}"
                    )
                try:
                    if client.get(f"{self.base_url}/models").status_code == 200:
                        return
                except httpx.TransportError:
                    pass  # not listening yet
                if time.perf_counter() > deadline:
                    raise LLMServerError(
                        f"the LLM server did not answer {self.base_url}/models within "
                        f"{self.startup_timeout_s:.0f} s; last lines of {self._log_path}:\n"
                        f"{_tail(self._log_path)}"
                    )
                time.sleep(0.1)

    def _terminate(self, timeout_s: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        atexit.unregister(self.stop)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("llm server ignored SIGTERM; killing it", pid=proc.pid)
                proc.kill()
                proc.wait(timeout=5)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after `timeout_s`); idempotent."""
        was_running = self._proc is not None
        self._terminate(timeout_s)
        # Keep the log of a server that failed; drop our temporary one after a clean run.
        if was_running and self._own_log and self._log_path is not None:
            self._log_path.unlink(missing_ok=True)
            self._log_path = None

    def __enter__(self) -> LocalLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
