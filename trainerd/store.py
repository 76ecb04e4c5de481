"""Durable experience store: every record an edge reported, once, in SQLite.

Records are keyed by (edge_id, seq), so an edge that resends after a lost acknowledgement
never creates a duplicate. A record whose key is already stored with *different* content is a
conflict (a client that claimed another edge's sequence numbers, or an edge whose numbering
went wrong): it never replaces the stored one and is never dropped either; it is kept in the
`conflicts` table for an operator to look at.

An acknowledged record must survive a crash (the edge drops it from its spool on the ack),
hence WAL with synchronous=FULL: each commit is fsynced.

The connection is shared between the event loop thread and worker threads (the server
stores batches with asyncio.to_thread), so every call takes one lock.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from velo.v1 import trainer_pb2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS experience (
    edge_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    unix_time REAL NOT NULL,      -- when the edge made the decision
    received_unix REAL NOT NULL,  -- when trainerd stored it
    record BLOB NOT NULL,         -- the serialized velo.v1.Experience
    PRIMARY KEY (edge_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS conflicts (
    edge_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    received_unix REAL NOT NULL,
    record BLOB NOT NULL
);
"""


class ExperienceStore:
    """Experience records in data_dir/experience.db (stdlib sqlite3)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False)
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(_SCHEMA)
            self._conn.commit()

    def add(self, records: Sequence[trainer_pb2.Experience]) -> tuple[int, int, int]:
        """Store `records` in one transaction; returns (stored, duplicates, conflicts).

        A record whose (edge_id, seq) is already stored with the same content, or repeated
        within `records`, is a duplicate; with other content, a conflict (kept aside).
        """
        now = time.time()
        rows = [(r.edge_id, r.seq, r.unix_time, now, r.SerializeToString()) for r in records]
        stored = duplicates = 0
        conflicts: list[tuple[str, int, float, bytes]] = []
        with self._lock, self._conn:  # the connection as context manager: commit or roll back
            for row in rows:
                if self._conn.execute(
                    "INSERT OR IGNORE INTO experience (edge_id, seq, unix_time, received_unix,"
                    " record) VALUES (?, ?, ?, ?, ?)", row,
                ).rowcount:
                    stored += 1
                    continue
                (kept,) = self._conn.execute(
                    "SELECT record FROM experience WHERE edge_id = ? AND seq = ?", row[:2]
                ).fetchone()
                if kept == row[4]:
                    duplicates += 1
                else:
                    conflicts.append((row[0], row[1], now, row[4]))
            self._conn.executemany("INSERT INTO conflicts VALUES (?, ?, ?, ?)", conflicts)
        return stored, duplicates, len(conflicts)

    def conflicts(self, edge_id: str | None = None) -> int:
        """Records kept aside because their key was taken by other content."""
        with self._lock:
            if edge_id is None:
                (n,) = self._conn.execute("SELECT COUNT(*) FROM conflicts").fetchone()
            else:
                (n,) = self._conn.execute("SELECT COUNT(*) FROM conflicts WHERE edge_id = ?",
                                          (edge_id,)).fetchone()
        return int(n)

    def count(self, edge_id: str | None = None) -> int:
        """Records stored, from one edge or from all."""
        with self._lock:
            if edge_id is None:
                (n,) = self._conn.execute("SELECT COUNT(*) FROM experience").fetchone()
            else:
                (n,) = self._conn.execute(
                    "SELECT COUNT(*) FROM experience WHERE edge_id = ?", (edge_id,)
                ).fetchone()
        return int(n)

    def latest_seq(self, edge_id: str) -> int:
        """The highest seq stored for `edge_id`; 0 when none."""
        with self._lock:
            (seq,) = self._conn.execute(
                "SELECT MAX(seq) FROM experience WHERE edge_id = ?", (edge_id,)
            ).fetchone()
        return int(seq or 0)

    def read(
        self, edge_id: str, after_seq: int = 0, limit: int = 1000
    ) -> list[trainer_pb2.Experience]:
        """Up to `limit` records of `edge_id` with seq > `after_seq`, in seq order."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT record FROM experience WHERE edge_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (edge_id, after_seq, limit),
            ).fetchall()
        return [trainer_pb2.Experience.FromString(blob) for (blob,) in rows]

    def edges(self) -> dict[str, int]:
        """Every edge that reported experience, with its record count."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT edge_id, COUNT(*) FROM experience GROUP BY edge_id ORDER BY edge_id"
            ).fetchall()
        return {edge_id: int(n) for edge_id, n in rows}

    def close(self) -> None:
        with self._lock:
            self._conn.close()
