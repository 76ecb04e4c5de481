"""edged: the edge daemon. Serves users over gRPC; its life reads top to bottom:

    startup  : embedder -> vector cache -> spool -> cloud client -> trainer link -> gRPC
    main loop: serve requests; background tasks upload experience, follow policies, evict,
               and watch the parts the edge depends on (its health follows them)
    shutdown : drain in-flight requests and background records -> stop tasks -> close stores

Health: the edge is SERVING while its vector database answers and, when it has a cloud, while
cloudd answers and says its LLM is up; each part is also reported on its own
(`velo.part.vector_db`, `velo.part.cloud`, `velo.part.trainer`), with the reason in GetStats.
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, cast

from edged.admin import CacheAdmin
from edged.announcements import AnnouncementListener
from edged.cloud_client import CloudClient
from edged.config import EdgeConfig
from edged.grpc_front import ROLES, EdgeServicer
from edged.metrics import EdgeMetrics, stats_readings
from edged.openai_front import OpenAIFront
from edged.pipeline import CLOUD, TRAINER, VECTOR_DB, EdgePipeline
from edged.reuse import ReuseGuard, ReuseThreshold
from edged.spool import Spool
from edged.trainer_link import ExperienceUploader, PolicyFollower
from velo.core.models import embedder_dir
from velo.core.policy import baseline_from_name
from velo.core.verifier import OnnxVerifier
from velo.edge.cache import VectorCache
from velo.edge.embedder import load_embedder
from velo.runtime.http_server import HttpServer
from velo.runtime.logs import get_logger
from velo.runtime.security import dial, read_token
from velo.runtime.serving import UNDECIDED, Daemon, Undecided
from velo.v1 import edge_pb2_grpc

if TYPE_CHECKING:
    from velo.edge.triton_embedder import TritonEmbedder

log = get_logger("edged")

VECTOR_DB_PROBE_S = 2.0  # how often Milvus is probed while it answers (every second if not)
EMBEDDER_PROBE_S = 2.0  # the same for a remote (Triton) embedder
CLOUD_PROBE_S = 1.0  # cloudd's health is checked every second, up or down
EMBEDDER = "embedder"
CACHE_SIZE_S = 30.0  # how often the reuse threshold is fitted to the cache's size again


def _index_stats(cache: VectorCache) -> dict[str, float]:
    index = cache.index
    if index is None:  # vector_db.in_process_index = false
        return {}
    return {"index_rows": len(index), "index_bytes": index.memory_bytes()}


def _guard_stats(guard: ReuseGuard | None) -> dict[str, float]:
    if guard is None:
        return {}
    return {"reuses_vetoed": guard.vetoed, "reuse_threshold": guard.rows.global_threshold,
            "reuse_threshold_questions": guard.questions}


def reuse_guard(cfg: EdgeConfig) -> ReuseGuard | None:
    """The [reuse] guard, or None when it is off. A bad verifier file stops the start with the
    reason (better than serving unguarded reuses the operator asked to guard)."""
    reuse = cfg.reuse
    if not reuse.enabled:
        return None
    verifier = OnnxVerifier(Path(reuse.verifier)) if reuse.verifier else None
    if reuse.threshold or verifier is None:
        threshold = ReuseThreshold.fixed(reuse.threshold)
    else:
        verifier.threshold_for(reuse.delta)  # an uncalibrated δ stops the start here
        threshold = ReuseThreshold(
            functools.partial(verifier.threshold_for, reuse.delta),
            f"{verifier.name} delta={reuse.delta}", verifier.calibrated_rows(reuse.delta))
    cfg.data_path.mkdir(parents=True, exist_ok=True)
    return ReuseGuard(verifier, threshold, reuse.calibrate_rows, reuse.right_q,
                      cfg.data_path / "reuse_rows.json")


class Edged(Daemon):
    name = "edged"

    def __init__(self, cfg: EdgeConfig) -> None:
        super().__init__(cfg.listen, cfg.shutdown_grace_s, tls=cfg.tls, auth=cfg.auth,
                         roles=ROLES, metrics_listen=cfg.metrics_listen)
        self.cfg = cfg
        self.http: HttpServer | None = None
        self.entries_deleted = 0  # by operators (edged.admin)
        self._probe_thread = ThreadPoolExecutor(1, thread_name_prefix="vector-db-probe")
        # The last probe, maybe still running.
        self._vector_db_probe: asyncio.Future[str | None] | None = None
        self._vector_db_slow = 0  # probes in a row that ran out of time

    async def startup(self) -> None:
        cfg = self.cfg
        model_dir = Path(cfg.embedder_dir) if cfg.embedder_dir else embedder_dir()
        # Runs that overlap share the cores: each gets its part of them (velo.edge.embedder).
        busy_threads = max(1, cfg.embedder_threads // cfg.embedder_workers)
        self.embedder = load_embedder(cfg.embedder, model_dir, cfg.embedder_threads,
                                      cfg.embedder_file, cfg.triton_url, cfg.triton_model,
                                      cfg.triton_timeout_s, busy_threads)
        # Write-backs are flushed by pipeline.flush_loop, never inline on the event loop.
        self.cache = VectorCache(cfg.vector_db, cfg.collection, self.embedder.dim, flush_at=0,
                                 texts_path=cfg.texts_path)
        # Released in the reverse order (Daemon.closing): the pipeline drains, background
        # tasks stop, then links and stores close.
        self.closing.callback(self._probe_thread.shutdown, wait=False, cancel_futures=True)
        await asyncio.to_thread(self.cache.open)
        self.closing.push_async_callback(asyncio.to_thread, self.cache.close)
        await self.report(VECTOR_DB, True, "")
        self.spool = Spool(cfg.data_path / "experience-spool.db", cfg.spool_max_records,
                           cfg.spool_max_bytes)
        self.closing.callback(self.spool.close)
        if self.spool.released_at_start:
            log.warning("released experience records held by the previous run (their shadow "
                        "verification never finished)", records=self.spool.released_at_start)
        token = read_token(cfg.auth.token_file)
        self.cloud = CloudClient(cfg.cloud, cfg.cloud_timeout_s, cfg.tls, token)
        self.trainer_channel = dial(cfg.trainer, cfg.tls, token, options=[
            ("grpc.max_receive_message_length", cfg.policy.max_bytes + 64 * 1024)],
        ) if cfg.trainer else None
        if self.trainer_channel is not None:
            self.closing.push_async_callback(self.trainer_channel.close)
        self.closing.push_async_callback(self.cloud.close)
        self.closing.push_async_callback(self.stop_tasks)
        self.uploader = ExperienceUploader(self.trainer_channel, self.spool, cfg.upload_batch,
                                           self.report, cfg.trainer_timeout_s)
        self.policies = PolicyFollower(
            self.trainer_channel, baseline_from_name(cfg.policy.baseline, cfg.policy.seed),
            cfg.data_path / "policy", top_p=cfg.cache.top_p, embed_dim=self.embedder.dim,
            sample=cfg.policy.sample, seed=cfg.policy.seed, max_bytes=cfg.policy.max_bytes,
            report=self.report, has_verifier=bool(cfg.reuse.verifier),
            fills_load=lambda: self.cloud.stub is not None and self.cloud.load.reported
            is not False, timeout_s=cfg.trainer_timeout_s)
        self.policies.load_saved()
        self.pipeline = EdgePipeline(cfg, self.embedder, self.cache, self.cloud, self.policies,
                                     self.spool, self.uploader, self.report, reuse_guard(cfg),
                                     EdgeMetrics(self.metrics))
        self.closing.push_async_callback(self._drain_pipeline)
        self.admin = CacheAdmin(self.cache, self.embedder, cfg.data_path, self._deleted,
                                cfg.cache.satisfaction_prior)
        self.metrics.read(stats_readings(self._scraped_stats, cfg))
        for work in (self.uploader.run(), self.policies.run(), self.pipeline.eviction_loop(),
                     self.pipeline.flush_loop(), self._follow_milvus(),
                     self.watch_part(VECTOR_DB, self._probe_vector_db, VECTOR_DB_PROBE_S)):
            self.spawn(work)
        if self.pipeline.guard is not None:
            guard, loop = self.pipeline.guard, asyncio.get_running_loop()

            def forget(pair_ids: list[int]) -> None:
                # Evictions and deletions run in worker threads; the guard is the loop's.
                loop.call_soon_threadsafe(guard.forget, pair_ids)

            self.cache.pairs_gone = forget
            await self._follow_cache_size(self.pipeline.guard, once=True)  # before serving
            self.spawn(self._follow_cache_size(self.pipeline.guard))
        if hasattr(self.embedder, "check"):  # a remote embedder (Triton) can go away
            self.spawn(self.watch_part(EMBEDDER, self._probe_embedder, EMBEDDER_PROBE_S))
        if cfg.mqtt.enabled and self.trainer_channel is not None:
            # Announced versions are pulled over the trainer channel, as the watch's are.
            self.announcements = AnnouncementListener(cfg.mqtt, self.policies, cfg.edge_id)
            self.spawn(self.announcements.run())
        if self.cloud.stub is not None:
            await self.report(CLOUD, *await self.cloud.check())  # known before SERVING
            self.spawn(self.watch_part(CLOUD, self.cloud.probe, CLOUD_PROBE_S))
        self.grpc.add(edge_pb2_grpc.add_EdgeServiceServicer_to_server, EdgeServicer(self),
                      "velo.v1.EdgeService")
        await super().startup()
        if cfg.http.listen:
            front = OpenAIFront(cfg, self.pipeline, self.admin, cfg.auth.table(),
                                self.required_down)
            self.http = HttpServer(front.app, cfg.http.listen, cfg.tls, cfg.shutdown_grace_s,
                                   cfg.http.header_timeout_s, cfg.http.max_connections)
            await self.http.start()
            log.info("OpenAI-compatible front listening", url=f"{self.http.url}/v1")
        log.info("edge ready", edge_id=cfg.edge_id, collection=cfg.collection,
                 vector_db=cfg.vector_db.uri, policy=self.policies.current.name,
                 cloud=cfg.cloud or None, trainer=cfg.trainer or None)

    def stats(self, cached_rows: int) -> dict[str, float]:
        """This edge's counters by name, the one source of GetStats and /metrics."""
        c, guard = self.pipeline.counters, self.pipeline.guard
        return {"requests": c.requests, "errors": c.errors, "evicted_rows": c.evicted_rows,
                "inflight": self.pipeline.inflight, "cached_rows": cached_rows,
                "policy_version": self.policies.current.version,
                "policies_rejected": len(self.policies.rejected),
                "experience_pending": self.spool.count(), "experience_sent": self.uploader.sent,
                "experience_dropped": self.spool.dropped,
                "shadow_verified": c.shadow_verified, "shadow_skipped": c.shadow_skipped,
                "bypassed": c.bypassed, "entries_superseded": c.entries_superseded,
                "entries_deleted": self.entries_deleted,
                "prompt_vector_hits": self.pipeline.decider.prompt_vectors.hits,
                "reuses_verified": c.reuses_verified, "reuses_judged_wrong": c.reuses_judged_wrong,
                "false_hit_estimate": c.false_hit_estimate, **_index_stats(self.cache),
                **_guard_stats(guard)}

    def _deleted(self, entries: int) -> None:
        self.entries_deleted += entries

    def _scraped_stats(self) -> dict[str, float]:
        """`stats` for a Prometheus scrape (on the scrape thread: Milvus may be asked)."""
        try:
            rows = self.cache.count()
        except Exception:
            rows = -1  # the vector DB is down; the rest of the stats still matter
        return self.stats(rows)

    def required_down(self) -> dict[str, str]:
        """The parts without which this edge does not serve that are down, and why."""
        return {name: p.reason for name, p in self.grpc.parts.items()
                if p.required and not p.ok}

    async def report(self, part: str, ok: bool, reason: str) -> None:
        """A part of the edge is up or down (the trainer is not required to serve)."""
        await self.grpc.set_part(part, ok, reason, required=part != TRAINER)

    async def _probe_vector_db(self) -> str | Undecided | None:
        """Probe Milvus on a thread of its own (a frozen server must not tie up the threads
        requests use), at most one probe at a time. A probe that only runs out of time counts
        after two in a row (a slow answer on a loaded box is not an outage)."""
        if self._vector_db_probe is not None:  # one probe at a time: wait for a stuck one
            await asyncio.gather(self._vector_db_probe, return_exceptions=True)
        reconnect = not self.grpc.parts[VECTOR_DB].ok
        probe = self._vector_db_probe = asyncio.get_running_loop().run_in_executor(
            self._probe_thread, self.cache.ping, 2.0, reconnect)
        try:
            async with asyncio.timeout(3.0):  # not wait_for: it can lose a cancel (3.11)
                problem = await asyncio.shield(probe)
        except TimeoutError:
            self._vector_db_slow += 1
            if self._vector_db_slow < 2:
                return UNDECIDED
            return f"Milvus at {self.cfg.vector_db.uri} did not answer within 3 s"
        self._vector_db_slow = 0
        return problem

    async def _follow_milvus(self) -> None:
        """Rows other clients wrote into or deleted from this edge's collection reach the
        in-process index every vector_db.index_sync_s (its own writes reach it at once). A sync
        that fails (Milvus down) is retried at the next; the probe reports the outage."""
        if self.cache.index is None:
            return
        while True:
            await asyncio.sleep(self.cfg.vector_db.index_sync_s)
            try:
                added, removed = await asyncio.to_thread(self.cache.sync_index)
            except Exception as exc:  # pymilvus raises its own types
                log.warning("could not sync the in-process index with Milvus",
                            error=str(exc)[:200])
                continue
            if added or removed:
                log.info("in-process index synced with Milvus: rows other clients changed",
                         added=added, removed=removed)

    async def _follow_cache_size(self, guard: ReuseGuard, once: bool = False) -> None:
        """Keep the reuse threshold fit for the cache's size (edged.reuse.ReuseThreshold):
        count the cached questions now and every CACHE_SIZE_S. A count that fails (Milvus
        down) keeps the last threshold; the watch reports the outage."""
        while True:
            try:
                rows = await asyncio.to_thread(self.cache.count)
                guard.follow_size(rows // 2)  # a question row and an answer row per entry
            except Exception as exc:  # pymilvus raises its own types; the next count retries
                log.warning("could not count the cached rows for the reuse threshold",
                            error=str(exc)[:200])
            if once:
                return
            await asyncio.sleep(CACHE_SIZE_S)

    async def _probe_embedder(self) -> str | None:
        """A remote embedder (Triton): the edge is not SERVING while it is down."""
        # Watched only when the embedder has `check`, which only TritonEmbedder has.
        return await asyncio.to_thread(cast("TritonEmbedder", self.embedder).check)

    async def shutdown(self) -> None:
        if self.http is not None:
            await self.http.stop()  # drains in-flight HTTP requests
        await super().shutdown()  # drains in-flight requests, then releases (startup's order)

    async def _drain_pipeline(self) -> None:
        """Background records (shadow verification) finish, write-backs are flushed."""
        await self.pipeline.drain()
        self.pipeline.close()

