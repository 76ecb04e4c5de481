"""The cached QA pairs' texts and what is known of each answer, stored once per pair in an
SQLite file beside the edge.

Milvus holds what a search needs (the vector, the hit count c^f, the value c^r, the creation
time); the question and answer live here, keyed by pair id, and are read for the top-P rows of
a search only. Kept in Milvus they were stored twice (both rows of a pair carry both texts,
SPEC §3) and held in Milvus's memory: ~1.2 KB a row with oasst1 answers, a quarter of its
memory per cached row. Here they cost disk and the kernel's reclaimable page cache.

Each pair also keeps its tenant and scope (so that an operator can list and delete a tenant's
entries, conversation scopes included: a scope's hash does not tell its tenant), when it was
cached, and its answer's facts (velo.core.shape.AnswerFacts: finish reason, token counts), which
decide which requests the answer fits.

Writes come before the Milvus rows that point at them and deletes after the rows are gone, so
a crash in between leaves at worst texts that nothing points to, never a row without its texts.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from velo.core.shape import AnswerFacts
from velo.runtime.logs import get_logger

MEMORY = ":memory:"  # a throwaway store (simulations, benchmarks): the texts die with it
# The write-ahead log is folded into the database every 256 pages (1 MiB).
WAL_PAGES = 256
SQL_VARIABLES = 900  # below SQLite's bound on parameters in one statement
# Columns added since the first version of the file, added to an older file when it is opened.
_ADDED = {"tenant": "TEXT", "scope": "TEXT", "created": "REAL",
          "finish_reason": "TEXT NOT NULL DEFAULT 'stop'",
          "prompt_tokens": "INTEGER NOT NULL DEFAULT 0",
          "completion_tokens": "INTEGER NOT NULL DEFAULT 0",
          "max_tokens": "INTEGER NOT NULL DEFAULT 0",
          "estimated": "INTEGER NOT NULL DEFAULT 0"}
_COLUMNS = ("pair_id, question, answer, tenant, scope, created, finish_reason, prompt_tokens, "
            "completion_tokens, max_tokens, estimated")


def store_path(data_dir: str | Path, collection: str) -> Path:
    """Where an edge keeps the texts of `collection`: in its data_dir, one file per collection.
    Tools that write an edge's cache from outside (chaos, fuzz) open the same file."""
    return Path(data_dir) / f"texts-{collection}.db"


@dataclass(frozen=True)
class Entry:
    """One cached pair as this store keeps it."""

    pair_id: int
    question: str
    answer: str
    tenant: str = ""  # "" when unknown (an entry cached before tenants were kept here)
    scope: str = ""
    created: float = 0.0
    facts: AnswerFacts = field(default_factory=AnswerFacts)

    def row(self) -> tuple[Any, ...]:
        f = self.facts
        return (self.pair_id, self.question, self.answer, self.tenant or None,
                self.scope or None, self.created or None, f.finish_reason, f.prompt_tokens,
                f.completion_tokens, f.max_tokens, int(f.estimated))


def _entry(row: tuple[Any, ...]) -> Entry:
    pair_id, question, answer, tenant, scope, created, finish, prompt, completion, cap, est = row
    return Entry(int(pair_id), question, answer, tenant or "", scope or "", created or 0.0,
                 AnswerFacts(finish, int(prompt), int(completion), int(cap), bool(est)))


class TextStoreError(sqlite3.DatabaseError):
    """A failure of the texts store at run time, with the file it happened in."""


def _quarantine(path: Path, exc: Exception) -> Path:
    """Move a damaged store (and its WAL and shared-memory files) aside; where it went."""
    import time

    aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    for suffix in ("", "-wal", "-shm"):
        part = Path(f"{path}{suffix}")
        if part.exists():
            part.rename(f"{aside}{suffix}")
    get_logger("velo.texts").error(
        "texts store damaged: set aside, starting an empty one (the cached answers it held are "
        "lost; their Milvus rows are removed at start)", path=str(path), error=str(exc),
        set_aside=str(aside))
    return aside


class TextStore:
    def __init__(self, path: str | Path = MEMORY) -> None:
        """Open (or create) the store at `path`; ":memory:" keeps it in this process only.

        A damaged file (SQLite's quick_check fails, or it is no database) is set aside as
        `<name>.damaged-<time>` with its WAL, named in the log, and a new store starts: the
        edge keeps serving (its cached answers are lost, not its forwards). `quarantined`
        says where the old file went."""
        if str(path) != MEMORY:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = str(path)
        self._lock = threading.Lock()  # one connection, shared by the search threads
        self.quarantined: Path | None = None
        try:
            self._open()
        except sqlite3.DatabaseError as exc:
            if self.path == MEMORY:
                raise
            self.quarantined = _quarantine(Path(self.path), exc)
            self._open()

    def _open(self) -> None:
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            (verdict,) = self._db.execute("PRAGMA quick_check(1)").fetchone()
            if verdict != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {verdict}")
            self._schema()
        except sqlite3.DatabaseError:
            self._db.close()
            raise

    @contextmanager
    def _using(self) -> Iterator[sqlite3.Connection]:
        """The connection, to one thread at a time; an SQLite error names the file (a disk
        full or a file damaged while the edge runs is otherwise "database or disk is full")."""
        with self._lock:
            try:
                yield self._db
            except sqlite3.Error as exc:
                raise TextStoreError(f"texts store {self.path}: {exc}") from exc

    def _schema(self) -> None:
        if self.path != MEMORY:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(f"PRAGMA wal_autocheckpoint={WAL_PAGES}")
        self._db.execute("CREATE TABLE IF NOT EXISTS texts (pair_id INTEGER PRIMARY KEY, "
                         "question TEXT NOT NULL, answer TEXT NOT NULL)")
        have = {row[1] for row in self._db.execute("PRAGMA table_info(texts)")}
        for name, kind in _ADDED.items():
            if name not in have:
                self._db.execute(f"ALTER TABLE texts ADD COLUMN {name} {kind}")
        self._db.execute("CREATE INDEX IF NOT EXISTS texts_by_tenant ON texts (tenant, created)")
        self._db.execute("CREATE INDEX IF NOT EXISTS texts_by_created ON texts (created)")

    def has_all(self) -> frozenset[int]:
        """Every pair id the store has (read at start, to find rows left without texts)."""
        with self._using() as db:
            return frozenset(p for (p,) in db.execute("SELECT pair_id FROM texts"))

    def put(self, entries: Iterable[Entry]) -> None:
        """Store entries in one transaction; a known id keeps its first texts (a pair's texts
        never change)."""
        with self._using() as db, db:
            db.execute("BEGIN")
            db.executemany(f"INSERT OR IGNORE INTO texts ({_COLUMNS}) VALUES "
                           "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", (e.row() for e in entries))

    def get(self, pair_ids: Iterable[int]) -> dict[int, Entry]:
        """pair_id -> Entry for the ids the store has."""
        found: dict[int, Entry] = {}
        with self._using() as db:
            for chunk in _chunks(list(set(pair_ids))):
                rows = db.execute(f"SELECT {_COLUMNS} FROM texts WHERE pair_id IN "
                                  f"({','.join('?' * len(chunk))})", chunk)
                found.update((int(r[0]), _entry(r)) for r in rows)
        return found

    def has(self, pair_ids: Iterable[int]) -> set[int]:
        """Which of `pair_ids` the store has."""
        found: set[int] = set()
        with self._using() as db:
            for chunk in _chunks(list(set(pair_ids))):
                found.update(p for (p,) in db.execute(
                    f"SELECT pair_id FROM texts WHERE pair_id IN ({','.join('?' * len(chunk))})",
                    chunk))
        return found

    def newest(self, tenant: str = "", limit: int = 50, offset: int = 0,
               ) -> tuple[list[Entry], int]:
        """Entries newest first (of one tenant, or of all with ""), and how many there are."""
        where, args = ("WHERE tenant = ?", [tenant]) if tenant else ("", [])
        with self._using() as db:
            total = int(db.execute(f"SELECT COUNT(*) FROM texts {where}", args).fetchone()[0])
            rows = db.execute(f"SELECT {_COLUMNS} FROM texts {where} ORDER BY created "
                              "DESC, pair_id LIMIT ? OFFSET ?", [*args, limit, offset])
            return [_entry(r) for r in rows], total

    def select(self, tenant: str = "", cached_before: float = 0.0) -> list[int]:
        """Ids of the entries of `tenant` ("" = any) cached before `cached_before` (0 = any)."""
        args: list[str | float]
        clauses, args = [], []
        if tenant:
            clauses.append("tenant = ?")
            args.append(tenant)
        if cached_before:
            clauses.append("created < ?")
            args.append(cached_before)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._using() as db:
            return [int(p) for (p,) in db.execute(f"SELECT pair_id FROM texts {where}", args)]

    def scopes(self, tenant: str) -> list[str]:
        """The scopes `tenant` has entries in (its own name, its conversations' scopes)."""
        with self._using() as db:
            return [s for (s,) in db.execute(
                "SELECT DISTINCT scope FROM texts WHERE tenant = ? AND scope IS NOT NULL",
                [tenant])]

    def scope_sizes(self) -> dict[str, int]:
        """Entries (pairs) per scope: how large each scope's index will be after a rebuild."""
        with self._using() as db:
            return {s: int(n) for s, n in db.execute(
                "SELECT scope, COUNT(*) FROM texts WHERE scope IS NOT NULL GROUP BY scope")}

    def without_scope(self) -> list[int]:
        """Ids of entries stored before scopes were kept here."""
        with self._using() as db:
            return [int(p) for (p,) in db.execute(
                "SELECT pair_id FROM texts WHERE scope IS NULL")]

    def set_scopes(self, scopes: Iterable[tuple[int, str, str, float]]) -> None:
        """(pair_id, scope, tenant, created) for entries stored without them ("" tenant:
        unknown)."""
        with self._using() as db, db:
            db.execute("BEGIN")
            db.executemany(
                "UPDATE texts SET scope = ?, tenant = ?, created = ? WHERE pair_id = ?",
                ((scope, tenant or None, created, p) for p, scope, tenant, created in scopes))

    def delete(self, pair_ids: Iterable[int]) -> None:
        with self._using() as db, db:
            db.execute("BEGIN")
            db.executemany("DELETE FROM texts WHERE pair_id = ?", ((p,) for p in pair_ids))

    def clear(self) -> None:
        with self._using() as db:
            db.execute("DELETE FROM texts")

    def count(self) -> int:
        with self._using() as db:
            return int(db.execute("SELECT COUNT(*) FROM texts").fetchone()[0])

    def close(self) -> None:
        with self._using() as db:
            db.close()


def _chunks(ids: list[int]) -> list[list[int]]:
    return [ids[i : i + SQL_VARIABLES] for i in range(0, len(ids), SQL_VARIABLES)]
