"""A real local LLM: SmolLM2-135M-Instruct served by llama.cpp's OpenAI-compatible server.

This is the embedded default of the one-machine stack (`velo up`, the demo, the cloudd tests).
cloudd talks to it exactly as it talks to vLLM in production: over HTTP at `base_url`; with
`[local_llm] enabled`, cloudd also runs it and restarts it when it dies (`LLMSupervisor`).

    with LocalLLMServer() as llm:
        print(llm.base_url)  # http://127.0.0.1:PORT/v1

The server is a child process (`python -m cloudd.llm_server ...`, which runs llama-cpp-python's
server, see `_serve`); its output goes to a log file whose tail is quoted when it fails. It is
ready only once it has generated one token: a server that answers GET /v1/models can still
crash in its first decode (llama-cpp-python 0.3.36 built on an AVX-512/AMX CPU did).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from velo.core.models import smollm2_gguf
from velo.runtime.lifeline import child_env, follow_parent
from velo.runtime.logs import get_logger

log = get_logger("velo.llm")

DEFAULT_ALIAS = "smollm2"

class LLMServerError(RuntimeError):
    """The local LLM server could not be started; the message quotes its log."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]  # (host, port): typeshed says Any
        return port


def tail(path: Path | None, lines: int = 20) -> str:
    """The last `lines` lines of a log file, for error messages."""
    if path is None:
        return "(no log)"
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.strip().splitlines()[-lines:]) or "(empty log)"


def describe_exit(code: int) -> str:
    """'exited with code 1' or 'was killed by SIGSEGV (exit code -11)'."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name} (exit code {code})"
        except ValueError:
            pass
    return f"exited with code {code}"


class LocalLLMServer:
    """Start and stop the llama.cpp server for a GGUF model (SmolLM2 by default)."""

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
        launcher: tuple[str, ...] = (sys.executable, "-m", "cloudd.llm_server"),
    ) -> None:
        """`launcher`: the command that runs the server, before its llama.cpp arguments."""
        self.model = Path(model) if model is not None else None
        self.port = port or _free_port()  # chosen once: a restarted server keeps its address
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.alias = alias
        self.startup_timeout_s = startup_timeout_s
        self.extra_args = extra_args
        self.launcher = launcher
        self._log_path = Path(log_path) if log_path is not None else None
        self._own_log = log_path is None
        self._proc: subprocess.Popen[bytes] | None = None
        self.startup_s: float | None = None  # measured by start(): spawn -> first token

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

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> LocalLLMServer:
        """Spawn the server and block until it has generated one token."""
        if self._proc is not None:
            return self
        model = self.model or smollm2_gguf()
        if not model.is_file():
            raise LLMServerError(f"model file {model} does not exist")
        if self._log_path is None:
            fd, name = tempfile.mkstemp(prefix="velo-llm-", suffix=".log")
            os.close(fd)
            self._log_path = Path(name)
        cmd = [
            *self.launcher,
            "--model", str(model),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--n_ctx", str(self.n_ctx),
            "--n_threads", str(self.n_threads),
            "--n_threads_batch", str(self.n_threads),
            "--model_alias", self.alias,
            # llama.cpp's server computes one request at a time and, by default, lets a new
            # request interrupt the running one; concurrent requests then stall. cloudd
            # queues them instead.
            "--interrupt_requests", "False",
            *self.extra_args,
        ]  # fmt: skip
        log.info("starting llm server", model=str(model), base_url=self.base_url,
                 log=str(self._log_path))
        started = time.perf_counter()
        # Appended: a restarted server's log follows the one that died.
        with open(self._log_path, "ab") as out:
            # The child keeps its own copy of the file descriptor.
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=child_env(dict(os.environ)),  # it dies with us (velo.runtime.lifeline)
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
        """Wait for GET /models, then generate one token: the first decode is where a broken
        build crashes, and nobody should be told the LLM is ready before it has decoded."""
        assert self._proc is not None
        deadline = started + self.startup_timeout_s
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            while not self._answers(client, "GET", "/models"):
                self._check_alive_until(deadline)
                time.sleep(0.1)
            body = {"model": self.alias, "max_tokens": 1, "temperature": 0.0,
                    "messages": [{"role": "user", "content": "Hi"}]}
            while not self._answers(client, "POST", "/chat/completions", body):
                self._check_alive_until(deadline)
                time.sleep(0.2)

    def _answers(self, client: httpx.Client, method: str, path: str,
                 body: dict[str, Any] | None = None) -> bool:
        try:
            return client.request(method, self.base_url + path, json=body,
                                  timeout=self.startup_timeout_s).status_code == 200
        except httpx.HTTPError:
            return False  # not listening yet, or died mid-request (checked next)

    def _check_alive_until(self, deadline: float) -> None:
        assert self._proc is not None
        code = self._proc.poll()
        if code is not None:
            raise LLMServerError(
                f"the LLM server {describe_exit(code)} while starting; "
                f"last lines of {self._log_path}:\n{tail(self._log_path)}"
            )
        if time.perf_counter() > deadline:
            raise LLMServerError(
                f"the LLM server did not generate a first token at {self.base_url} within "
                f"{self.startup_timeout_s:.0f} s; last lines of {self._log_path}:\n"
                f"{tail(self._log_path)}"
            )

    def wait(self) -> int:
        """Block until the server exits; returns its exit code."""
        assert self._proc is not None, "not started"
        return self._proc.wait()

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


class LLMSupervisor:
    """Keep a LocalLLMServer running: start it, and when it dies, say how (exit code and the
    last lines of its log) and start it again after a back-off that doubles up to
    `max_backoff_s` (reset once a server has stayed up for a minute).

    It runs in its own thread, which owns the child for its whole life (velo.runtime.lifeline: the
    parent-death signal is tied to the thread that forked). `on_state(up, reason)` is called
    from that thread on every change.
    """

    def __init__(self, server: LocalLLMServer, on_state: Callable[[bool, str], None], *,
                 max_backoff_s: float = 30.0) -> None:
        self.server, self.on_state, self.max_backoff_s = server, on_state, max_backoff_s
        self.restarts = 0
        self._stopping = threading.Event()
        self._restart_reason = ""  # why restart() ended the running server
        self._thread = threading.Thread(target=self._run, name="llm-supervisor", daemon=True)

    def start(self) -> LLMSupervisor:
        self._thread.start()
        return self

    def _run(self) -> None:
        backoff = 1.0
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                self.server.start()
            except LLMServerError as exc:
                reason = str(exc)
            else:
                self.on_state(True, "")
                code = self.server.wait()
                if self._stopping.is_set():
                    return
                reason = (f"the LLM server (pid {self.server.pid}) {describe_exit(code)}; "
                          f"last lines of {self.server.log_path}:\n{tail(self.server.log_path)}")
                if self._restart_reason:
                    reason, self._restart_reason = (f"the LLM server was restarted: "
                                                    f"{self._restart_reason}"), ""
                self.server.stop()
            if self._stopping.is_set():
                return
            if time.monotonic() - started > 60:
                backoff = 1.0
            self.restarts += 1
            self.on_state(False, f"{reason}\nrestarting it in {backoff:g} s "
                                 f"(restart {self.restarts})")
            self._stopping.wait(backoff)
            backoff = min(backoff * 2, self.max_backoff_s)

    def restart(self, reason: str) -> None:
        """End a server that runs but no longer answers (SIGKILL: a hung one may not heed
        SIGTERM); the supervising thread starts a new one as after a crash. Thread-safe."""
        pid = self.server.pid
        if pid is None or self._stopping.is_set():
            return
        log.warning("restarting the llm server", pid=pid, reason=reason)
        self._restart_reason = reason
        with contextlib.suppress(ProcessLookupError):  # it ended meanwhile: restarted anyway
            os.kill(pid, signal.SIGKILL)

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop supervising and terminate the server."""
        self._stopping.set()
        self.server.stop()
        self._thread.join(timeout_s)


def _serve(argv: list[str]) -> None:
    """The child: llama-cpp-python's OpenAI-compatible server, with llama.cpp's extra weight
    buffer types off.

    Why: llama-cpp-python 0.3.36 built on a CPU with AVX-512 and AMX (the build picks both up
    natively) segfaults in its first decode while those buffer types (weight repacking, AMX)
    are on; with them off it answers. Its server has no option for this, so the model default
    params are patched here before the model loads. They only change how weights are laid out
    in memory; for a 135M model the speed difference is small.
    """
    follow_parent()
    import llama_cpp.llama_cpp as native
    from llama_cpp.server.__main__ import main

    defaults = native.llama_model_default_params

    def without_extra_buffer_types() -> native.llama_model_params:
        params: native.llama_model_params = defaults()  # llama_cpp's ctypes wrapper: Any
        params.use_extra_bufts = False
        return params

    native.llama_model_default_params = without_extra_buffer_types
    sys.argv = ["llama_cpp.server", *argv]
    main()


if __name__ == "__main__":
    _serve(sys.argv[1:])
