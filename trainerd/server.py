"""trainerd: collects experience from every edge and serves versioned ONNX policies.

    ReportExperience  client stream of Experience -> stored once per (edge_id, seq)
    GetPolicy         one version's ONNX bytes (0: the latest)
    WatchPolicies     server stream: the latest version at once, then each new one
    PublishPolicy     verify a policy exactly as an edge will, store it as the next version

With a tokens file (velo.runtime.security), only edges report experience, each only as itself, and
only publishers publish. The optional learner (Algorithm 1) reads the ExperienceStore and
publishes through the PolicyRegistry. With [mqtt], each accepted version is also announced to
the edges over MQTT (trainerd.broadcast).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator

import grpc
from google.protobuf.unknown_fields import UnknownFieldSet

from trainerd.broadcast import PolicyBroadcaster
from trainerd.config import MiB, TrainerConfig
from trainerd.learner import OnlineLearner
from trainerd.registry import (
    PolicyCorrupted,
    PolicyInfo,
    PolicyNotFound,
    PolicyRegistry,
    PolicyRejected,
    PolicyTooLarge,
)
from trainerd.store import ExperienceStore
from velo.core.bad_input import clip, request_id_problem
from velo.core.load import LOAD_FEATURES
from velo.core.names import NAME_RULE, valid_name
from velo.runtime.logs import get_logger
from velo.runtime.metrics import Reading
from velo.runtime.security import caller
from velo.runtime.serving import Daemon, PartReport
from velo.v1 import trainer_pb2, trainer_pb2_grpc

log = get_logger("trainerd")

MAX_TOP_P = 64  # edged accepts top_p up to 64 too
MAX_EMBED_DIM = 8192
MAX_SEQ = 2**63 - 1  # SQLite integers are signed 64-bit
MAX_DELAY_S = 86_400.0  # a day: anything longer is not a request's delay
STORE = "store"  # the health part

_READERS = frozenset({"edge", "publisher"})
ROLES = {
    "/velo.v1.TrainerService/ReportExperience": frozenset({"edge"}),
    "/velo.v1.TrainerService/GetPolicy": _READERS,
    "/velo.v1.TrainerService/WatchPolicies": _READERS,
    "/velo.v1.TrainerService/PublishPolicy": frozenset({"publisher"}),
}

def validate_experience(record: trainer_pb2.Experience) -> str | None:
    """What is wrong with `record` (a message naming the field), or None when it is valid."""
    unknown = sorted({f.field_number for f in UnknownFieldSet(record)})
    if unknown:
        return f"unknown field(s) {unknown[:8]}: not a velo.v1 Experience this trainer knows"
    if not valid_name(record.edge_id):
        return f"edge_id {clip(record.edge_id)} must be {NAME_RULE}"
    if not 1 <= record.seq <= MAX_SEQ:
        return "seq must be >= 1 (and below 2^63)"
    if not 1 <= record.top_p <= MAX_TOP_P:
        return f"top_p is {record.top_p}; must be between 1 and {MAX_TOP_P}"
    if len(record.correlation) != 3 * record.top_p:
        return (f"correlation has {len(record.correlation)} values; "
                f"must be 3 * top_p = {3 * record.top_p}")
    if not 1 <= len(record.embedding) <= MAX_EMBED_DIM:
        return f"embedding has {len(record.embedding)} values; must be 1-{MAX_EMBED_DIM}"
    if len(record.action_mask) != 3:
        return f"action_mask has {len(record.action_mask)} values; must be 3 (A, B, C)"
    if record.action not in (0, 1, 2):
        return f"action is {record.action}; must be 0 (A), 1 (B) or 2 (C)"
    if not record.action_mask[record.action]:
        return f"action is {record.action} but action_mask says it was not allowed"
    if len(record.action_probs) not in (0, 3):
        return f"action_probs has {len(record.action_probs)} values; must be 3 (or none)"
    for name in ("correlation", "embedding", "action_probs"):
        if not all(math.isfinite(v) for v in getattr(record, name)):
            return f"{name} holds NaN or infinity"
    if record.action_probs and (min(record.action_probs) < 0
                                or abs(sum(record.action_probs) - 1) > 1e-3):
        return "action_probs must be probabilities that sum to 1"
    if not (math.isfinite(record.delay_s) and 0 <= record.delay_s <= MAX_DELAY_S):
        return f"delay_s is {record.delay_s}; must be between 0 and {MAX_DELAY_S:g} seconds"
    if not (math.isfinite(record.satisfaction) and -2.0 <= record.satisfaction <= 0.0):
        return (f"satisfaction is {record.satisfaction}; eq. 2 between unit vectors lies in "
                "[-2, 0]")
    if not math.isfinite(record.unix_time) or record.unix_time < 0:
        return f"unix_time is {record.unix_time}; must be a time"
    if len(record.load) not in (0, len(LOAD_FEATURES)):
        return (f"load has {len(record.load)} values; must be {len(LOAD_FEATURES)} "
                f"({', '.join(LOAD_FEATURES)}) or none")
    if not all(math.isfinite(v) and v >= 0 for v in record.load):
        return "load must hold seconds (finite, >= 0)"
    return request_id_problem(record.request_id)


def _info_proto(info: PolicyInfo) -> trainer_pb2.PolicyInfo:
    return trainer_pb2.PolicyInfo(
        version=info.version,
        sha256=info.sha256,
        name=info.name,
        created_unix=info.created_unix,
        size_bytes=info.size_bytes,
    )


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, store: ExperienceStore, registry: PolicyRegistry, max_batch_records: int,
                 report: PartReport) -> None:
        self.store = store
        self.registry = registry
        self.max_batch_records = max_batch_records
        self.report = report

    async def ReportExperience(
        self,
        request_iterator: AsyncIterator[trainer_pb2.Experience],
        context: grpc.aio.ServicerContext,
    ) -> trainer_pb2.ExperienceAck:
        stored = duplicates = conflicts = received = 0
        batch: list[trainer_pb2.Experience] = []
        edge = caller()  # with tokens: the edge this stream may report as, and no other

        async def flush() -> None:
            nonlocal stored, duplicates, conflicts
            if batch:
                # SQLite commits (with fsync) block: run them in a worker thread.
                try:
                    new, dup, clash = await asyncio.to_thread(self.store.add, list(batch))
                except Exception as exc:  # disk full, I/O error: say so, keep serving
                    await self.report(STORE, False, f"cannot store experience: {exc}")
                    await context.abort(grpc.StatusCode.UNAVAILABLE,
                                        f"trainerd cannot store experience now ({exc}); "
                                        f"{stored} records of this stream were stored")
                await self.report(STORE, True, "")
                stored, duplicates, conflicts = stored + new, duplicates + dup, conflicts + clash
                batch.clear()

        async for record in request_iterator:
            received += 1
            if edge is not None and record.edge_id != edge.name:
                await flush()
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"record #{received}: this token belongs to edge {edge.name!r}, which may "
                    f"not report as edge_id {clip(record.edge_id)}")
            problem = validate_experience(record)
            if problem is not None:
                # Keep the valid records before it: storing is idempotent, so the edge may
                # resend them all once it has dropped or fixed the bad one.
                await flush()
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"record #{received} (edge_id={clip(record.edge_id)}, "
                    f"seq={record.seq}): {problem}; the {received - 1} records before it "
                    f"were stored",
                )
            batch.append(record)
            if len(batch) >= self.max_batch_records:
                await flush()
        await flush()
        if conflicts:
            log.error("experience conflicts: records whose (edge_id, seq) was taken by other "
                      "content were kept aside", conflicts=conflicts, peer=context.peer())
        log.info("experience received", records=received, stored=stored, duplicates=duplicates,
                 conflicts=conflicts, peer=context.peer())
        return trainer_pb2.ExperienceAck(stored=stored, duplicates=duplicates,
                                         conflicts=conflicts)

    async def GetPolicy(
        self, request: trainer_pb2.GetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.Policy:
        if request.version < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"version is {request.version}; must be >= 0 (0: the latest)")
        try:
            info, data = await asyncio.to_thread(self.registry.get, request.version)
        except PolicyNotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except PolicyCorrupted as exc:
            log.error("stored policy corrupted", error=str(exc))
            await context.abort(grpc.StatusCode.DATA_LOSS, str(exc))
        return trainer_pb2.Policy(info=_info_proto(info), onnx=data)

    async def WatchPolicies(
        self, request: trainer_pb2.WatchPoliciesRequest, context: grpc.aio.ServicerContext
    ) -> None:
        after = request.after_version
        latest = self.registry.latest()
        if latest is not None and latest.version > after:
            await context.write(_info_proto(latest))
            after = latest.version
        while True:
            # Returns None when trainerd stops; a client cancel raises CancelledError here.
            info = await self.registry.wait_newer(after)
            if info is None:
                return
            await context.write(_info_proto(info))
            after = info.version

    async def PublishPolicy(
        self, request: trainer_pb2.PublishPolicyRequest, context: grpc.aio.ServicerContext
    ) -> trainer_pb2.PolicyInfo:
        try:
            info = await self.registry.publish(request.name, request.onnx)
        except PolicyTooLarge as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except PolicyRejected as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        log.info("policy published", version=info.version, name=info.name,
                 sha256=info.sha256, size_bytes=info.size_bytes)
        return _info_proto(info)


class Trainerd(Daemon):
    name = "trainerd"

    def __init__(self, config: TrainerConfig) -> None:
        # A policy travels as one message: gRPC's limit must fit the largest accepted policy.
        super().__init__(config.listen, config.shutdown_grace_s,
                         max_message_bytes=config.max_policy_bytes + MiB, tls=config.tls,
                         auth=config.auth, roles=ROLES, metrics_listen=config.metrics_listen)
        self.config = config
        self.store: ExperienceStore | None = None
        self.registry: PolicyRegistry | None = None

    async def startup(self) -> None:
        data = self.config.data_path
        self.store = ExperienceStore(data / "experience.db")
        self.closing.callback(self.store.close)  # after the drain (Daemon.shutdown)
        self.registry = PolicyRegistry(data / "policies", max_bytes=self.config.max_policy_bytes,
                                       edge_shape=(self.config.edge_top_p,
                                                   self.config.edge_embed_dim))
        await self.grpc.set_part(STORE, True)
        servicer = TrainerServicer(self.store, self.registry, self.config.max_batch_records,
                                   self.grpc.set_part)
        self.grpc.add(trainer_pb2_grpc.add_TrainerServiceServicer_to_server, servicer,
                      "velo.v1.TrainerService")
        self.metrics.read(self._readings)
        latest = self.registry.latest()
        self.log.info("opened", data_dir=str(data), experience=self.store.count(),
                      latest_policy=latest.version if latest else 0)
        if self.config.learner.enabled:
            self.learner = OnlineLearner(self.config.learner, self.store, self.registry)
            self.spawn(self.learner.run())
        if self.config.mqtt.enabled:  # MQTT announcements of each new version
            self.broadcaster = PolicyBroadcaster(self.config.mqtt, self.registry)
            self.spawn(self.broadcaster.run())
        await super().startup()

    def _readings(self) -> list[Reading]:
        assert self.store is not None and self.registry is not None  # startup set both first
        latest = self.registry.latest()
        return [Reading("velo_trainer_experience_records", "Experience records stored (all "
                        "edges)", self.store.count()),
                Reading("velo_trainer_policy_version", "Latest published policy version (0: "
                        "none yet)", latest.version if latest else 0)]

    async def shutdown(self) -> None:
        await self.stop_tasks()  # the learner and the broadcaster
        # End the watch streams first: they never finish on their own and would otherwise
        # hold the drain below for the whole grace period.
        if self.registry is not None:
            await self.registry.close()
        await super().shutdown()
