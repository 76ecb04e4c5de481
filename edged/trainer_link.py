"""edged's two conversations with trainerd, each a background task that never gives up:

- `ExperienceUploader` drains the on-disk spool into the ReportExperience client stream;
  records are deleted only after trainerd acknowledged them (it deduplicates resends).
- `PolicyFollower` pulls the latest policy at start, then follows WatchPolicies; each new
  version is fetched, verified (sha256, loads, probe state) and swapped in atomically. The last
  verified policy is kept on disk so a restarted edge runs it even while trainerd is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
from pathlib import Path

import grpc

from edged.spool import Spool
from velo.logs import get_logger
from velo.policy import OnnxPolicy, Policy, PolicyRejected
from velo.v1 import trainer_pb2, trainer_pb2_grpc

log = get_logger("edged.trainer")
MAX_BACKOFF_S = 10.0


class ExperienceUploader:
    def __init__(self, channel: grpc.aio.Channel | None, spool: Spool, batch: int) -> None:
        self.stub = trainer_pb2_grpc.TrainerServiceStub(channel) if channel else None
        self.spool, self.batch = spool, batch
        self.sent = 0
        self.rejected = 0  # records trainerd refused as invalid (dropped, logged)
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        backoff = 0.5
        while self.stub is not None:
            pending = await asyncio.to_thread(self.spool.pending, self.batch)
            if not pending:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=1.0)
                continue
            try:
                await self._upload(pending)
                backoff = 0.5
            except grpc.aio.AioRpcError as exc:
                log.warning("trainerd unreachable; experience stays spooled",
                            code=exc.code().name, detail=exc.details(), pending=len(pending),
                            retry_in_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def _upload(self, pending: list[tuple[int, bytes]]) -> None:
        records = [trainer_pb2.Experience.FromString(body) for _, body in pending]
        try:
            ack = await self.stub.ReportExperience(iter(records), timeout=30)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            # A record trainerd refuses would block the spool forever: resend one by one
            # (stored records are deduplicated) and drop only the refused ones.
            for record in records:
                try:
                    await self.stub.ReportExperience(iter([record]), timeout=30)
                except grpc.aio.AioRpcError as one:
                    if one.code() != grpc.StatusCode.INVALID_ARGUMENT:
                        raise
                    self.rejected += 1
                    log.error("trainerd refused an experience record; dropped",
                              seq=record.seq, detail=one.details())
            ack = None
        await asyncio.to_thread(self.spool.ack, pending[-1][0])
        self.sent += len(records)
        if ack is not None:
            log.debug("experience uploaded", stored=ack.stored, duplicates=ack.duplicates)


class PolicyFollower:
    def __init__(self, channel: grpc.aio.Channel | None, baseline: Policy, store_dir: Path, *,
                 top_p: int, embed_dim: int, sample: bool, seed: int) -> None:
        self.stub = trainer_pb2_grpc.TrainerServiceStub(channel) if channel else None
        self.current: Policy = baseline
        self.store_dir = store_dir
        self._args = {"top_p": top_p, "embed_dim": embed_dim, "sample": sample, "seed": seed}
        self.swapped = asyncio.Event()  # set after every successful swap (tests wait on it)

    def load_saved(self) -> None:
        """Start from the last verified policy on disk, if any."""
        meta_path = self.store_dir / "current.json"
        if not meta_path.exists():
            return
        meta = json.loads(meta_path.read_text())
        body = (self.store_dir / "current.onnx").read_bytes()
        try:
            self._install(body, meta["version"], meta["name"], meta["sha256"], save=False)
        except PolicyRejected as exc:
            log.error("saved policy no longer verifies; running the baseline", error=str(exc))

    async def run(self) -> None:
        backoff = 0.5
        while self.stub is not None:
            try:
                await self._fetch(0)
                async for info in self.stub.WatchPolicies(
                    trainer_pb2.WatchPoliciesRequest(after_version=self.current.version)
                ):
                    if info.version > self.current.version:
                        await self._fetch(info.version)
                    backoff = 0.5
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    log.warning("policy watch interrupted", code=exc.code().name,
                                detail=exc.details(), retry_in_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def _fetch(self, version: int) -> None:
        try:
            policy = await self.stub.GetPolicy(trainer_pb2.GetPolicyRequest(version=version),
                                               timeout=60)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND and version == 0:
                return  # no learned policy yet: keep the baseline
            raise
        if policy.info.version <= self.current.version:
            return
        try:
            await asyncio.to_thread(self._install, policy.onnx, policy.info.version,
                                    policy.info.name, policy.info.sha256)
        except PolicyRejected as exc:
            log.error("policy rejected; keeping the current one", version=policy.info.version,
                      current=self.current.name, error=str(exc))

    def _install(self, body: bytes, version: int, name: str, sha256: str,
                 save: bool = True) -> None:
        if hashlib.sha256(body).hexdigest() != sha256:
            raise PolicyRejected(f"policy v{version}: sha256 mismatch (corrupted in transit?)")
        policy = OnnxPolicy(body, version, name, **self._args)  # loads and probes
        if save:
            self._save(body, {"version": version, "name": name, "sha256": sha256})
        self.current = policy  # one reference assignment: requests see old or new, never half
        self.swapped.set()
        log.info("policy swapped", policy=policy.name, sha256=sha256[:12])

    def _save(self, body: bytes, meta: dict) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        for name, data in (("current.onnx", body), ("current.json", json.dumps(meta).encode())):
            tmp = self.store_dir / (name + ".tmp")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.store_dir / name)
