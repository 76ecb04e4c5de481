"""trainerd's ceiling: experience records per second that one trainerd stores, on one core.

    .venv/bin/python tools/bench_trainerd.py                   # ~85 s on 2 cores
    .venv/bin/python tools/bench_trainerd.py --seconds 3 --train-seconds 0   # a quick look

What it measures, with records built as edged builds them (`edged.pipeline._Record`: P = 5,
a 384-d embedding, the load, a request id; ~1.7 KB as protobuf):
- **the store alone**, in process: `trainerd.store.ExperienceStore.add` (one SQLite transaction,
  WAL, synchronous=FULL: one fsync per commit) at the batch sizes edges send. An edge's uploader
  (`edged.trainer_link.ExperienceUploader`) sends what its spool holds, up to `upload_batch`
  (256) records per ReportExperience stream: an edge with a backlog sends 256, an edge that keeps
  up sends a stream per record or two. Also `trainerd.server.validate_experience` alone;
- **end to end**: a real `velo-trainerd` process (`python -m trainerd`, configured through its
  environment as `velo up` does, its own temporary data_dir, loopback) pinned to CPU 0; N
  simulated edges (asyncio tasks of this process, pinned to the other CPU) each send
  ReportExperience streams one after the other, each waiting for its acknowledgement as an edge
  does. Records/s acknowledged, ack latency, and how much of its one core trainerd used;
- **while it trains**: the same with `[learner] enabled` (Algorithm 1: rounds read the store and
  train LRS in a worker thread of the same process), check_every_s 0.5: records/s, the slowest
  one-second window and the slowest ack, and the training rounds finished meanwhile.

One record per answered request: shadow verification does not add a record (the held record is
completed in place, `edged.spool`), so records/s is the fleet's edges x req/s it can take.

Output: tables on stdout; `--json PATH` writes the numbers too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from trainerd.server import validate_experience  # noqa: E402
from trainerd.store import ExperienceStore  # noqa: E402
from velo.core.load import LOAD_FEATURES  # noqa: E402
from velo.ops.ports import free_port  # noqa: E402
from velo.ops.stack import Daemon  # noqa: E402
from velo.v1 import trainer_pb2, trainer_pb2_grpc  # noqa: E402

TOP_P, EMBED_DIM = 5, 384  # the edges' defaults (cache.top_p, MiniLM)
UPLOAD_BATCH = 256  # edged's upload_batch default: records per ReportExperience stream
TRAINERD_CPU = 0
TEMPLATES = 64


# -- records as edged builds them ---------------------------------------------------------------
def templates(n: int, seed: int = 0) -> list[trainer_pb2.Experience]:
    """`n` distinct records shaped like edged's (`_Record.experience_encoder`): a unit embedding,
    the P x 3 correlation, a mask, an action with its probabilities, delay, q for some, load."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        emb = rng.standard_normal(EMBED_DIM).astype(np.float32)
        emb /= np.linalg.norm(emb)
        action = int(rng.choice(3, p=[0.5, 0.4, 0.1]))
        probs = rng.dirichlet([1.0, 1.0, 1.0]).astype(np.float32)
        measured = bool(action != 0 or rng.random() < 0.05)  # B/C with a reference, shadowed A
        out.append(trainer_pb2.Experience(
            edge_id="", seq=0, unix_time=0.0,
            correlation=rng.uniform(0.0, 1.0, 3 * TOP_P).astype(np.float32).tolist(),
            top_p=TOP_P, embedding=emb.tolist(), action_mask=[True, True, True],
            action=action, action_probs=(probs / probs.sum()).tolist(), policy_version=3,
            delay_s=0.02 if action == 0 else float(rng.uniform(1.5, 4.0)),
            has_satisfaction=measured,
            satisfaction=float(rng.uniform(-1.5, -0.5)) if measured else 0.0,
            shadow_verified=measured and action == 0, request_id="",
            load=rng.uniform(0.0, 2.0, len(LOAD_FEATURES)).astype(np.float32).tolist()))
    return out


class Edge:
    """One simulated edge: its id and its next sequence number."""

    def __init__(self, edge_id: str, pool: list[trainer_pb2.Experience]) -> None:
        self.edge_id, self.pool, self.seq = edge_id, pool, 0

    def batch(self, n: int) -> list[trainer_pb2.Experience]:
        out = []
        for _ in range(n):
            self.seq += 1
            r = trainer_pb2.Experience()
            r.CopyFrom(self.pool[self.seq % len(self.pool)])
            r.edge_id, r.seq, r.unix_time = self.edge_id, self.seq, time.time()
            r.request_id = uuid.uuid4().hex
            out.append(r)
        return out


# -- CPU pinning and accounting -----------------------------------------------------------------
def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` on `cpus` (threads it starts later inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), cpus)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# -- (a) the store alone ------------------------------------------------------------------------
@dataclass
class StoreRow:
    batch: int
    records: int
    records_per_s: float
    commit_p50_ms: float
    commit_p99_ms: float


def bench_store(workdir: Path, batch: int, seconds: float,
                pool: list[trainer_pb2.Experience]) -> StoreRow:
    """ExperienceStore.add in a loop of `batch`-record transactions; only add() is timed."""
    store = ExperienceStore(workdir / f"store-{batch}" / "experience.db")
    edge = Edge("edge-store", pool)
    times: list[float] = []
    stored = 0
    try:
        while sum(times) < seconds:
            records = edge.batch(batch)
            t = time.perf_counter()
            new, _, _ = store.add(records)
            times.append(time.perf_counter() - t)
            stored += new
    finally:
        store.close()
    return StoreRow(batch, stored, stored / sum(times), pct(times, 50) * 1e3,
                    pct(times, 99) * 1e3)


def bench_validate(pool: list[trainer_pb2.Experience]) -> float:
    """Microseconds per record in trainerd's validate_experience (the server runs it on every
    record before storing)."""
    records = Edge("edge-validate", pool).batch(2000)
    t = time.perf_counter()
    for r in records:
        assert validate_experience(r) is None
    return (time.perf_counter() - t) / len(records) * 1e6


# -- (b) a real trainerd over gRPC --------------------------------------------------------------
class Trainer:
    """A velo-trainerd process started as `velo up` starts it (velo.ops.stack.Daemon), on one
    CPU, over a fresh data_dir."""

    def __init__(self, workdir: Path, name: str, settings: dict[str, str]) -> None:
        data = workdir / name
        data.mkdir(parents=True)
        self.address = f"127.0.0.1:{free_port()}"
        self.daemon = Daemon.configured("trainerd", "trainerd", self.address,
                                        {"DATA_DIR": str(data), **settings},
                                        data / "trainerd.log")

    @property
    def log_path(self) -> Path:
        return self.daemon.log_path

    @property
    def pid(self) -> int:
        assert self.daemon.proc is not None  # started
        return self.daemon.proc.pid

    def start(self, others: set[int]) -> None:
        # The child inherits this thread's CPU set through fork and exec: it is on CPU 0 from
        # its first instruction; this process goes back to the other CPUs afterwards.
        os.sched_setaffinity(0, {TRAINERD_CPU})
        try:
            self.daemon.spawn()
        finally:
            os.sched_setaffinity(0, others)
        pin(os.getpid(), others)  # this process's every thread (gRPC's, numpy's) off CPU 0
        if not self.daemon.wait_serving(60):
            raise RuntimeError(f"trainerd did not serve within 60 s; see {self.log_path}")
        pin(self.pid, {TRAINERD_CPU})

    def stop(self) -> None:
        self.daemon.terminate()
        self.daemon.wait_stopped(15)


@dataclass
class GrpcRow:
    label: str
    senders: int
    batch: int
    seconds: float
    records: int
    records_per_s: float
    ack_p50_ms: float
    ack_p99_ms: float
    ack_max_ms: float
    worst_1s_records_per_s: float
    trainerd_cores: float  # CPU seconds of trainerd per wall second (1.0: its core is full)
    senders_cores: float  # the same for this process (the simulated edges)
    rounds: int = 0  # training rounds finished during the run (learner on)


async def send(stub: trainer_pb2_grpc.TrainerServiceStub, edge: Edge, batch: int, until: float,
               acks: list[tuple[float, float, int]]) -> None:
    """One edge's uploader: a stream of `batch` records, wait for its ack, again, until `until`."""
    while time.perf_counter() < until:
        records = edge.batch(batch)
        t = time.perf_counter()
        ack = await stub.ReportExperience(iter(records), timeout=120)
        done = time.perf_counter()
        if ack.stored != len(records):
            raise RuntimeError(f"{edge.edge_id}: {len(records)} sent, ack {ack}")
        acks.append((done, done - t, ack.stored))


def worst_window(acks: list[tuple[float, float, int]], start: float, end: float) -> float:
    """Records acknowledged in the slowest whole second of [start, end)."""
    seconds = int(end - start)
    if seconds < 1:
        return float("nan")
    counts = [0] * seconds
    for done, _, n in acks:
        i = int(done - start)
        if 0 <= i < seconds:
            counts[i] += n
    return float(min(counts))


def rounds_in(log_path: Path, start_unix: float) -> int:
    """'lrs update' lines trainerd logged after `start_unix` (its JSON log: ISO timestamps)."""
    from datetime import datetime

    n = 0
    for line in log_path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if entry.get("event") == "lrs update" and datetime.fromisoformat(
                    entry["timestamp"].replace("Z", "+00:00")).timestamp() >= start_unix:
                n += 1
    return n


async def bench_grpc(trainer: Trainer, label: str, senders: int, batch: int, seconds: float,
                     pool: list[trainer_pb2.Experience], warm_up: bool = True) -> GrpcRow:
    async with grpc.aio.insecure_channel(trainer.address) as channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        edges = [Edge(f"bench-{label}-{senders}x{batch}-{i}", pool) for i in range(senders)]
        if warm_up:  # the connection, trainerd's worker threads, SQLite's first pages
            await asyncio.gather(*(stub.ReportExperience(iter(e.batch(batch))) for e in edges))
        acks: list[tuple[float, float, int]] = []
        cpu0, mine0 = cpu_seconds(trainer.pid), time.process_time()
        start_unix, start = time.time(), time.perf_counter()
        await asyncio.gather(*(send(stub, e, batch, start + seconds, acks) for e in edges))
        end = time.perf_counter()
        cpu, mine = cpu_seconds(trainer.pid) - cpu0, time.process_time() - mine0
    wall = end - start
    latencies = [lat for _, lat, _ in acks]
    records = sum(n for _, _, n in acks)
    return GrpcRow(label, senders, batch, round(wall, 2), records, records / wall,
                   pct(latencies, 50) * 1e3, pct(latencies, 99) * 1e3,
                   max(latencies) * 1e3 if latencies else float("nan"),
                   worst_window(acks, start, end), cpu / wall, mine / wall,
                   rounds_in(trainer.log_path, start_unix))


@contextlib.contextmanager
def trainerd(workdir: Path, name: str, others: set[int],
             settings: dict[str, str] | None = None) -> Iterator[Trainer]:
    trainer = Trainer(workdir, name, settings or {})
    trainer.start(others)
    try:
        yield trainer
    finally:
        trainer.stop()


# -- the run ------------------------------------------------------------------------------------
def store_table(rows: list[StoreRow], validate_us: float) -> str:
    lines = ["| batch (records per transaction) | records/s | commit p50 / p99 ms |",
             "|---:|---:|---|"]
    lines += [f"| {r.batch} | {r.records_per_s:,.0f} | {r.commit_p50_ms:.2f} / "
              f"{r.commit_p99_ms:.2f} |" for r in rows]
    lines.append(f"\nvalidate_experience alone: {validate_us:.1f} µs per record "
                 f"(≈ {1e6 / validate_us:,.0f} records/s of one core)")
    return "\n".join(lines)


def grpc_table(rows: list[GrpcRow]) -> str:
    lines = ["| run | edges | records per stream | records/s | worst 1 s | ack p50 / p99 / max ms "
             "| trainerd cores | senders' cores | training rounds |",
             "|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    lines += [f"| {r.label} | {r.senders} | {r.batch} | {r.records_per_s:,.0f} | "
              f"{r.worst_1s_records_per_s:,.0f} | {r.ack_p50_ms:.1f} / {r.ack_p99_ms:.1f} / "
              f"{r.ack_max_ms:.0f} | {r.trainerd_cores:.2f} | {r.senders_cores:.2f} | "
              f"{r.rounds if r.label == 'training' else ''} |" for r in rows]
    return "\n".join(lines)


def ceiling(rows: list[GrpcRow]) -> str:
    best = max((r for r in rows if r.label == "ingest"), key=lambda r: r.records_per_s)
    one = [r for r in rows if r.label == "ingest" and r.batch == 1]
    lines = [f"ceiling: {best.records_per_s:,.0f} records/s acknowledged by one trainerd on one "
             f"core ({best.senders} edges, streams of {best.batch})",
             "  = edges x req/s it can take (one record per answered request): "
             + ", ".join(f"{n:,} edges x {best.records_per_s / n:,.0f} req/s"
                         for n in (10, 100, 1000))]
    if one:
        r = one[0]
        lines.append(f"  edges that keep up send streams of 1 record: {r.records_per_s:,.0f} "
                     f"streams/s with {r.senders} edges, {r.trainerd_cores:.2f} cores "
                     f"({r.trainerd_cores / r.records_per_s * 1e3:.2f} core-ms per record); "
                     "past that, spools back up and streams grow towards 256")
    return "\n".join(lines)


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    cpus = os.sched_getaffinity(0)
    if TRAINERD_CPU not in cpus:
        raise SystemExit(f"CPU {TRAINERD_CPU} is not available to this process ({cpus})")
    others = (cpus - {TRAINERD_CPU}) or cpus
    if others == cpus:
        print("warning: one CPU only; the senders share trainerd's core", file=sys.stderr)
    pool = templates(TEMPLATES)
    size = statistics.mean(len(r.SerializeToString()) for r in Edge("edge-x", pool).batch(64))
    print(f"# one record: {size:,.0f} bytes as protobuf (P = {TOP_P}, {EMBED_DIM}-d embedding)")

    # (a) in process, on trainerd's CPU
    os.sched_setaffinity(0, {TRAINERD_CPU})
    try:
        store_rows = [bench_store(workdir, b, args.store_seconds, pool) for b in args.batches]
        validate_us = bench_validate(pool)
    finally:
        os.sched_setaffinity(0, others)
    db = workdir / f"store-{args.batches[-1]}" / "experience.db"
    per_record = db.stat().st_size / max(1, store_rows[-1].records)
    print(f"\n## the store alone (ExperienceStore.add in process, CPU {TRAINERD_CPU}; "
          f"{per_record / 1024:.1f} KB per record in experience.db)\n")
    print(store_table(store_rows, validate_us), flush=True)

    # (b) a real trainerd, then (c) one that trains
    grpc_rows = []
    with trainerd(workdir, "trainerd-ingest", others) as trainer:
        for senders in args.senders:
            grpc_rows.append(await bench_grpc(trainer, "ingest", senders, UPLOAD_BATCH,
                                              args.seconds, pool))
            print(f"  {senders} edges x {UPLOAD_BATCH}: "
                  f"{grpc_rows[-1].records_per_s:,.0f} records/s", file=sys.stderr)
        grpc_rows.append(await bench_grpc(trainer, "ingest", args.idle_edges, 1, args.seconds,
                                          pool))
    if args.train_seconds > 0:
        learner = {"LEARNER__ENABLED": "true", "LEARNER__CHECK_EVERY_S": "0.5"}
        with trainerd(workdir, "trainerd-training", others, learner) as trainer:
            grpc_rows.append(await bench_grpc(trainer, "training", args.train_senders,
                                              UPLOAD_BATCH, args.train_seconds, pool))
            if grpc_rows[-1].rounds == 0:
                print(f"warning: no training round finished; see {trainer.log_path}",
                      file=sys.stderr)
    print(f"\n## a real trainerd on CPU {TRAINERD_CPU}, simulated edges on CPU "
          f"{','.join(map(str, sorted(others)))} ({args.seconds:g} s a row"
          + (f", training: {args.train_seconds:g} s" if args.train_seconds > 0 else "")
          + ")\n")
    print(grpc_table(grpc_rows))
    print()
    print(ceiling(grpc_rows))
    return {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                        "cpus": os.cpu_count()},
            "record_bytes": size, "db_bytes_per_record": per_record,
            "validate_us": validate_us, "store": [asdict(r) for r in store_rows],
            "grpc": [asdict(r) for r in grpc_rows]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=8.0, help="each end-to-end row (default 8)")
    p.add_argument("--store-seconds", type=float, default=3.0,
                   help="each store-alone row, time inside add() (default 3)")
    p.add_argument("--train-seconds", type=float, default=30.0,
                   help="the run with the learner on; 0: skip it (default 30)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, UPLOAD_BATCH],
                   help="records per transaction for the store alone (default 1 16 256)")
    p.add_argument("--senders", type=int, nargs="+", default=[1, 4, 16],
                   help="simulated edges sending streams of 256 (default 1 4 16)")
    p.add_argument("--idle-edges", type=int, default=16,
                   help="simulated edges sending streams of one record (default 16)")
    p.add_argument("--train-senders", type=int, default=4,
                   help="simulated edges while the learner trains (default 4)")
    p.add_argument("--workdir", help="where the data dirs go (default: a temporary directory, "
                   "removed afterwards); put it on the disk trainerd's data_dir would use")
    p.add_argument("--json", metavar="PATH", help="also write the numbers here")
    args = p.parse_args()
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if args.workdir:
            workdir = Path(args.workdir).resolve()
            workdir.mkdir(parents=True, exist_ok=False)
        else:
            workdir = Path(stack.enter_context(
                tempfile.TemporaryDirectory(prefix="velo-bench-trainerd-")))
        result = asyncio.run(run(args, workdir))
    print(f"\n# {time.perf_counter() - t0:.0f} s; {platform.platform()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
