"""The whole VELO stack on one machine, on loopback, with the embedded defaults:

    Milvus standalone (PyPI `milvus`) + SmolLM2 served by llama.cpp (OpenAI-compatible)
    + trainerd + cloudd + N x edged, each daemon its own process, configured by environment.

Used by `velo up` and `velo demo`. Stopping sends SIGTERM to every daemon (they drain) in the
reverse order of starting.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from velo.llm_server import LocalLLMServer
from velo.logs import get_logger
from velo.milvus_server import EmbeddedMilvus, free_port

log = get_logger("velo.stack")


@dataclass
class StackConfig:
    data_dir: Path = Path("var/stack")
    edges: int = 3
    # Cycled over the edges. "lrs": the edge follows trainerd's published policies (argmax)
    # and, when any edge does, the others keep their fixed baseline (no trainer link).
    edge_policies: tuple[str, ...] = ("cache-0.5",)
    base_port: int = 0  # 0: free ports; else trainer=base, cloud=base+1, edges base+2...
    llm_threads: int = 2
    log_level: str = "info"
    milvus_uri: str = ""  # an existing Milvus server; empty: start the embedded one
    run_tag: str = ""  # appended to every edge id (and so its collection): a run starting empty


@dataclass
class Stack:
    cfg: StackConfig
    milvus: EmbeddedMilvus | None = None
    llm: LocalLLMServer | None = None
    procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list)
    addresses: dict[str, str] = field(default_factory=dict)

    def _port(self, offset: int) -> int:
        return self.cfg.base_port + offset if self.cfg.base_port else free_port()

    def start(self) -> Stack:
        cfg, data = self.cfg, self.cfg.data_dir.resolve()
        (data / "logs").mkdir(parents=True, exist_ok=True)
        try:
            if not cfg.milvus_uri:
                self.milvus = EmbeddedMilvus(data / "milvus").start()
            milvus_uri = cfg.milvus_uri or self.milvus.uri
            # llama.cpp's server computes one request at a time and, by default, lets a new
            # request interrupt the running one; concurrent requests then stall. cloudd queues
            # them instead (max_concurrency 1).
            self.llm = LocalLLMServer(n_threads=cfg.llm_threads,
                                      log_path=data / "logs" / "llm.log",
                                      extra_args=("--interrupt_requests", "False")).start()
            trainer = f"127.0.0.1:{self._port(0)}"
            cloud = f"127.0.0.1:{self._port(1)}"
            self._spawn("trainerd", "trainerd", {"LISTEN": trainer,
                                                 "DATA_DIR": str(data / "trainerd")})
            self._spawn("cloudd", "cloudd", {"LISTEN": cloud, "LLM__BASE_URL": self.llm.base_url,
                                             "LLM__MAX_CONCURRENCY": "1"})
            fixed = "lrs" in cfg.edge_policies
            for i in range(cfg.edges):
                name, policy = f"edge-{i + 1}", cfg.edge_policies[i % len(cfg.edge_policies)]
                learned = policy == "lrs"
                self._spawn(name, "edged", {
                    "EDGE_ID": name + cfg.run_tag, "LISTEN": f"127.0.0.1:{self._port(2 + i)}",
                    "CLOUD": cloud,
                    "TRAINER": trainer if learned or not fixed else "",
                    "DATA_DIR": str(data / name), "VECTOR_DB__URI": milvus_uri,
                    "POLICY__BASELINE": "cache-0.5" if learned else policy,
                    "POLICY__SAMPLE": "false" if learned else "true",
                })
            for name, _ in self.procs:
                self._wait_healthy(name)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, module: str, settings: dict[str, str]) -> None:
        prefix = f"VELO_{module.upper()}__"
        env = {**os.environ, **{prefix + k: v for k, v in settings.items()},
               prefix + "LOG_LEVEL": self.cfg.log_level}
        self.addresses[name] = settings["LISTEN"]
        out = open(self.cfg.data_dir.resolve() / "logs" / f"{name}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen([sys.executable, "-m", module], env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        out.close()
        self.procs.append((name, proc))

    def _wait_healthy(self, name: str, timeout_s: float = 120.0) -> None:
        address, proc = self.addresses[name], dict(self.procs)[name]
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}; see "
                                       f"{self.cfg.data_dir / 'logs' / (name + '.log')}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        log.info("ready", daemon=name, address=address)
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.3)
        raise RuntimeError(f"{name} did not become healthy at {address} in {timeout_s} s")

    def stop(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in reversed(self.procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                log.warning("killing daemon that did not stop", daemon=name)
                proc.kill()
        self.procs.clear()
        if self.llm is not None:
            self.llm.stop()
            self.llm = None
        if self.milvus is not None:
            self.milvus.stop()
            self.milvus = None

    @property
    def edge_addresses(self) -> list[str]:
        return [a for n, a in self.addresses.items() if n.startswith("edge-")]
