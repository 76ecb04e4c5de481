"""The edge's rows in memory, searched in process (FAISS): what a decision searches.

Milvus is the store of record (durable, and shared at scale), but a search through it costs a
round trip, 3-6 ms whatever the size (docs/performance.md), against 0.1-0.7 ms for the same
probe here. So `VectorCache` writes every change to Milvus first and then here, and searches
only here; at start, and after Milvus comes back from an outage, this index is rebuilt from
Milvus. Writes that fail in Milvus never reach the index; a crash between the two writes is
mended by the rebuild at the next start (tests/test_row_index.py).

Each scope (a tenant, or a conversation's scope) has an index of its own, so a search never
sees another tenant's rows and needs no filter. A scope is searched exactly (a flat index)
while it is small; past `exact_up_to` rows it is re-built as IVF with 8-bit scalar-quantised
vectors: 384 bytes a row instead of 1,536, distances off by about 1e-3. Its number of lists is
Milvus's nlist, or the power of two nearest √rows where that is more, rows being what the
scope holds when it is trained or, in a rebuild, what it will hold (`expect`): with nprobe
fixed, a probe then scans ~nprobe·√rows rows instead of a fixed share of them. At 10^6 rows,
1,024 lists probe in 1.1 ms against 11.6 ms for 128, with the same hits on the labelled pairs
(docs/performance.md). A scope that grows large while the edge runs keeps its lists until the
next start.

A row's hit count c^f, value c^r and creation time live in arrays beside the vectors, read at
search time: the state needs them, and Milvus would cost the round trip again.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable

import faiss
import numpy as np

from velo.core.state import CachedRow

EXACT_UP_TO = 8192  # rows a scope is searched exactly for (a flat search of 8k rows: ~1 ms)
TRAIN_PER_LIST = 40  # rows per IVF list a scope is trained on (FAISS warns under 39)


def _one_thread() -> None:
    """FAISS would spread a search over OpenMP threads, which spin while they wait and take
    the cores from the embedder; one probe takes about a millisecond on one core. The setting
    holds per calling thread (searches come from worker threads), so it is made on each call."""
    faiss.omp_set_num_threads(1)


class _Scope:
    """One scope's index: FAISS ids are slots in RowIndex's arrays."""

    def __init__(self, dim: int) -> None:
        self.index: faiss.Index = faiss.IndexIDMap2(faiss.IndexFlatL2(dim))
        self.exact = True
        self.rows = 0
        self.nlist = 0  # IVF lists, once approximate
        self.expected = 0  # rows it will hold (a rebuild knows), 0 if not known
        self.lists: faiss.InvertedLists | None = None  # IVF lists made by compact()


class RowIndex:
    """Every row of one edge, searchable by scope. Thread-safe (one lock: a probe is short)."""

    def __init__(self, dim: int, nlist: int = 128, nprobe: int = 10,
                 exact_up_to: int = EXACT_UP_TO) -> None:
        self.dim, self.nlist, self.nprobe, self.exact_up_to = dim, nlist, nprobe, exact_up_to
        self._lock = threading.Lock()
        self._scopes: dict[str, _Scope] = {}
        self._slot: dict[int, int] = {}  # row id -> slot
        self._free: list[int] = []  # slots of removed rows, used again first
        self._next_slot = 0  # slots below it have been used
        size = 1024
        self._row_id = np.full(size, -1, np.int64)
        self._scope_of = np.zeros(size, np.int32)  # into self._scope_names
        self._hits = np.zeros(size, np.int64)
        self._value = np.zeros(size, np.float64)
        self._created = np.zeros(size, np.float64)
        self._scope_names: list[str] = []
        self._scope_code: dict[str, int] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._slot)

    def row_ids(self, created_before: float | None = None) -> set[int]:
        """Every row id held (what may be served), or those created before a time."""
        with self._lock:
            if created_before is None:
                return set(self._slot)
            return {i for i, slot in self._slot.items() if self._created[slot] < created_before}

    def facts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every row held: its id, value c^r and creation time (what eviction decides on)."""
        with self._lock:
            used = slice(0, self._next_slot)
            held = self._row_id[used] >= 0
            return (self._row_id[used][held], self._value[used][held],
                    self._created[used][held])

    def memory_bytes(self) -> int:
        """What the index holds in memory: vectors (8-bit or float), ids and row facts."""
        with self._lock:
            arrays = sum(a.nbytes for a in (self._row_id, self._scope_of, self._hits,
                                            self._value, self._created))
            # Flat: float vectors and ids; IVF: 8-bit vectors, ids and the centroids.
            vectors = sum(s.rows * (4 * self.dim + 8) if s.exact
                          else s.rows * (self.dim + 8) + 4 * self.dim * s.nlist
                          for s in self._scopes.values())
            # A dict entry with its two ints is about 100 bytes in CPython.
            return arrays + vectors + 100 * len(self._slot)

    def lists_for(self, rows: int) -> int:
        """IVF lists for a scope of `rows`: nlist, or the power of two nearest √rows if more."""
        return max(self.nlist, 1 << round(math.log2(math.sqrt(rows)))) if rows > 0 else self.nlist

    # -- writes ---------------------------------------------------------------------------
    def expect(self, scope: str, rows: int) -> None:
        """`scope` will hold about `rows` rows (a rebuild counts them first): it is trained
        once it holds enough of them for `lists_for(rows)` lists, not at `exact_up_to`."""
        with self._lock:
            self._scope(scope).expected = rows

    def add(self, scope: str, rows: Iterable[CachedRow]) -> None:
        """Add rows (each with its vector) to `scope`; a row already held is replaced."""
        rows = list(rows)
        if not rows:
            return
        vectors = np.stack([np.asarray(r.vector, np.float32) for r in rows])
        _one_thread()
        with self._lock:
            self._remove([r.id for r in rows if r.id in self._slot])
            held = self._scope(scope)
            code = self._scope_code[scope]
            slots = np.array([self._take_slot() for _ in rows], np.int64)
            for slot, row in zip(slots.tolist(), rows, strict=True):
                self._slot[row.id] = slot
                self._row_id[slot] = row.id
                self._scope_of[slot] = code
                self._hits[slot] = row.hits
                self._value[slot] = row.value
                self._created[slot] = row.created
            held.index.add_with_ids(vectors, slots)
            held.rows += len(rows)
            if held.exact and held.rows > max(
                    self.exact_up_to, TRAIN_PER_LIST * self.lists_for(held.expected)):
                self._approximate(held)

    def remove(self, row_ids: Iterable[int]) -> None:
        """Forget rows (ids not held are ignored)."""
        _one_thread()
        with self._lock:
            self._remove([i for i in row_ids if i in self._slot])

    def update(self, row_id: int, hits: int, value: float) -> None:
        """A used row's new c^f and c^r (eq. 4-5); a row not held is ignored."""
        with self._lock:
            slot = self._slot.get(row_id)
            if slot is not None:
                self._hits[slot] = hits
                self._value[slot] = value

    def compact(self) -> None:
        """Give back the room the IVF lists grew into: each list is a vector that doubles as
        rows come, so up to half its memory is spare (at 10^6 rows, 140 MB of 656). A rebuild
        calls this once its rows are in."""
        with self._lock:
            for held in self._scopes.values():
                if held.exact:
                    continue
                ivf = faiss.extract_index_ivf(held.index)
                lists = ivf.invlists
                assert lists is not None  # an IVF index has its lists
                exact = faiss.ArrayInvertedLists(lists.nlist, lists.code_size)
                for i in range(lists.nlist):
                    if size := lists.list_size(i):
                        exact.add_entries(i, size, lists.get_ids(i), lists.get_codes(i))
                ivf.replace_invlists(exact, False)
                held.lists = exact  # not owned by the index: the scope keeps it alive

    def clear(self) -> None:
        with self._lock:
            self._scopes.clear()
            self._slot.clear()
            self._free.clear()
            self._next_slot = 0
            self._row_id[:] = -1

    # -- search ---------------------------------------------------------------------------
    def search(self, scope: str, vectors: np.ndarray, k: int) -> list[list[CachedRow]]:
        """The k rows of `scope` nearest each vector by L2 distance J (eq. 1), nearest first;
        rows without texts or vectors (the caller fills the texts in)."""
        queries = np.ascontiguousarray(np.atleast_2d(vectors), np.float32)
        _one_thread()
        with self._lock:
            held = self._scopes.get(scope)
            if held is None or held.rows == 0:
                return [[] for _ in range(len(queries))]
            squared, slots = held.index.search(queries, min(k, held.rows))
            return [[self._row(int(slot), float(d)) for d, slot in zip(ds, ss, strict=True)
                     if slot >= 0] for ds, ss in zip(squared, slots, strict=True)]

    # -- inside the lock ------------------------------------------------------------------
    def _scope(self, scope: str) -> _Scope:
        held = self._scopes.get(scope)
        if held is None:
            held = self._scopes[scope] = _Scope(self.dim)
            self._scope_code[scope] = len(self._scope_names)
            self._scope_names.append(scope)
        return held

    def _row(self, slot: int, squared: float) -> CachedRow:
        row_id = int(self._row_id[slot])
        return CachedRow(id=row_id, pair_id=row_id // 2, kind=row_id % 2 + 1, question="",
                         answer="", hits=int(self._hits[slot]), value=float(self._value[slot]),
                         created=float(self._created[slot]),
                         distance=float(np.sqrt(max(squared, 0.0))))

    def _take_slot(self) -> int:
        if self._free:
            return self._free.pop()
        slot, self._next_slot = self._next_slot, self._next_slot + 1
        if slot >= len(self._row_id):  # grow every array to twice its size
            grow = len(self._row_id)
            self._row_id = np.concatenate([self._row_id, np.full(grow, -1, np.int64)])
            self._scope_of = np.concatenate([self._scope_of, np.zeros(grow, np.int32)])
            self._hits = np.concatenate([self._hits, np.zeros(grow, np.int64)])
            self._value = np.concatenate([self._value, np.zeros(grow)])
            self._created = np.concatenate([self._created, np.zeros(grow)])
        return slot

    def _remove(self, row_ids: list[int]) -> None:
        if not row_ids:
            return
        slots = np.array([self._slot.pop(i) for i in row_ids], np.int64)
        by_scope = self._scope_of[slots]
        for code in np.unique(by_scope).tolist():
            held = self._scopes[self._scope_names[code]]
            mine = slots[by_scope == code]
            held.rows -= int(held.index.remove_ids(faiss.IDSelectorBatch(mine)))
        self._row_id[slots] = -1
        self._free += slots.tolist()

    def _approximate(self, held: _Scope) -> None:
        """A scope grown past `exact_up_to`: IVF over 8-bit vectors, trained on its rows."""
        flat = held.index
        assert isinstance(flat, faiss.IndexIDMap2)  # every scope starts exact
        slots = faiss.vector_to_array(flat.id_map).astype(np.int64)
        vectors = flat.index.reconstruct_n(0, flat.ntotal)
        held.nlist = self.lists_for(max(held.rows, held.expected))
        ivf = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatL2(self.dim), self.dim, held.nlist,
                                            faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_L2)
        ivf.cp.min_points_per_centroid = 1  # train on what there is, without a warning
        ivf.train(vectors)
        ivf.nprobe = self.nprobe
        ivf.add_with_ids(vectors, slots)
        held.index, held.exact = ivf, False
