"""The fault suite: a real VELO stack on loopback, one fault at a time, and a count of what was
lost.

    python tools/chaos.py                  # every fault (about 6 minutes on 2 cores)
    python tools/chaos.py --quick          # the fast subset CI runs (tests/test_chaos.py)
    python tools/chaos.py --faults trainerd-sigkill,edged-sigkill --out var/chaos

The stack is the one `velo up` runs (embedded Milvus, trainerd, cloudd with SmolLM2 under
llama.cpp as its supervised local LLM, two edges), plus a probe edge with no cloud for the
fuzz and isolation runs. For each fault a workload runs through the edges while the fault
happens; then the stack is brought back (daemons restarted as `velo up` restarts them) and the
tool waits until every edge has uploaded its experience. It prints one row per fault:

- requests sent, and acknowledged answers (the client got an answer);
- experience: records produced (one per acknowledged answer, matched by request_id),
  received by trainerd, lost (acknowledged but never received), duplicated (stored twice);
- cache rows of the edges before and after (Strong reads of their Milvus collections);
- crashes: daemons that died without being killed by the fault, and UNKNOWN/INTERNAL replies;
- the slowest request, against the deadline a frozen dependency is bounded by (edges run with
  vector_db.timeout_s = 5, cloud_timeout_s = 10 and trainer_timeout_s = 5 here);
- after every fault, the edges' Milvus rows against their texts stores: a row whose texts are
  gone can never be served (an edge SIGKILLed between the two writes must not leave one).

Then, on a probe edge with no cloud and an HTTP front: mutated gRPC and HTTP requests (no
UNKNOWN/INTERNAL, no 5xx but the deliberate 503 of a cloud that is down), cross-tenant probes
over gRPC and HTTP with and without earlier turns, and slow clients (half-open connections).

It exits 1 when anything was lost, duplicated, served across tenants, crashed, answered 5xx
or outlived its deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from pymilvus import MilvusClient

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from fuzz import fuzz_edge, fuzz_http, isolation_probes  # noqa: E402

from trainerd.export import export_mlp_policy  # noqa: E402
from velo.core.models import embedder_dir  # noqa: E402
from velo.core.records import load_qa  # noqa: E402
from velo.edge.cache import VectorCache, VectorDBConfig  # noqa: E402
from velo.edge.embedder import Embedder  # noqa: E402
from velo.edge.texts import store_path  # noqa: E402
from velo.ops.ports import free_port  # noqa: E402
from velo.ops.stack import Stack, StackConfig  # noqa: E402
from velo.runtime.logs import configure_logging  # noqa: E402
from velo.v1 import (  # noqa: E402
    cloud_pb2,
    cloud_pb2_grpc,
    edge_pb2,
    edge_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)

TENANT = "chaos"
DATA = ROOT.parent / "shared" / "data" / "oasst1_dev.jsonl"
SERVER_ERRORS = {"UNKNOWN", "INTERNAL"}
# Deadlines the stack's edges run with here (VELO_EDGED__...), short enough to see them bound a
# freeze of FREEZE_S; a request is allowed DEADLINE_SLACK_S on top (embedding, queueing).
DEADLINES = {"VECTOR_DB__TIMEOUT_S": 5.0, "CLOUD_TIMEOUT_S": 10.0, "TRAINER_TIMEOUT_S": 5.0}
FREEZE_S = 20.0
DEADLINE_SLACK_S = 4.0


@dataclass
class Row:
    fault: str
    requests: int = 0
    acknowledged: int = 0
    produced: int = 0
    received: int = 0
    lost: int = 0
    duplicated: int = 0
    rows_before: int = 0
    rows_after: int = 0
    crashes: int = 0
    server_errors: int = 0
    codes: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)
    note: str = ""
    seconds: float = 0.0
    slowest_s: float = 0.0  # the slowest request of the workload, answered or failed
    bound_s: float = 0.0  # ... which must end within this (0: no bound checked)
    orphan_rows: int = 0  # Milvus rows whose texts are gone afterwards
    # Set by a fault whose experience cannot reach trainerd by design (it counts for itself).
    own_accounting: bool = False
    # Set by a fault that removes cache rows by design (a damaged texts store's rows go).
    rows_may_shrink: bool = False

    @property
    def failed(self) -> bool:
        late = bool(self.bound_s) and self.slowest_s > self.bound_s
        return bool(self.lost or self.duplicated or self.crashes or self.server_errors
                    or self.orphan_rows or late)


class Load:
    """Requests through the edges, `concurrency` at a time, each with its own request_id;
    remembers which were acknowledged and the status of every failure."""

    def __init__(self, chaos: Chaos, fault: str) -> None:
        self.chaos, self.fault = chaos, fault
        self.sent = 0
        self.acked: list[str] = []
        self.codes: Counter[str] = Counter()
        self.examples: dict[str, str] = {}  # status -> the first error message with it
        self.forwarded = 0  # acknowledged B answers: each cached one QA pair (two rows)
        self.slowest_s = 0.0

    async def run(self, seconds: float, concurrency: int = 4, new_share: float = 0.3,
                  stream: bool = False, edges: list[str] | None = None,
                  pool: list[str] | None = None) -> None:
        """Send for `seconds`: repeats of questions the edge has answered (hits) and a
        `new_share` of questions not asked before (misses: the cloud LLM answers and the pair
        is cached); or only questions from `pool`."""
        edges = edges or self.chaos.stack.edge_addresses
        deadline = time.monotonic() + seconds * self.chaos.pace

        async def client(worker: int) -> None:
            while time.monotonic() < deadline:
                await self.one(edges[(self.sent + worker) % len(edges)], new_share, stream,
                               pool)

        await asyncio.gather(*(client(i) for i in range(concurrency)))

    async def one(self, address: str, new_share: float, stream: bool = False,
                  pool: list[str] | None = None) -> None:
        chaos = self.chaos
        self.sent += 1
        request_id = f"{self.fault}-{self.sent}-{chaos.run_id}"
        text = chaos.question(address, new_share, pool)
        request = edge_pb2.AskRequest(prompt=text, tenant=TENANT, request_id=request_id,
                                      max_tokens=24)
        stub = edge_pb2_grpc.EdgeServiceStub(chaos.channel(address))
        started = time.monotonic()
        try:
            if stream:
                done = None
                async for chunk in stub.AskStream(request, timeout=60):
                    if chunk.HasField("done"):
                        done = chunk.done
                if done is None:
                    raise RuntimeError("a stream ended without its summary")
            else:
                done = await stub.Ask(request, timeout=60)
        except grpc.aio.AioRpcError as exc:
            self.slowest_s = max(self.slowest_s, time.monotonic() - started)
            self.codes[exc.code().name] += 1
            self.examples.setdefault(exc.code().name, exc.details() or "")
            await asyncio.sleep(0.05)  # a failing edge is not hammered in a tight loop
            return
        self.slowest_s = max(self.slowest_s, time.monotonic() - started)
        self.codes["OK"] += 1
        self.acked.append(request_id)
        self.forwarded += done.action == edge_pb2.ACTION_FORWARD
        if pool is None:
            chaos.answered[address].append(text)


class Chaos:
    def __init__(self, stack: Stack, items: list, out: Path, pace: float = 1.0) -> None:
        """`pace`: how long each workload runs, as a share of its full length (--quick)."""
        self.stack, self.out, self.pace = stack, out, pace
        self.run_id = hex(int(time.time()))[2:]
        self.rng = random.Random(7)
        self.fresh = itertools.cycle([item.question for item in items])
        self.answered: dict[str, list[str]] = defaultdict(list)  # edge -> its cached questions
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.milvus = MilvusClient(uri=stack.milvus_uri, token=stack.milvus_token)
        self.probe_http = ""  # the probe edge's HTTP front, host:port (probe_edge)

    # -- plumbing ---------------------------------------------------------------------------
    def channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address)
        return self._channels[address]

    def question(self, address: str, new_share: float, pool: list[str] | None) -> str:
        """A question `address` has answered before (a hit), or a new one (a miss)."""
        known = pool or self.answered[address]
        if known and self.rng.random() >= new_share:
            return self.rng.choice(known)
        return next(self.fresh)

    def rows(self) -> int:
        total = 0
        for name in self.stack.daemons:
            if not name.startswith("edge-"):
                continue
            collection = "velo_" + name.replace("-", "_")
            if self.milvus.has_collection(collection):
                (res,) = self.milvus.query(collection, filter="id >= 0",
                                           output_fields=["count(*)"],
                                           consistency_level="Strong")
                total += int(res["count(*)"])
        return total

    def orphan_rows(self) -> int:
        """Rows of the stack's edges whose pair has no texts in the edge's texts store."""
        orphans = 0
        for name in self.stack.daemons:
            if not name.startswith("edge-"):
                continue
            collection = "velo_" + name.replace("-", "_")
            path = store_path(self.stack.cfg.data_dir.resolve() / name, collection)
            if not self.milvus.has_collection(collection) or not path.exists():
                continue
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
                kept = {p for (p,) in conn.execute("SELECT pair_id FROM texts")}
            iterator = self.milvus.query_iterator(collection, batch_size=4096, filter="id >= 0",
                                                  output_fields=["id"],
                                                  consistency_level="Strong")
            try:
                while batch := iterator.next():
                    orphans += sum(1 for r in batch if int(r["id"]) // 2 not in kept)
            finally:
                iterator.close()
        return orphans

    def received(self) -> Counter[str]:
        """request_id -> records trainerd holds (read from its store on disk)."""
        db = self.stack.cfg.data_dir.resolve() / "trainerd" / "experience.db"
        counts: Counter[str] = Counter()
        if not db.exists():
            return counts
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            for (blob,) in conn.execute("SELECT record FROM experience"):
                counts[trainer_pb2.Experience.FromString(blob).request_id] += 1
        return counts

    async def recover(self, timeout_s: float = 120.0) -> None:
        """Restart what is down (as `velo up` does) until every daemon serves."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.stack.supervise()
            report = await asyncio.to_thread(self.stack.diagnose)
            if all(state.startswith("serving") for state in report.values()):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the stack did not recover: {report}")
            await asyncio.sleep(0.5)

    async def drained(self, timeout_s: float = 60.0) -> None:
        """Wait until the stack's edges have no experience left to upload."""
        deadline = time.monotonic() + timeout_s
        while True:
            pending = 0
            for address in self.stack.edge_addresses:
                stub = edge_pb2_grpc.EdgeServiceStub(self.channel(address))
                # wait_for_ready: the channel to an edge that was just restarted may still be
                # in its reconnect backoff, where a plain call fails at once (seen in CI).
                stats = await stub.GetStats(edge_pb2.GetStatsRequest(), timeout=10,
                                            wait_for_ready=True)
                pending += stats.experience_pending
            if pending == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{pending} experience records still spooled")
            await asyncio.sleep(0.5)

    def restarts(self) -> int:
        return sum(d.restarts for d in self.stack.daemons.values())

    def kill(self, name: str, sig: signal.Signals) -> None:
        self.stack.daemons[name].proc.send_signal(sig)

    def llm_pid(self) -> int:
        """The llama.cpp server that cloudd runs."""
        cloudd = self.stack.daemons["cloudd"].proc.pid
        out = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,args="], capture_output=True,
                             text=True).stdout
        for line in out.splitlines():
            pid, ppid, args = line.split(None, 2)
            if int(ppid) == cloudd and "cloudd.llm_server" in args:
                return int(pid)
        raise RuntimeError("cloudd runs no LLM server")

    async def llm_restarts(self) -> int:
        stub = cloud_pb2_grpc.CloudServiceStub(self.channel(self.stack.addresses["cloudd"]))
        return (await stub.GetCloudStats(cloud_pb2.CloudStatsRequest(), timeout=10)).llm_restarts

    async def measure(self, fault: str, action: Callable[[Chaos, Load, Row], Awaitable[None]],
                      expect_killed: tuple[str, ...] = ()) -> Row:
        """Run one fault: its workload and injection (`action`, which writes its note), then
        recovery and the count."""
        row = Row(fault)
        started = time.monotonic()
        await self.recover()
        row.rows_before = self.rows()
        restarts, llm_before = self.restarts(), await self.llm_restarts()
        load = Load(self, fault)
        await action(self, load, row)
        await self.recover()
        # Every restart the fault did not cause is a daemon that died by itself; so is an LLM
        # server cloudd had to restart when no fault killed it.
        row.crashes += max(0, self.restarts() - restarts - len(expect_killed))
        llm_deaths = await self.llm_restarts() - llm_before
        row.crashes += max(0, llm_deaths - (fault in LLM_KILLED))
        await self.drained()
        row.requests, row.acknowledged = load.sent, len(load.acked)
        row.codes, row.examples = dict(load.codes), dict(load.examples)
        row.server_errors = sum(n for code, n in load.codes.items() if code in SERVER_ERRORS)
        if not row.own_accounting:
            mine = {rid: n for rid, n in self.received().items() if rid.startswith(f"{fault}-")}
            row.produced = len(load.acked)
            row.received = sum(1 for rid in load.acked if mine.get(rid))
            row.lost = row.produced - row.received
            row.duplicated = sum(n - 1 for n in mine.values() if n > 1)
        row.rows_after = self.rows()
        row.orphan_rows = self.orphan_rows()
        row.slowest_s = round(load.slowest_s, 2)
        if row.orphan_rows:
            row.note += f"; {row.orphan_rows} ROWS WITHOUT TEXTS"
        if row.bound_s and row.slowest_s > row.bound_s:
            row.note += f"; SLOWEST {row.slowest_s} s > bound {row.bound_s} s"
        if row.rows_may_shrink:
            pass
        elif row.rows_after < row.rows_before + 2 * load.forwarded:  # no eviction during runs
            row.note += (f"; CACHE ROWS LOST: {row.rows_after} < {row.rows_before} + 2 x "
                         f"{load.forwarded} forwarded answers")
            row.crashes += 1
        row.seconds = round(time.monotonic() - started, 1)
        return row

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self.milvus.close()


# -- the faults ------------------------------------------------------------------------------
# Each runs its workload while it injects its fault, and writes a note on the row.
async def baseline(chaos: Chaos, load: Load, row: Row) -> None:
    await load.run(seconds=8, new_share=0.5)
    row.note = "no fault"


async def llm_crash(chaos: Chaos, load: Load, row: Row) -> None:
    streams = asyncio.ensure_future(load.run(seconds=14, new_share=1.0, stream=True))
    await asyncio.sleep(3)
    os.kill(chaos.llm_pid(), signal.SIGKILL)
    await streams
    row.note = "llama.cpp server SIGKILLed while answers streamed; cloudd restarted it"


async def cloudd_killed(chaos: Chaos, load: Load, row: Row) -> None:
    work = asyncio.ensure_future(load.run(seconds=12, new_share=0.4))
    await asyncio.sleep(3)
    chaos.kill("cloudd", signal.SIGKILL)
    await asyncio.sleep(2)
    await chaos.recover()
    await work
    row.note = "cloudd SIGKILLed under load, restarted; reuses served meanwhile"


def trainerd_down(sig: signal.Signals) -> Callable[[Chaos, Load, Row], Awaitable[None]]:
    async def fault(chaos: Chaos, load: Load, row: Row) -> None:
        work = asyncio.ensure_future(load.run(seconds=12, new_share=0.3))
        await asyncio.sleep(2)
        chaos.kill("trainerd", sig)
        await asyncio.sleep(6)  # trainerd stays down: experience waits in the spools
        await chaos.recover()
        await work
        row.note = f"trainerd {sig.name} under load, down ~6 s"
    return fault


async def edged_killed(chaos: Chaos, load: Load, row: Row) -> None:
    work = asyncio.ensure_future(load.run(seconds=12, concurrency=8, new_share=0.2))
    await asyncio.sleep(4)
    chaos.kill("edge-1", signal.SIGKILL)
    await asyncio.sleep(1)
    await chaos.recover()
    await work
    row.note = "edge-1 SIGKILLed under load (8 clients), restarted on its cache and spool"


async def milvus_stopped(chaos: Chaos, load: Load, row: Row) -> None:
    milvus = chaos.stack.milvus
    if milvus is None:
        row.note = "skipped: the stack uses an external Milvus (--milvus-uri)"
        return
    work = asyncio.ensure_future(load.run(seconds=16, new_share=0.2))
    await asyncio.sleep(3)
    await asyncio.to_thread(milvus.stop)
    await asyncio.sleep(5)
    await asyncio.to_thread(milvus.start)
    await work
    row.note = "Milvus stopped ~5 s under load, started again on its data"


def frozen(part: str, deadline_key: str,
           pids: Callable[[Chaos], list[int]]) -> Callable[[Chaos, Load, Row], Awaitable[None]]:
    """A fault: `part`'s processes SIGSTOPped for FREEZE_S under load (their ports still
    accept; nothing answers), then SIGCONT. Every request must end within the edges'
    `deadline_key` (plus DEADLINE_SLACK_S), whatever the freeze's length."""
    async def fault(chaos: Chaos, load: Load, row: Row) -> None:
        frozen_pids = pids(chaos)
        if not frozen_pids:
            row.note = f"skipped: the stack runs no {part} of its own"
            return
        work = asyncio.ensure_future(load.run(seconds=FREEZE_S + 8, new_share=0.4))
        await asyncio.sleep(3)
        for pid in frozen_pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(FREEZE_S)
        finally:
            for pid in frozen_pids:
                os.kill(pid, signal.SIGCONT)
        await work
        # A frozen trainerd holds no answer: requests keep the cloud's bound.
        bound = DEADLINES["CLOUD_TIMEOUT_S" if part == "trainerd" else deadline_key]
        row.bound_s = bound + DEADLINE_SLACK_S
        row.note = (f"{part} SIGSTOPped {FREEZE_S:g} s under load, then SIGCONT; "
                    f"{deadline_key.lower().replace('__', '.')} = {DEADLINES[deadline_key]:g} s")
    return fault


def _milvus_pids(chaos: Chaos) -> list[int]:
    milvus = chaos.stack.milvus
    return [milvus.pid] if milvus is not None and milvus.pid else []


def _daemon_pids(name: str) -> Callable[[Chaos], list[int]]:
    return lambda chaos: [chaos.stack.daemons[name].proc.pid]


async def texts_damaged(chaos: Chaos, load: Load, row: Row) -> None:
    """edge-2 SIGKILLed, its texts store cut to half its size (a torn disk), restarted: it sets
    the file aside, starts an empty store, removes the rows that lost their texts and keeps
    answering; the cached pairs in that file are lost by design."""
    await load.run(seconds=4, new_share=0.5, edges=[chaos.stack.addresses["edge-2"]])
    chaos.kill("edge-2", signal.SIGKILL)
    await asyncio.to_thread(chaos.stack.daemons["edge-2"].proc.wait, 30)
    path = store_path(chaos.stack.cfg.data_dir.resolve() / "edge-2", "velo_edge_2")
    with sqlite3.connect(path) as conn:  # fold the WAL in: the texts are all in the file now
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size = path.stat().st_size
    with path.open("r+b") as raw:
        raw.truncate(size // 2)
    await chaos.recover()
    chaos.answered[chaos.stack.addresses["edge-2"]].clear()  # what it had cached went
    await load.run(seconds=8, new_share=0.5)
    aside = sorted(path.parent.glob(f"{path.name}.damaged-*"))
    row.rows_may_shrink = True
    if not aside:
        row.crashes += 1
    row.note = (f"edge-2's texts store ({size} bytes) cut to half while it was down: "
                f"{'set aside as ' + aside[-1].name if aside else 'NOT SET ASIDE'}; the edge "
                "started on an empty store, removed the rows without texts and answered")


async def load_64(chaos: Chaos, load: Load, row: Row) -> None:
    await load.run(seconds=12, concurrency=64, new_share=0.0)
    failures = {c: n for c, n in load.codes.items() if c != "OK"}
    deliberate = set(failures) <= {"RESOURCE_EXHAUSTED"}
    row.note = (f"64 clients for {12 * chaos.pace:g} s ({load.sent / 12 / chaos.pace:.0f} "
                f"req/s); failures: "
                f"{failures or 'none'}" + ("" if deliberate else " - NOT ONLY deliberate "
                                                                   "RESOURCE_EXHAUSTED"))
    if not deliberate:
        row.server_errors += sum(failures.values())


async def spool_disk_full(chaos: Chaos, load: Load, row: Row) -> None:
    """An edge whose spool lies on a 1 MiB filesystem, with trainerd unreachable: the spool
    fills the disk; the edge drops the oldest records (counted) and keeps answering. Every
    acknowledged answer's record is either still in the spool or counted as dropped."""
    mount = Path(tempfile.mkdtemp(prefix="velo-chaos-tiny-"))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                             capture_output=True).returncode == 0
    row.own_accounting = True
    if not mounted:
        mount.rmdir()
        row.note = ("skipped: mounting a small tmpfs needs root here; tests/test_edged.py "
                    "simulates a full disk with an SQLite page limit")
        return
    try:
        edge = chaos.stack.add_edge("probe-spool", DATA_DIR=str(mount),
                                    TRAINER="127.0.0.1:1", SPOOL_MAX_RECORDS="1000000")
        questions = await seed_cache(chaos, "probe-spool", data_dir=mount)
        await load.run(seconds=12, concurrency=4, new_share=0.0, edges=[edge.address],
                       pool=questions)
        stats = await edge_pb2_grpc.EdgeServiceStub(chaos.channel(edge.address)).GetStats(
            edge_pb2.GetStatsRequest(), timeout=10)
        row.produced = len(load.acked)
        row.received = stats.experience_pending  # kept on the (full) disk
        row.lost = row.produced - stats.experience_pending - stats.experience_dropped
        row.crashes += 0 if edge.running else 1
        row.note = (f"1 MiB tmpfs, trainerd unreachable: {stats.experience_pending} records "
                    f"kept, {stats.experience_dropped} oldest dropped and counted (the "
                    "'received' column counts the kept ones); the edge answered throughout")
    finally:
        daemon = chaos.stack.daemons.pop("probe-spool", None)
        if daemon is not None and daemon.running:
            daemon.proc.terminate()
            daemon.proc.wait(timeout=30)
        subprocess.run(["umount", str(mount)], capture_output=True)
        mount.rmdir()


async def seed_cache(chaos: Chaos, edge_name: str, count: int = 40,
                     data_dir: Path | None = None) -> list[str]:
    """Cache `count` questions on `edge_name` directly (an edge without a cloud cannot
    answer its misses), the texts into the store in the edge's `data_dir`; returns them once
    the edge sees them."""
    collection = "velo_" + edge_name.replace("-", "_")
    texts = store_path(data_dir or chaos.stack.cfg.data_dir.resolve() / edge_name, collection)
    cache = VectorCache(VectorDBConfig(uri=chaos.stack.milvus_uri,
                                       token=chaos.stack.milvus_token), collection, 384,
                        texts_path=texts)
    embedder = Embedder(embedder_dir())
    questions = [next(chaos.fresh) for _ in range(count)]
    vectors = await asyncio.to_thread(embedder.embed, questions)
    await asyncio.to_thread(cache.open)
    try:
        for question, vector in zip(questions, vectors, strict=True):
            await asyncio.to_thread(cache.insert_pair, TENANT, question, "a cached answer",
                                    vector, vector, -1.0)
        await asyncio.to_thread(cache.wait_indexed)
    finally:
        await asyncio.to_thread(cache.close)
    await asyncio.sleep(6)  # an edge's Bounded reads see another client's rows within ~5 s
    return questions


async def bad_policies(chaos: Chaos, load: Load, row: Row) -> None:
    """Publish a good policy, then broken ones (trainerd refuses them), then corrupt the stored
    copy of a newer good one (the edges refuse it): every edge keeps the last good one."""
    work = asyncio.ensure_future(load.run(seconds=10, new_share=0.2))
    good = await asyncio.to_thread(export_mlp_policy, None, bias=(30.0, 0.0, 0.0))
    broken = {"truncated": good[: len(good) // 2], "corrupt": b"\x08\x07" + os.urandom(2048),
              "wrong shape": await asyncio.to_thread(export_mlp_policy, None, top_p=3)}
    stub = trainer_pb2_grpc.TrainerServiceStub(chaos.channel(chaos.stack.addresses["trainerd"]))
    first = await stub.PublishPolicy(trainer_pb2.PublishPolicyRequest(name="good", onnx=good))
    refused = []
    for name, body in broken.items():
        try:
            await stub.PublishPolicy(trainer_pb2.PublishPolicyRequest(name="bad", onnx=body))
        except grpc.aio.AioRpcError as exc:
            refused.append(f"{name}: {exc.code().name}")
    # Bit rot on trainerd's disk: found when trainerd restarts and announces the version.
    chaos.kill("trainerd", signal.SIGTERM)
    await asyncio.to_thread(chaos.stack.daemons["trainerd"].proc.wait, 30)
    stored = chaos.stack.cfg.data_dir.resolve() / "trainerd" / "policies"
    second = _rotten_version(stored, good)
    await chaos.recover()
    await work
    running, rejected = [], 0
    deadline = time.monotonic() + 30  # the edges' watches reconnect and see the new version
    while time.monotonic() < deadline:
        running, rejected = [], 0
        for address in chaos.stack.edge_addresses:
            stats = await edge_pb2_grpc.EdgeServiceStub(chaos.channel(address)).GetStats(
                edge_pb2.GetStatsRequest(), timeout=10)
            running.append(stats.policy)
            rejected += stats.policies_rejected
        if rejected >= len(running):
            break
        await asyncio.sleep(0.5)
    kept = all(p == f"onnx:good:v{first.version}" for p in running)
    if not kept or len(refused) != len(broken) or rejected < len(running):
        row.crashes += 1  # counted as a failure of the suite
    row.note = (f"trainerd refused {len(refused)}/{len(broken)} broken publishes "
                f"({'; '.join(refused)}); the edges refused the corrupted v{second} "
                f"{rejected} times and {'kept' if kept else 'DID NOT KEEP'} v{first.version}")


def _rotten_version(stored: Path, good: bytes) -> int:
    """Add the next version to a stopped trainerd's registry, listed with the sha256 of
    `good` but stored with its last bytes changed: bit rot under a published policy."""
    index_path = stored / "index.json"
    index = json.loads(index_path.read_text())
    version = max(p["version"] for p in index["policies"]) + 1
    index["policies"].append({"version": version, "sha256": hashlib.sha256(good).hexdigest(),
                              "name": "rotten", "created_unix": time.time(),
                              "size_bytes": len(good)})
    (stored / f"v{version:06d}.onnx").write_bytes(good[:-16] + os.urandom(16))
    index_path.write_text(json.dumps(index))
    return version


# -- probe edge: fuzz, isolation, slow clients ------------------------------------------------
PROBE_EDGE = "probe-edge"


def probe_edge(chaos: Chaos) -> tuple[str, str]:
    """(gRPC address, HTTP base URL) of the probe edge: no cloud, an HTTP front, auth off."""
    edge = chaos.stack.daemons.get(PROBE_EDGE)
    if edge is None:
        chaos.probe_http = f"127.0.0.1:{free_port()}"
        edge = chaos.stack.add_edge(PROBE_EDGE, HTTP__LISTEN=chaos.probe_http)
    return edge.address, f"http://{chaos.probe_http}"


async def fuzz_row(chaos: Chaos, requests: int) -> Row:
    address, _ = probe_edge(chaos)
    edge = chaos.stack.daemons[PROBE_EDGE]
    started = time.monotonic()
    report = await fuzz_edge(address, requests=requests, seed=7)
    return Row("fuzz (mutated requests)", requests=report.requests,
               acknowledged=report.codes.get("OK", 0), codes=report.codes,
               crashes=0 if report.alive and edge.running else 1,
               server_errors=report.unknown + report.internal,
               note=f"{report.requests} mutated AskRequest/AskStream/GetStats payloads; "
                    f"UNKNOWN {report.unknown}, INTERNAL {report.internal}",
               seconds=round(time.monotonic() - started, 1))


async def fuzz_http_row(chaos: Chaos, requests: int) -> Row:
    _, url = probe_edge(chaos)
    edge = chaos.stack.daemons[PROBE_EDGE]
    started = time.monotonic()
    report = await fuzz_http(url, requests=requests, seed=7)
    codes = {f"HTTP {status}": n for status, n in sorted(report.statuses.items())}
    surprise = f"; first surprise: {report.surprises[0]}" if report.surprises else ""
    return Row("fuzz (mutated HTTP requests)", requests=report.requests,
               acknowledged=report.statuses.get(200, 0), codes=codes,
               crashes=0 if report.alive and edge.running else 1,
               server_errors=report.server_errors,
               note=f"{report.requests} mutated requests to the OpenAI-compatible front (wrong "
                    f"JSON types, odd strings, nesting to 10^5, broken bytes and headers); 5xx "
                    f"other than 503: {report.server_errors}; {report.unsendable} the HTTP "
                    f"client refused to send{surprise}",
               seconds=round(time.monotonic() - started, 1))


async def isolation_row(chaos: Chaos, probes: int) -> Row:
    address, url = probe_edge(chaos)
    edge = chaos.stack.daemons[PROBE_EDGE]
    cache = VectorCache(VectorDBConfig(uri=chaos.stack.milvus_uri,
                                       token=chaos.stack.milvus_token), "velo_probe_edge", 384,
                        texts_path=store_path(chaos.stack.cfg.data_dir.resolve() / PROBE_EDGE,
                                              "velo_probe_edge"))
    await asyncio.to_thread(cache.open)
    started = time.monotonic()
    try:
        report = await isolation_probes(address, cache, Embedder(embedder_dir()),
                                        probes=probes, seed=11, http_url=url)
    finally:
        await asyncio.to_thread(cache.close)
    kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(report.kinds.items()))
    return Row("isolation (cross-tenant probes)", requests=report.probes,
               acknowledged=report.served, codes=report.codes,
               server_errors=sum(n for c, n in report.codes.items()
                                 if c in SERVER_ERRORS or (c.startswith("HTTP 5")
                                                           and c != "HTTP 503")),
               crashes=0 if edge.running else 1,
               lost=report.across_tenants + report.unexplained,
               note=f"{report.probes} probes ({kinds}) over 8 tenants holding the same "
                    f"questions: {report.served} reuses, answers from another tenant: "
                    f"{report.across_tenants}, unexplained: {report.unexplained}",
               seconds=round(time.monotonic() - started, 1))


async def slow_clients_row(chaos: Chaos, connections: int = 2000) -> Row:
    """Half-open connections to the probe edge's HTTP port (headers never finished), twice
    its connection cap: gRPC answers throughout, and HTTP as soon as the header timeout has
    closed them (the cap keeps the file descriptors the gRPC port needs)."""
    import httpx

    address, url = probe_edge(chaos)
    edge = chaos.stack.daemons[PROBE_EDGE]
    host, port = chaos.probe_http.rsplit(":", 1)
    started = time.monotonic()
    opened: list[asyncio.StreamWriter] = []
    refused = 0
    for _ in range(connections):
        try:
            _, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: edge\r\n")
            opened.append(writer)
        except OSError:
            refused += 1
    stub = edge_pb2_grpc.EdgeServiceStub(chaos.channel(address))
    codes: Counter[str] = Counter()
    slowest = 0.0
    http_back_after = None
    async with httpx.AsyncClient(base_url=url, timeout=5) as client:
        while time.monotonic() - started < 20:
            began = time.monotonic()
            try:
                await stub.GetStats(edge_pb2.GetStatsRequest(), timeout=5)
                codes["gRPC OK"] += 1
            except grpc.aio.AioRpcError as exc:
                codes[f"gRPC {exc.code().name}"] += 1
            slowest = max(slowest, time.monotonic() - began)
            try:
                reply = await client.get("/v1/models")
                codes[f"HTTP {reply.status_code}"] += 1
                if reply.status_code == 200 and http_back_after is None:
                    http_back_after = time.monotonic() - started
            except httpx.HTTPError:
                codes["HTTP refused"] += 1
            await asyncio.sleep(0.2)
    closed_by_edge = 0
    for writer in opened:
        closed_by_edge += writer.transport.is_closing() or writer.is_closing()
        writer.close()
    grpc_failed = sum(n for c, n in codes.items() if c.startswith("gRPC") and c != "gRPC OK")
    recovered = http_back_after is not None
    back = f"{http_back_after:.1f} s" if http_back_after is not None else "NEVER"
    return Row("slow clients (half-open HTTP)", requests=sum(codes.values()),
               acknowledged=codes["gRPC OK"] + codes["HTTP 200"], codes=dict(codes),
               crashes=0 if edge.running and not grpc_failed and recovered else 1,
               slowest_s=round(slowest, 2),
               note=f"{connections} half-open connections ({refused} refused at connect) for "
                    f"20 s: gRPC GetStats answered {codes['gRPC OK']}/"
                    f"{codes['gRPC OK'] + grpc_failed}, HTTP /v1/models {codes['HTTP 200']}/"
                    f"{sum(n for c, n in codes.items() if c.startswith('HTTP'))} (first after "
                    f"{back}; header timeout 10 s, cap 1000: new connections replace the oldest "
                    "half-open ones)",
               seconds=round(time.monotonic() - started, 1))


FAULTS: dict[str, Callable[[Chaos, Load, Row], Awaitable[None]]] = {
    "baseline": baseline,
    "llm-crash-midstream": llm_crash,
    "cloudd-sigkill": cloudd_killed,
    "trainerd-sigterm": trainerd_down(signal.SIGTERM),
    "trainerd-sigkill": trainerd_down(signal.SIGKILL),
    "edged-sigkill": edged_killed,
    "milvus-stopped": milvus_stopped,
    "milvus-frozen": frozen("Milvus", "VECTOR_DB__TIMEOUT_S", _milvus_pids),
    "cloudd-frozen": frozen("cloudd", "CLOUD_TIMEOUT_S", _daemon_pids("cloudd")),
    "trainerd-frozen": frozen("trainerd", "TRAINER_TIMEOUT_S", _daemon_pids("trainerd")),
    "texts-damaged": texts_damaged,
    "load-64-clients": load_64,
    "spool-disk-full": spool_disk_full,
    "bad-policy": bad_policies,  # last: the edges then run the published policy
}
KILLED = {"cloudd-sigkill": ("cloudd",), "trainerd-sigterm": ("trainerd",),
          "trainerd-sigkill": ("trainerd",), "edged-sigkill": ("edge-1",),
          "texts-damaged": ("edge-2",),
          "bad-policy": ("trainerd",)}
LLM_KILLED = {"llm-crash-midstream"}
QUICK = ("baseline", "llm-crash-midstream", "trainerd-sigkill", "edged-sigkill",
         "load-64-clients", "spool-disk-full", "bad-policy")


def table(rows: list[Row]) -> str:
    lines = ["| fault | requests | acknowledged | failed (status) | experience produced / "
             "received / lost / duplicated | cache rows before / after | crashes | "
             "UNKNOWN/INTERNAL or 5xx | slowest s | rows without texts | notes |",
             "|---|---:|---:|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        experience = f"{r.produced} / {r.received} / {r.lost} / {r.duplicated}"
        if r.fault.startswith(("fuzz", "slow")):
            experience = "–"
        elif r.fault.startswith("isolation"):
            experience = f"cross-tenant answers: {r.lost}"
        rows_ = f"{r.rows_before} / {r.rows_after}" if r.rows_before or r.rows_after else "–"
        failed = ", ".join(f"{code} {n}" for code, n in sorted(r.codes.items())
                           if code != "OK") or "–"
        slowest = f"{r.slowest_s:g}" + (f" (≤ {r.bound_s:g})" if r.bound_s else "")
        lines.append(f"| {r.fault} | {r.requests} | {r.acknowledged} | {failed} | {experience} "
                     f"| {rows_} | {r.crashes} | {r.server_errors} | {slowest} "
                     f"| {r.orphan_rows} | {r.note} |")
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> int:
    faults = args.faults.split(",") if args.faults else list(QUICK if args.quick else FAULTS)
    unknown = [f for f in faults if f not in FAULTS]
    if unknown:
        raise SystemExit(f"unknown faults {unknown}; known: {', '.join(FAULTS)}")
    # No eviction during the run: cache rows before/after must be comparable.
    os.environ["VELO_EDGED__CACHE__EVICTION_MIN_ROWS"] = "100000000"
    for key, seconds in DEADLINES.items():
        os.environ[f"VELO_EDGED__{key}"] = f"{seconds:g}"
    shutil.rmtree(args.out / "stack", ignore_errors=True)  # a fresh stack every run
    stack = Stack(StackConfig(data_dir=args.out / "stack", edges=2,
                              edge_policies=("cache-0.5", "cache-0.5"),
                              milvus_uri=args.milvus_uri, milvus_token=args.milvus_token,
                              run_tag=""))
    items = [i for i in load_qa(args.data) if len(i.question) <= 300]
    print(f"chaos: starting the stack in {args.out / 'stack'} ...", flush=True)
    stack.start()  # from this (the main) thread: the daemons die with the thread that forks
    chaos = Chaos(stack, items, args.out, pace=0.6 if args.quick else 1.0)
    rows: list[Row] = []
    try:
        for fault in faults:
            print(f"chaos: {fault} ...", flush=True)
            row = await chaos.measure(fault, FAULTS[fault], KILLED.get(fault, ()))
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
        if args.fuzz:
            print(f"chaos: fuzz ({args.fuzz} gRPC and {args.fuzz} HTTP requests) ...",
                  flush=True)
            rows.append(await fuzz_row(chaos, args.fuzz))
            rows.append(await fuzz_http_row(chaos, args.fuzz))
        if args.isolation:
            print(f"chaos: isolation ({args.isolation} probes) ...", flush=True)
            rows.append(await isolation_row(chaos, args.isolation))
        if args.slow_clients:
            print(f"chaos: slow clients ({args.slow_clients} connections) ...", flush=True)
            rows.append(await slow_clients_row(chaos, args.slow_clients))
    finally:
        await chaos.close()
        stack.stop()
    text = table(rows)
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "chaos.md").write_text(text + "\n")
    (args.out / "chaos.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    bad = [r.fault for r in rows if r.failed]
    print(f"\n{args.out / 'chaos.md'}: " + (f"FAILED: {', '.join(bad)}" if bad else
                                              "0 lost, 0 duplicated, 0 cross-tenant, 0 crashes"))
    return 1 if bad else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--quick", action="store_true", help="the fast subset (CI)")
    parser.add_argument("--faults", default="", help=f"comma-separated, of: {', '.join(FAULTS)}")
    parser.add_argument("--fuzz", type=int, default=None,
                        help="mutated requests against a live edge (default 10000; quick 2000)")
    parser.add_argument("--isolation", type=int, default=None,
                        help="cross-tenant probes (default 10000; quick 2000)")
    parser.add_argument("--slow-clients", type=int, default=None,
                        help="half-open HTTP connections (default 2000; quick 300)")
    parser.add_argument("--out", type=Path, default=ROOT / "var" / "chaos")
    parser.add_argument("--data", type=Path, default=DATA if DATA.exists()
                        else ROOT / "data" / "oasst1_dev.jsonl")
    parser.add_argument("--milvus-uri", default="",
                        help="use this Milvus instead of an embedded one (Milvus faults skip)")
    parser.add_argument("--milvus-token", default=os.environ.get("VELO_MILVUS_TOKEN", ""))
    args = parser.parse_args()
    if args.fuzz is None:
        args.fuzz = 2000 if args.quick else 10_000
    if args.isolation is None:
        args.isolation = 2000 if args.quick else 10_000
    if args.slow_clients is None:
        args.slow_clients = 300 if args.quick else 2000
    configure_logging("warning")
    sys.exit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
