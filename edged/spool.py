"""A bounded on-disk queue of experience records waiting for trainerd.

Records get a per-edge sequence number that is never reused, even across restarts (trainerd
deduplicates by edge and sequence number, so a reused number would silently drop a record).
Records leave the spool only once trainerd has acknowledged them. When the spool is full the
oldest records are dropped and counted: the edge keeps serving whatever happens upstream,
and so it does when the disk itself is full (oldest records make room, or the new one is
dropped and counted; a request never fails because of its experience record).

The spool is bounded in bytes too, so that it does not fill its disk: at most `max_bytes`, and
at most half of what its disk had free when the edge started (its database pages in use). Past
that, the oldest records are dropped and counted as when it reaches `max_records`. If the disk
fills anyway (another writer), the oldest quarter is dropped to make room, and records that
still cannot be written are dropped and counted; the request is answered either way.

A record can be written *held* (shadow verification: stored at once, so that a crash loses
nothing, but completed with q when the LLM's fresh answer arrives). Held records are not
uploaded until `release`d; a restart releases whatever the previous process still held.
"""

from __future__ import annotations

import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from velo.runtime.logs import get_logger

log = get_logger("edged.spool")

Encoder = Callable[[int], bytes]
# The write-ahead log is folded into the database every 32 pages (128 KiB) and kept at that
# size: on a small disk SQLite's default (4 MiB) would not fit.
WAL_PAGES = 32
ACK_CHUNK = 32  # records deleted per transaction: a few pages of log each


class Spool:
    def __init__(self, path: Path, max_records: int, max_bytes: int = 1 << 30) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.max_records = max_records
        self._unsaved_drops = 0  # dropped while not even the counter could be written
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(f"PRAGMA wal_autocheckpoint={WAL_PAGES}")
        self._db.execute(f"PRAGMA journal_size_limit={WAL_PAGES * 4096}")
        self._db.execute("CREATE TABLE IF NOT EXISTS records (seq INTEGER PRIMARY KEY, body BLOB,"
                         " ready INTEGER NOT NULL DEFAULT 1)")
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(records)")}
        if "ready" not in columns:  # a spool written before held records existed
            self._db.execute("ALTER TABLE records ADD COLUMN ready INTEGER NOT NULL DEFAULT 1")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER)")
        # Sequence numbers start at the creation time in microseconds, so an edge whose spool
        # was wiped still numbers above anything trainerd has seen from it (which it would
        # otherwise drop as duplicates).
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('next_seq', ?), ('dropped', 0)",
                         (time.time_ns() // 1000,))
        # The record count is kept in meta (exact and O(1): COUNT(*) scans the table, and
        # held records leave holes in the run of sequence numbers).
        (count,) = self._db.execute("SELECT COUNT(*) FROM records").fetchone()
        self._db.execute("INSERT OR REPLACE INTO meta VALUES ('count', ?)", (count,))
        self.released_at_start = self._db.execute("UPDATE records SET ready = 1 WHERE ready = 0"
                                                  ).rowcount
        self._page_size = self._pragma("page_size")
        free = shutil.disk_usage(path.parent).free
        self.max_bytes = min(max_bytes, free // 2 + self._used_bytes())
        if self.max_bytes < max_bytes:
            log.warning("experience spool bounded by its disk", max_bytes=self.max_bytes,
                        disk_free=free)

    def _pragma(self, name: str) -> int:
        return int(self._db.execute(f"PRAGMA {name}").fetchone()[0])

    def _used_bytes(self) -> int:
        return (self._pragma("page_count") - self._pragma("freelist_count")) * self._page_size

    def _meta(self, key: str) -> int:
        value: int = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0]
        return value

    def _add_meta(self, key: str, delta: int) -> None:
        self._db.execute("UPDATE meta SET value = value + ? WHERE key = ?", (delta, key))

    def append(self, encode: Encoder, held: bool = False) -> int | None:
        """Store `encode(seq)` under the next sequence number, which it returns (None: the
        disk is full and the record was dropped)."""
        return self.append_many([(encode, held)])[0]

    def append_many(self, records: Sequence[tuple[Encoder, bool]]) -> list[int | None]:
        """`append` for many (encoder, held) records in one transaction (one fsync)."""
        with self._lock:
            try:
                return self._append(records)
            except sqlite3.OperationalError as exc:
                if "full" not in str(exc):
                    raise
            self._rollback()
            self._make_room()
            try:
                return self._append(records)
            except sqlite3.OperationalError as exc:
                self._rollback()
                self._add_meta_safely("dropped", len(records))  # outside any transaction
                log.error("experience spool cannot write (disk full?); records dropped",
                          dropped=len(records), error=str(exc))
                return [None] * len(records)

    def _make_room(self) -> None:
        """The disk is full: fold the log into the database and drop the oldest quarter of the
        records (counted), whose pages new records then reuse."""
        self._checkpoint()
        self._drop_oldest(max(1, self._meta_or("count", 0) // 4))
        self._checkpoint()
        log.warning("experience spool: the disk is full; dropped the oldest records",
                    records=self._meta_or("count", -1))

    def _append(self, records: Sequence[tuple[Encoder, bool]]) -> list[int | None]:
        self._db.execute("BEGIN IMMEDIATE")
        first = self._meta("next_seq")
        seqs = list(range(first, first + len(records)))
        self._add_meta("next_seq", len(records))
        self._db.executemany("INSERT INTO records VALUES (?, ?, ?)",
                             [(seq, encode(seq), int(not held))
                              for seq, (encode, held) in zip(seqs, records, strict=True)])
        self._add_meta("count", len(records))
        count = self._meta("count")
        excess = count - self.max_records
        used = self._used_bytes()
        if used > self.max_bytes:  # as many of the oldest as the excess bytes hold
            excess = max(excess, -(-(used - self.max_bytes) * count // used))
        if excess > 0:
            self._delete_oldest(excess)
        self._db.execute("COMMIT")
        if excess > 0:
            log.warning("experience spool full; dropped oldest", dropped=excess,
                        max_records=self.max_records, max_bytes=self.max_bytes)
        return list(seqs)

    def _delete_oldest(self, n: int) -> int:
        deleted = self._db.execute("DELETE FROM records WHERE seq IN "
                                   "(SELECT seq FROM records ORDER BY seq LIMIT ?)", (n,)).rowcount
        self._add_meta("count", -deleted)
        self._add_meta("dropped", deleted)
        return deleted

    def _drop_oldest(self, n: int) -> None:
        """Outside a transaction: delete (frees pages for reuse) and count the oldest `n`."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._delete_oldest(n)
            self._db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            self._rollback()
            log.error("experience spool cannot make room", error=str(exc))

    def _meta_or(self, key: str, default: int) -> int:
        try:
            return self._meta(key)
        except sqlite3.OperationalError:
            return default

    def _checkpoint(self) -> None:
        try:
            # RESTART, not TRUNCATE: the log keeps its allocated room for the next writes.
            self._db.execute("PRAGMA wal_checkpoint(RESTART)")
        except sqlite3.OperationalError as exc:
            log.error("experience spool cannot checkpoint", error=str(exc))

    def _add_meta_safely(self, key: str, delta: int) -> None:
        try:
            self._add_meta(key, delta)
        except sqlite3.OperationalError:
            self._unsaved_drops += delta  # counted in memory until the disk has room

    def _rollback(self) -> None:
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def release(self, seq: int, body: bytes) -> bool:
        """Complete a held record with its final body and let it be uploaded; False when it
        is gone (dropped because the spool was full)."""
        with self._lock:
            return self._db.execute("UPDATE records SET body = ?, ready = 1 WHERE seq = ?",
                                    (body, seq)).rowcount == 1

    def pending(self, limit: int) -> list[tuple[int, bytes]]:
        """Up to `limit` records ready to upload, oldest first."""
        with self._lock:
            return self._db.execute("SELECT seq, body FROM records WHERE ready = 1 "
                                    "ORDER BY seq LIMIT ?", (limit,)).fetchall()

    def ack(self, seqs: Sequence[int]) -> None:
        """trainerd has these records: delete them, in small transactions (each must fit in
        the write-ahead log's room, which matters on a nearly full disk)."""
        for start in range(0, len(seqs), ACK_CHUNK):
            chunk = list(seqs[start:start + ACK_CHUNK])
            with self._lock:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    deleted = self._db.execute(
                        f"DELETE FROM records WHERE seq IN ({','.join('?' * len(chunk))})",
                        chunk).rowcount
                    self._add_meta("count", -deleted)
                    self._db.execute("COMMIT")
                except sqlite3.OperationalError:
                    self._rollback()  # kept, and sent again: trainerd stores each record once
                    raise

    def count(self) -> int:
        with self._lock:
            return self._meta("count")

    @property
    def dropped(self) -> int:
        with self._lock:
            return self._meta("dropped") + self._unsaved_drops

    def close(self) -> None:
        with self._lock:
            self._db.close()
