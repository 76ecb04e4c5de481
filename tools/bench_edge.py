"""Edge hot-path benchmark: VELO's edge decision and gRPC `Ask` next to GPTCache, same machine.

    .venv/bin/python tools/bench_edge.py                  # 10^3, 10^4, 10^5 rows (~15 min)
    .venv/bin/python tools/bench_edge.py --million        # and 10^6 rows (~35 min; no GPTCache)
    .venv/bin/python tools/bench_edge.py --rows 1000 --requests 100 --no-grpc   # a quick look

What it measures, at each cache size (rows in the vector store), on cache-hit traffic:
- the edge decision in process (embed -> search -> state -> policy, `edged.decision.Decider`,
  the code edged runs): p50/p95/p99 per stage and in total, single stream; throughput with 1, 8
  and 64 concurrent requests; the learned policy's (ONNX LRS) forward pass on the same states;
- a full gRPC `Ask` that is a hit, against a real `velo-edged` process: p50/p95/p99 single
  stream, throughput with 1, 8 and 64 concurrent clients, and the daemon's RSS;
- GPTCache 0.1.44 (PyPI `gptcache`) with the same ONNX MiniLM embedder and its SQLite + FAISS
  store, filled with the same vectors and asked the same questions: `get` latency and
  throughput with 1, 8 and 64 threads; the ratios VELO / GPTCache;
- the Milvus server's memory (resident, anonymous, mapped files): freshly started with the full
  cache loaded, less freshly started with the empty collection, per 10^6 rows (`--milvus-mmap`:
  with its segments memory-mapped);
- once: both systems' right / wrong hits on the labelled paraphrase pairs (GPTCache's own
  benchmark pairs, half of the cached sides held out as negatives), at the same threshold.

Data: the `a` side of 400 paraphrase pairs is cached (with real oasst1 answers); the queries are
their `b` sides that are hits under the edge's default policy (cache-0.5: L2 distance <= 0.5,
i.e. cosine >= 0.875; GPTCache's threshold T = 0.9375 is the same rule). The rest of the rows
are filler: real embeddings pushed ~0.8 away (L2) in a random direction, carrying real texts, so
that the index and the memory see realistic vectors and text sizes without embedding 10^5 texts.

Output: a table on stdout and a JSON file (`--out`, default var/bench/edge.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import uvloop  # noqa: E402

from edged.decision import Decider  # noqa: E402
from lab.pairs import load_pairs  # noqa: E402
from velo.core.models import embedder_dir  # noqa: E402
from velo.core.policy import CachePolicy, OnnxPolicy  # noqa: E402
from velo.core.records import load_qa  # noqa: E402
from velo.core.verifier import OnnxVerifier  # noqa: E402
from velo.edge.cache import VectorCache, VectorDBConfig  # noqa: E402
from velo.edge.embedder import Embedder  # noqa: E402
from velo.edge.texts import store_path  # noqa: E402
from velo.ops.milvus_server import EmbeddedMilvus  # noqa: E402
from velo.v1 import edge_pb2, edge_pb2_grpc  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
PAIRS = DATA / "paraphrase_pairs_dev.jsonl"
QA = DATA / "oasst1_dev.jsonl"
THETA = 0.5  # the edge's default policy, cache-0.5
GPTCACHE_T = 1 - THETA**2 / 4  # GPTCache hits when 4 - d^2 >= 4T, d the L2 distance
CACHED_PAIRS = 400
GPTCACHE, GPTCACHE_PATCHED = "GPTCache 0.1.44 as shipped", "GPTCache + question_id index (patched)"
FILLER_DISTANCE = 0.8
TENANT, PAIRS_TENANT = "bench", "pairs"
COLLECTION = "velo_bench"


@dataclass(frozen=True)
class Variant:
    """An embedder setting of the edge: ONNX file, onnxruntime intra-op threads per run and
    runs at once (edged `embedder_file`, `embedder_threads`, `embedder_workers`)."""

    file: str
    threads: int
    workers: int

    @property
    def name(self) -> str:
        return f"{self.file.removesuffix('.onnx')} {self.threads}x{self.workers}"

    @classmethod
    def parse(cls, text: str) -> Variant:
        file, _, shape = text.partition("@")
        threads, _, workers = (shape or "1").partition("x")
        return cls(file, int(threads), int(workers or 1))


# -- data -------------------------------------------------------------------------------------
class BenchData:
    """Real cached pairs and hit queries, and a deterministic source of filler rows."""

    def __init__(self, embedder: Embedder, pairs_limit: int = 0, seed: int = 0) -> None:
        pairs = [p for p in load_pairs(PAIRS) if p.label == 1][: pairs_limit or None]
        qa = load_qa(QA)
        self.pairs = pairs
        self.answers = [item.answer for item in qa]
        self.questions = [item.question for item in qa]
        self.a_vecs = embedder.embed([p.a for p in pairs])
        self.b_vecs = embedder.embed([p.b for p in pairs])
        self.answer_vecs = embedder.embed(self.answers)
        self.pool = np.concatenate([self.a_vecs, self.b_vecs, self.answer_vecs,
                                    embedder.embed(self.questions)])
        self.rng = np.random.default_rng(seed)

        n = min(CACHED_PAIRS, len(pairs))
        self.cached_q = [p.a for p in pairs[:n]]
        self.cached_a = [self.answers[i % len(self.answers)] for i in range(n)]
        self.cached_qv = self.a_vecs[:n]
        self.cached_av = self.answer_vecs[np.arange(n) % len(self.answers)]
        rows = np.concatenate([self.cached_qv, self.cached_av])
        nearest = np.sqrt(((self.b_vecs[:n, None, :] - rows[None]) ** 2).sum(-1)).min(1)
        # A margin under THETA: the int8 embedder and the approximate index must not turn
        # a query of this set into a miss (a miss needs the cloud, which this bench has not).
        self.hit_queries = [pairs[i].b for i in np.flatnonzero(nearest <= THETA - 0.1)]

    def filler(self, start: int, pairs: int) -> tuple[list[str], list[str], np.ndarray,
                                                     np.ndarray]:
        """`pairs` filler QA pairs (two vectors each), numbered from `start`."""
        base = self.pool[self.rng.integers(0, len(self.pool), size=2 * pairs)]
        # ~FILLER_DISTANCE from a real vector: |noise| = tan(angle) for a unit vector.
        sigma = np.tan(2 * np.arcsin(FILLER_DISTANCE / 2)) / np.sqrt(base.shape[1])
        vecs = base + self.rng.normal(0, sigma, size=base.shape).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        qs = [f"{self.questions[(start + i) % len(self.questions)]} #{start + i}"
              for i in range(pairs)]
        ans = [self.answers[(start + i) % len(self.answers)] for i in range(pairs)]
        return qs, ans, vecs[:pairs].astype(np.float32), vecs[pairs:].astype(np.float32)


# -- statistics -------------------------------------------------------------------------------
def pct(samples_s: list[float]) -> dict[str, float]:
    ms = np.asarray(samples_s) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()), "n": len(ms)}


def settle(cache: VectorCache, milvus: EmbeddedMilvus | None, timeout_s: float = 900) -> None:
    """Compact the collection, wait for its index, then for Milvus to go quiet. After a bulk
    fill Milvus merges small segments and rebuilds their indexes in the background for minutes;
    measured meanwhile, every number (the floor's too) measures that merge on the same cores."""
    deadline = time.monotonic() + timeout_s
    job = cache.client.compact(cache.collection)
    while cache.client.get_compaction_state(job) != "Completed" and time.monotonic() < deadline:
        time.sleep(1.0)
    cache.wait_indexed(max(deadline - time.monotonic(), 1.0))
    pid = milvus.pid if milvus is not None else None
    if pid is None:  # another machine's server: its load is not ours to see
        return
    while time.monotonic() < deadline:
        before = cpu_seconds(pid)
        time.sleep(3.0)
        if (cpu_seconds(pid) - before) / 3.0 < 0.1:  # under a tenth of a core
            return
    print("Milvus still busy after settling; measuring anyway", flush=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_mb(pid: int) -> dict[str, float]:
    """Resident memory of a process and its children (the embedded Milvus runs as a child):
    `rss` in all, `anon` the part only swap could free, `file` mapped file pages (with mmap,
    Milvus's segments: the kernel can drop them and read them back)."""
    keys = {"VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file"}
    total = dict.fromkeys(keys.values(), 0.0)
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, *value = line.split()
            if name in keys:
                total[keys[name]] += int(value[0]) / 1024
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        for child in children.read_text().split():
            for key, mb in memory_mb(int(child)).items():
                total[key] += mb
    return total


# -- VELO -------------------------------------------------------------------------------------
async def closed_loop(call, queries: list[str], clients: int, total: int) -> tuple[float, list]:
    """`clients` concurrent loops issuing `total` calls in all; returns (req/s, latencies)."""
    latencies: list[float] = []
    next_index = 0

    async def client() -> None:
        nonlocal next_index
        while next_index < total:
            prompt = queries[next_index % len(queries)]
            next_index += 1
            t = time.perf_counter()
            await call(prompt)
            latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return total / (time.perf_counter() - start), latencies


async def bench_decision(decider: Decider, queries: list[str], requests: int,
                         clients: list[int], lrs: OnnxPolicy | None,
                         verifier: OnnxVerifier | None = None) -> dict:
    for prompt in queries[:20]:  # warm the sessions and the search path
        await decider.decide(prompt, TENANT)
    stages: dict[str, list[float]] = {"embed": [], "search": [], "state": [], "policy": [],
                                      "total": []}
    states, prompts, reused = [], [], 0
    for i in range(requests):
        prompts.append(queries[i % len(queries)])
        decided = await decider.decide(prompts[-1], TENANT)
        t = decided.times
        for name, value in (("embed", t.embed_s), ("search", t.search_s), ("state", t.state_s),
                            ("policy", t.policy_s), ("total", t.total_s)):
            stages[name].append(value)
        states.append(decided.state)
        reused += decided.decision.action.letter == "A"
    out: dict = {"single_stream": {k: pct(v) for k, v in stages.items()},
                 "hit_share": reused / requests}
    if lrs is not None:
        times = []
        for state in states:
            t = time.perf_counter()
            lrs.decide(state)
            times.append(time.perf_counter() - t)
        out["lrs_policy"] = pct(times)
    if verifier is not None:  # the reuse guard's P(same) of the top-P rows (edged [reuse])
        times = []
        for prompt, state in zip(prompts, states, strict=True):
            t = time.perf_counter()
            verifier.scorer_for(prompt)(state.rows)
            times.append(time.perf_counter() - t)
        out["verifier"] = pct(times)
    out["throughput"] = {}
    for c in clients:
        embeddings, searches = decider.embeddings, decider.searches
        e0, s0 = (embeddings.calls, embeddings.items), (searches.calls, searches.items)
        rps, lat = await closed_loop(lambda p: decider.decide(p, TENANT), queries, c,
                                     max(requests, 4 * c))
        out["throughput"][str(c)] = {
            "rps": rps, **pct(lat),
            "embed_batch": (embeddings.items - e0[1]) / max(1, embeddings.calls - e0[0]),
            "search_batch": (searches.items - s0[1]) / max(1, searches.calls - s0[0])}
    return out


class EdgedProcess:
    """A real velo-edged serving the benchmark collection, no cloud, no trainer."""

    def __init__(self, milvus_uri: str, milvus_token: str, workdir: Path, port: int,
                 variant: Variant, prompt_vectors: int = 0) -> None:
        self.address = f"127.0.0.1:{port}"
        env = dict(os.environ,
                   # 0: every request embeds its prompt, as GPTCache does (the semantic path).
                   VELO_EDGED__LIMITS__PROMPT_VECTORS=str(prompt_vectors),
                   VELO_EDGED__EMBEDDER_FILE=variant.file,
                   VELO_EDGED__EMBEDDER_THREADS=str(variant.threads),
                   VELO_EDGED__EMBEDDER_WORKERS=str(variant.workers),
                   VELO_EDGED__EDGE_ID="bench", VELO_EDGED__LISTEN=self.address,
                   VELO_EDGED__CLOUD="", VELO_EDGED__TRAINER="",
                   VELO_EDGED__DATA_DIR=str(workdir / "edged"),
                   VELO_EDGED__VECTOR_DB__URI=milvus_uri,
                   VELO_EDGED__VECTOR_DB__TOKEN=milvus_token,
                   VELO_EDGED__VECTOR_DB__COLLECTION=COLLECTION,
                   VELO_EDGED__LOG_LEVEL="warning",
                   # Hit traffic only updates values; keep every row for the whole run.
                   VELO_EDGED__CACHE__EVICTION_EVERY="1000000000",
                   VELO_EDGED__POLICY__SHADOW_RATE="0")
        self.log = open(workdir / "edged.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "edged"], env=env, cwd=ROOT,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    async def wait_ready(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"velo-edged exited with {self.proc.returncode}; see "
                                   f"{self.log.name}")
            try:
                async with grpc.aio.insecure_channel(self.address) as channel:
                    await edge_pb2_grpc.EdgeServiceStub(channel).GetStats(
                        edge_pb2.GetStatsRequest(), timeout=2)
                    return
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.5)
        raise TimeoutError("velo-edged did not come up")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class Profiler:
    """py-spy sampling a process while the busiest load runs: where the time goes."""

    CATEGORIES: ClassVar[dict[str, str]] = {  # a sample counts for the first found in its stack
        "embedding (onnxruntime run)": "Embedder._run",
        "embedding (tokenizer)": "Embedder.embed",
        "vector search (pymilvus + wait)": "search_many",
        "experience spool (SQLite)": "Spool.append",
        "write-back flush (Milvus upsert)": "flush_updates",
        "policy": "decide (velo/core/policy.py",
        "gRPC server / event loop": "",
    }

    def __init__(self, pid: int, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.raw = out / f"edged-{pid}.txt"
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(pid),
             "--rate", "200", "--format", "raw", "--output", str(self.raw), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> dict:
        self.proc.send_signal(2)  # py-spy writes its file on SIGINT
        self.proc.wait(timeout=30)
        if not self.raw.exists():
            return {"error": "py-spy wrote nothing (needs ptrace permission)"}
        shares = dict.fromkeys(self.CATEGORIES, 0)
        total = 0
        for line in self.raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            total += int(count)
            for name, marker in self.CATEGORIES.items():
                if marker in stack:
                    shares[name] += int(count)
                    break
        return {"samples": total, "file": str(self.raw),
                "shares": {k: v / max(1, total) for k, v in shares.items()}}


async def bench_grpc(edged: EdgedProcess, queries: list[str], requests: int,
                     clients: list[int], profile: Path | None) -> dict:
    async with grpc.aio.insecure_channel(edged.address) as channel:
        stub = edge_pb2_grpc.EdgeServiceStub(channel)
        actions: dict[str, int] = {}
        edge_s: list[float] = []  # the decision as timed inside velo-edged

        async def ask(prompt: str) -> None:
            try:
                reply = await stub.Ask(edge_pb2.AskRequest(prompt=prompt, tenant=TENANT),
                                       timeout=30)
            except grpc.aio.AioRpcError as exc:  # a miss: this edge has no cloud to ask
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                actions["miss"] = actions.get("miss", 0) + 1
                return
            edge_s.append(reply.edge_s)
            letter = "ABC"[reply.action - 1]
            actions[letter] = actions.get(letter, 0) + 1

        for prompt in queries[:20]:
            await ask(prompt)
        edge_s.clear()
        _, single = await closed_loop(ask, queries, 1, requests)
        out: dict = {"single_stream": pct(single), "decision_in_edged": pct(edge_s),
                     "throughput": {}}
        for c in clients:
            profiler = Profiler(edged.proc.pid, profile) if profile and c == max(clients) \
                else None
            rps, lat = await closed_loop(ask, queries, c, max(requests, 4 * c))
            out["throughput"][str(c)] = {"rps": rps, **pct(lat)}
            if profiler is not None:
                out["profile"] = profiler.stop()
        out["actions"] = actions
    out["edged_rss_mb"] = memory_mb(edged.proc.pid)["rss"]
    return out


# -- GPTCache ---------------------------------------------------------------------------------
class GPTCacheSide:
    """GPTCache with our ONNX embedder, its SQLite + FAISS (flat) store, FAISS on 1 OpenMP
    thread in every thread that calls it (its best setting on 2 cores: otherwise FAISS and
    onnxruntime threads fight; `omp_set_num_threads` holds only for the calling thread, so
    each benchmark worker pins itself, see `threaded_loop`).

    `patched`: with the index GPTCache's SQLite schema lacks (answers and dependencies by
    question id); as shipped, every hit scans the whole answers table."""

    def __init__(self, embedder: Embedder, workdir: Path, threshold: float,
                 patched: bool = False) -> None:
        import faiss
        from gptcache import Cache, Config
        from gptcache.manager import CacheBase, VectorBase, get_data_manager
        from gptcache.processor.pre import get_prompt
        from gptcache.similarity_evaluation.distance import SearchDistanceEvaluation

        faiss.omp_set_num_threads(1)
        workdir.mkdir(parents=True, exist_ok=True)
        self.manager = get_data_manager(
            CacheBase("sqlite", sql_url=f"sqlite:///{workdir / 'gptcache.db'}"),
            VectorBase("faiss", dimension=embedder.dim,
                       index_path=str(workdir / "faiss.index")),
            max_size=10_000_000)  # its default (1000 rows) would evict the benchmark's rows
        self.cache = Cache()
        self.cache.init(pre_embedding_func=get_prompt,
                        embedding_func=lambda text, **_: embedder.embed_one(text),
                        data_manager=self.manager, similarity_evaluation=SearchDistanceEvaluation(),
                        config=Config(similarity_threshold=threshold))
        self.rows = 0
        self.patched = patched
        if patched:
            import sqlalchemy

            with self.manager.s._engine.begin() as db:
                for table in ("gptcache_answer", "gptcache_question_dep"):
                    db.execute(sqlalchemy.text(
                        f"CREATE INDEX IF NOT EXISTS {table}_qid ON {table} (question_id)"))

    def memory_mb(self) -> dict[str, float]:
        """What GPTCache keeps: the FAISS flat index in memory (d floats a row, not
        reclaimable) and its SQLite file (on disk; cached pages are reclaimable)."""
        index = self.manager.v._index
        return {"faiss_index": index.ntotal * index.d * 4 / 2**20,
                "sqlite_file": Path(self.manager.s._url.removeprefix("sqlite:///"))
                .stat().st_size / 2**20}

    def add(self, questions: list[str], answers: list[str], vectors: np.ndarray) -> None:
        for start in range(0, len(questions), 5000):
            self.manager.import_data(questions[start:start + 5000], answers[start:start + 5000],
                                     list(vectors[start:start + 5000]),
                                     [None] * len(questions[start:start + 5000]))
        self.rows += len(questions)

    def get(self, prompt: str) -> str | None:
        from gptcache.adapter.api import get

        return get(prompt, cache_obj=self.cache)


def bench_gptcache(side: GPTCacheSide, queries: list[str], requests: int,
                   clients: list[int]) -> dict:
    _pin_faiss()
    for prompt in queries[:20]:
        side.get(prompt)
    single, hits = [], 0
    for i in range(requests):
        t = time.perf_counter()
        hits += side.get(queries[i % len(queries)]) is not None
        single.append(time.perf_counter() - t)
    out: dict = {"single_stream": pct(single), "hit_share": hits / requests, "throughput": {},
                 "patched": side.patched, "memory_mb": side.memory_mb()}
    for c in clients:
        rps, latencies, errors = threaded_loop(side.get, queries, c, max(requests, 4 * c),
                                               initializer=_pin_faiss)
        out["throughput"][str(c)] = {"rps": rps, **pct(latencies), "errors": errors}
    return out


def _pin_faiss() -> None:
    import faiss

    faiss.omp_set_num_threads(1)  # per thread: every worker calls this itself


def threaded_loop(call, queries: list[str], clients: int, total: int,
                  initializer=None) -> tuple[float, list, dict[str, int]]:
    """`closed_loop` for a synchronous library: `clients` threads, `total` calls in all.
    A call that raises is counted under its error (and not as throughput); the worker goes
    on. Returns (successful calls per second, their latencies, errors by message)."""
    lock, latencies, errors = threading.Lock(), [], {}
    counter = iter(range(total))

    def worker() -> None:
        for i in counter:
            t = time.perf_counter()
            try:
                call(queries[i % len(queries)])
            except Exception as exc:
                with lock:
                    key = f"{type(exc).__name__}: {str(exc)[:80]}"
                    errors[key] = errors.get(key, 0) + 1
                continue
            with lock:
                latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients, initializer=initializer) as pool:
        for _ in range(clients):
            pool.submit(worker)
    return len(latencies) / (time.perf_counter() - start), latencies, errors


# -- the floor ---------------------------------------------------------------------------------
def ivf_index(vectors: np.ndarray):
    """The paper's index, in process (FAISS IVF_FLAT, nlist 128, nprobe 10) over every row."""
    import faiss

    _pin_faiss()
    quantizer = faiss.IndexFlatL2(vectors.shape[1])
    index = faiss.IndexIVFFlat(quantizer, vectors.shape[1], 128, faiss.METRIC_L2)
    index.train(vectors[np.random.default_rng(0).permutation(len(vectors))[:50_000]])
    index.add(vectors)
    index.nprobe = 10
    return index


def bench_floor(embedder: Embedder, index, queries: list[str], requests: int) -> dict:
    """What no edge decision can beat: one embedding, then one in-process ANN probe for the
    top 5, measured together, single stream."""
    _pin_faiss()
    for prompt in queries[:20]:
        index.search(embedder.embed_one(prompt)[None], 5)
    embed, probe, both = [], [], []
    for i in range(requests):
        t0 = time.perf_counter()
        vector = embedder.embed_one(queries[i % len(queries)])
        t1 = time.perf_counter()
        index.search(vector[None], 5)
        t2 = time.perf_counter()
        embed.append(t1 - t0)
        probe.append(t2 - t1)
        both.append(t2 - t0)
    return {"embed": pct(embed), "probe": pct(probe), "total": pct(both)}


# -- wrong hits on labelled pairs ----------------------------------------------------------------
def load_labelled(data: BenchData, cache: VectorCache) -> tuple[np.ndarray, list[str]]:
    """Cache the `a` side of every other pair (its own tenant); returns which and the answers."""
    held_in = np.flatnonzero(np.arange(len(data.pairs)) % 2 == 0)
    answers = [f"answer of pair {i}" for i in range(len(data.pairs))]
    cache.import_pairs(PAIRS_TENANT, [data.pairs[i].a for i in held_in],
                       [answers[i] for i in held_in], data.a_vecs[held_in],
                       data.answer_vecs[held_in % len(data.answers)], 0.0)
    return held_in, answers


def tally(served: list[str | None], answers: list[str]) -> dict:
    """A hit is right only when it serves the answer of the query's own pair (held-out pairs
    have none cached, so any hit on them is wrong)."""
    right = sum(s == answers[i] for i, s in enumerate(served) if s is not None)
    hits = sum(s is not None for s in served)
    return {"queries": len(served), "hits": hits, "right": right, "wrong": hits - right,
            "wrong_hit_rate": (hits - right) / max(1, hits),
            "wrong_per_request": (hits - right) / len(served)}


async def velo_wrong_hits(data: BenchData, decider: Decider, answers: list[str]) -> dict:
    served = []
    for p in data.pairs:
        decided = await decider.decide(p.b, PAIRS_TENANT)
        served.append(decided.state.rows[0].answer
                      if decided.decision.action.letter == "A" else None)
    return tally(served, answers)


def gptcache_wrong_hits(data: BenchData, embedder: Embedder, workdir: Path,
                        held_in: np.ndarray, answers: list[str]) -> dict:
    out = {}
    for name, threshold in ((f"gptcache T={GPTCACHE_T:.4f}", GPTCACHE_T),
                            ("gptcache T=0.8 (its default)", 0.8)):
        side = GPTCacheSide(embedder, Path(tempfile.mkdtemp(dir=workdir)), threshold)
        side.add([data.pairs[i].a for i in held_in], [answers[i] for i in held_in],
                 data.a_vecs[held_in])
        out[name] = tally([side.get(p.b) for p in data.pairs], answers)
    return out


# -- the run ----------------------------------------------------------------------------------
async def run(args: argparse.Namespace) -> dict:
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(workdir / "edged", ignore_errors=True)  # each run starts an empty spool
    milvus = None
    uri, token = args.milvus_uri, args.milvus_token
    if not uri:
        shutil.rmtree(workdir / "milvus", ignore_errors=True)  # a fresh server starts in ~10 s
        milvus = EmbeddedMilvus(workdir / "milvus", mmap=args.milvus_mmap).start()
        uri, token = milvus.uri, milvus.token
    report: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                "python": platform.python_version()},
                    "threshold_l2": THETA, "gptcache_threshold": GPTCACHE_T,
                    "variants": [v.name for v in args.variants], "sizes": {}}
    embedders = {v: Embedder(embedder_dir(), threads=v.threads, model_file=v.file)
                 for v in args.variants}
    reference = embedders[args.variants[0]]  # GPTCache gets the first (float32) one
    data = BenchData(reference, args.pairs)
    queries = data.hit_queries
    report["hit_queries"] = len(queries)
    print(f"{len(queries)} hit queries (b sides of {len(data.cached_q)} cached pairs)", flush=True)

    # The texts go where the benchmarked velo-edged reads them (its data_dir).
    texts = store_path(workdir / "edged", COLLECTION)
    cache = VectorCache(VectorDBConfig(uri=uri, token=token, index_type=args.index_type),
                        COLLECTION, reference.dim, texts_path=texts)
    cache.open()
    cache.drop()
    cache.open()
    if milvus is not None:  # the baseline: a started Milvus with the empty collection loaded
        cache.close()
        milvus = restart(milvus, args.milvus_mmap)
        uri = milvus.uri  # the token stays: it is the data_dir's
        report["milvus_empty"] = loaded_memory(milvus, reference.dim, 0)
        cache = VectorCache(VectorDBConfig(uri=uri, token=token, index_type=args.index_type),
                            COLLECTION, reference.dim, texts_path=texts)
        cache.open()
    deciders = {v: Decider(e, cache, lambda: CachePolicy(THETA), top_p=5,
                           max_batch=args.max_batch, embed_workers=v.workers)
                for v, e in embedders.items()}
    lrs = _untrained_lrs(reference.dim) if args.lrs else None
    verifier = OnnxVerifier(Path(args.verifier)) if args.verifier else None
    gpts: dict[str, GPTCacheSide] = {}
    try:
        held_in, answers = load_labelled(data, cache)
        settle(cache, milvus)
        await asyncio.sleep(1.0)
        report["wrong_hits"] = {f"velo cache-0.5, {v.name}": await velo_wrong_hits(data, d, answers)
                                for v, d in deciders.items()}
        if not args.no_gptcache:
            report["wrong_hits"].update(
                gptcache_wrong_hits(data, reference, workdir, held_in, answers))
            for label, patched in ((GPTCACHE, False), (GPTCACHE_PATCHED, True)):
                folder = workdir / ("gptcache-patched" if patched else "gptcache")
                shutil.rmtree(folder, ignore_errors=True)  # no rows from a last run
                gpts[label] = GPTCacheSide(reference, folder, GPTCACHE_T, patched)
        rows = cache.import_pairs(TENANT, data.cached_q, data.cached_a, data.cached_qv,
                                  data.cached_av, 0.0)
        vectors = [data.cached_qv, data.cached_av]  # every row's vector: the floor's index
        for gpt in gpts.values():
            gpt.add(data.cached_q + data.cached_q, data.cached_a + data.cached_a,
                    np.concatenate([data.cached_qv, data.cached_av]))
        for size in args.rows:
            if size > rows:
                qs, ans, qv, av = data.filler(rows, (size - rows) // 2)
                t = time.perf_counter()
                rows += cache.import_pairs(TENANT, qs, ans, qv, av, 0.0)
                cache.wait_indexed()
                fill_s = time.perf_counter() - t
                settle(cache, milvus)
                vectors += [qv, av]
                if rows <= args.gptcache_max_rows:
                    for gpt in gpts.values():
                        gpt.add(qs + qs, ans + ans, np.concatenate([qv, av]))
            else:
                fill_s = 0.0
            await asyncio.sleep(1.0)
            print(f"\n== {rows} rows (filled in {fill_s:.0f} s) ==", flush=True)
            result: dict = {"rows": rows, "velo": {}, "floor": {}}
            if milvus is not None:
                result["milvus_memory_mb"] = memory_mb(milvus.pid)
            # On disk, in the kernel's reclaimable page cache when read: not in the memory target.
            result["text_store_mb"] = sum(f.stat().st_size for f in texts.parent.glob(
                texts.name + "*")) / 2**20
            result["gptcache"] = {label: bench_gptcache(gpt, queries, args.requests,
                                                        args.clients)
                                  for label, gpt in gpts.items()
                                  if rows <= args.gptcache_max_rows}
            floor_index = ivf_index(np.concatenate(vectors))
            for variant, embedder in embedders.items():
                result["floor"][variant.name] = bench_floor(embedder, floor_index, queries,
                                                            args.requests)
            for variant, decider in deciders.items():
                side: dict = {"decision": await bench_decision(decider, queries, args.requests,
                                                               args.clients, lrs, verifier)}
                if not args.no_grpc:
                    edged = EdgedProcess(uri, token, workdir, args.port, variant)
                    try:
                        await edged.wait_ready()
                        side["grpc_ask"] = await bench_grpc(
                            edged, queries, args.requests, args.clients,
                            workdir / "profiles" if args.profile else None)
                    finally:
                        edged.stop()
                    if variant == args.variants[0]:  # the exact-match layer, on repeats
                        edged = EdgedProcess(uri, token, workdir, args.port, variant,
                                             prompt_vectors=10_000)
                        try:
                            await edged.wait_ready()
                            side["grpc_ask_repeated"] = await bench_grpc(
                                edged, queries, args.requests, args.clients, None)
                        finally:
                            edged.stop()
                result["velo"][variant.name] = side
            report["sizes"][str(rows)] = result
            print_size(result, args.clients)
        if milvus is not None:
            cache.close()  # its pending write-backs land before the restart
            milvus = restart(milvus, args.milvus_mmap)
            report["milvus_restarted"] = loaded_memory(milvus, reference.dim, rows)
    finally:
        for decider in deciders.values():
            decider.close()
        cache.close()
        if milvus is not None:
            milvus.stop()
    return report


def _untrained_lrs(dim: int) -> OnnxPolicy:
    """The LRS network (random weights: the same work per forward pass as a trained one)."""
    from velo.learning.lrs import LRS, LRSConfig

    learner = LRS(LRSConfig(top_p=5, embed_dim=dim), agents=3)
    return OnnxPolicy(learner.export_onnx(), 1, "lrs", top_p=5, embed_dim=dim, sample=False)


def restart(milvus: EmbeddedMilvus, mmap: bool) -> EmbeddedMilvus:
    milvus.stop()
    # On a new port: pymilvus keeps one connection per address and would not reconnect.
    return EmbeddedMilvus(milvus.data_dir, mmap=mmap).start()


def loaded_memory(milvus: EmbeddedMilvus, dim: int, rows: int) -> dict:
    """Memory of a restarted Milvus with the full cache loaded: the steady state of an edge.
    Right after a bulk fill Milvus also holds write buffers and growing segments (~1.6x)."""
    cache = VectorCache(VectorDBConfig(uri=milvus.uri, token=milvus.token), COLLECTION, dim)
    cache.open()  # loads the collection
    try:
        time.sleep(5.0)
        return {"rows": rows, **memory_mb(milvus.pid)}
    finally:
        cache.close()


def memory_model(report: dict) -> dict:
    """Milvus memory per row: the full cache loaded minus the empty collection loaded, each
    measured on a freshly started server."""
    empty, full = report.get("milvus_empty"), report.get("milvus_restarted")
    if not empty or not full:
        return {}
    per_row = {key: (full[key] - empty[key]) / full["rows"] for key in ("rss", "anon", "file")}
    return {"mmap": report["args"]["milvus_mmap"], "rows": full["rows"],
            **{f"{key}_mb_per_1e5_rows": mb * 1e5 for key, mb in per_row.items()},
            **{f"{key}_gb_per_1e6_rows": mb * 1e6 / 1024 for key, mb in per_row.items()}}


# -- printing ---------------------------------------------------------------------------------
def print_size(result: dict, clients: list[int]) -> None:
    gpts = result.get("gptcache", {})
    top = str(max(clients))
    print("latency, single stream (ms)              p50     p95     p99")
    for name, side in result["velo"].items():
        d = side["decision"]["single_stream"]
        floor = result["floor"][name]
        print(f"VELO, embedder {name}")
        for stage in ("embed", "search", "state", "policy", "total"):
            s = d[stage]
            label = "edge decision" if stage == "total" else "  " + stage
            print(f"  {label:<38}{s['p50_ms']:7.2f} {s['p95_ms']:7.2f} {s['p99_ms']:7.2f}")
        if "verifier" in side["decision"]:
            s = side["decision"]["verifier"]
            print(f"  {'  reuse verifier, top-P rows':<38}{s['p50_ms']:7.2f} {s['p95_ms']:7.2f} "
                  f"{s['p99_ms']:7.2f}")
        if "lrs_policy" in side["decision"]:
            s = side["decision"]["lrs_policy"]
            print(f"  {'  policy if ONNX LRS':<38}{s['p50_ms']:7.2f} {s['p95_ms']:7.2f} "
                  f"{s['p99_ms']:7.2f}")
        for part, label in (("embed", "floor: one embedding"),
                            ("probe", "floor: one IVF128/nprobe10 probe"),
                            ("total", "floor: both, measured together")):
            s = floor[part]
            print(f"  {label:<38}{s['p50_ms']:7.2f} {s['p95_ms']:7.2f} {s['p99_ms']:7.2f}")
        if "grpc_ask" in side:
            s = side["grpc_ask"]["single_stream"]
            print(f"  {'gRPC Ask (hit), at the client':<38}{s['p50_ms']:7.2f} {s['p95_ms']:7.2f} "
                  f"{s['p99_ms']:7.2f}")
            s = side["grpc_ask"]["decision_in_edged"]
            print(f"  {'  of which the decision in edged':<38}{s['p50_ms']:7.2f} "
                  f"{s['p95_ms']:7.2f} {s['p99_ms']:7.2f}")
        for label, ratio in floor_ratios(side, floor).items():
            print(f"  {label:<38}{ratio:7.2f}")
    for label, g in gpts.items():
        s = g["single_stream"]
        print(f"  {label:<38}{s['p50_ms']:7.2f} {s['p95_ms']:7.2f} {s['p99_ms']:7.2f}")
    print("throughput (req/s), concurrent clients:     " + "  ".join(f"{c:>7}" for c in clients))
    lines = []
    for name, side in result["velo"].items():
        lines.append((f"VELO decision, {name}", side["decision"]["throughput"]))
        if "grpc_ask" in side:
            lines.append((f"VELO gRPC Ask, {name}", side["grpc_ask"]["throughput"]))
        if "grpc_ask_repeated" in side:
            lines.append((f"VELO Ask, repeats kept, {name}",
                          side["grpc_ask_repeated"]["throughput"]))
    for label, t in lines + [(label, g["throughput"]) for label, g in gpts.items()]:
        print(f"  {label:<42}" + "  ".join(f"{t[str(c)]['rps']:7.1f}" for c in clients))
    for glabel, g in gpts.items():
        errors = {c: sum(g["throughput"][str(c)]["errors"].values()) for c in clients}
        if any(errors.values()):
            print(f"  errors, {glabel} (not counted as throughput): " + ", ".join(
                f"{c} clients: {n}" for c, n in errors.items()) + "; " + "; ".join(
                {e for c in clients for e in g["throughput"][str(c)]["errors"]}))
        short = "patched" if g["patched"] else "as shipped"
        for label, t in lines:
            ratios = [t[str(c)]["rps"] / g["throughput"][str(c)]["rps"] for c in clients]
            print(f"  {label[5:] + ' / ' + short:<42}" + "  ".join(f"{r:7.2f}" for r in ratios))
        print(f"  {glabel} keeps: FAISS index {g['memory_mb']['faiss_index']:.0f} MB in memory,"
              f" SQLite file {g['memory_mb']['sqlite_file']:.0f} MB")
    extra = []
    if "milvus_memory_mb" in result:
        m = result["milvus_memory_mb"]
        extra.append(f"Milvus RSS {m['rss']:.0f} MB (anon {m['anon']:.0f} MB)")
    if "text_store_mb" in result:
        extra.append(f"texts file (disk) {result['text_store_mb']:.0f} MB")
    for name, side in result["velo"].items():
        if "grpc_ask" in side:
            extra.append(f"edged RSS ({name}) {side['grpc_ask']['edged_rss_mb']:.0f} MB")
    if extra:
        print("  " + ", ".join(extra), flush=True)
    for name, side in result["velo"].items():
        prof = side.get("grpc_ask", {}).get("profile", {})
        if "shares" in prof:
            print(f"  where velo-edged's CPU goes ({name}, {top} clients, "
                  f"{prof['samples']} py-spy samples): " + ", ".join(
                      f"{k} {v:.0%}" for k, v in prof["shares"].items() if v >= 0.01))


def best_rps(side: dict) -> float:
    """A system's throughput at its best concurrency."""
    return max(t["rps"] for t in side["throughput"].values())


def floor_ratios(side: dict, floor: dict) -> dict[str, float]:
    """p50s against the floor's p50 (one embedding + one in-process probe)."""
    base = floor["total"]["p50_ms"]
    ratios = {"decision p50 / floor p50": side["decision"]["single_stream"]["total"]["p50_ms"]
              / base}
    if "grpc_ask" in side:
        ratios["Ask p50 / floor p50"] = side["grpc_ask"]["single_stream"]["p50_ms"] / base
    return ratios


def print_wrong_hits(wrong: dict) -> None:
    queries = next(iter(wrong.values()))["queries"]
    print(f"\nlabelled pairs ({queries} queries, half with no right answer cached)")
    print(f"  {'system':<40}  hits  right  wrong  wrong/hits")
    for name, t in wrong.items():
        print(f"  {name:<40}{t['hits']:5d}  {t['right']:5d}  {t['wrong']:5d}  "
              f"{t['wrong_hit_rate']:9.1%}")


def markdown(report: dict) -> str:
    """The table of docs/performance.md: one row per cache size and system, the floor and
    every ratio."""
    clients = report["args"]["clients"].strip("[]").replace(" ", "").split(",")
    top = clients[-1]
    lines = ["| rows | system | p50 / p95 / p99 ms, single stream | × floor (p50) | "
             + " | ".join(f"req/s, {c} client{'s' if c != '1' else ''}" for c in clients)
             + f" | req/s at {top} clients × GPTCache's best (as shipped / patched) |",
             "|---:|---|---|---:|" + "---:|" * len(clients) + "---|"]
    for rows, result in report["sizes"].items():
        gpts = result.get("gptcache", {})

        def vs_gptcache(t: dict, gpts: dict = gpts) -> str:
            return " / ".join(f"{t[top]['rps'] / best_rps(g):.1f}" for g in gpts.values()) or "–"

        for name, side in result["velo"].items():
            floor = result["floor"][name]
            f = floor["total"]
            lines.append(f"| {int(rows):,} | floor, {name}: one embedding + one in-process "
                         f"IVF probe | {f['p50_ms']:.1f} / {f['p95_ms']:.1f} / "
                         f"{f['p99_ms']:.1f} | 1 |" + " |" * len(clients) + " |")
            base = floor["total"]["p50_ms"]
            for key, label in (
                    ("decision", "decision"), ("grpc_ask", "gRPC Ask (hit)"),
                    ("grpc_ask_repeated", "gRPC Ask (hit), repeated prompts not embedded "
                     "again (prompt_vectors = 10000, the default)")):
                if key not in side:
                    continue
                measured = side[key]
                single = measured["single_stream"]
                single = single.get("total", single)  # the decision's is per stage
                lines.append(f"| {int(rows):,} | VELO {name}, {label} | {single['p50_ms']:.1f}"
                             f" / {single['p95_ms']:.1f} / {single['p99_ms']:.1f} | "
                             f"{single['p50_ms'] / base:.2f} | "
                             + " | ".join(f"{measured['throughput'][c]['rps']:.0f}"
                                          for c in clients)
                             + f" | {vs_gptcache(measured['throughput'])} |")
        for label, g in gpts.items():
            s = g["single_stream"]
            errors = sum(sum(g["throughput"][c]["errors"].values()) for c in clients)
            lines.append(f"| {int(rows):,} | {label}"
                         + (f" ({errors} errors, not counted)" if errors else "")
                         + f" | {s['p50_ms']:.1f} / {s['p95_ms']:.1f} / {s['p99_ms']:.1f} | | "
                         + " | ".join(f"{g['throughput'][c]['rps']:.0f}" for c in clients)
                         + " | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1000,10000,100000",
                        help="cache sizes in rows, ascending (default 1000,10000,100000)")
    parser.add_argument("--million", action="store_true", help="add 10^6 rows")
    parser.add_argument("--requests", type=int, default=400, help="requests per measurement")
    parser.add_argument("--clients", default="1,8,64")
    parser.add_argument("--pairs", type=int, default=0,
                        help="use the first N labelled pairs (default: all 999)")
    parser.add_argument("--max-batch", type=int, default=16,
                        help="micro-batch bound of the decision (edged limits.max_batch)")
    parser.add_argument("--embedders", default="model.onnx@2x2,model-int8.onnx@2x2",
                        help="edge embedder settings FILE@THREADSxWORKERS to measure; GPTCache "
                        "gets the first's file (default: float32 and int8, 2 runs at once "
                        "sharing one 2-thread session, as edged does)")
    parser.add_argument("--milvus-uri", default="", help="an existing Milvus (default: embedded)")
    parser.add_argument("--milvus-token", default=os.environ.get("VELO_MILVUS_TOKEN", ""),
                        help="its token, user:password (default: $VELO_MILVUS_TOKEN; the "
                        "embedded one's is its own)")
    parser.add_argument("--milvus-mmap", action="store_true",
                        help="the embedded Milvus memory-maps loaded segments (less memory, "
                        "slower searches: docs/performance.md)")
    parser.add_argument("--index-type", default="IVF_FLAT",
                        help="the collection's index (IVF_FLAT, IVF_SQ8: 8-bit vectors, HNSW)")
    parser.add_argument("--port", type=int, default=50159, help="port of the benchmarked edged")
    parser.add_argument("--no-gptcache", action="store_true")
    parser.add_argument("--gptcache-max-rows", type=int, default=100_000,
                        help="measure GPTCache up to this many rows (its flat index and "
                        "answer-table scans take minutes per measurement at 10^6)")
    parser.add_argument("--verifier", default=str(ROOT / "docs" / "reuse" / "verifier.onnx"),
                        help="time the reuse guard's verifier on each state ('' to skip)")
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="skip py-spy on velo-edged during the busiest gRPC load")
    parser.add_argument("--no-grpc", action="store_true", help="skip the velo-edged process")
    parser.add_argument("--no-lrs", dest="lrs", action="store_false",
                        help="skip the ONNX LRS forward pass (needs torch to export)")
    parser.add_argument("--workdir", default=str(ROOT / "var" / "bench"))
    parser.add_argument("--out", type=Path, default=ROOT / "var" / "bench" / "edge.json")
    args = parser.parse_args(argv)
    args.rows = sorted(int(r) for r in args.rows.split(","))
    if args.million:
        args.rows.append(1_000_000)
    args.clients = [int(c) for c in args.clients.split(",")]
    args.variants = [Variant.parse(v) for v in args.embedders.split(",")]

    report = uvloop.run(run(args))
    report["args"] = {k: (v if isinstance(v, int | float | str | bool) else str(v))
                      for k, v in vars(args).items() if k != "milvus_token"}
    print_wrong_hits(report["wrong_hits"])
    report["memory"] = memory_model(report)
    if report["memory"]:
        m = report["memory"]
        print(f"\nMilvus memory (mmap {'on' if m['mmap'] else 'off'}), restarted with "
              f"{m['rows']} rows loaded, less the empty collection: {m['rss_mb_per_1e5_rows']:.0f}"
              f" MB per 10^5 rows (anonymous {m['anon_mb_per_1e5_rows']:.0f}, mapped files "
              f"{m['file_mb_per_1e5_rows']:.0f}) -> {m['rss_gb_per_1e6_rows']:.2f} GB per 10^6 "
              f"rows ({m['anon_gb_per_1e6_rows']:.2f} GB anonymous)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    args.out.with_suffix(".md").write_text(markdown(report))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
