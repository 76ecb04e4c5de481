"""The edge's vector cache: QA pairs in a Milvus collection (SPEC §3).

Each answered question becomes two rows, the question vector (kind 1) and the answer vector
(kind 2), each carrying the hit count c^f and the cache value c^r. The texts of the pair are
stored once, outside Milvus, in the edge's `TextStore` (velo/edge/texts.py), and read for the top-P
rows of a search only: in Milvus, both texts on both rows were a quarter of its memory. Row ids
are `2 * pair_id + kind - 1`, so a search fetches neither. Searches are filtered by tenant, so
one tenant never sees another tenant's answers.

pymilvus is synchronous; the daemon calls these methods through `asyncio.to_thread`.

Consistency: a search must see this edge's own recent writes. Strong consistency costs
~250 ms a search (it waits for Milvus's time tick), and Session consistency returns nothing
from a client that has not written yet (seen with Milvus 2.3 after a restart). So searches
run Bounded (fast, at most `gracefulTime` = 5 s stale) and this class overlays its own writes
of the last `RECENT_S` seconds (`_Overlay`): recent inserts are searched exactly in memory,
recent updates replace the stale copies and recent deletes are filtered out.

In-process index (`vector_db.in_process_index`, on by default): searches read a copy of the
edge's rows in memory (velo/edge/index.py), written after Milvus under one lock and rebuilt from
Milvus at open and when Milvus comes back, and never ask Milvus: the round trip was most of a
decision. Without it, the rest of this note holds for searches too.

Hot path (measured in tools/bench_edge.py): searches do not fetch the 384 floats of each row
(that halved a search at 10^5 rows), and the hit count / value written back on every reuse
(eq. 4-5) is write-behind: `update_row` only records it, `flush_updates` upserts all pending
rows in one call (edged runs it every `flush_every_s` and on shutdown; other users let it run
by itself once `flush_at` rows are pending).
"""

from __future__ import annotations

import ctypes
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
from pymilvus import DataType, MilvusClient
from pymilvus.client.types import LoadState

from velo.core.names import NAME_RULE, valid_name, valid_scope
from velo.core.shape import AnswerFacts
from velo.core.state import ANSWER, QUESTION, CachedRow
from velo.edge.index import RowIndex
from velo.edge.texts import MEMORY, Entry, TextStore
from velo.runtime.config import require
from velo.runtime.logs import get_logger

log = get_logger("velo.cache")

MAX_TEXT_BYTES = 65_535  # the longest question or answer cached (Milvus's VARCHAR limit)
RECENT_S = 15.0  # longer than Milvus's Bounded staleness (gracefulTime, 5 s by default)
MAX_DIRTY = 512  # pending write-backs that trigger a flush from update_row itself
CONSISTENCY = "Bounded"
# Milvus 2.3 servers do not report the MVCC timestamp pymilvus 3 asks for; the iterator falls
# back to a client timestamp (fine for eviction scans) and warns on every scan.
logging.getLogger("pymilvus.client.iterator.query_iterator").setLevel(logging.ERROR)
_FIELDS = ["id", "hits", "value", "created"]  # what a search fetches of a row
_INDEXED = ["id", "vec", "tenant", "hits", "value", "created"]  # what the in-process index holds
MAX_SEARCH = 16_384  # Milvus's largest top-k
# Rows per Milvus read when the index is rebuilt. pymilvus hands vectors back as lists of Python
# floats (~12 KB a row): measured at 2*10^5 rows, batches of 1,024 peak at half the memory of
# 4,096 (214 vs 434 MB) and read as fast (11.6 vs 14.0 s); 512 takes three times as long.
REBUILD_BATCH = 1024
# A sync whose row counts agree skips the scan of every row id (5 s, 3 s of edged's CPU at
# 10^6 rows, measured), but not this many times in a row: an insert and a delete by another
# client would leave the counts alike.
FULL_SYNC_EVERY = 10


@dataclass
class VectorDBConfig:
    # Milvus server (standalone or cluster). The one-machine stack starts one for you.
    uri: str = "http://127.0.0.1:19530"
    token: str = ""  # Milvus auth token ("user:password"), empty when auth is off
    collection: str = ""  # empty: "velo_<edge_id>"
    # The paper's index; "FLAT", "HNSW" and "IVF_SQ8" (8-bit vectors in the index: a quarter of
    # IVF_FLAT's index memory, distances off by ~1e-3) also work. Set when the collection is made.
    # (IVF_SQ8 keeps no vectors in memory: after a Milvus restart, reading them back for the
    # in-process index failed, "invalid local path", in a benchmark run with Milvus 2.3.5.)
    index_type: str = "IVF_FLAT"
    nlist: int = 128  # IVF lists (paper: 128)
    nprobe: int = 10  # IVF lists probed per search (paper: 10)
    timeout_s: float = 10.0  # per Milvus call
    # Search an in-process copy of this edge's rows (velo/edge/index.py) instead of asking
    # Milvus: a round trip less per request (~5 ms). Milvus stays the store of record; the copy
    # is rebuilt from it at start and after an outage. false: every search asks Milvus.
    in_process_index: bool = True
    # How often the in-process index is brought to what Milvus holds, for rows that other
    # clients wrote into or deleted from this edge's collection (an operator's tool, a restore);
    # the edge's own writes reach it at once. A sync compares row counts first; it scans every
    # row's id (seconds at 10^6 rows) when they differ, and every tenth sync whatever they say.
    index_sync_s: float = 60.0

    def __post_init__(self) -> None:
        require(self.index_type in {"IVF_FLAT", "IVF_SQ8", "FLAT", "HNSW"}, "index_type",
                "must be IVF_FLAT, IVF_SQ8, FLAT or HNSW")
        require(self.nlist >= 1 and 1 <= self.nprobe <= self.nlist, "nprobe",
                "must be between 1 and nlist")
        require(self.index_sync_s > 0, "index_sync_s", "must be > 0 seconds")


class VectorCache:
    def __init__(self, cfg: VectorDBConfig, collection: str, dim: int,
                 flush_at: int = MAX_DIRTY, texts_path: str | Path = MEMORY) -> None:
        """`flush_at`: pending write-backs at which `update_row` flushes them itself (0: never;
        edged flushes from a background task instead, off the event loop). `texts_path`: the
        SQLite file of the pairs' texts (edged keeps it in its data_dir); the default keeps
        them in this process, for caches that do not outlive it."""
        self.cfg, self.collection, self.dim = cfg, collection, dim
        self.flush_at = flush_at
        self.texts_path = texts_path
        self.client: MilvusClient | None = None
        self.texts: TextStore | None = None
        self.removed_without_texts = 0  # rows removed at open: their texts were gone
        self.set_aside = ""  # the collection renamed aside at open (another data folder's)
        # Told the ids of pairs that have no row left (evicted or deleted), from the thread
        # that removed them: what keeps state per pair (edged's per-row thresholds) forgets.
        self.pairs_gone: Callable[[list[int]], None] | None = None
        self._text_fields = False  # a collection made before the texts moved out of Milvus
        self._overlay = _Overlay()
        self._flush_lock = threading.Lock()  # one flush at a time
        # What searches read when `in_process_index`: every write goes to Milvus, then here,
        # under `_write_lock`, so that two writers cannot leave the two in different orders.
        self.index: RowIndex | None = (RowIndex(dim, cfg.nlist, cfg.nprobe)
                                       if cfg.in_process_index else None)
        self._write_lock = threading.RLock()
        self._syncs = 0  # sync_index calls: every FULL_SYNC_EVERY-th scans whatever the counts

    # -- life -------------------------------------------------------------------------------
    def open(self) -> None:
        """Connect, create the collection and its index if missing, and load it."""
        if self.texts is None:
            self.texts = TextStore(self.texts_path)
        self.client = MilvusClient(uri=self.cfg.uri, token=self.cfg.token,
                                   timeout=self.cfg.timeout_s)
        if not self.client.has_collection(self.collection):
            self._create()
        fields = self.client.describe_collection(self.collection)["fields"]
        self._text_fields = any(f["name"] == "question" for f in fields)
        self._load()
        if self._text_fields:
            self._copy_texts_out()
        else:
            if foreign := self._another_folders_rows():
                self._set_aside(foreign)
            self.removed_without_texts = self._remove_rows_without_texts()
        self._backfill_scopes()
        self.reload_index()

    def reload_index(self) -> int:
        """Rebuild the in-process index from Milvus, the store of record (at open, and when
        Milvus is back from an outage); returns the rows it holds. Writes wait meanwhile."""
        if self.index is None:
            return 0
        assert self.client is not None and self.texts is not None  # open() first
        fresh = RowIndex(self.dim, self.cfg.nlist, self.cfg.nprobe)
        for scope, pairs in self.texts.scope_sizes().items():
            fresh.expect(scope, 2 * pairs)  # each scope's lists sized to its rows
        with self._write_lock:
            self.flush_updates()  # what Milvus hands back must be the newest c^f and c^r
            iterator = self.client.query_iterator(
                self.collection, batch_size=REBUILD_BATCH, filter="id >= 0",
                output_fields=_INDEXED, consistency_level="Strong")
            try:
                while batch := iterator.next():
                    self._index_rows(fresh, batch)
            finally:
                iterator.close()
            fresh.compact()
            self.index = fresh
        _give_back_free_heap()
        return len(fresh)

    def sync_index(self) -> tuple[int, int]:
        """Bring the in-process index to the rows Milvus holds (rows other clients wrote or
        deleted); returns (rows added, rows removed). This edge's own writes of the last
        RECENT_S seconds are left as they are: the scan may not see them yet. When Milvus
        holds as many rows as the index, the scan is skipped (FULL_SYNC_EVERY)."""
        if self.index is None:
            return 0, 0
        assert self.client is not None  # open() first
        self._syncs += 1
        if self._syncs % FULL_SYNC_EVERY and self._counts_agree():
            return 0, 0
        started = time.time()
        held = set(self._scan()[0].tolist())
        missing = sorted(held - self.index.row_ids() - set(self._overlay.deleted_ids()))
        # Rows written in the last RECENT_S seconds (inserts, imports) may be missing from a
        # Bounded scan: only older ones are taken as deleted by someone else.
        extra = self.index.row_ids(created_before=started - RECENT_S) - held
        with self._write_lock:
            added = 0
            for start in range(0, len(missing), 1000):
                chunk = missing[start : start + 1000]
                added += self._index_rows(self.index, self.client.query(
                    self.collection, filter=f"id in {chunk}", output_fields=_INDEXED,
                    consistency_level=CONSISTENCY, timeout=self.cfg.timeout_s))
            self.index.remove(extra)
        return added, len(extra)

    def _counts_agree(self) -> bool:
        """Milvus holds (Strong: every write made so far) as many rows as the index, which did
        not change meanwhile. This edge writes Milvus, then the index, under the write lock, so
        a write in between makes them differ."""
        assert self.index is not None
        before = len(self.index)
        return before == self.count(consistency="Strong") == len(self.index)

    def _index_rows(self, index: RowIndex, found: list[dict[str, Any]]) -> int:
        """Add rows read from Milvus to `index`, but those that cannot be served: deleted by
        this edge (Milvus 2.3's iterator may not see a delete of the last seconds: it reads at
        a client timestamp) or whose pair's texts are gone. Returns the rows added."""
        assert self.texts is not None  # open() first
        texts = self.texts.has(int(r["id"]) // 2 for r in found)
        deleted = set(self._overlay.deleted_ids())
        by_scope: dict[str, list[CachedRow]] = {}
        for r in found:
            if int(r["id"]) // 2 in texts and int(r["id"]) not in deleted:
                by_scope.setdefault(r["tenant"], []).append(_row(r, 0.0))
        for scope, rows in by_scope.items():
            index.add(scope, rows)
        return sum(len(rows) for rows in by_scope.values())

    def _load(self) -> None:
        assert self.client is not None  # open() connected
        self.client.load_collection(self.collection)
        # Before reporting ready: wait until Milvus has caught up with every write made before
        # now (a Strong read; ~20 s on a fresh collection), so that rows written by this edge
        # before a restart are visible to the Bounded searches that follow.
        self.client.search(self.collection, data=[[0.0] * self.dim], limit=1,
                           consistency_level="Strong")

    def _another_folders_rows(self) -> int:
        """The collection's rows when this edge's texts file holds no pair and is undamaged,
        else 0. Such rows were written by an edge with another data folder (a relative
        `data_dir` read from another working directory, a new disk, a second stack on the same
        Milvus). New or empty alike: a start that failed after creating the file (Milvus not up
        yet at boot) leaves an empty one. A damaged file (set aside, so this store starts
        empty) or one that holds fewer pairs than the collection lost texts: its rows are
        orphans."""
        assert self.texts is not None
        if self.texts.path == MEMORY or self.texts.quarantined or self.texts.count():
            return 0
        return self.count()

    def _set_aside(self, rows: int) -> None:
        """Another data folder's rows (`_another_folders_rows`): this edge cannot serve them,
        and removing them as orphans would wipe that cache for good. The collection is renamed
        aside, released (kept on Milvus's disk, out of its memory), and this edge starts on a
        new, empty one."""
        assert self.client is not None
        aside = f"{self.collection}_aside_{time.strftime('%Y%m%d%H%M%S')}_{secrets.token_hex(2)}"
        self.client.release_collection(self.collection)
        self.client.rename_collection(self.collection, aside)
        log.warning("this edge's data folder has no texts for the rows of its collection: "
                    "the collection was set aside and the edge starts with an empty cache "
                    "(docs/operating.md, 'The texts file and the collection')",
                    collection=self.collection, set_aside_as=aside, rows=rows,
                    texts=self.texts.path if self.texts else "")
        self.set_aside = aside
        self._create()
        self._load()

    def _remove_rows_without_texts(self) -> int:
        """Rows whose pair has no texts (the store was lost, damaged or truncated) can never be
        served: remove them, so that the cache's size counts what can be served. Checked when
        the store holds fewer pairs than Milvus; returns how many rows went."""
        assert self.texts is not None
        assert self.client is not None  # open() connected before calling this
        pairs = self.count() // 2
        if self.texts.count() >= pairs:
            return 0
        kept = self.texts.has_all()
        orphans: list[int] = []
        iterator = self.client.query_iterator(
            self.collection, batch_size=4096, filter="id >= 0", output_fields=["id"],
            consistency_level="Strong")
        try:
            while batch := iterator.next():
                orphans += [int(r["id"]) for r in batch if int(r["id"]) // 2 not in kept]
        finally:
            iterator.close()
        for start in range(0, len(orphans), 1000):
            self.client.delete(self.collection, ids=orphans[start : start + 1000],
                               timeout=self.cfg.timeout_s)
        if orphans:
            log.warning("removed cached rows whose texts are gone", rows=len(orphans),
                        texts=self.texts.path, store_set_aside=str(self.texts.quarantined or ""))
        return len(orphans)

    def _backfill_scopes(self) -> None:
        """Entries stored before the TextStore kept scopes, tenants and creation times: read
        them from their Milvus rows (a conversation scope's tenant cannot be told: left
        unknown, and such entries are listed under no tenant)."""
        assert self.texts is not None and self.client is not None  # called by open()
        missing = self.texts.without_scope()
        for start in range(0, len(missing), 1000):
            chunk = missing[start : start + 1000]
            ids = [2 * p + k for p in chunk for k in (0, 1)]
            rows = self.client.query(self.collection, filter=f"id in {ids}",
                                     output_fields=["id", "tenant", "created"],
                                     consistency_level="Strong")
            # Texts whose rows are gone (a crash between the two deletes) get an empty scope,
            # so that they are not looked up again at every start.
            scopes = {p: ("", "", 0.0) for p in chunk}
            scopes |= {int(r["id"]) // 2: (r["tenant"], r["tenant"] if valid_name(r["tenant"])
                                           else "", float(r["created"])) for r in rows}
            self.texts.set_scopes((p, *scope) for p, scope in scopes.items())

    def _copy_texts_out(self) -> None:
        """A collection whose rows still carry their texts (VELO before the TextStore): copy
        the texts the store lacks into it. Its rows keep theirs (new rows get empty ones), and
        leave Milvus's memory as they are evicted."""
        assert self.texts is not None and self.client is not None  # called by open()
        iterator = self.client.query_iterator(
            self.collection, batch_size=2048, filter="id >= 0",
            output_fields=["id", "question", "answer"], consistency_level="Strong")
        try:
            while batch := iterator.next():
                texts = {int(r["id"]) // 2: (r["question"], r["answer"]) for r in batch}
                known = self.texts.has(texts)
                self.texts.put(Entry(p, q, a) for p, (q, a) in texts.items() if p not in known)
        finally:
            iterator.close()

    def _create(self) -> None:
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vec", DataType.FLOAT_VECTOR, dim=self.dim)
        schema.add_field("pair_id", DataType.INT64)
        schema.add_field("kind", DataType.INT64)
        schema.add_field("tenant", DataType.VARCHAR, max_length=64)
        schema.add_field("hits", DataType.INT64)
        schema.add_field("value", DataType.DOUBLE)
        schema.add_field("created", DataType.DOUBLE)
        index = MilvusClient.prepare_index_params()
        params = {"IVF_FLAT": {"nlist": self.cfg.nlist}, "IVF_SQ8": {"nlist": self.cfg.nlist},
                  "HNSW": {"M": 16, "efConstruction": 200}, "FLAT": {}}[self.cfg.index_type]
        index.add_index("vec", index_type=self.cfg.index_type, metric_type="L2", params=params)
        assert self.client is not None  # called by open()
        self.client.create_collection(self.collection, schema=schema, index_params=index,
                                      consistency_level=CONSISTENCY)

    def ping(self, timeout_s: float = 2.0, warm: bool = False) -> str | None:
        """None when Milvus answers and this edge's collection is loaded; else what is wrong.

        A restarted Milvus 2.3 standalone may come back with the collection released (every
        search then fails "collection not loaded"): the ping loads it again. `warm` (Milvus
        was down): also wait, up to a minute, until a search answers; the first ones after a
        restart take longer than vector_db.timeout_s, and requests must not be let in before.
        """
        try:
            assert self.client is not None  # open() first
            if not self.client.has_collection(self.collection, timeout=timeout_s):
                return f"collection {self.collection} does not exist any more"
            state = self.client.get_load_state(self.collection, timeout=timeout_s)["state"]
            if state != LoadState.Loaded:
                self.client.load_collection(self.collection, timeout=60)
            if warm:
                self.client.search(self.collection, data=[[0.0] * self.dim], limit=1,
                                   consistency_level="Strong", timeout=60)
                # Milvus may have come back with other rows than it went down with (a restore,
                # a lost volume): what it holds is what may be served.
                self.reload_index()
        except Exception as exc:  # pymilvus raises many types
            return f"Milvus at {self.cfg.uri} does not answer: {str(exc)[:300]}"
        return None

    def close(self) -> None:
        """Flush pending write-backs (nothing learned is lost), then disconnect."""
        if self.client is not None:
            self.flush_updates()
            self.client.close()
            self.client = None
        if self.texts is not None:
            self.texts.close()
            self.texts = None

    # -- queries ----------------------------------------------------------------------------
    def search(self, vector: np.ndarray, tenant: str, top_p: int) -> list[CachedRow]:
        """The top-P rows of this tenant by L2 distance J (eq. 1), nearest first."""
        (result,) = self.search_many([(tenant, vector)], top_p)
        if isinstance(result, Exception):
            raise result
        return result

    def search_many(self, queries: list[tuple[str, np.ndarray]], top_p: int,
                    ) -> list[list[CachedRow] | Exception]:
        """`search` for many (tenant, vector) queries: one Milvus search per tenant.

        A query that fails (a bad tenant, Milvus refusing one search) gets its exception in
        its place and fails alone: the other tenants' queries of the batch are answered.
        """
        by_tenant: dict[str, list[int]] = {}
        for i, (tenant, _) in enumerate(queries):
            by_tenant.setdefault(tenant, []).append(i)
        results: list[list[CachedRow] | Exception] = [[] for _ in queries]
        if self.index is not None:
            for tenant, positions in by_tenant.items():
                try:
                    tenant_filter(tenant)  # a bad tenant fails alone, as with Milvus
                    found = self.index.search(tenant, np.stack([queries[i][1]
                                                                for i in positions]), top_p)
                    for i, rows in zip(positions, found, strict=True):
                        results[i] = self._with_texts(rows)
                except Exception as exc:
                    for i in positions:
                        results[i] = exc
            return results
        params = {"metric_type": "L2", "params": {"nprobe": self.cfg.nprobe, "ef": 64}}
        for tenant, positions in by_tenant.items():
            vectors = [queries[i][1] for i in positions]
            try:
                assert self.client is not None  # open() first
                found = self.client.search(
                    self.collection, data=[v.tolist() for v in vectors], limit=top_p,
                    filter=tenant_filter(tenant), output_fields=_FIELDS,
                    search_params=params, consistency_level=CONSISTENCY,
                    timeout=self.cfg.timeout_s)
                for i, vector, hits in zip(positions, vectors, found, strict=True):
                    results[i] = self._merge_recent(hits, vector, tenant, top_p)
            except Exception as exc:  # pymilvus raises many types; each query gets its own
                for i in positions:
                    results[i] = exc
        return results

    def _merge_recent(self, hits: list[dict[str, Any]], vector: np.ndarray, tenant: str,
                      top_p: int) -> list[CachedRow]:
        # Milvus reports squared L2 for metric L2; eq. 1 is the plain distance.
        found = {int(h["entity"]["id"]): _row(h["entity"], float(np.sqrt(max(h["distance"], 0))))
                 for h in hits}
        nearest = sorted(self._overlay.merge(found, vector, tenant).values(),
                         key=lambda r: r.distance)[:top_p]
        return self._with_texts(nearest)

    def _with_texts(self, nearest: list[CachedRow]) -> list[CachedRow]:
        assert self.texts is not None  # open() first
        entries = self.texts.get(r.pair_id for r in nearest)
        # A row without texts (its pair's texts lost with the edge's data_dir) is left out
        # rather than served empty.
        return [replace(r, question=e.question, answer=e.answer, facts=e.facts)
                for r in nearest if (e := entries.get(r.pair_id)) is not None]

    def search_scopes(self, vector: np.ndarray, scopes: list[str], min_similarity: float,
                      ) -> list[CachedRow]:
        """Every row of these scopes at least `min_similarity` alike to `vector` (up to
        MAX_SEARCH of them), without texts: for an operator's delete by question."""
        if not scopes:
            return []
        assert self.client is not None  # open() first
        found: dict[int, CachedRow] = {}
        # Every IVF list probed; HNSW's ef must reach the top-k.
        params = {"metric_type": "L2", "params": {"nprobe": self.cfg.nlist, "ef": MAX_SEARCH}}
        for start in range(0, len(scopes), 256):
            chunk = scopes[start : start + 256]
            for scope in chunk:
                tenant_filter(scope)  # checked: the filter is an expression
            (hits,) = self.client.search(
                self.collection, data=[vector.tolist()], limit=MAX_SEARCH,
                filter="tenant in [" + ",".join(f'"{c}"' for c in chunk) + "]",
                output_fields=_FIELDS, search_params=params, consistency_level="Strong",
                timeout=self.cfg.timeout_s)
            found |= {int(h["entity"]["id"]): _row(h["entity"],
                                                   float(np.sqrt(max(h["distance"], 0))))
                      for h in hits}
            for scope in chunk:
                found = self._overlay.merge(found, vector, scope)
        return [r for r in found.values() if r.similarity >= min_similarity]

    def pair_rows(self, pair_ids: list[int]) -> dict[int, list[CachedRow]]:
        """The rows (question, answer) of these pairs as they stand now, without texts."""
        rows: dict[int, list[CachedRow]] = {}
        latest = self._overlay.latest()
        deleted = set(self._overlay.deleted_ids())
        for start in range(0, len(pair_ids), 500):
            ids = [2 * p + k for p in pair_ids[start : start + 500] for k in (0, 1)]
            assert self.client is not None  # open() first
            found = {int(r["id"]): _row(r, 0.0) for r in self.client.query(
                self.collection, filter=f"id in {ids}", output_fields=_FIELDS,
                consistency_level=CONSISTENCY, timeout=self.cfg.timeout_s)}
            for row_id in ids:
                row = latest.get(row_id) or found.get(row_id)
                if row is not None and row_id not in deleted:
                    rows.setdefault(row.pair_id, []).append(row)
        return rows

    def count(self, consistency: str = CONSISTENCY) -> int:
        """Rows held by this edge (Bounded by default: may lag the last few seconds of writes;
        "Strong": every write made so far)."""
        assert self.client is not None  # open() first
        (res,) = self.client.query(self.collection, filter="id >= 0", output_fields=["count(*)"],
                                   consistency_level=consistency, timeout=self.cfg.timeout_s)
        return int(res["count(*)"])

    # -- writes -----------------------------------------------------------------------------
    def insert_pair(self, scope: str, question: str, answer: str, question_vec: np.ndarray,
                    answer_vec: np.ndarray, value: float, *, tenant: str = "",
                    facts: AnswerFacts | None = None) -> int | None:
        """Cache a QA pair as two rows; returns the pair id (None if a text is too long).
        `scope`: where it is looked up (a tenant, or a conversation's scope); `tenant`: whose
        it is (by default the scope, when that is a tenant)."""
        (pair_id,) = self.insert_pairs(scope, [(question, answer, question_vec, answer_vec,
                                                facts or AnswerFacts())], value, tenant=tenant)
        return pair_id

    def insert_pairs(self, scope: str,
                     pairs: list[tuple[str, str, np.ndarray, np.ndarray, AnswerFacts]],
                     value: float, *, tenant: str = "") -> list[int | None]:
        """`insert_pair` for many (question, answer, vectors, facts) in one write each to the
        text store and to Milvus; visible to this edge's searches at once."""
        if not valid_scope(scope):
            raise ValueError(f"tenant {scope[:64]!r} is not {NAME_RULE}")
        tenant = tenant or (scope if valid_name(scope) else "")
        ids: list[int | None] = []
        entries, rows = [], []
        for question, answer, question_vec, answer_vec, facts in pairs:
            if max(len(question.encode()), len(answer.encode())) > MAX_TEXT_BYTES:
                ids.append(None)
                continue
            pair_id, pair = _pair_rows(scope, question_vec, answer_vec, value, self._text_fields)
            entries.append(Entry(pair_id, question, answer, tenant, scope, pair[0]["created"],
                                 facts))
            rows += pair
            ids.append(pair_id)
        if rows:
            assert self.texts is not None and self.client is not None  # open() first
            self.texts.put(entries)  # before the rows that point at them
            made = [_row(r, 0.0) for r in rows]
            with self._writing() as left_s:
                self.client.insert(self.collection, rows, timeout=left_s)
                self._overlay.inserted(scope, made)
                if self.index is not None:
                    self.index.add(scope, made)
        return ids

    def import_pairs(self, tenant: str, questions: list[str], answers: list[str],
                     question_vecs: np.ndarray, answer_vecs: np.ndarray, value: float,
                     batch: int = 2000) -> int:
        """Bulk-load QA pairs (warm-starting an edge, benchmarks); returns the rows written.

        Unlike `insert_pair`, imported rows are not overlaid on searches: they become visible
        once Milvus catches up (Bounded staleness, or at once after `wait_indexed`).
        """
        if not valid_scope(tenant):
            raise ValueError(f"tenant {tenant[:64]!r} is not {NAME_RULE}")
        written = 0
        rows: list[dict[str, Any]] = []
        texts: list[Entry] = []

        def write() -> int:
            assert self.texts is not None and self.client is not None  # open() first
            self.texts.put(texts)
            with self._write_lock:
                self.client.insert(self.collection, rows)
                if self.index is not None:
                    self.index.add(tenant, [_row(r, 0.0) for r in rows])
            return len(rows)

        owner = tenant if valid_name(tenant) else ""
        for q, a, qv, av in zip(questions, answers, question_vecs, answer_vecs, strict=True):
            if max(len(q.encode()), len(a.encode())) > MAX_TEXT_BYTES:
                continue
            pair_id, pair = _pair_rows(tenant, qv, av, value, self._text_fields)
            rows += pair
            texts.append(Entry(pair_id, q, a, owner, tenant, pair[0]["created"]))
            if len(rows) >= batch:
                written, rows, texts = written + write(), [], []
        if rows:
            written += write()
        return written

    def wait_indexed(self, timeout_s: float = 600.0) -> None:
        """Seal what was written and wait until the index covers every row."""
        assert self.client is not None  # open() first
        self.client.flush(self.collection)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = self.client.describe_index(self.collection, "vec")
            if int(info.get("pending_index_rows", 0)) == 0 and \
                    int(info.get("indexed_rows", 0)) >= int(info.get("total_rows", 0)):
                return
            time.sleep(0.5)
        raise TimeoutError(f"index of {self.collection} not built in {timeout_s} s")

    def update_row(self, row: CachedRow, tenant: str, hits: int, value: float) -> CachedRow:
        """Write back c^f and c^r of a used row (eq. 4-5); Milvus sees it at the next flush."""
        updated = replace(row, hits=hits, value=value)
        pending = self._overlay.updated(tenant, updated)
        if self.index is not None:
            self.index.update(row.id, hits, value)
        if self.flush_at and pending >= self.flush_at:
            self.flush_updates()
        return updated

    def flush_updates(self) -> int:
        """Upsert every pending write-back in one call; returns the rows written."""
        with self._flush_lock:
            dirty = self._overlay.take_dirty()
            if not dirty:
                return 0
            try:
                vectors = self._overlay.vectors(list(dirty))
                missing = [i for i in dirty if i not in vectors]
                for start in range(0, len(missing), 1000):
                    chunk = missing[start : start + 1000]
                    assert self.client is not None  # open() first
                    for r in self.client.query(self.collection, filter=f"id in {chunk}",
                                               output_fields=["id", "vec"],
                                               consistency_level=CONSISTENCY,
                                               timeout=self.cfg.timeout_s):
                        vectors[int(r["id"])] = r["vec"]
                # Rows evicted meanwhile (no vector found, or deleted since) stay deleted: the
                # check and the upsert are one step for the other writers.
                with self._writing() as left_s:
                    rows = [_entity(tenant, row, vectors[i], self._text_fields)
                            for i, (tenant, row) in dirty.items()
                            if i in vectors and not self._overlay.is_deleted(i)]
                    if rows:
                        assert self.client is not None  # open() first
                        self.client.upsert(self.collection, rows, timeout=left_s)
            except Exception:
                self._overlay.restore_dirty(dirty)  # retried at the next flush
                raise
            return len(rows)

    def drop(self) -> None:
        """Delete the whole collection (simulation teardown; never called by edged)."""
        assert self.client is not None and self.texts is not None  # open() first
        self.client.drop_collection(self.collection)
        self.texts.clear()
        self._overlay = _Overlay()  # pending write-backs went with it
        if self.index is not None:
            self.index.clear()

    def clear(self) -> None:
        """Drop every row (simulation resets; never called by edged)."""
        ids = self._scan()[0].tolist()
        assert self.client is not None  # _scan() needed it too
        for start in range(0, len(ids), 1000):
            self._delete_rows(ids[start : start + 1000])
        assert self.texts is not None  # open() first
        self.texts.clear()

    def delete_pairs(self, pair_ids: list[int]) -> int:
        """Delete whole pairs (both rows, then their texts); returns the rows deleted."""
        ids = [2 * p + k for p in pair_ids for k in (0, 1)]
        for start in range(0, len(ids), 1000):
            self._delete_rows(ids[start : start + 1000])
        assert self.texts is not None  # open() first
        self.texts.delete(pair_ids)
        if pair_ids and self.pairs_gone is not None:
            self.pairs_gone(list(pair_ids))
        return len(ids)

    def evict(self, *, below_mean: bool, max_rows: int, ttl_s: float,
              grace_s: float = 0.0) -> int:
        """Algorithm 2 lines 15-22 plus a row cap and a TTL; returns the rows dropped.

        Below-mean: drop every row whose value c^r is below the mean value of the edge, except
        rows younger than `grace_s` (0: the paper's rule as written; see `eviction_mask`).

        The rows' values come from the in-process index, which holds them for the state: a
        pass runs every xi requests, and scanning them from Milvus took seconds of CPU at
        10^6 rows (under load the passes ran back to back). Rows another client wrote since
        the last sync wait for it (vector_db.index_sync_s).
        """
        ids, values, created = self._scan() if self.index is None else self.index.facts()
        drop = eviction_mask(values, created, below_mean=below_mean, max_rows=max_rows,
                             ttl_s=ttl_s, now=time.time(), grace_s=grace_s)
        doomed = ids[drop]
        if len(doomed) == 0:  # most passes; the set of kept pairs below: 0.07 s at 10^6 rows
            return 0
        for start in range(0, len(doomed), 1000):
            self._delete_rows(doomed[start : start + 1000].tolist())
        # A pair's texts go once neither of its rows is left (rows are evicted one by one).
        gone = set((doomed // 2).tolist()) - set((ids[~drop] // 2).tolist())
        assert self.texts is not None  # open() first
        self.texts.delete(gone)
        if gone and self.pairs_gone is not None:
            self.pairs_gone(sorted(gone))
        return len(doomed)

    def _delete_rows(self, ids: list[int]) -> None:
        """Delete rows from Milvus, then from what searches see (the index, the overlay)."""
        assert self.client is not None  # open() first
        with self._writing() as left_s:
            self.client.delete(self.collection, filter=f"id in {ids}", timeout=left_s)
            self._overlay.deleted(ids)
            if self.index is not None:
                self.index.remove(ids)

    @contextmanager
    def _writing(self) -> Iterator[float]:
        """The write lock, waited for within vector_db.timeout_s (a write stuck in a frozen
        Milvus must not add its wait to the next one's); yields the seconds left for the call."""
        deadline = time.monotonic() + self.cfg.timeout_s
        if not self._write_lock.acquire(timeout=self.cfg.timeout_s):
            raise TimeoutError("another write to Milvus did not finish within "
                               f"vector_db.timeout_s = {self.cfg.timeout_s} s")
        try:
            yield max(0.1, deadline - time.monotonic())
        finally:
            self._write_lock.release()

    def _scan(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids, values, created = [], [], []
        rows: dict[int, tuple[float, float]] = {}
        assert self.client is not None  # open() first
        iterator = self.client.query_iterator(self.collection, batch_size=4096, filter="id >= 0",
                                              output_fields=["id", "value", "created"],
                                              consistency_level=CONSISTENCY)
        try:
            while batch := iterator.next():
                for r in batch:
                    rows[int(r["id"])] = (r["value"], r["created"])
        finally:
            iterator.close()
        for row_id, row in self._overlay.latest().items():
            rows[row_id] = (row.value, row.created)
        for row_id in self._overlay.deleted_ids():
            rows.pop(row_id, None)
        for row_id, (value, made) in rows.items():
            ids.append(row_id)
            values.append(value)
            created.append(made)
        return (np.array(ids, dtype=np.int64), np.array(values, dtype=np.float64),
                np.array(created, dtype=np.float64))


def tenant_filter(tenant: str) -> str:
    """The Milvus filter of one tenant's rows; ValueError for a tenant that breaks the name
    rule. Checked here too, whoever the caller: the filter is an expression, and the rule's
    alphabet has no quote or backslash, so nothing a caller sends can become its syntax."""
    if not valid_scope(tenant):
        raise ValueError(f"tenant {tenant[:64]!r} is not {NAME_RULE}")
    return f'tenant == "{tenant}"'


def eviction_mask(values: np.ndarray, created: np.ndarray, *, below_mean: bool, max_rows: int,
                  ttl_s: float, now: float, grace_s: float = 0.0) -> np.ndarray:
    """Which rows to drop: below the mean value c^r (Algorithm 2, lines 15-22), older than the
    TTL, and then the lowest-valued rows beyond the cap.

    Rows younger than `grace_s` are kept by the below-mean rule (a new row's value starts at
    q - d, a forward's whole delay below the reused rows around it: the rule as written drops
    it before anyone could reuse it), and the cap takes the older rows first (lowest value
    first), reaching young ones only if the old ones are not enough: a hard cap stays hard.
    """
    drop = np.zeros(len(values), dtype=bool)
    if len(values) == 0:
        return drop
    young = created > now - grace_s if grace_s > 0 else np.zeros(len(values), dtype=bool)
    if below_mean:
        drop |= (values < values.mean()) & ~young
    if ttl_s > 0:
        drop |= created < now - ttl_s
    keep = np.flatnonzero(~drop)
    if len(keep) > max_rows:
        # Old rows before young ones, each by value: lexsort's last key is the primary one.
        order = np.lexsort((values[keep], young[keep]))
        drop[keep[order[: len(keep) - max_rows]]] = True
    return drop


class _Overlay:
    """This edge's writes of the last RECENT_S seconds, and the write-backs not yet flushed.

    Dicts keep insertion order, and an entry is re-inserted when touched, so the oldest
    entries are always first and expiry stops at the first fresh one.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inserted: dict[int, tuple[float, str, CachedRow]] = {}  # id -> (t, tenant, row)
        self._updated: dict[int, tuple[float, CachedRow]] = {}  # id -> (t, row)
        self._dirty: dict[int, tuple[str, CachedRow]] = {}  # id -> (tenant, row), unflushed
        self._deleted: dict[int, float] = {}  # id -> t

    def inserted(self, tenant: str, rows: list[CachedRow]) -> None:
        now = time.monotonic()
        with self._lock:
            for row in rows:
                self._inserted[row.id] = (now, tenant, row)

    def updated(self, tenant: str, row: CachedRow) -> int:
        """Record a write-back; returns how many are pending."""
        now = time.monotonic()
        with self._lock:
            self._updated.pop(row.id, None)
            self._updated[row.id] = (now, row)
            self._dirty[row.id] = (tenant, row)
            return len(self._dirty)

    def deleted(self, ids: list[int]) -> None:
        now = time.monotonic()
        with self._lock:
            for row_id in ids:
                self._inserted.pop(row_id, None)
                self._updated.pop(row_id, None)
                self._dirty.pop(row_id, None)
                self._deleted[row_id] = now

    def is_deleted(self, row_id: int) -> bool:
        with self._lock:
            return row_id in self._deleted

    def take_dirty(self) -> dict[int, tuple[str, CachedRow]]:
        with self._lock:
            dirty, self._dirty = self._dirty, {}
            now = time.monotonic()
            for row_id, (_, row) in dirty.items():  # Milvus may lag the flush by its staleness
                self._updated.pop(row_id, None)
                self._updated[row_id] = (now, row)
            return dirty

    def restore_dirty(self, dirty: dict[int, tuple[str, CachedRow]]) -> None:
        with self._lock:
            for row_id, entry in dirty.items():
                if row_id not in self._deleted:
                    self._dirty.setdefault(row_id, entry)

    def vectors(self, ids: list[int]) -> dict[int, list[float]]:
        """Vectors of recently inserted rows (the others are read back from Milvus)."""
        with self._lock:
            # Inserted rows come from entities with their "vec" (`_row`): never None here.
            return {i: cast(np.ndarray, self._inserted[i][2].vector).tolist()
                    for i in ids if i in self._inserted}

    def merge(self, found: dict[int, CachedRow], vector: np.ndarray,
              tenant: str) -> dict[int, CachedRow]:
        """Search results `found` (id -> row, from Milvus) as this edge last wrote them."""
        with self._lock:
            self._expire()
            for row_id in self._deleted:
                found.pop(row_id, None)
            for row_id, (_, row_tenant, row) in self._inserted.items():
                if row_tenant == tenant:
                    distance = float(np.linalg.norm(row.vector - vector))
                    found[row_id] = replace(row, distance=distance)
            for row_id, row in found.items():
                # An unflushed write-back is the newest version and never expires.
                newer = (self._dirty[row_id][1] if row_id in self._dirty
                         else self._updated[row_id][1] if row_id in self._updated else None)
                if newer is not None:
                    found[row_id] = replace(row, hits=newer.hits, value=newer.value)
        return found

    def latest(self) -> dict[int, CachedRow]:
        """Recently inserted or updated rows, newest version."""
        with self._lock:
            self._expire()
            rows = {i: row for i, (_, _, row) in self._inserted.items()}
            rows.update({i: row for i, (_, row) in self._updated.items()})
            rows.update({i: row for i, (_, row) in self._dirty.items()})
            return rows

    def deleted_ids(self) -> list[int]:
        with self._lock:
            return list(self._deleted)

    def _expire(self) -> None:
        horizon = time.monotonic() - RECENT_S
        entry: Any  # (t, ...) or t, by table
        for table in (self._inserted, self._updated, self._deleted):
            while table:
                row_id, entry = next(iter(table.items()))
                if (entry[0] if isinstance(entry, tuple) else entry) >= horizon:
                    break
                del table[row_id]


def _entity(tenant: str, row: CachedRow, vector: list[float],
            text_fields: bool) -> dict[str, Any]:
    entity = {"id": row.id, "vec": vector, "pair_id": row.pair_id, "kind": row.kind,
              "tenant": tenant, "hits": row.hits, "value": float(row.value),
              "created": row.created}
    if text_fields:  # an old collection's required fields; the texts are in the TextStore
        entity.update(question="", answer="")
    return entity


def _pair_rows(tenant: str, question_vec: np.ndarray, answer_vec: np.ndarray, value: float,
               text_fields: bool) -> tuple[int, list[dict[str, Any]]]:
    pair_id = secrets.randbits(61)
    now = time.time()
    return pair_id, [
        _entity(tenant, CachedRow(id=pair_id * 2 + kind - 1, pair_id=pair_id, kind=kind,
                                  question="", answer="", hits=0, value=float(value),
                                  created=now, distance=0.0),
                np.asarray(vec, np.float32).tolist(), text_fields)
        for kind, vec in ((QUESTION, question_vec), (ANSWER, answer_vec))]


def _give_back_free_heap() -> None:
    """Return the heap a rebuild freed to the OS. glibc keeps freed pages of its arenas for
    reuse, so the transient lists of a rebuild stayed in edged's RSS for good (at 2*10^5 rows,
    +105 MB on top of the index; docs/performance.md). No-op where libc has no malloc_trim."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def _row(entity: dict[str, Any], distance: float) -> CachedRow:
    """A row as Milvus returns it; its texts are filled in from the TextStore."""
    row_id = int(entity["id"])
    return CachedRow(
        id=row_id, pair_id=row_id // 2, kind=row_id % 2 + 1, question="", answer="",
        hits=int(entity["hits"]), value=float(entity["value"]),
        created=float(entity["created"]), distance=distance,
        vector=np.asarray(entity["vec"], dtype=np.float32) if "vec" in entity else None,
    )
