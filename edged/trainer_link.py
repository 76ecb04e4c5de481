"""edged's two conversations with trainerd, each a background task that never gives up:

- `ExperienceUploader` drains the on-disk spool into the ReportExperience client stream;
  records are deleted only after trainerd acknowledged them (it deduplicates resends).
- `PolicyFollower` follows WatchPolicies (the latest version at once, then each new one);
  each new version is fetched, verified (size, sha256, loads, probe state) and swapped in
  atomically. The last verified policy is kept on disk so a restarted edge runs it even
  while trainerd is down. A policy that fails verification is refused once and counted; the
  edge keeps the last good one. With MQTT on, edged.announcements also hands it each
  announced version (follow_announcement), fetched and checked the same way.

Both report the edge's `trainer` part (not required: the edge serves without trainerd).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypedDict

import grpc

from edged.spool import Spool
from velo.core.policy import OnnxPolicy, Policy, PolicyRejected
from velo.runtime.fleet import Announcement
from velo.runtime.logs import get_logger
from velo.runtime.serving import PartReport
from velo.v1 import trainer_pb2, trainer_pb2_grpc

log = get_logger("edged.trainer")
MAX_BACKOFF_S = 10.0
FALLBACK_VERSIONS = 8  # older versions tried when the latest is refused
TRAINER = "trainer"


class _PolicyArgs(TypedDict):
    """OnnxPolicy's keyword arguments that come from the edge's config."""

    top_p: int
    embed_dim: int
    sample: bool
    seed: int


async def _no_report(part: str, ok: bool, reason: str) -> None:
    return None


class ExperienceUploader:
    def __init__(self, channel: grpc.aio.Channel | None, spool: Spool, batch: int,
                 report: PartReport = _no_report, timeout_s: float = 30.0) -> None:
        self.stub = (trainer_pb2_grpc.TrainerServiceStub(channel)
                     if channel else None)
        self.spool, self.batch, self.report = spool, batch, report
        self.timeout_s = timeout_s  # deadline of one upload stream
        self.sent = 0
        self.rejected = 0  # records trainerd refused as invalid (dropped, logged)
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        backoff = 0.5
        while self.stub is not None:
            try:
                pending = await asyncio.to_thread(self.spool.pending, self.batch)
                if not pending:
                    self._wake.clear()
                    # asyncio.timeout, not wait_for: 3.11's wait_for loses a cancel that
                    # comes as the event is set, and this loop would then never stop.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(1.0):
                            await self._wake.wait()
                    continue
                await self._upload(pending)
                await self.report(TRAINER, True, "")
                backoff = 0.5
            except grpc.aio.AioRpcError as exc:
                reason = f"trainerd refused or unreachable: {exc.code().name}: {exc.details()}"
                await self.report(TRAINER, False, reason)
                log.warning("experience stays spooled", code=exc.code().name,
                            detail=exc.details(), retry_in_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
            except Exception as exc:  # the spool's disk (full, failing): keep trying
                log.error("experience upload failed; will retry", error=repr(exc))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def _upload(self, pending: list[tuple[int, bytes]]) -> None:
        assert self.stub is not None  # only run() uploads, and only while it has a stub
        records = [trainer_pb2.Experience.FromString(body) for _, body in pending]
        try:
            ack = await self.stub.ReportExperience(iter(records), timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            # A record trainerd refuses would block the spool forever: resend one by one
            # (stored records are deduplicated) and drop only the refused ones.
            for record in records:
                try:
                    await self.stub.ReportExperience(iter([record]), timeout=self.timeout_s)
                except grpc.aio.AioRpcError as one:
                    if one.code() != grpc.StatusCode.INVALID_ARGUMENT:
                        raise
                    self.rejected += 1
                    log.error("trainerd refused an experience record; dropped",
                              seq=record.seq, detail=one.details())
            ack = None
        await asyncio.to_thread(self.spool.ack, [seq for seq, _ in pending])
        self.sent += len(records)
        if ack is not None:
            log.debug("experience uploaded", stored=ack.stored, duplicates=ack.duplicates)
            if ack.conflicts:
                log.error("trainerd holds other records under some of this edge's sequence "
                          "numbers (kept aside there)", conflicts=ack.conflicts)


class PolicyFollower:
    def __init__(self, channel: grpc.aio.Channel | None, baseline: Policy, store_dir: Path, *,
                 top_p: int, embed_dim: int, sample: bool, seed: int, max_bytes: int,
                 report: PartReport = _no_report, has_verifier: bool = False,
                 fills_load: Callable[[], bool] = lambda: False,
                 timeout_s: float = 60.0) -> None:
        self.stub = (trainer_pb2_grpc.TrainerServiceStub(channel)
                     if channel else None)
        self.timeout_s = timeout_s  # deadline of one policy download
        self.current: Policy = baseline
        self.store_dir = store_dir
        self.max_bytes, self.report = max_bytes, report
        self.has_verifier = has_verifier  # a "verified"-state policy needs [reuse] verifier
        self.fills_load = fills_load  # a load-aware policy needs a cloud reporting its load
        self._args: _PolicyArgs = {"top_p": top_p, "embed_dim": embed_dim, "sample": sample,
                                   "seed": seed}
        self.rejected: dict[int, str] = {}  # version -> why; never fetched again
        self.swapped = asyncio.Event()  # set after every successful swap (tests wait on it)
        # The watch stream and MQTT announcements (edged.announcements) may both ask for the
        # same version at once: one fetch at a time, and the second finds it running already.
        self._fetching = asyncio.Lock()

    def load_saved(self) -> None:
        """Start from the last verified policy on disk, if any."""
        meta_path = self.store_dir / "current.json"
        if not meta_path.exists():
            return
        try:
            meta = json.loads(meta_path.read_text())
            body = (self.store_dir / "current.onnx").read_bytes()
            self._swap(self._verify(body, meta["version"], meta["name"], meta["sha256"]))
        except (PolicyRejected, OSError, ValueError, KeyError) as exc:
            log.error("saved policy no longer verifies; running the baseline", error=str(exc))

    async def run(self) -> None:
        backoff = 0.5
        while self.stub is not None:
            try:
                # The watch announces the latest version at once, then each new one.
                async for info in self.stub.WatchPolicies(
                    trainer_pb2.WatchPoliciesRequest(after_version=self.current.version)
                ):
                    await self.report(TRAINER, True, "")
                    await self._adopt_newest_good(info.version)
                    backoff = 0.5
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    await self.report(TRAINER, False, f"policy watch: {exc.code().name}: "
                                                      f"{exc.details()}")
                    log.warning("policy watch interrupted", code=exc.code().name,
                                detail=exc.details(), retry_in_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def _adopt_newest_good(self, latest: int) -> None:
        """Run the newest version that verifies, from `latest` down to the one running now: an
        edge that refuses the latest (corrupted, too large) still gets the last good one, even
        if it never saw it announced (the watch only announces the latest)."""
        for version in range(latest, max(self.current.version, latest - FALLBACK_VERSIONS), -1):
            if await self._fetch(version):
                return

    async def follow_announcement(self, announced: Announcement) -> bool:
        """An MQTT announcement named a version: pull it over gRPC at once and run it if its
        sha256 and size are the announced ones (the announcement itself never carries weights).
        True when that version (or a newer one) runs now."""
        return await self._fetch(announced.version, announced)

    async def _fetch(self, version: int, announced: Announcement | None = None) -> bool:
        """Fetch, verify and swap to `version`; False when it is refused (or was before), or
        does not match what `announced` says."""
        async with self._fetching:
            if version <= self.current.version:
                return True  # already running (the other path got there first)
            return await self._fetch_locked(version, announced)

    async def _fetch_locked(self, version: int, announced: Announcement | None) -> bool:
        if version in self.rejected:
            return False
        # run() fetches only with a stub; announcements are followed only with a trainer
        # channel (edged.server), which gives one.
        assert self.stub is not None
        try:
            policy = await self.stub.GetPolicy(trainer_pb2.GetPolicyRequest(version=version),
                                               timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                # Larger than this edge's channel accepts (policy.max_bytes).
                self._reject(version, f"larger than policy.max_bytes ({self.max_bytes})")
                return False
            if exc.code() == grpc.StatusCode.DATA_LOSS:
                self._reject(version, f"trainerd's copy is corrupted: {exc.details()}")
                return False
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return False  # never published, or gone: nothing to run
            raise
        info = policy.info
        if info.version <= self.current.version:
            return True  # nothing newer to run
        if announced is not None and (info.sha256, info.size_bytes, len(policy.onnx)) != (
                announced.sha256, announced.size_bytes, announced.size_bytes):
            # Not recorded as rejected: the policy may be fine and the announcement forged or
            # stale; the watch stream still delivers this version if it is good.
            log.error("policy does not match its MQTT announcement; ignored", version=version,
                      announced_sha256=announced.sha256[:12], sha256=info.sha256[:12],
                      announced_size=announced.size_bytes, size=len(policy.onnx))
            return False
        try:
            # Loading and probing a policy is real work: off the event loop.
            verified = await asyncio.to_thread(self._verify, policy.onnx, info.version,
                                               info.name, info.sha256)
        except PolicyRejected as exc:
            self._reject(info.version, str(exc))
            return False
        await asyncio.to_thread(self._save, policy.onnx, {
            "version": info.version, "name": info.name, "sha256": info.sha256})
        self._swap(verified)
        return True

    def _reject(self, version: int, why: str) -> None:
        self.rejected[version] = why
        log.error("policy rejected; keeping the current one", version=version,
                  current=self.current.name, error=why)

    def _verify(self, body: bytes, version: int, name: str, sha256: str) -> OnnxPolicy:
        """Everything an edge checks before it runs a policy: size, sha256, loads, probes."""
        if len(body) > self.max_bytes:
            raise PolicyRejected(f"policy v{version} is {len(body)} bytes; this edge accepts "
                                 f"at most {self.max_bytes} (policy.max_bytes)")
        if hashlib.sha256(body).hexdigest() != sha256:
            raise PolicyRejected(f"policy v{version}: sha256 mismatch (corrupted in transit?)")
        policy = OnnxPolicy(body, version, name, **self._args)
        if policy.state == "verified" and not self.has_verifier:
            raise PolicyRejected(f"policy v{version} was trained on the verified state; this "
                                 "edge has no verifier ([reuse] verifier)")
        if policy.load_features and not self.fills_load():
            raise PolicyRejected(f"policy v{version} reads the cloud's load "
                                 f"({','.join(policy.load_features)}); this edge has no cloud "
                                 "that reports it (edged `cloud` empty, or a cloudd without "
                                 "load reports)")
        return policy

    def _swap(self, policy: OnnxPolicy) -> None:
        self.current = policy  # one reference assignment: requests see old or new, never half
        self.swapped.set()
        log.info("policy swapped", policy=policy.name, sha256=policy.sha256[:12])

    def _save(self, body: bytes, meta: dict[str, int | str]) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        for name, data in (("current.onnx", body), ("current.json", json.dumps(meta).encode())):
            tmp = self.store_dir / (name + ".tmp")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.store_dir / name)
