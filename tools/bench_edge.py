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
  cache loaded, less freshly started with the empty collection, per 10^6 rows (`--no-milvus-mmap`:
  without its segments memory-mapped);
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
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import uvloop  # noqa: E402
from edge_bench.data import (  # noqa: E402
    COLLECTION,
    GPTCACHE,
    GPTCACHE_PATCHED,
    GPTCACHE_T,
    TENANT,
    THETA,
    BenchData,
    Variant,
)
from edge_bench.floor import bench_embedder_batched, bench_floor, ivf_index  # noqa: E402
from edge_bench.gptcache_side import GPTCacheSide, bench_gptcache  # noqa: E402
from edge_bench.measure import memory_mb, settle  # noqa: E402
from edge_bench.report import markdown, print_size, print_wrong_hits  # noqa: E402
from edge_bench.velo_side import bench_decision, bench_grpc, edged_process, ready, stop  # noqa: E402
from edge_bench.wrong_hits import gptcache_wrong_hits, load_labelled, velo_wrong_hits  # noqa: E402
from pymilvus import MilvusClient  # noqa: E402

from edged.config import LimitsConfig  # noqa: E402
from edged.decision import Decider  # noqa: E402
from velo.core.models import embedder_dir  # noqa: E402
from velo.core.policy import CachePolicy, OnnxPolicy  # noqa: E402
from velo.core.verifier import OnnxVerifier  # noqa: E402
from velo.edge.cache import VectorCache, VectorDBConfig  # noqa: E402
from velo.edge.embedder import Embedder  # noqa: E402
from velo.edge.texts import store_path  # noqa: E402
from velo.ops.milvus_server import EmbeddedMilvus  # noqa: E402


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
    # As edged builds its embedder (edged.server): overlapping runs share the threads.
    embedders = {v: Embedder(embedder_dir(), threads=v.threads, model_file=v.file,
                             busy_threads=max(1, v.threads // v.workers))
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
                # As an edge holds them after a restart (what the velo-edged below measures):
                # a scope grown while an edge runs keeps the IVF lists it was trained with.
                cache.reload_index()
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
                result["floor"][variant.name]["embedder_batched"] = bench_embedder_batched(
                    embedder, variant.workers, queries)
            for variant, decider in deciders.items():
                side: dict = {"decision": await bench_decision(decider, queries, args.requests,
                                                               args.clients, lrs, verifier)}
                if not args.no_grpc:
                    edged = edged_process(uri, token, workdir, args.port, variant)
                    try:
                        t = time.perf_counter()
                        await ready(edged)
                        side["edged_start_s"] = time.perf_counter() - t
                        if milvus is not None:  # what reading every row back left in Milvus
                            side["milvus_after_edge_start_mb"] = memory_mb(milvus.pid)
                        print(f"  velo-edged serving {side['edged_start_s']:.1f} s after its "
                              f"start (the in-process index rebuilt from Milvus)", flush=True)
                        side["grpc_ask"] = await bench_grpc(
                            edged, queries, args.requests, args.clients,
                            workdir / "profiles" if args.profile else None)
                    finally:
                        stop(edged)
                    if variant == args.variants[0]:  # the exact-match layer, on repeats
                        edged = edged_process(uri, token, workdir, args.port, variant,
                                              prompt_vectors=10_000)
                        try:
                            await ready(edged)
                            side["grpc_ask_repeated"] = await bench_grpc(
                                edged, queries, args.requests, args.clients, None)
                        finally:
                            stop(edged)
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
    try:
        return EmbeddedMilvus(milvus.data_dir, mmap=mmap).start()
    except RuntimeError as exc:
        # Seen twice on 2026-12-07: right after a stop, the new server aborted (SIGABRT) before
        # it logged a line; the next start worked. Once more, then give up.
        print(f"Milvus restart failed ({str(exc).splitlines()[0]}); trying once more",
              flush=True)
        time.sleep(5.0)
        return EmbeddedMilvus(milvus.data_dir, mmap=mmap).start()


def loaded_memory(milvus: EmbeddedMilvus, dim: int, rows: int) -> dict:
    """Memory of a restarted Milvus with the full cache loaded: the steady state of an edge.
    Right after a bulk fill Milvus also holds write buffers and growing segments (~1.6x)."""
    # The collection alone, loaded: an edge (a VectorCache) would rebuild its index here, and
    # without the edge's texts file it would take every row for one whose texts are lost.
    client = MilvusClient(uri=milvus.uri, token=milvus.token)
    try:
        if client.has_collection(COLLECTION):
            client.load_collection(COLLECTION)
        time.sleep(5.0)
        return {"rows": rows, **memory_mb(milvus.pid)}
    finally:
        client.close()


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
    parser.add_argument("--max-batch", type=int, default=LimitsConfig.max_batch,
                        help="micro-batch bound of the decision (edged limits.max_batch)")
    parser.add_argument("--embedders", default="model.onnx@2x2,model-int8.onnx@2x2",
                        help="edge embedder settings FILE@THREADSxWORKERS to measure; GPTCache "
                        "gets the first's file (default: float32 and int8, 2 runs at once: a "
                        "lone run on 2 threads, overlapping runs on 1 each, as edged does)")
    parser.add_argument("--milvus-uri", default="", help="an existing Milvus (default: embedded)")
    parser.add_argument("--milvus-token", default=os.environ.get("VELO_MILVUS_TOKEN", ""),
                        help="its token, user:password (default: $VELO_MILVUS_TOKEN; the "
                        "embedded one's is its own)")
    parser.add_argument("--milvus-mmap", action=argparse.BooleanOptionalAction, default=True,
                        help="the embedded Milvus memory-maps loaded segments, as `velo up` "
                        "does (less memory, slower Milvus searches: docs/performance.md)")
    parser.add_argument("--index-type", default=VectorDBConfig.index_type,
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
