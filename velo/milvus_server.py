"""A real Milvus standalone server started from Python (the PyPI package `milvus`).

This is the embedded default of the one-machine stack: no container, no install, ~260 MB,
ready in ~10 s. Production edges point `vector_db.uri` at their own Milvus server instead.
"""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from velo.logs import get_logger

log = get_logger("velo.milvus")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EmbeddedMilvus:
    def __init__(self, data_dir: str | Path, port: int = 0, mmap: bool = False) -> None:
        """`mmap`: loaded segments are memory-mapped files under data_dir/mmap instead of
        process memory (Milvus 2.3 `queryNode.mmapDirPath`): the page cache holds the hot
        vectors and the kernel may drop cold texts (see README, Performance)."""
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_port()
        self.mmap = mmap
        self._server = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120.0) -> EmbeddedMilvus:
        try:
            from milvus import MilvusServer
        except ImportError as exc:
            raise RuntimeError("the embedded Milvus server needs the `milvus` package: "
                               "pip install 'velo[embedded]'") from exc
        self.data_dir.mkdir(parents=True, exist_ok=True)
        server = MilvusServer(wait_for_started=False)
        server.set_base_dir(str(self.data_dir))
        server.listen_port = self.port
        server.show_startup_banner = False
        if self.mmap:
            self._enable_mmap(server)
        log.info("starting milvus", uri=self.uri, data_dir=str(self.data_dir))
        server.start()
        self._server = server
        try:
            self._wait_ready(server, timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _enable_mmap(self, server) -> None:
        # The package's config template has no mmapDirPath key and its setter only replaces
        # keys it has, so the key goes into the template text that it writes out.
        mmap_dir = self.data_dir / "mmap"
        mmap_dir.mkdir(parents=True, exist_ok=True)
        config = server.config
        text = config.template_text.replace("\nqueryNode:\n",
                                            f"\nqueryNode:\n  mmapDirPath: {mmap_dir}\n", 1)
        if text == config.template_text:
            raise RuntimeError("cannot enable mmap: this `milvus` package's config template has "
                               "no queryNode section; start Milvus without mmap")
        config.template_text = text

    def _wait_ready(self, server, timeout_s: float) -> None:
        """Poll /healthz; fail fast, quoting the log, if the server process exits."""
        url = f"http://127.0.0.1:{server.webservice_port}/healthz"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if server.server_proc.poll() is not None:
                raise RuntimeError(
                    f"Milvus exited with {server.server_proc.returncode} while starting. Only one "
                    "embedded Milvus can run per machine (its etcd uses port 2381); to share one, "
                    f"pass its URI instead. Log tail:\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as reply:
                    if b"OK" in reply.read():
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"Milvus did not become healthy in {timeout_s} s; log tail:\n"
                           f"{self._log_tail()}")

    def _log_tail(self, lines: int = 8) -> str:
        path = self.data_dir / "logs" / "milvus-stdout.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Terminate and give Milvus time to persist (the package's own stop waits only 1 s)."""
        server, self._server = self._server, None
        if server is None or server.server_proc is None:
            return
        proc = server.server_proc
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        server.server_proc = None
        for fd in server.proc_fds.values():
            fd.close()
        server.proc_fds.clear()

    def __enter__(self) -> EmbeddedMilvus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
