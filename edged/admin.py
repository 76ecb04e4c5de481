"""The cache, for operators: list and show entries, delete them (by id, tenant, question, age),
import QA pairs (warm-up) and export them. Both fronts serve it (gRPC EdgeService methods and
the HTTP front's /v1/velo/cache routes), with the admin role when the edge has [auth], and
only to loopback callers when it has none.

An entry is a cached QA pair: two rows in Milvus (question and answer vectors, velo.edge.cache)
and its texts and facts in the edge's text store (velo.edge.texts). Every invalidation and import
is written as one audit line (who, what, how many entries) to the log and to `audit.jsonl` in
the edge's data folder.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, TypeVarTuple

from edged.contract import EdgeError, ErrorKind, invalid
from velo.core.bad_input import clip
from velo.core.names import NAME_RULE, valid_name
from velo.core.shape import AnswerFacts, estimate_tokens
from velo.edge.cache import VectorCache
from velo.edge.embedder import TextEmbedder
from velo.edge.texts import Entry
from velo.runtime.logs import get_logger
from velo.v1 import chat_pb2, edge_pb2

log = get_logger("edged.audit")
MAX_LIST = 1000  # entries per page, ids per delete request, pairs per import call
DEFAULT_LIST = 50
DEFAULT_MIN_SIMILARITY = 0.9  # delete by question: rows at least this alike
EXPORT_PAGE = 500

R = TypeVar("R")
Ts = TypeVarTuple("Ts")


@dataclass(frozen=True)
class EntryView:
    """An entry as an operator sees it: its texts and facts, and its rows' hits and value."""

    entry: Entry
    hits: int  # reuses of either of its rows (c^f)
    value: float  # the higher of its rows' cache values (c^r, eq. 5)

    @property
    def age_s(self) -> float:
        return max(0.0, time.time() - self.entry.created) if self.entry.created else 0.0

    def proto(self) -> edge_pb2.CacheEntry:
        e, f = self.entry, self.entry.facts
        return edge_pb2.CacheEntry(
            id=e.pair_id, tenant=e.tenant, scope=e.scope, question=e.question, answer=e.answer,
            hits=self.hits, value=self.value, created_unix_s=e.created, age_s=self.age_s,
            finish_reason=f.finish_reason,
            usage=chat_pb2.Usage(prompt_tokens=f.prompt_tokens,
                                 completion_tokens=f.completion_tokens, estimated=f.estimated))


@dataclass(frozen=True)
class Deletion:
    """Which entries to delete: every criterion given must hold."""

    ids: tuple[int, ...] = ()
    tenant: str = ""
    question: str = ""  # entries with a row at least min_similarity alike (needs tenant)
    min_similarity: float = 0.0  # 0: DEFAULT_MIN_SIMILARITY
    older_than_s: float = 0.0  # cached more than this long ago (0: any age)
    dry_run: bool = False

    def problem(self) -> str | None:
        if not (self.ids or self.tenant or self.question or self.older_than_s):
            return ("say what to delete: ids, tenant, question (with tenant) or older_than_s; "
                    "every criterion given must hold")
        if len(self.ids) > MAX_LIST:
            return f"at most {MAX_LIST} ids per request"
        if self.tenant and not valid_name(self.tenant):
            return f"tenant {clip(self.tenant)} is invalid: use {NAME_RULE}"
        if self.question and not self.tenant:
            return "a delete by question needs the tenant whose entries to search"
        if not 0.0 <= self.min_similarity <= 1.0:
            return "min_similarity must be between 0 and 1 (a cosine similarity)"
        if not (math.isfinite(self.older_than_s) and self.older_than_s >= 0):
            return "older_than_s must be a number of seconds >= 0"
        return None

    def describe(self) -> str:
        parts = [f"ids={list(self.ids)[:20]}" if self.ids else "",
                 f"tenant={self.tenant}" if self.tenant else "",
                 f"question={clip(self.question)} min_similarity="
                 f"{self.min_similarity or DEFAULT_MIN_SIMILARITY}" if self.question else "",
                 f"older_than_s={self.older_than_s:g}" if self.older_than_s else ""]
        return " ".join(p for p in parts if p)


class CacheAdmin:
    def __init__(self, cache: VectorCache, embedder: TextEmbedder, data_dir: Path,
                 on_deleted: Callable[[int], None], import_value: float) -> None:
        self.cache, self.embedder = cache, embedder
        # An imported answer's cache value c^r: the edge's prior satisfaction, as if reused at
        # no delay (nothing is known of how good it is).
        self.import_value = import_value
        self.audit_path = data_dir / "audit.jsonl"
        self.on_deleted = on_deleted  # told how many entries an operator deleted (stats)

    async def newest(self, tenant: str = "", limit: int = 0, offset: int = 0,
                   ) -> tuple[list[EntryView], int]:
        """Entries newest first, and how many match."""
        if tenant and not valid_name(tenant):
            raise invalid(f"tenant {clip(tenant)} is invalid: use {NAME_RULE}")
        if not 0 <= limit <= MAX_LIST or offset < 0:
            raise invalid(f"limit must be between 0 (= {DEFAULT_LIST}) and {MAX_LIST}, offset "
                          ">= 0")
        assert self.cache.texts is not None  # opened before the admin was made
        entries, total = await self._db(self.cache.texts.newest, tenant, limit or DEFAULT_LIST,
                                        offset)
        return await self._views(entries), total

    async def get(self, entry_id: int) -> EntryView:
        assert self.cache.texts is not None  # opened before the admin was made
        entries = await self._db(self.cache.texts.get, [entry_id])
        views = await self._views(list(entries.values()))
        if not views:
            raise EdgeError(ErrorKind.NOT_FOUND, f"entry {entry_id} is not cached on this edge")
        return views[0]

    async def delete(self, deletion: Deletion, who: str) -> list[int]:
        """The ids of the entries deleted (or that would be, with dry_run)."""
        if problem := deletion.problem():
            raise invalid(problem)
        chosen: set[int] | None = None

        def narrow(found: set[int]) -> None:
            nonlocal chosen
            chosen = found if chosen is None else chosen & found

        texts = self.cache.texts
        assert texts is not None  # opened before the admin was made
        if deletion.ids:
            narrow(await self._db(texts.has, deletion.ids))
        if deletion.tenant or deletion.older_than_s:
            before = time.time() - deletion.older_than_s if deletion.older_than_s else 0.0
            narrow(set(await self._db(texts.select, deletion.tenant, before)))
        if deletion.question:
            vector = await asyncio.to_thread(self.embedder.embed_one, deletion.question)
            scopes = await self._db(texts.scopes, deletion.tenant)
            rows = await self._db(self.cache.search_scopes, vector, scopes,
                                  deletion.min_similarity or DEFAULT_MIN_SIMILARITY)
            narrow({r.pair_id for r in rows})
        ids = sorted(chosen or ())
        if not deletion.dry_run and ids:
            await self._db(self.cache.delete_pairs, ids)
            self.on_deleted(len(ids))
        self._audit(who, "delete" + (" (dry run)" if deletion.dry_run else ""),
                    deletion.describe(), len(ids))
        return ids

    async def import_pairs(self, tenant: str, pairs: list[tuple[str, str]], who: str,
                           ) -> tuple[list[int], int]:
        """Cache (question, answer) pairs for `tenant` as complete answers; returns the new
        ids and how many pairs were skipped (an empty or too long text)."""
        if not valid_name(tenant):
            raise invalid(f"tenant {clip(tenant)} is invalid: use {NAME_RULE}")
        if len(pairs) > MAX_LIST:
            raise invalid(f"at most {MAX_LIST} pairs per import call; send the rest in more")
        kept = [(q, a) for q, a in pairs if q.strip() and a.strip()]
        ids: list[int] = []
        if kept:
            vectors = await asyncio.to_thread(self.embedder.embed,
                                              [t for pair in kept for t in pair])
            # Token counts are estimates: the edge has no tokenizer of the LLM's.
            items = [(q, a, vectors[2 * i], vectors[2 * i + 1],
                      AnswerFacts("stop", estimate_tokens(q), estimate_tokens(a), 0, True))
                     for i, (q, a) in enumerate(kept)]
            ids = [i for i in await self._db(self.cache.insert_pairs, tenant, items,
                                             self.import_value) if i is not None]
        skipped = len(pairs) - len(ids)
        self._audit(who, "import", f"tenant={tenant} pairs={len(pairs)}", len(ids))
        return ids, skipped

    async def export(self, tenant: str = "") -> AsyncIterator[EntryView]:
        """Every entry (of one tenant), newest first."""
        if tenant and not valid_name(tenant):
            raise invalid(f"tenant {clip(tenant)} is invalid: use {NAME_RULE}")
        offset = 0
        while True:
            assert self.cache.texts is not None  # opened before the admin was made
            entries, _ = await self._db(self.cache.texts.newest, tenant, EXPORT_PAGE, offset)
            if not entries:
                return
            for view in await self._views(entries):
                yield view
            offset += len(entries)

    # -- helpers ------------------------------------------------------------------------------
    async def _views(self, entries: list[Entry]) -> list[EntryView]:
        """Entries with their rows' hits and values; an entry whose rows are gone (evicted
        while this ran) is left out."""
        rows = await self._db(self.cache.pair_rows, [e.pair_id for e in entries])
        return [EntryView(e, sum(r.hits for r in rows[e.pair_id]),
                          max(r.value for r in rows[e.pair_id]))
                for e in entries if e.pair_id in rows]

    async def _db(self, method: Callable[[*Ts], R], *args: *Ts) -> R:
        try:
            return await asyncio.to_thread(method, *args)
        except EdgeError:
            raise
        except Exception as exc:  # pymilvus raises many types; the caller needs one status
            raise EdgeError(ErrorKind.UNAVAILABLE,
                            f"vector database unavailable: {clip(str(exc), 300)}") from exc

    def _audit(self, who: str, action: str, what: str, entries: int) -> None:
        line = {"time": time.time(), "who": who, "action": action, "what": what,
                "entries": entries}
        log.info("audit", **line)
        try:
            with self.audit_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
        except OSError as exc:  # the log line above stands
            log.error("audit file not written", path=str(self.audit_path), error=str(exc))
