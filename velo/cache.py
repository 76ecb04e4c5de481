"""The edge's vector cache: QA pairs in a Milvus collection (SPEC §3).

Each answered question becomes two rows, the question vector (kind 1) and the answer vector
(kind 2), both carrying the texts, the hit count c^f and the cache value c^r. Searches are
filtered by tenant, so one tenant never sees another tenant's answers.

pymilvus is synchronous; the daemon calls these methods through `asyncio.to_thread`.

Consistency: a search must see this edge's own recent writes. Strong consistency costs
~250 ms a search (it waits for Milvus's time tick), and Session consistency returns nothing
from a client that has not written yet (seen with Milvus 2.3 after a restart). So searches
run Bounded (fast, at most `gracefulTime` = 5 s stale) and this class overlays its own writes
of the last `RECENT_S` seconds: recent inserts are searched exactly in memory, recent
updates replace the stale copies and recent deletes are filtered out.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass, replace

import numpy as np
from pymilvus import DataType, MilvusClient

from velo.config import require
from velo.state import ANSWER, QUESTION, CachedRow

MAX_TEXT_BYTES = 65_535  # Milvus VARCHAR limit
RECENT_S = 15.0  # longer than Milvus's Bounded staleness (gracefulTime, 5 s by default)
CONSISTENCY = "Bounded"
# Milvus 2.3 servers do not report the MVCC timestamp pymilvus 3 asks for; the iterator falls
# back to a client timestamp (fine for eviction scans) and warns on every scan.
logging.getLogger("pymilvus.client.iterator.query_iterator").setLevel(logging.ERROR)
_FIELDS = ["id", "pair_id", "kind", "question", "answer", "hits", "value", "created", "tenant"]


@dataclass
class VectorDBConfig:
    # Milvus server (standalone or cluster). The one-machine stack starts one for you.
    uri: str = "http://127.0.0.1:19530"
    token: str = ""  # Milvus auth token ("user:password"), empty when auth is off
    collection: str = ""  # empty: "velo_<edge_id>"
    index_type: str = "IVF_FLAT"  # the paper's index; "FLAT" and "HNSW" also work
    nlist: int = 128  # IVF lists (paper: 128)
    nprobe: int = 10  # IVF lists probed per search (paper: 10)
    timeout_s: float = 10.0  # per Milvus call

    def __post_init__(self) -> None:
        require(self.index_type in {"IVF_FLAT", "FLAT", "HNSW"}, "index_type",
                "must be IVF_FLAT, FLAT or HNSW")
        require(self.nlist >= 1 and 1 <= self.nprobe <= self.nlist, "nprobe",
                "must be between 1 and nlist")


class VectorCache:
    def __init__(self, cfg: VectorDBConfig, collection: str, dim: int) -> None:
        self.cfg, self.collection, self.dim = cfg, collection, dim
        self.client: MilvusClient | None = None
        self._lock = threading.Lock()
        self._recent: dict[int, tuple[float, str, CachedRow]] = {}  # id -> (time, tenant, row)
        self._deleted: dict[int, float] = {}  # id -> time

    # -- life -------------------------------------------------------------------------------
    def open(self) -> None:
        """Connect, create the collection and its index if missing, and load it."""
        self.client = MilvusClient(uri=self.cfg.uri, token=self.cfg.token,
                                   timeout=self.cfg.timeout_s)
        if not self.client.has_collection(self.collection):
            self._create()
        self.client.load_collection(self.collection)
        # Before reporting ready: wait until Milvus has caught up with every write made before
        # now (a Strong read; ~20 s on a fresh collection), so that rows written by this edge
        # before a restart are visible to the Bounded searches that follow.
        self.client.search(self.collection, data=[[0.0] * self.dim], limit=1,
                           consistency_level="Strong")

    def _create(self) -> None:
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vec", DataType.FLOAT_VECTOR, dim=self.dim)
        schema.add_field("pair_id", DataType.INT64)
        schema.add_field("kind", DataType.INT64)
        schema.add_field("tenant", DataType.VARCHAR, max_length=64)
        schema.add_field("question", DataType.VARCHAR, max_length=MAX_TEXT_BYTES)
        schema.add_field("answer", DataType.VARCHAR, max_length=MAX_TEXT_BYTES)
        schema.add_field("hits", DataType.INT64)
        schema.add_field("value", DataType.DOUBLE)
        schema.add_field("created", DataType.DOUBLE)
        index = MilvusClient.prepare_index_params()
        params = {"IVF_FLAT": {"nlist": self.cfg.nlist}, "HNSW": {"M": 16, "efConstruction": 200},
                  "FLAT": {}}[self.cfg.index_type]
        index.add_index("vec", index_type=self.cfg.index_type, metric_type="L2", params=params)
        self.client.create_collection(self.collection, schema=schema, index_params=index,
                                      consistency_level=CONSISTENCY)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    # -- queries ----------------------------------------------------------------------------
    def search(self, vector: np.ndarray, tenant: str, top_p: int) -> list[CachedRow]:
        """The top-P rows of this tenant by L2 distance J (eq. 1), nearest first."""
        params = {"metric_type": "L2", "params": {"nprobe": self.cfg.nprobe, "ef": 64}}
        (hits,) = self.client.search(
            self.collection, data=[vector.tolist()], limit=top_p, filter=f'tenant == "{tenant}"',
            output_fields=[*_FIELDS, "vec"], search_params=params, consistency_level=CONSISTENCY,
        )
        # Milvus reports squared L2 for metric L2; eq. 1 is the plain distance.
        found = {int(h["entity"]["id"]): _row(h["entity"], float(np.sqrt(max(h["distance"], 0))))
                 for h in hits}
        with self._lock:
            self._expire()
            for row_id in self._deleted:
                found.pop(row_id, None)
            for row_id, (_, row_tenant, row) in self._recent.items():
                if row_tenant == tenant:
                    distance = float(np.linalg.norm(row.vector - vector))
                    found[row_id] = replace(row, distance=distance)
        return sorted(found.values(), key=lambda r: r.distance)[:top_p]

    def count(self) -> int:
        """Rows held by this edge (Bounded: may lag the last few seconds of writes)."""
        (res,) = self.client.query(self.collection, filter="id >= 0", output_fields=["count(*)"],
                                   consistency_level=CONSISTENCY)
        return int(res["count(*)"])

    def _remember(self, tenant: str, rows: list[CachedRow]) -> None:
        now = time.monotonic()
        with self._lock:
            for row in rows:
                self._recent[row.id] = (now, tenant, row)

    def _forget(self, ids: list[int]) -> None:
        now = time.monotonic()
        with self._lock:
            for row_id in ids:
                self._recent.pop(row_id, None)
                self._deleted[row_id] = now

    def _expire(self) -> None:
        horizon = time.monotonic() - RECENT_S
        for table in (self._recent, self._deleted):
            stale = [k for k, v in table.items()
                     if (v[0] if isinstance(v, tuple) else v) < horizon]
            for row_id in stale:
                del table[row_id]

    # -- writes -----------------------------------------------------------------------------
    def insert_pair(self, tenant: str, question: str, answer: str, question_vec: np.ndarray,
                    answer_vec: np.ndarray, value: float) -> int | None:
        """Cache a QA pair as two rows; returns the pair id (None if a text is too long)."""
        if max(len(question.encode()), len(answer.encode())) > MAX_TEXT_BYTES:
            return None
        pair_id = secrets.randbits(61)
        now = time.time()
        rows = [
            {"id": pair_id * 2 + kind - 1, "vec": vec.astype(np.float32).tolist(),
             "pair_id": pair_id, "kind": kind, "tenant": tenant, "question": question,
             "answer": answer, "hits": 0, "value": float(value), "created": now}
            for kind, vec in ((QUESTION, question_vec), (ANSWER, answer_vec))
        ]
        self.client.insert(self.collection, rows)
        self._remember(tenant, [_row(r, 0.0) for r in rows])
        return pair_id

    def update_row(self, row: CachedRow, tenant: str, hits: int, value: float) -> CachedRow:
        """Write back c^f and c^r of a used row (eq. 4-5)."""
        updated = replace(row, hits=hits, value=value)
        self.client.upsert(self.collection, [{
            "id": row.id, "vec": row.vector.tolist(), "pair_id": row.pair_id, "kind": row.kind,
            "tenant": tenant, "question": row.question, "answer": row.answer, "hits": hits,
            "value": float(value), "created": row.created,
        }])
        self._remember(tenant, [updated])
        return updated

    def drop(self) -> None:
        """Delete the whole collection (simulation teardown; never called by edged)."""
        self.client.drop_collection(self.collection)

    def clear(self) -> None:
        """Drop every row (simulation resets; never called by edged)."""
        ids = self._scan()[0].tolist()
        for start in range(0, len(ids), 1000):
            chunk = ids[start : start + 1000]
            self.client.delete(self.collection, filter=f"id in {chunk}")
            self._forget(chunk)

    def evict(self, *, below_mean: bool, max_rows: int, ttl_s: float) -> int:
        """Algorithm 2 lines 15-22 plus a row cap and a TTL; returns the rows dropped.

        Below-mean: drop every row whose value c^r is below the mean value of the edge.
        """
        ids, values, created = self._scan()
        drop = eviction_mask(values, created, below_mean=below_mean, max_rows=max_rows,
                             ttl_s=ttl_s, now=time.time())
        doomed = ids[drop]
        for start in range(0, len(doomed), 1000):
            chunk = doomed[start : start + 1000].tolist()
            self.client.delete(self.collection, filter=f"id in {chunk}")
            self._forget(chunk)
        return len(doomed)

    def _scan(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids, values, created = [], [], []
        rows: dict[int, tuple[float, float]] = {}
        iterator = self.client.query_iterator(self.collection, batch_size=4096, filter="id >= 0",
                                              output_fields=["id", "value", "created"],
                                              consistency_level=CONSISTENCY)
        try:
            while batch := iterator.next():
                for r in batch:
                    rows[int(r["id"])] = (r["value"], r["created"])
        finally:
            iterator.close()
        with self._lock:
            self._expire()
            for row_id, (_, _, row) in self._recent.items():
                rows[row_id] = (row.value, row.created)
            for row_id in self._deleted:
                rows.pop(row_id, None)
        for row_id, (value, made) in rows.items():
            ids.append(row_id)
            values.append(value)
            created.append(made)
        return (np.array(ids, dtype=np.int64), np.array(values, dtype=np.float64),
                np.array(created, dtype=np.float64))


def eviction_mask(values: np.ndarray, created: np.ndarray, *, below_mean: bool, max_rows: int,
                  ttl_s: float, now: float) -> np.ndarray:
    """Which rows to drop: below the mean value c^r (Algorithm 2, lines 15-22), older than the
    TTL, and then the lowest-valued rows beyond the cap."""
    drop = np.zeros(len(values), dtype=bool)
    if len(values) == 0:
        return drop
    if below_mean:
        drop |= values < values.mean()
    if ttl_s > 0:
        drop |= created < now - ttl_s
    keep = np.flatnonzero(~drop)
    if len(keep) > max_rows:
        drop[keep[np.argsort(values[keep])[: len(keep) - max_rows]]] = True
    return drop


def _row(entity: dict, distance: float) -> CachedRow:
    return CachedRow(
        id=int(entity["id"]), pair_id=int(entity["pair_id"]), kind=int(entity["kind"]),
        question=entity["question"], answer=entity["answer"], hits=int(entity["hits"]),
        value=float(entity["value"]), created=float(entity["created"]), distance=distance,
        vector=np.asarray(entity["vec"], dtype=np.float32),
    )
