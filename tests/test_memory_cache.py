"""The simulator's in-memory cache must behave as the edge's Milvus cache for the same writes:
same rows in the same order, same distances, same hits and values, same evictions."""

from __future__ import annotations

import uuid

import numpy as np

from lab.memory_cache import MemoryCache
from velo.edge.cache import VectorCache, VectorDBConfig

DIM = 16


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def view(rows) -> list[tuple]:
    return [(r.question, r.kind, r.hits, round(r.value, 6), round(r.distance, 4)) for r in rows]


def test_memory_cache_matches_milvus(milvus) -> None:
    rng = np.random.default_rng(0)
    real = VectorCache(VectorDBConfig(uri=milvus.uri, token=milvus.token),
                       f"parity_{uuid.uuid4().hex[:8]}", DIM)
    real.open()
    memory = MemoryCache(DIM)
    try:
        questions, answers = unit(rng, 12), unit(rng, 12)
        for i in range(12):
            for cache in (real, memory):
                cache.insert_pair("t", f"q{i}", f"a{i}", questions[i], answers[i], value=-i / 4)
        for cache in (real, memory):  # another tenant's copy of q0 is never returned to "t"
            cache.insert_pair("other", "q-other", "a-other", questions[0], answers[0], value=0.0)
        probes = np.concatenate([questions[:3], unit(rng, 3)])
        for probe in probes:
            assert view(real.search(probe, "t", 5)) == view(memory.search(probe, "t", 5))
        # Write back hits and value to the nearest row of the first probe (eq. 4-5).
        for cache in (real, memory):
            row = cache.search(probes[0], "t", 1)[0]
            cache.update_row(row, "t", row.hits + 1, row.value + 2.0)
        assert view(real.search(probes[0], "t", 3)) == view(memory.search(probes[0], "t", 3))
        assert memory.search(probes[0], "t", 1)[0].hits == 1
        # Below-mean eviction drops the same rows.
        dropped = real.evict(below_mean=True, max_rows=100, ttl_s=0)
        assert dropped > 0 and memory.evict(below_mean=True, max_rows=100, ttl_s=0) == dropped
        for probe in probes:
            assert view(real.search(probe, "t", 5)) == view(memory.search(probe, "t", 5))
    finally:
        real.drop()
        real.close()
