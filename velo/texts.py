"""The texts of cached QA pairs, stored once per pair in an SQLite file beside the edge.

Milvus holds what a search needs (the vector, the hit count c^f, the value c^r, the creation
time); the question and answer live here, keyed by pair id, and are read for the top-P rows of
a search only. Kept in Milvus they were stored twice (both rows of a pair carry both texts,
SPEC §3) and held in Milvus's memory: ~1.2 KB a row with oasst1 answers, a quarter of its
memory per cached row. Here they cost disk and the kernel's reclaimable page cache.

Writes come before the Milvus rows that point at them and deletes after the rows are gone, so
a crash in between leaves at worst texts that nothing points to, never a row without its texts.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path

MEMORY = ":memory:"  # a throwaway store (simulations, benchmarks): the texts die with it
# The write-ahead log is folded into the database every 256 pages (1 MiB).
WAL_PAGES = 256


def store_path(data_dir: str | Path, collection: str) -> Path:
    """Where an edge keeps the texts of `collection`: in its data_dir, one file per collection.
    Tools that write an edge's cache from outside (chaos, fuzz) open the same file."""
    return Path(data_dir) / f"texts-{collection}.db"


class TextStore:
    def __init__(self, path: str | Path = MEMORY) -> None:
        """Open (or create) the store at `path`; ":memory:" keeps it in this process only."""
        if str(path) != MEMORY:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = str(path)
        self._lock = threading.Lock()  # one connection, shared by the search threads
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        if self.path != MEMORY:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(f"PRAGMA wal_autocheckpoint={WAL_PAGES}")
        self._db.execute("CREATE TABLE IF NOT EXISTS texts (pair_id INTEGER PRIMARY KEY, "
                         "question TEXT NOT NULL, answer TEXT NOT NULL)")

    def put(self, pairs: Iterable[tuple[int, str, str]]) -> None:
        """Store (pair_id, question, answer) triples in one transaction; a known id keeps its
        first texts (a pair's texts never change)."""
        with self._lock, self._db:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR IGNORE INTO texts VALUES (?, ?, ?)", pairs)

    def get(self, pair_ids: Iterable[int]) -> dict[int, tuple[str, str]]:
        """pair_id -> (question, answer) for the ids the store has."""
        ids = list(set(pair_ids))
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        with self._lock:
            rows = self._db.execute(
                f"SELECT pair_id, question, answer FROM texts WHERE pair_id IN ({marks})", ids)
            return {int(p): (q, a) for p, q, a in rows}

    def has(self, pair_ids: Iterable[int]) -> set[int]:
        """Which of `pair_ids` the store has."""
        ids = list(set(pair_ids))
        found: set[int] = set()
        with self._lock:
            for start in range(0, len(ids), 900):  # SQLite's bound on parameters
                chunk = ids[start : start + 900]
                found.update(p for (p,) in self._db.execute(
                    f"SELECT pair_id FROM texts WHERE pair_id IN ({','.join('?' * len(chunk))})",
                    chunk))
        return found

    def delete(self, pair_ids: Iterable[int]) -> None:
        with self._lock, self._db:
            self._db.execute("BEGIN")
            self._db.executemany("DELETE FROM texts WHERE pair_id = ?", ((p,) for p in pair_ids))

    def clear(self) -> None:
        with self._lock:
            self._db.execute("DELETE FROM texts")

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM texts").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
