"""trainerd configuration (TOML file + VELO_TRAINERD__KEY environment overrides)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from trainerd.learner import LearnerConfig
from velo.runtime.config import load_config, require
from velo.runtime.fleet import MqttConfig
from velo.runtime.security import AuthConfig, TLSConfig, require_auth_beyond_loopback

ENV_PREFIX = "VELO_TRAINERD"
MiB = 1024 * 1024
_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclass
class TrainerConfig:
    listen: str = "127.0.0.1:50070"  # gRPC address edges and tools connect to (port 0: any)
    metrics_listen: str = ""  # Prometheus /metrics, e.g. "127.0.0.1:9170"; empty: off
    data_dir: str = "var/trainerd"  # experience.db and policies/ live here
    shutdown_grace_s: float = 5.0  # how long in-flight RPCs may finish on SIGTERM
    log_level: str = "info"  # debug, info, warning, error or critical (JSON lines on stderr)
    # Largest ONNX policy accepted by PublishPolicy; the gRPC message limit follows it. No more
    # than the edges' [policy] max_bytes (8 MiB by default): a "latest" that every edge refuses
    # would leave the fleet on its old policy. A default LRS is ~110 KB.
    max_policy_bytes: int = 8 * MiB
    # The edges' P (cache.top_p) and embedding width H: every published policy is loaded and
    # run on states of this shape exactly as an edge will, and refused if an edge could not.
    edge_top_p: int = 5
    edge_embed_dim: int = 384  # see edge_top_p
    # Experience records are committed to SQLite in transactions of at most this many, so a
    # long upload stream neither holds all its records in memory nor one huge transaction.
    max_batch_records: int = 10_000
    # Algorithm 1 on the experience streams (off by default: it needs the trainer extra, torch).
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)  # see velo.runtime.security
    # Tokens of edges (role "edge", name = the edge id it reports as) and of publishers.
    auth: AuthConfig = field(default_factory=AuthConfig)
    # Announce each accepted policy to edges over MQTT (see velo.runtime.fleet); off by default.
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    # Listening beyond loopback needs auth.tokens_file, unless this says an open trainerd (that
    # anyone reaching it may publish policies to every edge) is wanted.
    insecure: bool = False

    def __post_init__(self) -> None:
        require(":" in self.listen, "listen", "must be HOST:PORT, e.g. 127.0.0.1:50070")
        require_auth_beyond_loopback({"listen": self.listen}, self.auth.tokens_file,
                                     self.insecure)
        require(bool(self.data_dir.strip()), "data_dir", "must not be empty")
        require(self.shutdown_grace_s >= 0, "shutdown_grace_s", "must be >= 0")
        require(self.log_level.lower() in _LOG_LEVELS, "log_level",
                f"must be one of {', '.join(_LOG_LEVELS)}")
        # protobuf (and so ONNX and gRPC) cannot carry a message of 2 GiB or more.
        require(1024 <= self.max_policy_bytes <= 1024 * MiB, "max_policy_bytes",
                "must be between 1024 and 1073741824 (1 GiB)")
        require(1 <= self.max_batch_records <= 1_000_000, "max_batch_records",
                "must be between 1 and 1000000")
        require(1 <= self.edge_top_p <= 64, "edge_top_p", "must be between 1 and 64")
        require(1 <= self.edge_embed_dim <= 8192, "edge_embed_dim",
                "must be between 1 and 8192")

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)


def load(path: str | Path | None) -> TrainerConfig:
    """Read the TOML file at `path` (optional), apply VELO_TRAINERD__* overrides, validate."""
    return load_config(TrainerConfig, path, ENV_PREFIX)
