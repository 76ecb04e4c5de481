"""A real Milvus standalone server started from Python (the PyPI package `milvus`).

This is the embedded default of the one-machine stack: no container, no install, ~260 MB,
ready in ~10 s. Production edges point `vector_db.uri` at their own Milvus server instead.

Network exposure: Milvus 2.3 has no setting for the address its servers listen on: its API,
webservice (9091: /healthz, metrics, /expr) and internal gRPC ports listen on every interface, and
its embedded etcd on the fixed ports 2379/2380 (so only one could run per machine). By default
(`private_network=True`) Milvus runs in a Linux network namespace of its own (see
velo/ops/private_network.py): there "every interface" is that namespace's loopback, and the only way
in is a relay on the host's 127.0.0.1:<port>, the API port clients use. Nothing else of Milvus is
reachable from the host or the network (the internal ports take calls without credentials; the
webservice's /expr runs expressions for anyone passing etcd.rootPath), and any number of
embedded Milvus servers run side by side. A namespace needs root (CAP_SYS_ADMIN): without it the
server runs in the host's network as Milvus 2.3 does, with a warning in the log: every port on
every interface, one per machine. Firewall the host then.

Authentication is on either way (`auth=True`): the first start on a data_dir replaces the default
root password (root/Milvus) with a random one, kept in data_dir/root.token (mode 0600), and every
client passes `.token`. `<component>.ip` only sets the address a component advertises to the
others; it is set to 127.0.0.1 here so their traffic stays on loopback.

The default password works from the moment the API port listens until start() changes it, right
after /healthz first says OK (once per data_dir); start() then checks that root is still the only
user, and returns only after both.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from velo.ops import private_network
from velo.ops.ports import LOOPBACK, free_port
from velo.runtime.logs import get_logger

if TYPE_CHECKING:
    from milvus import MilvusServer, MilvusServerConfig
    from pymilvus import MilvusClient

log = get_logger("velo.milvus")

# Config sections of the components that serve gRPC and advertise `<section>.ip` to the others.
COMPONENTS = ("rootCoord", "proxy", "queryCoord", "queryNode", "indexNode", "dataCoord", "dataNode")
# A stop takes well under a second; SIGKILL only if one hangs regardless.
STOP_TIMEOUT_S = 10.0
DEFAULT_TOKEN = "root:Milvus"  # Milvus's initial root credentials
TOKEN_FILE = "root.token"
# Inside a private network namespace every port is free: Milvus's defaults.
INNER_API_PORT, INNER_WEBSERVICE_PORT = 19530, 9091
RELAY_START_TIMEOUT_S = 30.0
# A start whose server dies of a signal is tried again, after a pause: seen once in CI, a
# restart right after a stop aborted at once (SIGABRT, empty log), and every later test that
# needed that server failed. An exit with a code (a bad config, a taken port) is not retried.
START_ATTEMPTS, CRASH_PAUSE_S = 3, 2.0


class _Crashed(RuntimeError):
    """The server process died of a signal while starting."""


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
    def __init__(self, data_dir: str | Path, port: int = 0, mmap: bool = True,
                 auth: bool = True, private_network: bool = True) -> None:
        """`port`: the API port; 0 picks a free one. `.port`/`.uri` always name the port the
        server listens on: a taken `port` fails start() instead of moving elsewhere.

        `mmap`: loaded segments are memory-mapped files under data_dir/mmap instead of
        process memory (Milvus 2.3 `queryNode.mmapDirPath`): the kernel may drop their pages
        and read them back. On by default: edges search their in-process index, so Milvus's
        searches, which mmap slows (+35 %), are off the hot path, and its memory per row
        falls to almost nothing (docs/performance.md).

        `auth`: Milvus authentication (`common.security.authorizationEnabled`) with a root
        password of this data_dir's own (see the module docstring); clients pass `.token`.

        `private_network`: run Milvus in a network namespace of its own behind a loopback relay
        where the kernel allows (root); `.private` says whether it does."""
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_port()
        # Whether the server must get exactly self.port: asked for, or kept across a restart so
        # that clients holding the URI reconnect. A picked port may still move if taken meanwhile.
        self._pin_port = bool(port)
        self.mmap = mmap
        self.auth = auth
        self.private_network = private_network
        self.token = ""  # `token=` for MilvusClient / VectorDBConfig; set by start() if auth
        self._server: MilvusServer | None = None
        self._relay: subprocess.Popen[str] | None = None  # the door to the private network

    @property
    def uri(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def token_path(self) -> Path:
        return self.data_dir / TOKEN_FILE

    @property
    def pid(self) -> int | None:
        """The server process's pid while it runs (tests freeze it; operators kill it)."""
        # running implies a server: checked again only to narrow it for mypy
        return (self._server.server_proc.pid
                if self._server is not None and self.running else None)

    @property
    def relay_pid(self) -> int | None:
        """The pid of the relay into Milvus's private network namespace (None without one)."""
        return self._relay.pid if self._relay is not None else None

    @property
    def private(self) -> bool:
        """Whether Milvus runs in a network namespace of its own (reachable only via .uri)."""
        return self._relay is not None

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
        deadline = time.monotonic() + timeout_s
        try:
            for attempt in range(1, START_ATTEMPTS + 1):
                try:
                    server = self._launch(deadline)
                    break
                except _Crashed as exc:
                    self.stop()
                    if attempt == START_ATTEMPTS or time.monotonic() > deadline:
                        raise
                    log.warning("milvus died of a signal while starting; starting it again",
                                attempt=attempt, error=str(exc))
                    time.sleep(CRASH_PAUSE_S)
            if self.auth:
                self.token = self._secure(deadline)
        except BaseException:
            self.stop()
            raise
        self._pin_port = True
        log.info("milvus ready", uri=self.uri, pid=server.server_proc.pid)
        return self

    def _launch(self, deadline: float) -> MilvusServer:
        """Start the relay (if any) and the server, and wait until /healthz says OK."""
        if self.private_network:
            self._start_relay()
        self._server = server = self._new_server()
        log.info("starting milvus", data_dir=str(self.data_dir), private_network=self.private)
        if self._relay is not None:
            self._launch_inside(server, self._relay.pid)
        else:
            server.start()  # writes the config: ports are resolved now
            # A pinned port taken since the check above fails in server.start(); a picked
            # one may have moved to the next free port: report the one Milvus reads.
            self.port = server.listen_port
        self._wait_ready(server, self._left(deadline))
        return server

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
        if self._relay is not None:
            # The package probes the host's ports; the namespace's are all free.
            config.try_bind_port = lambda port: socket.socket()
            config.update(proxy_port=INNER_API_PORT)
            server.webservice_port = INNER_WEBSERVICE_PORT
        elif self._pin_port:
            # The package probes ports without SO_REUSEADDR, so a restart would move off a port
            # that only has TIME_WAIT connections left; probe as Milvus binds instead.
            config.try_bind_port = reserve_port
            config.update(proxy_port=self.port)  # a port in `configs` fails when taken
        else:
            config.try_bind_port = reserve_port
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

    def _start_relay(self) -> None:
        """Start the relay that makes a private network namespace and listens on self.port;
        leave self._relay None (and say so) where the kernel refuses a namespace."""
        for _ in range(3):
            relay = subprocess.Popen(
                [sys.executable, "-m", "velo.ops.private_network", str(self.port),
                 str(INNER_API_PORT)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert relay.stdout is not None
            line = relay.stdout.readline().strip()  # "ready", or why not, then it exits
            if line == private_network.READY:
                self._relay = relay
                return
            code = relay.wait(timeout=RELAY_START_TIMEOUT_S)
            _close_pipes(relay)
            if code == private_network.UNAVAILABLE_EXIT:
                log.warning("no private network for Milvus: it listens on every interface of "
                            "this host and only one embedded Milvus can run here (run as root "
                            "for a network namespace, or firewall the host)", reason=line)
                return
            if code != private_network.PORT_TAKEN_EXIT:
                raise RuntimeError(f"the relay to Milvus's private network failed ({code}): "
                                   f"{line or 'no output'}")
            if self._pin_port:
                raise RuntimeError(f"cannot start Milvus on port {self.port}: it is already in "
                                   "use (pass another port, or port=0 for a free one)")
            self.port = free_port()  # taken since it was picked: pick again
        raise RuntimeError("cannot find a free loopback port for Milvus")

    def _stop_relay(self) -> None:
        relay, self._relay = self._relay, None
        if relay is None:
            return
        relay.terminate()
        try:
            relay.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            relay.kill()
            relay.wait(timeout=5)
        _close_pipes(relay)

    @staticmethod
    def _launch_inside(server: MilvusServer, relay_pid: int) -> None:
        """What the package's MilvusServer.start() does, with the process started inside the
        relay's network namespace."""
        import milvus

        config = server.config
        config.resolve()  # writes configs/milvus.yaml
        base = config.base_data_dir
        milvus._initialize_data_files(base)
        executable = server.get_milvus_executable_path()
        libraries = [os.path.dirname(executable), os.environ.get("LD_LIBRARY_PATH", "")]
        env = {**os.environ, "DEPLOY_MODE": "STANDALONE",
               "METRICS_PORT": str(server.webservice_port),
               "MILVUS_RUN_DIR": os.path.join(base, "run"),
               "LD_LIBRARY_PATH": os.pathsep.join(filter(None, libraries))}
        for name in ("stdout", "stderr"):  # closed by stop(), as the package's are
            log_path = os.path.join(base, "logs", f"milvus-{name}.log")
            server.proc_fds[name] = open(log_path, "w", encoding="utf-8")  # noqa: SIM115
        namespace = os.open(private_network.namespace_path(relay_pid), os.O_RDONLY)
        try:
            server.server_proc = subprocess.Popen(
                [executable, "run", "standalone"], cwd=base, env=env,
                stdout=server.proc_fds["stdout"], stderr=server.proc_fds["stderr"],
                preexec_fn=lambda: private_network.enter(namespace))
        finally:
            os.close(namespace)

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
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if server.server_proc.poll() is not None:
                shared = "" if self.private else (
                    " Without a private network only one embedded Milvus can run per machine "
                    "(its etcd listens on the fixed ports 2379 and 2380); to share one, pass its "
                    "URI instead.")
                code = server.server_proc.returncode
                error = _Crashed if code < 0 else RuntimeError
                raise error(f"Milvus exited with {code} while starting.{shared} Log tail:\n"
                            f"{self._log_tail()}")
            if self._relay is not None and self._relay.poll() is not None:
                raise RuntimeError(f"the relay to Milvus's private network exited with "
                                   f"{self._relay.returncode}")
            if self.healthy():
                return
            time.sleep(0.2)
        raise TimeoutError(f"Milvus did not become healthy in {timeout_s} s; log tail:\n"
                           f"{self._log_tail()}")

    def healthy(self) -> bool:
        """Whether Milvus's /healthz says OK (a probe without credentials)."""
        if self._server is None:
            return False
        url = f"http://{LOOPBACK}:{self._server.webservice_port}/healthz"

        def fetch() -> bool:
            try:
                with urllib.request.urlopen(url, timeout=2) as reply:
                    return b"OK" in reply.read()
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                return False

        if self._relay is None:
            return fetch()
        return private_network.call_inside(self._relay.pid, fetch)  # the webservice is inside

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

    def _client(self, token: str, deadline: float) -> MilvusClient:
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
            self._stop_relay()
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
        self._stop_relay()

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


def _close_pipes(process: subprocess.Popen[str]) -> None:
    for pipe in (process.stdin, process.stdout):
        if pipe is not None:
            pipe.close()


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
