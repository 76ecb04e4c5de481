"""edged: the edge daemon. Serves users over gRPC; its life reads top to bottom:

    startup  : embedder -> vector cache -> spool -> cloud client -> trainer link -> gRPC
    main loop: serve requests; background tasks upload experience, follow policies, evict
    shutdown : drain in-flight requests and background records -> stop tasks -> close stores
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc

from edged.cloud_client import CloudClient
from edged.config import EdgeConfig
from edged.pipeline import EdgePipeline, RequestError
from edged.spool import Spool
from edged.trainer_link import ExperienceUploader, PolicyFollower
from velo.cache import VectorCache
from velo.embedder import Embedder
from velo.logs import get_logger
from velo.models import embedder_dir
from velo.policy import baseline_from_name
from velo.qos import Action
from velo.serving import Daemon
from velo.v1 import edge_pb2, edge_pb2_grpc

log = get_logger("edged")


class EdgeServicer(edge_pb2_grpc.EdgeServiceServicer):
    def __init__(self, edge: Edged) -> None:
        self.edge = edge

    async def Ask(self, request: edge_pb2.AskRequest, context: grpc.aio.ServicerContext,
                  ) -> edge_pb2.AskResponse:
        try:
            return await self.edge.pipeline.ask(request)
        except RequestError as exc:
            await context.abort(exc.code, str(exc))
        except Exception as exc:
            log.exception("request failed", request_id=request.request_id)
            await context.abort(grpc.StatusCode.INTERNAL, f"edge error: {exc!r}")

    async def AskStream(self, request: edge_pb2.AskRequest,
                        context: grpc.aio.ServicerContext) -> None:
        async def write(text: str) -> None:
            await context.write(edge_pb2.AskChunk(text=text))

        try:
            done = await self.edge.pipeline.ask(request, on_text=write)
            await context.write(edge_pb2.AskChunk(done=done))
        except RequestError as exc:
            await context.abort(exc.code, str(exc))
        except asyncio.CancelledError:
            log.info("client cancelled stream", request_id=request.request_id)
            raise
        except Exception as exc:
            log.exception("stream failed", request_id=request.request_id)
            await context.abort(grpc.StatusCode.INTERNAL, f"edge error: {exc!r}")

    async def GetStats(self, request: edge_pb2.GetStatsRequest,
                       context: grpc.aio.ServicerContext) -> edge_pb2.EdgeStats:
        edge = self.edge
        c = edge.pipeline.counters
        try:
            rows = await asyncio.to_thread(edge.cache.count)
        except Exception:
            rows = -1  # the vector DB is down; the rest of the stats still matter
        return edge_pb2.EdgeStats(
            edge_id=edge.cfg.edge_id, requests=c.requests, errors=c.errors,
            actions=[edge_pb2.ActionStats(action=int(a) + 1, requests=s.requests,
                                          delay_sum_s=s.delay_sum_s,
                                          satisfaction_count=s.satisfaction_count,
                                          satisfaction_sum=s.satisfaction_sum,
                                          reward_sum=s.reward_sum)
                     for a, s in c.actions.items()],
            cached_rows=rows, evicted_rows=c.evicted_rows, policy=edge.policies.current.name,
            policy_version=edge.policies.current.version,
            experience_pending=edge.spool.count(), experience_sent=edge.uploader.sent,
            experience_dropped=edge.spool.dropped,
        )


class Edged(Daemon):
    name = "edged"

    def __init__(self, cfg: EdgeConfig) -> None:
        super().__init__(cfg.listen, cfg.shutdown_grace_s)
        self.cfg = cfg
        self.tasks: list[asyncio.Task] = []

    async def startup(self) -> None:
        cfg = self.cfg
        model_dir = Path(cfg.embedder_dir) if cfg.embedder_dir else embedder_dir()
        self.embedder = Embedder(model_dir, threads=cfg.embedder_threads,
                                 model_file=cfg.embedder_file)
        # Write-backs are flushed by pipeline.flush_loop, never inline on the event loop.
        self.cache = VectorCache(cfg.vector_db, cfg.collection, self.embedder.dim, flush_at=0)
        await asyncio.to_thread(self.cache.open)
        self.spool = Spool(cfg.data_path / "experience-spool.db", cfg.spool_max_records)
        self.cloud = CloudClient(cfg.cloud, cfg.limits.request_timeout_s)
        self.trainer_channel = grpc.aio.insecure_channel(cfg.trainer, options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024)]) if cfg.trainer else None
        self.uploader = ExperienceUploader(self.trainer_channel, self.spool, cfg.upload_batch)
        self.policies = PolicyFollower(
            self.trainer_channel, baseline_from_name(cfg.policy.baseline, cfg.policy.seed),
            cfg.data_path / "policy", top_p=cfg.cache.top_p, embed_dim=self.embedder.dim,
            sample=cfg.policy.sample, seed=cfg.policy.seed)
        self.policies.load_saved()
        self.pipeline = EdgePipeline(cfg, self.embedder, self.cache, self.cloud, self.policies,
                                     self.spool, self.uploader)
        self.tasks = [asyncio.create_task(coro) for coro in (
            self.uploader.run(), self.policies.run(), self.pipeline.eviction_loop(),
            self.pipeline.flush_loop())]
        self.grpc.add(edge_pb2_grpc.add_EdgeServiceServicer_to_server, EdgeServicer(self),
                      "velo.v1.EdgeService")
        await super().startup()
        log.info("edge ready", edge_id=cfg.edge_id, collection=cfg.collection,
                 vector_db=cfg.vector_db.uri, policy=self.policies.current.name,
                 cloud=cfg.cloud or None, trainer=cfg.trainer or None)

    async def shutdown(self) -> None:
        await super().shutdown()  # drains in-flight requests
        await self.pipeline.drain()
        self.pipeline.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.cloud.close()
        if self.trainer_channel is not None:
            await self.trainer_channel.close()
        self.spool.close()
        await asyncio.to_thread(self.cache.close)


def action_name(action_pb: int) -> str:
    """'A', 'B' or 'C' for an edge_pb2.Action value."""
    return Action(action_pb - 1).letter
