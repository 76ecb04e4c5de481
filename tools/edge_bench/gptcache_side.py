"""GPTCache's side: GPTCache 0.1.44 with our ONNX embedder and its SQLite + FAISS store, as shipped
or with the index its schema lacks."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from edge_bench.measure import pct, threaded_loop
from velo.edge.embedder import Embedder


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
    pin_faiss()
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
        rps, latencies, errors = threaded_loop(side.get, queries, c, max(requests, 8 * c),
                                               initializer=pin_faiss)
        out["throughput"][str(c)] = {"rps": rps, **pct(latencies), "errors": errors}
    return out


def pin_faiss() -> None:
    import faiss

    faiss.omp_set_num_threads(1)  # per thread: every worker calls this itself
