"""The whole VELO stack on one machine, on loopback, with the embedded defaults:

    Milvus standalone (PyPI `milvus`) + trainerd + cloudd (which runs SmolLM2 with llama.cpp
    as its supervised local LLM) + N x edged, each daemon its own process, configured by
    environment.

Used by `velo up`, `velo demo` and the chaos suite. The stack supervises its daemons: one that
dies is logged (exit code, last lines of its log) and started again after a back-off, while the
others keep running; start and supervise it from one thread that lives as long as the stack
(the main thread), because the daemons die with the thread that started them. Stopping sends
SIGTERM (the daemons drain) edges first, then cloudd and trainerd, then Milvus.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloudd.llm_server import describe_exit, tail
from velo.ops.diagnose import cloud_health, daemon_health, edge_health
from velo.ops.milvus_server import EmbeddedMilvus
from velo.ops.ports import free_port
from velo.runtime.lifeline import child_env
from velo.runtime.logs import get_logger
from velo.v1 import (
    cloud_pb2,
    cloud_pb2_grpc,
    edge_pb2,
    edge_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)

log = get_logger("velo.stack")
MAX_RESTART_BACKOFF_S = 30.0
# With a base port, each daemon's /metrics is on its gRPC port + this (trainerd 50150, cloudd
# 50151, edges 50152...): one number to remember, and no clash with the gRPC ports for up to
# METRICS_PORT_OFFSET - 2 edges.
METRICS_PORT_OFFSET = 100


POLICY_FILE = Path(__file__).parent / "policies" / "lrs-load.onnx"


@dataclass
class StackConfig:
    data_dir: Path = Path("var/stack")
    edges: int = 3
    # Cycled over the edges. "lrs": the edge follows trainerd's published policies (argmax)
    # and, when any edge does, the others keep their fixed baseline (no trainer link).
    edge_policies: tuple[str, ...] = ("cache-0.5",)
    # 0: free ports; else trainer=base, cloud=base+1, edges base+2..., and each daemon's
    # Prometheus /metrics on its port + METRICS_PORT_OFFSET.
    base_port: int = 0
    # The edges' OpenAI-compatible HTTP fronts: edge-1 on this port, edge-2 on the next...
    # (0: none).
    http_port: int = 0
    llm_threads: int = 2
    log_level: str = "info"
    milvus_uri: str = ""  # an existing Milvus server; empty: start the embedded one
    milvus_token: str = ""  # its token ("user:password"), when it has authentication on
    run_tag: str = ""  # appended to every edge id (and so its collection): a run starting empty
    restart: bool = True  # start a daemon that died again (supervise())
    # More settings for every edge, as VELO_EDGED__ keys by their suffix (e.g. a reuse guard:
    # {"REUSE__VERIFIER": "docs/reuse/verifier.onnx"}).
    edge_settings: dict[str, str] = field(default_factory=dict)
    # Published through trainerd at start when an edge's policy is "lrs" (none: such edges run
    # cache-0.5 until something is published). The shipped one: LRS on the load-aware state,
    # trained on the loaded simulator in nearest-edge mode (`lab.under_load.live_burst`,
    # mode="nearest"): it reuses at c^s >= 0.75 whatever the load.
    policy_file: Path | None = POLICY_FILE

    def __post_init__(self) -> None:
        if self.base_port and self.edges > METRICS_PORT_OFFSET - 2:
            raise ValueError(f"at most {METRICS_PORT_OFFSET - 2} edges with a base port (their "
                             "gRPC ports would reach the metrics ports); use base port 0")


@dataclass
class Daemon:
    """One daemon process of the stack and how to start it again."""

    name: str
    module: str
    env: dict[str, str]
    address: str
    log_path: Path
    metrics_port: int = 0  # where it serves Prometheus /metrics on loopback (0: nowhere)
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started: float = 0.0  # monotonic time of the last spawn
    next_start: float = 0.0  # monotonic time of the next restart after a death
    backoff_s: float = 1.0

    @classmethod
    def configured(cls, name: str, module: str, listen: str, settings: dict[str, str],
                   log_path: Path, log_level: str = "info", metrics_port: int = 0) -> Daemon:
        """`module` (edged, cloudd, trainerd) listening on `listen`, with `settings` as its
        VELO_<MODULE>__ environment keys (by their suffix, e.g. "VECTOR_DB__URI"), and serving
        /metrics on 127.0.0.1:`metrics_port` when that is not 0."""
        prefix = f"VELO_{module.upper()}__"
        metrics = {prefix + "METRICS_LISTEN": f"127.0.0.1:{metrics_port}"} if metrics_port else {}
        env = {**os.environ, **{prefix + k: v for k, v in settings.items()},
               prefix + "LISTEN": listen, prefix + "LOG_LEVEL": log_level, **metrics}
        return cls(name, module, env, listen, log_path, metrics_port)

    def spawn(self) -> None:
        with open(self.log_path, "ab") as out:
            # A stack killed outright takes its daemons with it (they get SIGTERM and drain).
            self.proc = subprocess.Popen([sys.executable, "-m", self.module],
                                         env=child_env(self.env), stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.started = time.monotonic()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_serving(self, timeout_s: float,
                     check: Callable[[grpc.Channel], None] | None = None) -> bool:
        """Wait until its health says SERVING (True) or `timeout_s` passes (False); fail fast,
        quoting its log, if it exits. `check` looks at each answer that is not SERVING yet,
        and may raise to give up early."""
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if not self.running:
                    code = self.proc.returncode if self.proc else None
                    assert code is not None  # spawned before it is waited for, and exited
                    raise RuntimeError(f"{self.name} {describe_exit(code)} while starting; "
                                       f"last lines of {self.log_path}:\n{tail(self.log_path)}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return True
                    if check is not None:
                        check(channel)
                except grpc.RpcError:
                    pass
                time.sleep(0.3)
        return False

    def terminate(self) -> None:
        """SIGTERM: it drains and exits (wait_stopped waits for that)."""
        if self.running:
            assert self.proc is not None  # running: it has a process
            self.proc.send_signal(signal.SIGTERM)

    def wait_stopped(self, timeout_s: float) -> None:
        """Wait for it to exit; SIGKILL it once `timeout_s` has passed."""
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout=max(0.1, timeout_s))
        except subprocess.TimeoutExpired:
            log.warning("killing daemon that did not stop", daemon=self.name)
            self.proc.kill()
            self.proc.wait()


@dataclass
class Stack:
    cfg: StackConfig
    milvus: EmbeddedMilvus | None = None
    daemons: dict[str, Daemon] = field(default_factory=dict)
    stopping: bool = False

    def _port(self, offset: int) -> int:
        return self.cfg.base_port + offset if self.cfg.base_port else free_port()

    def _metrics_port(self, offset: int) -> int:
        return self._port(METRICS_PORT_OFFSET + offset)

    @property
    def logs(self) -> Path:
        return self.cfg.data_dir.resolve() / "logs"

    @property
    def addresses(self) -> dict[str, str]:
        return {name: d.address for name, d in self.daemons.items()}

    @property
    def http_urls(self) -> dict[str, str]:
        """The edges' OpenAI-compatible base URLs (empty without http_port)."""
        if not self.cfg.http_port:
            return {}
        return {f"edge-{i + 1}": f"http://127.0.0.1:{self.cfg.http_port + i}/v1"
                for i in range(self.cfg.edges)}

    @property
    def metrics_urls(self) -> dict[str, str]:
        """Each daemon's Prometheus /metrics."""
        return {name: f"http://127.0.0.1:{d.metrics_port}/metrics"
                for name, d in self.daemons.items() if d.metrics_port}

    @property
    def edge_addresses(self) -> list[str]:
        return [d.address for name, d in self.daemons.items() if name.startswith("edge-")]

    @property
    def milvus_uri(self) -> str:
        return self.cfg.milvus_uri or (self.milvus.uri if self.milvus else "")

    @property
    def milvus_token(self) -> str:
        return self.cfg.milvus_token or (self.milvus.token if self.milvus else "")

    def start(self) -> Stack:
        cfg = self.cfg
        self.logs.mkdir(parents=True, exist_ok=True)
        try:
            if not cfg.milvus_uri:
                self.milvus = EmbeddedMilvus(cfg.data_dir.resolve() / "milvus").start()
            self.configure()
            for daemon in self.daemons.values():
                daemon.spawn()
            for name in self.daemons:
                self.wait_healthy(name)
            if "lrs" in cfg.edge_policies and cfg.policy_file is not None \
                    and cfg.policy_file.is_file():
                self.publish(cfg.policy_file.stem, cfg.policy_file.read_bytes())
        except BaseException:
            self.stop()
            raise
        return self

    def configure(self) -> None:
        """Decide each daemon's ports and settings (start() then spawns them): trainerd,
        cloudd, then the edges, on the stack's Milvus."""
        cfg, data = self.cfg, self.cfg.data_dir.resolve()
        trainer = f"127.0.0.1:{self._port(0)}"
        cloud = f"127.0.0.1:{self._port(1)}"
        self._add("trainerd", "trainerd", trainer, {"DATA_DIR": str(data / "trainerd")},
                  self._metrics_port(0))
        self._add("cloudd", "cloudd", cloud, {
            "LOCAL_LLM__ENABLED": "true", "LOCAL_LLM__THREADS": str(cfg.llm_threads),
            "LOCAL_LLM__LOG_FILE": str(self.logs / "llm.log"),
            # llama.cpp's server computes one request at a time: cloudd queues the rest.
            "LLM__MAX_CONCURRENCY": "1", "LLM__MODEL": "smollm2"}, self._metrics_port(1))
        fixed = "lrs" in cfg.edge_policies
        for i in range(cfg.edges):
            name, policy = f"edge-{i + 1}", cfg.edge_policies[i % len(cfg.edge_policies)]
            learned = policy == "lrs"
            http = {"HTTP__LISTEN": f"127.0.0.1:{cfg.http_port + i}"} if cfg.http_port else {}
            self._add(name, "edged", f"127.0.0.1:{self._port(2 + i)}", {
                **self._edge_settings(name), **http, "CLOUD": cloud,
                "TRAINER": trainer if learned or not fixed else "",
                "POLICY__BASELINE": "cache-0.5" if learned else policy,
                "POLICY__SAMPLE": "false" if learned else "true",
            }, self._metrics_port(2 + i))

    def publish(self, name: str, onnx: bytes, timeout_s: float = 60.0) -> int:
        """Publish a policy through trainerd and wait until every edge that follows trainerd
        (policy "lrs") runs it; its version."""
        with grpc.insecure_channel(self.addresses["trainerd"]) as channel:
            info = trainer_pb2_grpc.TrainerServiceStub(
                channel).PublishPolicy(trainer_pb2.PublishPolicyRequest(name=name, onnx=onnx),
                                       timeout=30)
        followers = [a for i, a in enumerate(self.edge_addresses)
                     if self.cfg.edge_policies[i % len(self.cfg.edge_policies)] == "lrs"]
        deadline = time.monotonic() + timeout_s
        for address in followers:
            with grpc.insecure_channel(address) as channel:
                stub = edge_pb2_grpc.EdgeServiceStub(channel)
                while stub.GetStats(edge_pb2.GetStatsRequest(),
                                    timeout=5).policy_version != info.version:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"edge {address} did not load policy "
                                           f"v{info.version} in {timeout_s:.0f} s")
                    time.sleep(0.3)
        return cast(int, info.version)  # a protobuf message's field: Any to mypy

    def _edge_settings(self, name: str) -> dict[str, str]:
        return {"EDGE_ID": name + self.cfg.run_tag,
                "DATA_DIR": str(self.cfg.data_dir.resolve() / name),
                "VECTOR_DB__URI": self.milvus_uri, "VECTOR_DB__TOKEN": self.milvus_token,
                **self.cfg.edge_settings}

    def add_edge(self, name: str, **settings: str) -> Daemon:
        """Start one more edge on this stack's Milvus (no cloud or trainer unless given as
        CLOUD=/TRAINER=; any VELO_EDGED__ key by its suffix) and wait until it serves."""
        self._add(name, "edged", f"127.0.0.1:{free_port()}",
                  {**self._edge_settings(name), "CLOUD": "", "TRAINER": "", **settings},
                  free_port())
        self.daemons[name].spawn()
        self.wait_healthy(name)
        return self.daemons[name]

    def _add(self, name: str, module: str, listen: str, settings: dict[str, str],
             metrics_port: int) -> None:
        self.daemons[name] = Daemon.configured(name, module, listen, settings,
                                               self.logs / f"{name}.log", self.cfg.log_level,
                                               metrics_port)

    def wait_healthy(self, name: str, timeout_s: float = 180.0) -> None:
        """Wait until `name` says SERVING; fail fast, quoting its log, if it exits."""
        daemon = self.daemons[name]
        if daemon.wait_serving(timeout_s, self._fail_if_llm_cannot_start
                               if daemon.module == "cloudd" else None):
            log.info("ready", daemon=name, address=daemon.address)
            return
        raise RuntimeError(f"{name} did not become healthy at {daemon.address} in "
                           f"{timeout_s:.0f} s: {self.diagnose().get(name, '')} (see "
                           f"{daemon.log_path})")

    @staticmethod
    def _fail_if_llm_cannot_start(channel: grpc.Channel) -> None:
        """cloudd restarts a local LLM server that fails to start for ever (it may be a
        passing problem in production); the stack gives up on the second failure and says
        why, rather than waiting out its timeout."""
        stats = cloud_pb2_grpc.CloudServiceStub(channel).GetCloudStats(
            cloud_pb2.CloudStatsRequest(), timeout=1)
        if stats.llm_restarts >= 2:
            raise RuntimeError(f"cloudd's LLM server failed to start {stats.llm_restarts} "
                               f"times: {stats.llm_down_reason}")

    def supervise(self) -> list[str]:
        """Restart what died (after its back-off); returns the names started again. Call it
        every second or so while the stack runs (`velo up` does)."""
        started: list[str] = []
        if self.stopping or not self.cfg.restart:
            return started
        now = time.monotonic()
        for daemon in self.daemons.values():
            if daemon.running or daemon.proc is None:
                continue
            if not daemon.next_start:  # just found dead: report, then wait the back-off
                if now - daemon.started > 60:
                    daemon.backoff_s = 1.0
                daemon.next_start = now + daemon.backoff_s
                log.error("daemon died; restarting it", daemon=daemon.name,
                          how=describe_exit(daemon.proc.returncode),
                          restart_in_s=daemon.backoff_s, log=str(daemon.log_path),
                          last_lines=tail(daemon.log_path, 8))
            elif now >= daemon.next_start:
                daemon.restarts += 1
                daemon.next_start = 0.0
                daemon.backoff_s = min(daemon.backoff_s * 2, MAX_RESTART_BACKOFF_S)
                daemon.spawn()
                log.warning("daemon restarted", daemon=daemon.name, restarts=daemon.restarts)
                started.append(daemon.name)
        if self.milvus is not None and not self.milvus.running:
            log.error("embedded Milvus died; restarting it", log=str(self.milvus.data_dir))
            self.milvus.stop()
            self.milvus.start()
            started.append("milvus")
        return started

    def diagnose(self) -> dict[str, str]:
        """Each daemon's health in words: 'serving', 'down: ...' with the parts that are down
        and why (for the demo, when requests fail)."""
        report = {}
        for name, daemon in self.daemons.items():
            if not daemon.running:
                code = daemon.proc.returncode if daemon.proc else None
                report[name] = f"not running ({describe_exit(code) if code is not None else '?'})"
            elif daemon.module == "edged":
                report[name] = edge_health(daemon.address)
            elif daemon.module == "cloudd":
                report[name] = cloud_health(daemon.address)
            else:
                report[name] = daemon_health(daemon.address)
        if self.milvus is not None and not self.milvus.running:
            report["milvus"] = "not running"
        return report

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM edges first (they drain and flush to Milvus and trainerd), then cloudd and
        trainerd, then Milvus; SIGKILL what does not stop within `timeout_s`."""
        self.stopping = True
        edges = [d for n, d in self.daemons.items() if n.startswith("edge-")]
        others = [d for n, d in self.daemons.items() if not n.startswith("edge-")]
        for group in (edges, others):
            for daemon in group:
                daemon.terminate()
            deadline = time.monotonic() + timeout_s
            for daemon in group:
                daemon.wait_stopped(deadline - time.monotonic())
        if self.milvus is not None:
            self.milvus.stop()
            self.milvus = None

