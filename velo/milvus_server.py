"""A real Milvus standalone server started from Python (the PyPI package `milvus`).

This is the embedded default of the one-machine stack: no container, no install, ~260 MB,
ready in ~10 s. Production edges point `vector_db.uri` at their own Milvus server instead.

Network exposure: Milvus 2.3 has no setting for the address its servers listen on. Its embedded
etcd listens on 127.0.0.1:2379/2380, but the API port, the webservice port (9091: /healthz,
metrics) and the internal gRPC ports of the coordinators and nodes listen on every interface,
so authentication is on by default (`auth=True`): the first start on a data_dir replaces the
default root password (root/Milvus) with a random one, kept in data_dir/root.token (mode 0600), and
every client passes `.token`. That refuses the public API (gRPC and REST on the API port) to
clients without the token. It is no barrier against someone who can reach the other ports and
knows Milvus's internals: the internal ports take calls without credentials (the proxy's
UpdateCredentialCache sets the password hash logins are checked against) and the webservice's
/expr runs expressions on the components for anyone passing etcd.rootPath ("by-dev"); see the
xfail tests in tests/test_milvus_server.py. Firewall the host where that matters.
`<component>.ip` only sets the address a component advertises to the others; it is set to
127.0.0.1 here so their traffic stays on loopback.

The default password works from the moment the API port listens until start() changes it, right
after /healthz first says OK (once per data_dir); start() then checks that root is still the only
user, and returns only after both.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from velo.logs import get_logger

if TYPE_CHECKING:
    from milvus import MilvusServer, MilvusServerConfig

log = get_logger("velo.milvus")

LOOPBACK = "127.0.0.1"
# Config sections of the components that serve gRPC and advertise `<section>.ip` to the others.
COMPONENTS = ("rootCoord", "proxy", "queryCoord", "queryNode", "indexNode", "dataCoord", "dataNode")
# A stop takes well under a second; SIGKILL only if one hangs regardless.
STOP_TIMEOUT_S = 10.0
DEFAULT_TOKEN = "root:Milvus"  # Milvus's initial root credentials
TOKEN_FILE = "root.token"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def reserve_port(port: int) -> socket.socket | None:
    """A socket listening on the loopback `port`, or None when Milvus could not listen there.

    Probes as Milvus's Go listeners bind (SO_REUSEADDR): a port whose last connections linger in
    TIME_WAIT after a stop is free for a restart; one another process listens on is not.
    """
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((LOOPBACK, port))
        sock.listen()
        return sock
    except (OSError, OverflowError):
        sock.close()
        return None


class EmbeddedMilvus:
    def __init__(self, data_dir: str | Path, port: int = 0, mmap: bool = False,
                 auth: bool = True) -> None:
        """`port`: the API port; 0 picks a free one. `.port`/`.uri` always name the port the
        server listens on: a taken `port` fails start() instead of moving elsewhere.

        `mmap`: loaded segments are memory-mapped files under data_dir/mmap instead of
        process memory (Milvus 2.3 `queryNode.mmapDirPath`): the page cache holds the hot
        vectors and the kernel may drop cold texts (see README, Performance).

        `auth`: Milvus authentication (`common.security.authorizationEnabled`) with a root
        password of this data_dir's own (see the module docstring); clients pass `.token`."""
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_port()
        # Whether the server must get exactly self.port: asked for, or kept across a restart so
        # that clients holding the URI reconnect. A picked port may still move if taken meanwhile.
        self._pin_port = bool(port)
        self.mmap = mmap
        self.auth = auth
        self.token = ""  # `token=` for MilvusClient / VectorDBConfig; set by start() if auth
        self._server: MilvusServer | None = None

    @property
    def uri(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def token_path(self) -> Path:
        return self.data_dir / TOKEN_FILE

    @property
    def pid(self) -> int | None:
        """The server process's pid while it runs (tests freeze it; operators kill it)."""
        return self._server.server_proc.pid if self.running else None

    @property
    def running(self) -> bool:
        """Whether the server process started by start() is alive (not stopped, not dead)."""
        server = self._server
        return (server is not None and server.server_proc is not None
                and server.server_proc.poll() is None)

    def start(self, timeout_s: float = 120.0) -> EmbeddedMilvus:
        if self._pin_port:
            sock = reserve_port(self.port)
            if sock is None:
                raise RuntimeError(f"cannot start Milvus on port {self.port}: it is already in use "
                                   "(pass another port, or port=0 for a free one)")
            sock.close()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        server = self._new_server()
        log.info("starting milvus", data_dir=str(self.data_dir))
        server.start()  # writes the config: ports are resolved now
        self._server = server
        # A pinned port that got taken since the check above fails in server.start(); a picked
        # one may have moved to the next free port: report the one in the config Milvus reads.
        self.port = server.listen_port
        deadline = time.monotonic() + timeout_s
        try:
            self._wait_ready(server, timeout_s)
            if self.auth:
                self.token = self._secure(deadline)
        except BaseException:
            self.stop()
            raise
        self._pin_port = True
        log.info("milvus ready", uri=self.uri, pid=server.server_proc.pid)
        return self

    def _new_server(self) -> MilvusServer:
        """The package's server, configured but not started (start() writes its config)."""
        try:
            from milvus import MilvusServer
        except ImportError as exc:
            raise RuntimeError("the embedded Milvus server needs the `milvus` package: "
                               "pip install 'velo-edge-cache[embedded]'") from exc
        server = MilvusServer(wait_for_started=False)
        server.set_base_dir(str(self.data_dir))
        server.show_startup_banner = False
        config = server.config
        # The package probes ports without SO_REUSEADDR, so a restart would move off a port that
        # only has TIME_WAIT connections left; probe as Milvus binds instead.
        config.try_bind_port = reserve_port
        if self._pin_port:
            config.update(proxy_port=self.port)  # a port in `configs` fails when taken
        else:
            server.listen_port = self.port  # the first port the package tries, then upwards
        for section in COMPONENTS:
            # Advertise loopback instead of the host's first unicast address (this does not
            # change where Milvus 2.3 listens, see the module docstring).
            config.set(f"{section}.ip", LOOPBACK)
        # On SIGTERM Milvus 2.3 stops its coordinators, then the query node, which waits for the
        # query coordinator to move its loaded segments elsewhere for common.gracefulStopTimeout
        # (1800 s): a handoff that never comes in a standalone server, so every stop ran into
        # SIGKILL. Loaded segments are only a copy of persisted data: do not wait.
        self._add_key(config, "queryNode", "gracefulStopTimeout: 0")
        # A key of the package's template (common.security.authorizationEnabled).
        config.set("authorization_enabled", self.auth)
        if self.mmap:
            self._enable_mmap(server)
        return server

    @staticmethod
    def _add_key(config: MilvusServerConfig, section: str, line: str) -> None:
        """Put `line` first under the top-level `section`: the package's setter only replaces
        keys its config template has, so new keys go into the template text it writes out."""
        text = config.template_text.replace(f"\n{section}:\n", f"\n{section}:\n  {line}\n", 1)
        if text == config.template_text:
            raise RuntimeError(f"cannot set {section}.{line}: this `milvus` package's config "
                               f"template has no {section} section")
        config.template_text = text

    def _enable_mmap(self, server: MilvusServer) -> None:
        mmap_dir = self.data_dir / "mmap"
        mmap_dir.mkdir(parents=True, exist_ok=True)
        self._add_key(server.config, "queryNode", f"mmapDirPath: {mmap_dir}")

    def _wait_ready(self, server: MilvusServer, timeout_s: float) -> None:
        """Poll /healthz; fail fast, quoting the log, if the server process exits."""
        url = f"http://{LOOPBACK}:{server.webservice_port}/healthz"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if server.server_proc.poll() is not None:
                raise RuntimeError(
                    f"Milvus exited with {server.server_proc.returncode} while starting. Only one "
                    "embedded Milvus can run per machine (its etcd listens on the fixed ports "
                    "2379 and 2380); to share one, pass its URI instead. Log tail:\n"
                    f"{self._log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as reply:
                    if b"OK" in reply.read():
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"Milvus did not become healthy in {timeout_s} s; log tail:\n"
                           f"{self._log_tail()}")

    def _secure(self, deadline: float) -> str:
        """The root token of this data_dir: read from data_dir/root.token and checked, or, the
        first time, a new random password that replaces the default one before start() returns.

        The new token goes to root.token.new before the password changes and becomes root.token
        once it has: a crash in between leaves a file that names the password either way."""
        path, pending = self.token_path, self.token_path.with_name(TOKEN_FILE + ".new")
        if path.exists():
            token = path.read_text().strip()
            if not self._token_works(token, deadline):
                raise RuntimeError(
                    f"Milvus refuses the root password in {path}: it is not the password of the "
                    f"Milvus data in {self.data_dir} (restore the root.token that belongs to it, "
                    "or start on an empty data_dir)")
            return token
        if pending.exists():
            token = pending.read_text().strip()
            if self._token_works(token, deadline):  # the password changed, then a crash
                os.replace(pending, path)
                return token
        else:
            token = f"root:{secrets.token_urlsafe(24)}"
            _write_private(pending, token)
        self._change_default_password(token, deadline)
        os.replace(pending, path)
        _fsync_dir(path.parent)
        log.info("milvus root password set", token_file=str(path))
        return token

    def _change_default_password(self, token: str, deadline: float) -> None:
        try:
            client = self._client(DEFAULT_TOKEN, deadline)
        except Exception as exc:
            if not _refused(exc):
                raise
            raise RuntimeError(
                f"Milvus in {self.data_dir} has a root password of its own but "
                f"{self.token_path} is missing: restore that file, or start on an empty "
                "data_dir") from exc
        try:
            client.update_password("root", DEFAULT_TOKEN.split(":", 1)[1],
                                   token.split(":", 1)[1], timeout=self._left(deadline))
        finally:
            client.close()
        # Anyone who reached the API port before the change (it listens on every interface)
        # could have used the default password; a user made meanwhile would stay valid.
        client = self._client(token, deadline)
        try:
            users = client.list_users(timeout=self._left(deadline))
        finally:
            client.close()
        if users != ["root"]:
            raise RuntimeError(f"Milvus in {self.data_dir} has users besides root ({users}), made "
                               "while its password was the default one: do not use this data_dir")

    def _client(self, token: str, deadline: float):  # -> pymilvus.MilvusClient
        from pymilvus import MilvusClient

        # dedicated: not the connection pymilvus shares among the clients of one uri and token.
        return MilvusClient(uri=self.uri, token=token, timeout=self._left(deadline),
                            dedicated=True)

    def _token_works(self, token: str, deadline: float) -> bool:
        """Whether Milvus accepts `token` (False when it refuses it; other failures raise)."""
        try:
            client = self._client(token, deadline)
        except Exception as exc:
            if _refused(exc):
                return False
            raise
        client.close()
        return True

    @staticmethod
    def _left(deadline: float) -> float:
        return max(deadline - time.monotonic(), 1.0)

    def _log_tail(self, lines: int = 8) -> str:
        path = self.data_dir / "logs" / "milvus-stdout.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM, which Milvus handles by stopping its components in order; SIGKILL only if
        that hangs. Flushed data is in segment files and the rest in its on-disk WAL (rocksmq),
        replayed at the next start. (The package's own stop waits only 1 s.)"""
        server, self._server = self._server, None
        if server is None or server.server_proc is None:
            return
        proc = server.server_proc
        started = time.monotonic()
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning("milvus did not stop in time; killing it", timeout_s=STOP_TIMEOUT_S)
            proc.kill()
            proc.wait(timeout=5)
        # Milvus 2.3.5 exits with SIGABRT (-6) after a clean stop: closing its etcd client panics
        # once all components have stopped. The log says "All cleanup done" before that.
        log.info("milvus stopped", returncode=proc.returncode,
                 seconds=round(time.monotonic() - started, 2))
        server.server_proc = None
        for fd in server.proc_fds.values():
            fd.close()
        server.proc_fds.clear()

    def __enter__(self) -> EmbeddedMilvus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _refused(exc: BaseException | None) -> bool:
    """Whether Milvus refused the credentials: pymilvus reports that as a failure to connect
    ("illegal connection params or server unavailable") caused by an UNAUTHENTICATED gRPC error.
    """
    import grpc

    for _ in range(8):  # the chain of causes, not a cycle
        if exc is None:
            break
        code = getattr(exc, "code", None)
        if isinstance(exc, grpc.RpcError) and callable(code) and code() in (
                grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, atomically (a temporary file renamed over it)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)  # a leftover would keep its mode
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
