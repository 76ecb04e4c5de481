"""`velo cache`: an operator's view of an edge's cache, over gRPC (the admin role when the edge
has [auth]; without [auth], only on the edge box itself).

    velo cache list [--tenant T] [--limit N] [--offset K]
    velo cache show ID
    velo cache delete [--id ID ...] [--tenant T] [--question TEXT [--min-similarity S]]
                      [--older-than 7d] [--dry-run]
    velo cache import FILE --tenant T
    velo cache export [--tenant T] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from velo.runtime.security import TLSConfig
    from velo.v1.edge_pb2_grpc import EdgeServiceStub

IMPORT_BATCH = 500  # pairs per ImportEntries call
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def duration_s(text: str) -> float:
    """'90', '90s', '15m', '12h', '7d', '2w' -> seconds."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 90s, 15m, 12h, 7d")
    return float(match[1]) * _UNITS[match[2]]


def add_parser(sub: argparse._SubParsersAction, edge: str,
               client_args: Callable[[argparse.ArgumentParser], None]) -> None:
    cache = sub.add_parser("cache", help="list, show, delete, import and export an edge's cached "
                           "answers (admin)")
    verbs = cache.add_subparsers(dest="verb", required=True,
                                 help="what to do with the cache")

    def verb(name: str, help: str) -> argparse.ArgumentParser:
        p = verbs.add_parser(name, help=help)
        p.add_argument("--edge", default=edge, help=f"the edge's address (default {edge})")
        client_args(p)
        return p

    ls = verb("list", "entries, newest first")
    ls.add_argument("--tenant", default="", help="only this tenant's entries")
    ls.add_argument("--limit", type=int, default=50, help="entries to show (at most 1000)")
    ls.add_argument("--offset", type=int, default=0, help="skip this many of the newest")
    ls.add_argument("--json", action="store_true", help="print JSON lines, not a table")
    show = verb("show", "one entry, whole")
    show.add_argument("id", type=int, help="the entry id (list, or x-velo-entry-id)")
    rm = verb("delete", "delete entries; every criterion given must hold")
    rm.add_argument("--id", type=int, action="append", default=[], dest="ids",
                    help="this entry (repeatable)")
    rm.add_argument("--tenant", default="", help="entries of this tenant")
    rm.add_argument("--question", default="",
                    help="entries whose question is at least --min-similarity alike to this "
                    "text (needs --tenant)")
    rm.add_argument("--min-similarity", type=float, default=0.0,
                    help="with --question: cosine similarity (default 0.9)")
    rm.add_argument("--older-than", type=duration_s, default=0.0,
                    help="entries cached longer ago than this (90s, 15m, 12h, 7d)")
    rm.add_argument("--dry-run", action="store_true",
                    help="say what would be deleted, delete nothing")
    imp = verb("import", "cache the QA pairs of a JSON-lines file (the project's data format, "
               "or velo cache export's)")
    imp.add_argument("file", type=Path, help="QA JSON lines: question and answer per line")
    imp.add_argument("--tenant", required=True, help="the tenant whose cache gets the pairs")
    exp = verb("export", "write the entries as QA JSON lines")
    exp.add_argument("--tenant", default="", help="only this tenant's entries")
    exp.add_argument("--out", type=Path, default=None, help="file to write (default stdout)")


def run(args: argparse.Namespace, tls: TLSConfig | None) -> None:
    from velo.runtime.security import dial
    from velo.v1 import edge_pb2_grpc

    async def main() -> None:
        async with dial(args.edge, tls, args.api_key) as channel:
            await VERBS[args.verb](edge_pb2_grpc.EdgeServiceStub(channel), args)

    try:
        asyncio.run(main())
    except grpc.aio.AioRpcError as exc:
        sys.exit(f"velo cache {args.verb}: {exc.code().name}: {exc.details()}")
    except OSError as exc:
        sys.exit(f"velo cache {args.verb}: {exc}")


async def _list(stub: EdgeServiceStub, args: argparse.Namespace) -> None:
    from velo.core.records import entry_record
    from velo.v1 import edge_pb2

    reply = await stub.ListEntries(edge_pb2.ListEntriesRequest(
        tenant=args.tenant, limit=args.limit, offset=args.offset), timeout=60)
    if args.json:
        for entry in reply.entries:
            print(json.dumps(entry_record(entry), ensure_ascii=False))
        return
    print(f"{'id':>19}  {'tenant':12} {'age':>8} {'hits':>5} {'value':>7} {'finish':6} "
          f"{'tokens':>6}  question")
    for e in reply.entries:
        question = e.question.replace("\n", " ")
        print(f"{e.id:>19}  {e.tenant or '?':12.12} {_age(e.age_s):>8} {e.hits:>5} "
              f"{e.value:>7.3f} {e.finish_reason:6} {e.usage.completion_tokens:>6}  "
              f"{question[:60]}{'...' if len(question) > 60 else ''}")
    shown = args.offset + len(reply.entries)
    print(f"({len(reply.entries)} shown, {shown} of {reply.total}"
          f"{' for ' + args.tenant if args.tenant else ''})", file=sys.stderr)


async def _show(stub: EdgeServiceStub, args: argparse.Namespace) -> None:
    from velo.core.records import entry_record
    from velo.v1 import edge_pb2

    entry = await stub.GetEntry(edge_pb2.GetEntryRequest(id=args.id), timeout=60)
    print(json.dumps(entry_record(entry), ensure_ascii=False, indent=2))


async def _delete(stub: EdgeServiceStub, args: argparse.Namespace) -> None:
    from velo.v1 import edge_pb2

    reply = await stub.DeleteEntries(edge_pb2.DeleteEntriesRequest(
        ids=args.ids, tenant=args.tenant, question=args.question,
        min_similarity=args.min_similarity, older_than_s=args.older_than,
        dry_run=args.dry_run), timeout=120)
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{verb} {reply.deleted} entries" + (f": {', '.join(map(str, reply.ids[:20]))}"
                                               f"{' ...' if reply.deleted > 20 else ''}"
                                               if reply.deleted else ""))


async def _import(stub: EdgeServiceStub, args: argparse.Namespace) -> None:
    from velo.core.records import importable_pairs
    from velo.v1 import edge_pb2

    with args.file.open(encoding="utf-8") as f:
        pairs, skipped = importable_pairs(f)
    imported = 0
    for start in range(0, len(pairs), IMPORT_BATCH):
        batch = pairs[start : start + IMPORT_BATCH]
        reply = await stub.ImportEntries(edge_pb2.ImportEntriesRequest(
            tenant=args.tenant, pairs=[edge_pb2.ImportedPair(question=q, answer=a)
                                       for q, a in batch]), timeout=300)
        imported += reply.imported
        skipped += reply.skipped
    print(f"imported {imported} pairs into {args.tenant}'s cache; skipped {skipped} (bad "
          "lines, empty or too long texts, conversation entries)")


async def _export(stub: EdgeServiceStub, args: argparse.Namespace) -> None:
    from velo.core.records import entry_record
    from velo.v1 import edge_pb2

    out = args.out.open("w", encoding="utf-8") if args.out else sys.stdout
    count = 0
    try:
        async for entry in stub.ExportEntries(edge_pb2.ExportEntriesRequest(tenant=args.tenant),
                                              timeout=3600):
            out.write(json.dumps(entry_record(entry), ensure_ascii=False) + "\n")
            count += 1
    finally:
        if args.out:
            out.close()
    print(f"exported {count} entries" + (f" to {args.out}" if args.out else ""),
          file=sys.stderr)


VERBS = {"list": _list, "show": _show, "delete": _delete, "import": _import, "export": _export}


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"

