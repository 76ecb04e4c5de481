"""A bounded on-disk queue of experience records waiting for trainerd.

Records get a per-edge sequence number that is never reused, even across restarts (trainerd
deduplicates by edge and sequence number, so a reused number would silently drop a record).
Records leave the spool only once trainerd has acknowledged them. When the spool is full the
oldest records are dropped and counted: the edge keeps serving whatever happens upstream.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from velo.logs import get_logger

log = get_logger("edged.spool")


class Spool:
    def __init__(self, path: Path, max_records: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.max_records = max_records
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS records (seq INTEGER PRIMARY KEY, body BLOB)")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER)")
        # Sequence numbers start at the creation time in microseconds, so an edge whose spool
        # was wiped still numbers above anything trainerd has seen from it (which it would
        # otherwise drop as duplicates).
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('next_seq', ?), ('dropped', 0)",
                         (time.time_ns() // 1000,))

    def _meta(self, key: str) -> int:
        return self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0]

    def append(self, encode: Callable[[int], bytes]) -> int:
        """Store `encode(seq)` under the next sequence number, which it returns."""
        return self.append_many([encode])[0]

    def append_many(self, encoders: list[Callable[[int], bytes]]) -> list[int]:
        """`append` for many records in one transaction (one fsync for a whole batch)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            first = self._meta("next_seq")
            seqs = list(range(first, first + len(encoders)))
            self._db.execute("UPDATE meta SET value = value + ? WHERE key = 'next_seq'",
                             (len(encoders),))
            self._db.executemany("INSERT INTO records VALUES (?, ?)",
                                 [(seq, encode(seq)) for seq, encode in zip(seqs, encoders,
                                                                             strict=True)])
            excess = self._count() - self.max_records
            if excess > 0:
                self._db.execute("DELETE FROM records WHERE seq IN "
                                 "(SELECT seq FROM records ORDER BY seq LIMIT ?)", (excess,))
                self._db.execute("UPDATE meta SET value = value + ? WHERE key = 'dropped'",
                                 (excess,))
            self._db.execute("COMMIT")
        if excess > 0:
            log.warning("experience spool full; dropped oldest", dropped=excess,
                        max_records=self.max_records)
        return seqs

    def pending(self, limit: int) -> list[tuple[int, bytes]]:
        with self._lock:
            return self._db.execute("SELECT seq, body FROM records ORDER BY seq LIMIT ?",
                                    (limit,)).fetchall()

    def ack(self, upto_seq: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM records WHERE seq <= ?", (upto_seq,))

    def _count(self) -> int:
        # Records are always one run of sequence numbers (appends go at the end, acks and
        # drops remove the oldest), so min and max give the count without the full scan of
        # COUNT(*), which made every request pay ~16 ms once 25k records were spooled
        # (tools/bench_edge.py profile). Two subqueries: SQLite answers a lone MIN or MAX of
        # the key from the b-tree's ends, but scans for MIN and MAX in one SELECT.
        low, high = self._db.execute("SELECT (SELECT MIN(seq) FROM records), "
                                     "(SELECT MAX(seq) FROM records)").fetchone()
        return 0 if low is None else high - low + 1

    def count(self) -> int:
        with self._lock:
            return self._count()

    @property
    def dropped(self) -> int:
        with self._lock:
            return self._meta("dropped")

    def close(self) -> None:
        with self._lock:
            self._db.close()
