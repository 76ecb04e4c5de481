"""The floor: one embedding plus one in-process IVF probe, measured together."""

from __future__ import annotations

import time

import numpy as np

from edge_bench.gptcache_side import pin_faiss
from edge_bench.measure import pct
from velo.edge.embedder import Embedder


def ivf_index(vectors: np.ndarray):
    """The paper's index, in process (FAISS IVF_FLAT, nlist 128, nprobe 10) over every row."""
    import faiss

    pin_faiss()
    quantizer = faiss.IndexFlatL2(vectors.shape[1])
    index = faiss.IndexIVFFlat(quantizer, vectors.shape[1], 128, faiss.METRIC_L2)
    index.train(vectors[np.random.default_rng(0).permutation(len(vectors))[:50_000]])
    index.add(vectors)
    index.nprobe = 10
    return index


def bench_floor(embedder: Embedder, index, queries: list[str], requests: int) -> dict:
    """What no edge decision can beat: one embedding, then one in-process ANN probe for the
    top 5, measured together, single stream."""
    pin_faiss()
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


def bench_embedder_batched(embedder: Embedder, workers: int, queries: list[str],
                           batches: tuple[int, ...] = (1, 4, 16, 32, 64),
                           seconds: float = 3.0) -> dict:
    """The embedder's own best throughput on these cores (texts/s), over batch sizes and over
    how its runs get the cores: `embedder` as edged runs it, and the same model with every
    run on one thread. `workers` runs at once, nothing else. New prompts cannot be answered
    faster than this."""
    single = Embedder(embedder.model_dir, threads=1, model_file=embedder.model_file)
    settings = {"as edged runs it": embedder, "one thread a run": single}
    texts_per_s = {name: _batched(e, workers, queries, batches, seconds)
                   for name, e in settings.items()}
    best_setting = max(texts_per_s, key=lambda name: max(texts_per_s[name].values()))
    return {"texts_per_s": texts_per_s, "best_setting": best_setting,
            "best": max(texts_per_s[best_setting].values())}


def _batched(embedder: Embedder, workers: int, queries: list[str], batches: tuple[int, ...],
             seconds: float) -> dict[str, float]:
    from concurrent.futures import ThreadPoolExecutor

    embedder.embed(queries[:32])  # warm
    best: dict[str, float] = {}
    with ThreadPoolExecutor(workers) as pool:
        for size in batches:
            # Every query in turn, in runs of `size`: the texts' lengths as the edge sees them.
            runs = [queries[i : i + size] for i in range(0, len(queries), size)]

            def worker(first: int, runs: list[list[str]] = runs) -> int:
                done, i, stop = 0, first, time.perf_counter() + seconds
                while time.perf_counter() < stop:
                    run = runs[i % len(runs)]
                    embedder.embed(run)
                    done, i = done + len(run), i + 1
                return done

            t = time.perf_counter()
            texts = sum(pool.map(worker, range(workers)))
            best[str(size)] = texts / (time.perf_counter() - t)
    return best
