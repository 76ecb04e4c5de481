"""An in-memory stand-in for the edge's Milvus cache, for simulations that run thousands of
episodes (`velo experiment figures`, `load`, ...).

Same interface and semantics as `velo.edge.cache.VectorCache` for what the simulator uses: two rows
per QA pair, exact top-P by L2 distance within a tenant (what Milvus returns for the few
hundred rows a simulated edge holds), hits and value written back, and the same eviction rule
(`velo.edge.cache.eviction_mask`). A test checks that it returns the same rows as Milvus for the
same writes. Nothing is persisted: it is a simulation backend, never an edge store.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import replace
from typing import Protocol, cast

import numpy as np

from velo.core.state import ANSWER, QUESTION, CachedRow
from velo.edge.cache import MAX_TEXT_BYTES, eviction_mask


class SimCache(Protocol):
    """What the simulator asks of an edge's cache. VectorCache (real Milvus) and MemoryCache
    both keep it; `scope` is where a pair is looked up (the simulated tenant)."""

    def open(self) -> None: ...
    def close(self) -> None: ...
    def drop(self) -> None: ...
    def clear(self) -> None: ...
    def count(self) -> int: ...
    def search(self, vector: np.ndarray, tenant: str, top_p: int) -> list[CachedRow]: ...
    def insert_pair(self, scope: str, question: str, answer: str, question_vec: np.ndarray,
                    answer_vec: np.ndarray, value: float) -> int | None: ...
    def update_row(self, row: CachedRow, tenant: str, hits: int, value: float) -> CachedRow: ...
    def evict(self, *, below_mean: bool, max_rows: int, ttl_s: float) -> int: ...


class MemoryCache(SimCache):
    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.rows: dict[int, tuple[str, CachedRow]] = {}  # id -> (tenant, row)
        self._ids = np.zeros(0, dtype=np.int64)  # search matrix, rebuilt after writes
        self._vectors = np.zeros((0, dim), dtype=np.float32)
        self._stale = False

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    def drop(self) -> None:
        self.clear()

    def search(self, vector: np.ndarray, tenant: str, top_p: int) -> list[CachedRow]:
        """The top-P rows of this tenant by L2 distance J (eq. 1), nearest first."""
        if self._stale:
            self._rebuild()
        if not len(self._ids):
            return []
        distances = np.linalg.norm(self._vectors - vector.astype(np.float32), axis=1)
        order = np.argsort(distances, kind="stable")
        found = []
        for i in order:
            row_tenant, row = self.rows[int(self._ids[i])]
            if row_tenant == tenant:
                found.append(replace(row, distance=float(distances[i])))
                if len(found) == top_p:
                    break
        return found

    def count(self) -> int:
        return len(self.rows)

    def insert_pair(self, scope: str, question: str, answer: str, question_vec: np.ndarray,
                    answer_vec: np.ndarray, value: float) -> int | None:
        if max(len(question.encode()), len(answer.encode())) > MAX_TEXT_BYTES:
            return None
        pair_id, now = secrets.randbits(61), time.time()
        for kind, vec in ((QUESTION, question_vec), (ANSWER, answer_vec)):
            row_id = pair_id * 2 + kind - 1
            self.rows[row_id] = (scope, CachedRow(
                id=row_id, pair_id=pair_id, kind=kind, question=question, answer=answer, hits=0,
                value=float(value), created=now, distance=0.0,
                vector=np.asarray(vec, dtype=np.float32)))
        self._stale = True
        return pair_id

    def update_row(self, row: CachedRow, tenant: str, hits: int, value: float) -> CachedRow:
        updated = replace(row, hits=hits, value=float(value))
        if row.id in self.rows:
            self.rows[row.id] = (tenant, replace(updated, distance=0.0))
        return updated

    def clear(self) -> None:
        self.rows.clear()
        self._stale = True

    def evict(self, *, below_mean: bool, max_rows: int, ttl_s: float) -> int:
        ids = np.array(list(self.rows), dtype=np.int64)
        rows = [row for _, row in self.rows.values()]
        drop = eviction_mask(np.array([r.value for r in rows]), np.array([r.created for r in rows]),
                             below_mean=below_mean, max_rows=max_rows, ttl_s=ttl_s,
                             now=time.time())
        for row_id in ids[drop]:
            del self.rows[int(row_id)]
        self._stale = True
        return int(drop.sum())

    def _rebuild(self) -> None:
        self._ids = np.array(list(self.rows), dtype=np.int64)
        # Every row here was inserted with its vector (insert_pair).
        self._vectors = (np.stack([cast(np.ndarray, row.vector) for _, row in self.rows.values()])
                         if self.rows else np.zeros((0, self.dim), dtype=np.float32))
        self._stale = False
