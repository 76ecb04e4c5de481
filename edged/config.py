"""edged configuration (TOML file + VELO_EDGED__SECTION__KEY environment overrides)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from velo.core.names import NAME_RULE, valid_name
from velo.edge.cache import VectorDBConfig
from velo.edge.embedder import EMBEDDER_KINDS
from velo.edge.texts import store_path
from velo.runtime.config import is_file, load_config, require
from velo.runtime.fleet import MqttConfig
from velo.runtime.security import AuthConfig, TLSConfig, require_auth_beyond_loopback

ENV_PREFIX = "VELO_EDGED"
MiB = 1024 * 1024


@dataclass
class CacheConfig:
    top_p: int = 5  # P: rows returned by a search and seen by the policy (eq. 6)
    phi1: float = 1.0  # weight of satisfaction q in the reward, and of c^s in eq. 4
    phi2: float = 0.1  # weight of delay d in the reward, and of c^f in eq. 4 (w = phi2/phi1)
    # Eq. 4 picks among rows whose similarity is within this margin of the best one, so a
    # popular but distant row never outranks a close match (the paper leaves c^f unbounded).
    select_margin: float = 0.05
    # Used in eq. 5 when q is unknown (no reference and not shadow-verified): the running
    # mean of measured q, starting here.
    satisfaction_prior: float = -0.6
    eviction_every: int = 100  # xi: run the below-mean eviction every xi requests (Alg. 2)
    eviction_min_rows: int = 200  # below-mean eviction only once the edge holds this many rows
    # Below-mean eviction spares rows younger than this: a new row's value (q - d, d a
    # forward's whole delay) starts below the reused rows', so Algorithm 2 as written drops
    # what the edge just learned before anyone can reuse it. 0: the paper's rule as written
    # (experiments). The row cap takes older rows first and young ones only when it must.
    eviction_grace_s: float = 3600.0
    max_rows: int = 100_000  # hard cap; the lowest-value rows go first
    # Per-entry TTL: an answer is never served once this old (counted from when it was cached;
    # a hit does not refresh it) and is dropped by the next eviction (0 = never).
    ttl_s: float = 0.0
    # Similarity floor: rows below it are never used for A or C, whatever the policy says. A
    # request may raise it (AskRequest.cache.min_similarity), never lower it.
    min_similarity: float = 0.0
    # Hit counts and values written back on reuse (eq. 4-5) reach Milvus in one batch this
    # often (and on shutdown); searches on this edge see them at once either way.
    flush_every_s: float = 0.5

    def __post_init__(self) -> None:
        require(1 <= self.top_p <= 64, "top_p", "must be between 1 and 64")
        require(self.eviction_every >= 1, "eviction_every", "must be >= 1")
        require(self.eviction_grace_s >= 0, "eviction_grace_s", "must be >= 0 (0: the paper's "
                "below-mean rule as written)")
        require(self.max_rows >= 2, "max_rows", "must be >= 2 (a QA pair is two rows)")
        require(self.ttl_s >= 0, "ttl_s", "must be >= 0")
        require(0.0 <= self.min_similarity <= 1.0, "min_similarity", "must be in [0, 1]")
        require(self.flush_every_s > 0, "flush_every_s", "must be > 0")


@dataclass
class PolicyConfig:
    # Runs until trainerd has published a learned policy, and whenever none verifies:
    # "cache-<theta>" (GPTCache: J_min <= theta -> A else B), "greedy-<theta>"
    # (paper: J_min > theta -> B else C), "adaptive-<theta0>-<k>" (A when
    # J_min <= theta0 + k * the cloud's wait), "verifier-<tau>" (A when the verifier's
    # P(same) >= tau; needs reuse.verifier), "greedy-llm" or "random".
    baseline: str = "cache-0.5"
    sample: bool = True  # sample actions from the policy's probabilities (paper); else argmax
    seed: int = 0  # for sampling and random baselines
    shadow_rate: float = 0.05  # epsilon: share of A/C answers re-asked to the LLM to measure q
    # Shadow verifications in flight at once; a sample beyond this is skipped (and counted),
    # so that background checks never crowd out users.
    shadow_max_inflight: int = 2
    # Largest learned policy this edge accepts from trainerd (its forward pass runs on every
    # request: a huge one would slow every answer).
    max_bytes: int = 8 * MiB

    def __post_init__(self) -> None:
        require(0.0 <= self.shadow_rate <= 1.0, "shadow_rate", "must be in [0, 1]")
        require(self.shadow_max_inflight >= 0, "shadow_max_inflight", "must be >= 0")
        require(1024 <= self.max_bytes <= 1024 * MiB, "max_bytes",
                "must be between 1024 and 1073741824 (1 GiB)")
        from velo.core.policy import baseline_from_name

        try:
            baseline_from_name(self.baseline)
        except ValueError as exc:
            require(False, "baseline", str(exc))


@dataclass
class LimitsConfig:
    max_prompt_chars: int = 8000  # longer prompts get INVALID_ARGUMENT
    max_reference_chars: int = 32000  # longer reference answers get INVALID_ARGUMENT
    max_tokens: int = 1024  # cap on AskRequest.max_tokens
    # The tokens a request may generate when it names no limit (max_tokens = 0). The edge
    # always tells cloudd the limit, so that it knows which cached answers fit the request.
    default_max_tokens: int = 256
    max_inflight: int = 256  # concurrent requests; beyond, RESOURCE_EXHAUSTED
    # Concurrent requests share one embedding batch and one vector search, up to this many
    # (natural batching: no added wait when the edge is idle). A batch is embedded in runs of
    # similar length, so a larger one wastes less on padding; each request goes on when its
    # run is done. 32 with that, against 16 without: +16 % new prompts a second on 2 cores at
    # 64 clients (docs/performance.md).
    max_batch: int = 32
    request_timeout_s: float = 120.0  # whole request, cloud included
    # Embeddings of this many recent distinct prompts are kept (1.5 KB each at 384-d): a
    # repeated prompt skips the embedding, most of an edge's CPU (0: embed every request).
    prompt_vectors: int = 10_000

    def __post_init__(self) -> None:
        require(1 <= self.default_max_tokens <= self.max_tokens, "default_max_tokens",
                "must be between 1 and max_tokens")
        require(self.max_inflight >= 1, "max_inflight", "must be >= 1")
        require(1 <= self.max_batch <= 256, "max_batch", "must be between 1 and 256")
        require(0 <= self.prompt_vectors <= 10_000_000, "prompt_vectors",
                "must be between 0 and 10000000")


@dataclass
class ReuseConfig:
    # The verifier of reuse (edged.reuse): an ONNX file written by `velo experiment reuse` or
    # `pairs` (OUT/verifier.onnx). Empty: no verifier; the guard then scores rows by cosine
    # similarity.
    verifier: str = ""
    # Reuse only at a score >= this (the verifier's P(same), or the cosine similarity). 0 with a
    # verifier: the verifier file's threshold for `delta` at the cache's size. 0 without a
    # verifier: the guard is off and A serves what the policy picks, as in the paper.
    threshold: float = 0.0
    # The bound on the error rate (wrong answers served / requests) the threshold is taken for;
    # it must be one the verifier file was calibrated for (0.01, 0.02, 0.05, 0.1 and the one
    # given to --delta). The threshold follows the number of cached questions (a bigger cache
    # offers more near-misses): counted at start and every 30 s.
    delta: float = 0.05
    # Learn per-row thresholds from verification (velo.edge.calibration).
    calibrate_rows: bool = True
    # A verified answer is right when its q (eq. 2) against the fresh answer is at least this
    # (-0.6: the two answers' embeddings have cosine >= 0.82).
    right_q: float = -0.6

    def __post_init__(self) -> None:
        require(not self.verifier or is_file(self.verifier), "verifier",
                f"{self.verifier} is not a readable file")
        require(0.0 <= self.threshold <= 1.0, "threshold", "must be in [0, 1]")
        require(0.0 < self.delta < 1.0, "delta", "must be in (0, 1)")
        require(-2.0 <= self.right_q <= 0.0, "right_q", "must be in [-2, 0] (eq. 2)")

    @property
    def enabled(self) -> bool:
        return bool(self.verifier) or self.threshold > 0


@dataclass
class HttpConfig:
    # The OpenAI-compatible HTTP front (edged.openai_front), e.g. "0.0.0.0:8080"; empty: off.
    # It uses the edge's [tls] and [auth] as the gRPC port does (an API key names the tenant).
    listen: str = ""
    model: str = "velo"  # the model name /v1/models lists (requests may name any model)
    # Tenant of requests when [auth] is off and no x-velo-tenant header is sent.
    tenant: str = "default"
    max_body_bytes: int = 1 * MiB  # larger request bodies get 413
    # Slow clients: a request's headers must arrive within this many seconds, and beyond
    # max_connections open connections new ones are closed at once (half-open connections
    # must not take the file descriptors the gRPC port needs).
    header_timeout_s: float = 10.0
    max_connections: int = 1000  # see header_timeout_s

    def __post_init__(self) -> None:
        require(not self.listen or ":" in self.listen, "listen", "must be host:port")
        require(0 < self.header_timeout_s <= 300, "header_timeout_s", "must be in (0, 300]")
        require(1 <= self.max_connections <= 100_000, "max_connections",
                "must be between 1 and 100000")
        require(valid_name(self.tenant), "tenant", f"must be {NAME_RULE}")
        require(1024 <= self.max_body_bytes <= 64 * MiB, "max_body_bytes",
                "must be between 1024 and 67108864")


@dataclass
class EdgeAuthConfig(AuthConfig):
    # tokens_file: users' API keys (role "tenant": the one tenant a key may ask as; "admin":
    # GetStats). token_file: this edge's own token (role "edge" at cloudd and trainerd).
    token_file: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(not self.token_file or is_file(self.token_file), "token_file",
                f"{self.token_file} is not a readable file")


@dataclass
class EdgeConfig:
    edge_id: str = "edge-1"  # unique in the fleet; names the collection and experience
    listen: str = "127.0.0.1:50051"  # gRPC address; beyond loopback it needs [auth] or insecure
    # Prometheus /metrics (velo.runtime.metrics), e.g. "127.0.0.1:9151"; empty: not served.
    metrics_listen: str = ""
    cloud: str = "127.0.0.1:50060"  # cloudd address; empty: no cloud (only Action A works)
    # Deadline of each call to cloudd (a whole answer, or a whole stream): a frozen cloudd turns
    # into UNAVAILABLE (HTTP 503) after it. At most limits.request_timeout_s.
    cloud_timeout_s: float = 60.0
    trainer: str = "127.0.0.1:50070"  # trainerd address; empty: no experience upload/policies
    # Deadline of each call to trainerd (an experience upload, a policy download); a frozen
    # trainerd only delays uploads (the spool keeps them) and new policies.
    trainer_timeout_s: float = 30.0
    data_dir: str = "var/edged"  # experience spool, last verified policy, cached pairs' texts
    # "minilm" (English, 384 wide) or "use-multilingual" (16 languages, 512 wide: a cached
    # answer serves the question in every language). A different width needs a new collection.
    # "triton": the same MiniLM vectors from a Triton Inference Server (triton_url): the edge
    # box spends no CPU on embedding; the server must answer when edged starts.
    embedder: str = "minilm"
    embedder_dir: str = ""  # exported ONNX embedder; empty: models/minilm-l6-v2
    # "model.onnx" (float32, what trainerd uses) or "model-int8.onnx" (~2x less CPU per
    # request, slightly different distances: measure with tools/bench_edge.py first).
    embedder_file: str = "model.onnx"
    # embedder = "triton": the server's gRPC address (host:port; tools/triton_server.py) and
    # model (deploy/triton/model_repository/minilm; which ONNX file it runs is set there).
    triton_url: str = "127.0.0.1:8001"
    triton_model: str = "minilm"  # see triton_url
    triton_timeout_s: float = 10.0  # deadline of each call to Triton (an embedding, a check)
    # onnxruntime intra-op threads of a lone embedding run (idle ones sleep): the machine's
    # cores, so that a lone request uses them all.
    embedder_threads: int = 2
    # Embedding runs at once. A run that starts while another runs gets embedder_threads //
    # embedder_workers threads (at least 1) from a second session: the model twice in memory
    # (~95 MB float32, ~30 MB int8) when that differs from embedder_threads.
    embedder_workers: int = 2
    log_level: str = "info"  # debug, info, warning, error or critical (JSON lines on stderr)
    shutdown_grace_s: float = 10.0  # in-flight requests get this long to finish on SIGTERM
    spool_max_records: int = 200_000  # experience kept while trainerd is unreachable
    # ... and at most this many bytes of it (and half of the disk's free space at start)
    spool_max_bytes: int = 1024 * MiB
    upload_batch: int = 256  # experience records per upload stream
    vector_db: VectorDBConfig = field(default_factory=VectorDBConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    reuse: ReuseConfig = field(default_factory=ReuseConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)  # see velo.runtime.security
    auth: EdgeAuthConfig = field(default_factory=EdgeAuthConfig)
    # Learn of new policies from trainerd's MQTT announcements too (see velo.runtime.fleet); the
    # weights still come from `trainer` over gRPC. Off by default.
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    # Listening beyond loopback (listen, http.listen) needs auth.tokens_file, unless this says
    # that an open edge is wanted.
    insecure: bool = False

    def __post_init__(self) -> None:
        require(valid_name(self.edge_id), "edge_id", f"must be {NAME_RULE}")
        require_auth_beyond_loopback({"listen": self.listen, "http.listen": self.http.listen},
                                     self.auth.tokens_file, self.insecure)
        require(self.embedder in EMBEDDER_KINDS, "embedder",
                f"must be one of {', '.join(EMBEDDER_KINDS)}")
        require(self.log_level.upper() in logging.getLevelNamesMapping(), "log_level",
                "must be debug, info, warning, error or critical")
        require(self.spool_max_records >= 1, "spool_max_records", "must be >= 1")
        require(0 < self.cloud_timeout_s <= self.limits.request_timeout_s, "cloud_timeout_s",
                f"must be in (0, limits.request_timeout_s = {self.limits.request_timeout_s}]")
        for key in ("trainer_timeout_s", "triton_timeout_s"):
            require(0 < getattr(self, key) <= 600, key, "must be in (0, 600]")
        require(not self.mqtt.enabled or bool(self.trainer), "mqtt",
                "needs trainer: announced policies are pulled from trainerd over gRPC")
        require(not self.policy.baseline.startswith("verifier-") or bool(self.reuse.verifier),
                "policy.baseline", "verifier-<tau> reads the verifier's P(same): it needs "
                "reuse.verifier")
        require(not self.policy.baseline.startswith("adaptive-") or bool(self.cloud),
                "policy.baseline", "adaptive-<theta0>-<k> follows the cloud's wait: it needs "
                "cloud")
        require(self.spool_max_bytes >= 64 * 1024, "spool_max_bytes", "must be >= 65536")
        require(self.embedder_threads >= 1 and self.embedder_workers >= 1, "embedder_workers",
                "embedder_threads and embedder_workers must be >= 1")

    @property
    def collection(self) -> str:
        return self.vector_db.collection or "velo_" + re.sub(r"[^A-Za-z0-9_]", "_", self.edge_id)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    @property
    def texts_path(self) -> Path:
        """The SQLite file of the cached pairs' texts (velo/edge/texts.py)."""
        return store_path(self.data_path, self.collection)


def load(path: str | Path | None) -> EdgeConfig:
    return load_config(EdgeConfig, path, ENV_PREFIX)

