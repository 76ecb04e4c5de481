"""The shipped systemd units and example configs are valid: the configs load through the same
validation the daemons run at start, each unit runs its daemon with its config,
`systemd-analyze verify` accepts the units, and the daemons' Type=notify readiness is true."""

import configparser
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloudd.config import load as load_cloudd
from edged.config import load as load_edged
from trainerd.config import load as load_trainerd
from velo.core.models import ROOT
from velo.runtime.config import ConfigError, load_config

SYSTEMD = ROOT / "systemd"


def filled_in(daemon: str, tmp_path: Path) -> Path:
    """The shipped example config with its /etc/velo paths made real under tmp_path: the
    certificates of a test CA, tokens files and the edge's own token, as an operator makes
    them (docs/operating.md)."""
    from tests.certs import CA
    from tests.test_security import tokens_file
    from velo.runtime.security import new_token

    etc = tmp_path / "etc" / "velo"
    ca = CA(etc / "tls", "ca")
    for name in ("edge-1", "cloudd", "trainerd"):
        issued = ca.issue(name)
        issued.cert.rename(etc / "tls" / f"{name}.pem")
        issued.key.rename(etc / "tls" / f"{name}.key")
    token = new_token()
    (etc / "edge-1.token").write_text(token + "\n")
    for name in ("edge-tokens", "cloud-tokens", "trainer-tokens"):
        tokens_file(etc / f"{name}.toml", [(token, "edge", "edge-1")])
    config = tmp_path / f"{daemon}.toml"
    config.write_text((SYSTEMD / f"{daemon}.toml").read_text().replace("/etc/velo/", f"{etc}/"))
    return config


LOADERS = [("edged", load_edged), ("cloudd", load_cloudd), ("trainerd", load_trainerd)]


@pytest.mark.parametrize("daemon, loader", LOADERS)
def test_example_config_loads_and_unit_uses_it(daemon: str, loader, tmp_path: Path) -> None:
    cfg = loader(filled_in(daemon, tmp_path))
    assert cfg.listen.startswith("0.0.0.0:")
    assert cfg.auth.tokens_file and cfg.tls.cert_file and cfg.tls.ca_file  # secure as shipped
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(SYSTEMD / f"velo-{daemon}.service")
    service = unit["Service"]
    assert service["Type"] == "notify"
    exec_start = f"/opt/velo/.venv/bin/velo-{daemon} --config /etc/velo/{daemon}.toml"
    assert service["ExecStart"] == exec_start
    assert service["Restart"] == "on-failure" and service["ProtectSystem"] == "strict"
    assert service["StateDirectory"] == f"velo/{daemon}"


@pytest.mark.parametrize("daemon, loader", LOADERS)
def test_a_daemon_beyond_loopback_without_tokens_refuses_to_start(daemon: str, loader,
                                                                   tmp_path: Path) -> None:
    """Secure by default: the example with its tokens file taken out is refused, naming the
    key and how to make tokens; `insecure = true` says in so many words that open is meant;
    on loopback no tokens are needed (the demo)."""
    config = filled_in(daemon, tmp_path)
    text = config.read_text()
    open_ = re.sub(r'(?m)^tokens_file = .*$', 'tokens_file = ""', text)
    config.write_text(open_)
    with pytest.raises(ConfigError, match=r"'listen' 0\.0\.0\.0:\d+ reaches beyond this "
                       r"machine.*velo token"):
        loader(config)
    meant = re.sub(r'(?m)^insecure = false', 'insecure = true', open_)
    assert meant != open_  # the example shows the key
    config.write_text(meant)
    assert loader(config).insecure
    config.write_text(re.sub(r'(?m)^listen = "0\.0\.0\.0:', 'listen = "127.0.0.1:', open_)
                      .replace('listen = "0.0.0.0:8080"', 'listen = "127.0.0.1:8080"'))
    assert not loader(config).auth.tokens_file


def test_env_overrides_file_and_bad_keys_are_named(tmp_path, monkeypatch) -> None:
    from edged.config import EdgeConfig

    monkeypatch.setenv("VELO_EDGED__CACHE__TOP_P", "7")
    assert load_edged(filled_in("edged", tmp_path)).cache.top_p == 7
    monkeypatch.setenv("VELO_EDGED__CACHE__TOP_P", "seven")
    with pytest.raises(ConfigError, match=r"VELO_EDGED__CACHE__TOP_P .*'cache\.top_p'.* int"):
        load_edged(None)
    monkeypatch.delenv("VELO_EDGED__CACHE__TOP_P")
    bad = tmp_path / "edged.toml"
    bad.write_text('[cache]\ntopp = 5\n')
    with pytest.raises(ConfigError,
                       match=r"unknown config key 'cache\.topp'.*did you mean 'cache\.top_p'"):
        load_config(EdgeConfig, bad, "VELO_EDGED")
    bad.write_text('[policy]\nbaseline = "lru"\n')
    with pytest.raises(ConfigError, match=r"'policy\.baseline' unknown baseline 'lru'"):
        load_edged(bad)
    # A baseline that reads what this edge cannot give it is refused, not run on zeros.
    bad.write_text('[policy]\nbaseline = "verifier-0.9"\n')
    with pytest.raises(ConfigError, match=r"'policy\.baseline' verifier-<tau> .* needs "
                       r"reuse\.verifier"):
        load_edged(bad)


def test_edged_with_a_bad_config_exits_2_naming_the_key(tmp_path, capsys) -> None:
    from edged.__main__ import main

    bad = tmp_path / "edged.toml"
    bad.write_text('edge_id = "edge-1"\n[vector_db]\nnprobe = 500\n')
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(bad)])
    assert exit_.value.code == 2
    assert "velo-edged: config key 'vector_db.nprobe'" in capsys.readouterr().err


def test_the_edge_daemon_never_imports_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, edged.server, edged.__main__; "
            "sys.exit(1 if 'torch' in sys.modules or 'transformers' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


# -- systemd-analyze verify ------------------------------------------------------------------
UNITS = sorted(SYSTEMD.glob("velo-*.service")) + sorted(SYSTEMD.glob("velo-*.target"))
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze not found (Debian package 'systemd')")
ENTRY_POINTS = Path(sys.prefix) / "bin"  # this environment's velo-edged, velo-cloudd, ...


def install_units(dest: Path) -> list[Path]:
    """The shipped units copied to `dest` as an install would leave them, except that ExecStart
    names this environment's entry points instead of /opt/velo/.venv: verify checks that the
    binary exists and is executable, so it must point at one that really does."""
    installed = []
    for unit in UNITS:
        text = unit.read_text().replace("ExecStart=/opt/velo/.venv/bin/",
                                        f"ExecStart={ENTRY_POINTS}/")
        (dest / unit.name).write_text(text)
        installed.append(dest / unit.name)
    return installed


def verify(units: list[Path]) -> tuple[int, list[str]]:
    """Exit status of `systemd-analyze verify`, and its complaints about these units. It warns
    about an unknown key or a bad value and still exits 0, so the complaints are what counts;
    lines about the host's own units (pulled in as dependencies) are not ours to judge."""
    result = subprocess.run([SYSTEMD_ANALYZE, "verify", *map(str, units)],
                            capture_output=True, text=True, timeout=120)
    names = [unit.name for unit in units]
    ours = [line for line in (result.stdout + result.stderr).splitlines()
            if any(name in line for name in names)]
    return result.returncode, ours


def test_every_daemon_has_a_unit_and_the_targets_order_them() -> None:
    assert [u.name for u in UNITS] == ["velo-cloudd.service", "velo-edged.service",
                                       "velo-trainerd.service", "velo-cloud.target",
                                       "velo-edge.target"]

    def unit(name: str) -> configparser.ConfigParser:
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        parser.read(SYSTEMD / name)
        return parser

    edged, cloudd = unit("velo-edged.service")["Unit"], unit("velo-cloudd.service")["Unit"]
    # edged needs its vector database: after Milvus (when on the box), never requiring it.
    assert "milvus.service" in edged["After"].split() and "Requires" not in edged
    assert "vllm.service" in cloudd["After"].split() and "Requires" not in cloudd
    assert unit("velo-edge.target")["Unit"]["Wants"].split() == ["velo-edged.service"]
    assert unit("velo-cloud.target")["Unit"]["Wants"].split() == ["velo-cloudd.service",
                                                                  "velo-trainerd.service"]


@needs_systemd_analyze
def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    for daemon in ("edged", "cloudd", "trainerd"):
        assert os.access(ENTRY_POINTS / f"velo-{daemon}", os.X_OK), \
            f"velo-{daemon} is not installed in {ENTRY_POINTS}: pip install -e ."
    returncode, complaints = verify(install_units(tmp_path))
    assert returncode == 0 and complaints == [], "\n".join(complaints)


@needs_systemd_analyze
@pytest.mark.parametrize("good, bad, said", [
    ("RestartSec=2", "RestartSecs=2", "Unknown key 'RestartSecs'"),
    ("Type=notify", "Type=notfy", "notfy"),
    ("NoNewPrivileges=yes", "NoNewPrivileges=maybe", "maybe"),
])
def test_systemd_analyze_verify_catches_a_typo(tmp_path: Path, good: str, bad: str,
                                               said: str) -> None:
    """The check above can fail: a typo'd key or value in a shipped unit is reported."""
    units = install_units(tmp_path)
    edged = tmp_path / "velo-edged.service"
    text = edged.read_text()
    assert f"\n{good}\n" in text
    edged.write_text(text.replace(f"\n{good}\n", f"\n{bad}\n"))
    _, complaints = verify(units)
    assert any("velo-edged.service" in line and said in line for line in complaints), complaints


# -- Type=notify readiness, with a real daemon process ---------------------------------------
@contextlib.contextmanager
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A bound unix datagram socket standing in for systemd's NOTIFY_SOCKET, and its path
    (in a short temporary directory: a unix socket path has at most 107 bytes)."""
    directory = tempfile.mkdtemp(prefix="velo-notify-")
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(path)
        yield sock, path
    finally:
        sock.close()
        shutil.rmtree(directory)


def notification(sock: socket.socket, timeout_s: float) -> str | None:
    """The next state the daemon sent, or None if none came within `timeout_s`."""
    sock.settimeout(timeout_s)
    try:
        return sock.recv(4096).decode()
    except TimeoutError:
        return None


def free_port() -> int:
    with socket.socket() as sock:  # a free port; tiny race with other processes, acceptable
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def health_now(port: int, service: str) -> int:
    """The health status the port answers at once (no waiting for it to come up)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5, wait_for_ready=False)
    return reply.status


@contextlib.contextmanager
def daemon_process(name: str, env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """`velo-<name>` started as systemd would, through its installed entry point."""
    with log.open("wb") as out:
        proc = subprocess.Popen([str(ENTRY_POINTS / f"velo-{name}")], env={**os.environ, **env},
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def stop_and_expect_stopping(proc: subprocess.Popen, sock: socket.socket, log: Path) -> None:
    """SIGTERM, as `systemctl stop` sends: STOPPING=1 first, then a clean exit."""
    proc.send_signal(signal.SIGTERM)
    assert notification(sock, 20) == "STOPPING=1", log.read_text()
    assert proc.wait(timeout=30) == 0, log.read_text()
    assert notification(sock, 0.2) is None  # nothing after STOPPING=1


def test_trainerd_says_ready_once_its_port_serves_and_stopping_on_sigterm(tmp_path: Path) -> None:
    port, log = free_port(), tmp_path / "trainerd.log"
    with notify_socket() as (sock, path), daemon_process("trainerd", {
            "NOTIFY_SOCKET": path, "VELO_TRAINERD__LISTEN": f"127.0.0.1:{port}",
            "VELO_TRAINERD__DATA_DIR": str(tmp_path / "trainerd")}, log) as proc:
        assert notification(sock, 60) == "READY=1", log.read_text()
        # Asked the moment READY=1 arrives, without waiting: the port must already serve.
        assert health_now(port, "velo.v1.TrainerService") == health_pb2.HealthCheckResponse.SERVING
        stop_and_expect_stopping(proc, sock, log)


class GatedLLM(BaseHTTPRequestHandler):
    """GET /v1/models (cloudd's startup probe of its LLM) hangs until `gate` is set, as a vLLM
    still loading its weights would; `asked` is set when the probe has arrived."""

    asked = threading.Event()
    gate = threading.Event()

    def do_GET(self) -> None:
        type(self).asked.set()
        type(self).gate.wait(timeout=60)
        body = b'{"object": "list", "data": [{"id": "fake-model"}]}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # keep pytest's output quiet
        pass


def test_cloudd_says_ready_only_after_startup_and_stopping_on_sigterm(tmp_path: Path) -> None:
    """cloudd probes its LLM before it opens its port: while the probe hangs it must neither
    say READY=1 nor answer; once the LLM answers, READY=1 comes and the port serves."""
    handler = type("Gated", (GatedLLM,), {"asked": threading.Event(), "gate": threading.Event()})
    llm = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    llm.daemon_threads = True
    threading.Thread(target=llm.serve_forever, daemon=True).start()
    port, log = free_port(), tmp_path / "cloudd.log"
    try:
        with notify_socket() as (sock, path), daemon_process("cloudd", {
                "NOTIFY_SOCKET": path, "VELO_CLOUDD__LISTEN": f"127.0.0.1:{port}",
                "VELO_CLOUDD__LLM__BASE_URL": f"http://127.0.0.1:{llm.server_port}/v1",
                "VELO_CLOUDD__LLM__MODEL": "fake-model",
                "VELO_CLOUDD__LLM__CONNECT_TIMEOUT_S": "30"}, log) as proc:
            assert handler.asked.wait(timeout=60), log.read_text()
            assert notification(sock, 1.0) is None  # still starting: not ready
            with pytest.raises(grpc.RpcError) as refused:
                health_now(port, "")
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            handler.gate.set()
            assert notification(sock, 30) == "READY=1", log.read_text()
            assert health_now(port, "velo.v1.CloudService") == \
                health_pb2.HealthCheckResponse.SERVING
            stop_and_expect_stopping(proc, sock, log)
    finally:
        handler.gate.set()
        llm.shutdown()
        llm.server_close()
