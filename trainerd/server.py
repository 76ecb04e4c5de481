"""trainerd: collects experience from every edge and serves versioned ONNX policies.

    ReportExperience  client stream of Experience -> stored once per (edge_id, seq)
    GetPolicy         one version's ONNX bytes (0: the latest)
    WatchPolicies     server stream: the latest version at once, then each new one
    PublishPolicy     check a policy against the contract and store it as the next version

The learner (Algorithm 1) is not here yet; it will read the ExperienceStore and publish
through the PolicyRegistry.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from trainerd.config import MiB, TrainerConfig
from trainerd.learner import OnlineLearner
from trainerd.registry import (
    PolicyInfo,
    PolicyNotFound,
    PolicyRegistry,
    PolicyRejected,
    PolicyTooLarge,
)
from trainerd.store import ExperienceStore
from velo.logs import get_logger
from velo.serving import Daemon
from velo.v1 import trainer_pb2, trainer_pb2_grpc

log = get_logger("trainerd")

MAX_EDGE_ID_CHARS = 128
MAX_TOP_P = 64  # edged accepts top_p up to 64 too
MAX_EMBED_DIM = 8192
MAX_SEQ = 2**63 - 1  # SQLite integers are signed 64-bit

R = TypeVar("R")


def _never_unknown(
    method: Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[R]],
) -> Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[R]]:
    """Turn an unexpected exception into INTERNAL (logged with its traceback) rather than
    grpc's UNKNOWN, which would leak the exception text to the client."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> R:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise  # a deliberate abort(): its status is already set
        except Exception:
            log.exception("rpc failed", method=method.__name__)
            await context.abort(
                grpc.StatusCode.INTERNAL, f"trainerd: internal error in {method.__name__}"
            )
            raise  # not reached: abort() raises

    return wrapper


def validate_experience(record: trainer_pb2.Experience) -> str | None:
    """What is wrong with `record` (a message naming the field), or None when it is valid."""
    if not record.edge_id or len(record.edge_id) > MAX_EDGE_ID_CHARS:
        return f"edge_id must be 1-{MAX_EDGE_ID_CHARS} characters"
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
    if len(record.action_probs) not in (0, 3):
        return f"action_probs has {len(record.action_probs)} values; must be 3 (or none)"
    return None


def _info_proto(info: PolicyInfo) -> trainer_pb2.PolicyInfo:
    return trainer_pb2.PolicyInfo(
        version=info.version,
        sha256=info.sha256,
        name=info.name,
        created_unix=info.created_unix,
        size_bytes=info.size_bytes,
    )


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, store: ExperienceStore, registry: PolicyRegistry, max_batch_records: int):
        self.store = store
        self.registry = registry
        self.max_batch_records = max_batch_records

    @_never_unknown
    async def ReportExperience(
        self,
        request_iterator: AsyncIterator[trainer_pb2.Experience],
        context: grpc.aio.ServicerContext,
    ) -> trainer_pb2.ExperienceAck:
        stored = duplicates = received = 0
        batch: list[trainer_pb2.Experience] = []

        async def flush() -> None:
            nonlocal stored, duplicates
            if batch:
                # SQLite commits (with fsync) block: run them in a worker thread.
                new, dup = await asyncio.to_thread(self.store.add, list(batch))
                stored, duplicates = stored + new, duplicates + dup
                batch.clear()

        async for record in request_iterator:
            received += 1
            problem = validate_experience(record)
            if problem is not None:
                # Keep the valid records before it: storing is idempotent, so the edge may
                # resend them all once it has dropped or fixed the bad one.
                await flush()
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"record #{received} (edge_id={record.edge_id[:MAX_EDGE_ID_CHARS]!r}, "
                    f"seq={record.seq}): {problem}; the {received - 1} records before it "
                    f"were stored",
                )
            batch.append(record)
            if len(batch) >= self.max_batch_records:
                await flush()
        await flush()
        log.info("experience received", records=received, stored=stored, duplicates=duplicates,
                 peer=context.peer())
        return trainer_pb2.ExperienceAck(stored=stored, duplicates=duplicates)

    @_never_unknown
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
        return trainer_pb2.Policy(info=_info_proto(info), onnx=data)

    @_never_unknown
    async def WatchPolicies(
        self, request: trainer_pb2.WatchPoliciesRequest, context: grpc.aio.ServicerContext
    ) -> None:
        # Written with context.write() rather than as an async generator so that
        # _never_unknown applies here as to the other methods.
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

    @_never_unknown
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
                         max_message_bytes=config.max_policy_bytes + MiB)
        self.config = config
        self.store: ExperienceStore | None = None
        self.registry: PolicyRegistry | None = None
        self.learner_task: asyncio.Task | None = None

    async def startup(self) -> None:
        data = self.config.data_path
        self.store = ExperienceStore(data / "experience.db")
        self.registry = PolicyRegistry(data / "policies", max_bytes=self.config.max_policy_bytes)
        servicer = TrainerServicer(self.store, self.registry, self.config.max_batch_records)
        self.grpc.add(trainer_pb2_grpc.add_TrainerServiceServicer_to_server, servicer,
                      "velo.v1.TrainerService")
        latest = self.registry.latest()
        self.log.info("opened", data_dir=str(data), experience=self.store.count(),
                      latest_policy=latest.version if latest else 0)
        self.learner_task = None
        if self.config.learner.enabled:
            self.learner = OnlineLearner(self.config.learner, self.store, self.registry)
            self.learner_task = asyncio.create_task(self.learner.run())
        await super().startup()

    async def shutdown(self) -> None:
        if self.learner_task is not None:
            self.learner_task.cancel()
            await asyncio.gather(self.learner_task, return_exceptions=True)
        # End the watch streams first: they never finish on their own and would otherwise
        # hold the drain below for the whole grace period.
        if self.registry is not None:
            await self.registry.close()
        await super().shutdown()
        if self.store is not None:
            self.store.close()
