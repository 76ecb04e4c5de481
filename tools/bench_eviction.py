"""Fresh answers kept: are the answers an edge just gave still in its cache right after a
burst of new questions? With the default eviction (rows younger than cache.eviction_grace_s
are spared) and with Algorithm 2's below-mean rule as written (eviction_grace_s = 0).

The real stack, as `velo up` runs it (embedded Milvus, trainerd, cloudd with SmolLM2 on
llama.cpp), and two edges with the default config but for that one key. Each edge starts warm,
as a busy edge is: QA pairs imported through the admin API, half of them reused once. Then
`--clients` clients ask new questions (Quora questions no edge has seen) for `--seconds`, and
every answer that was acknowledged as stored is looked up by id (GetEntry) once the eviction
passes the load triggered (every xi = 100 requests) have finished.

    .venv/bin/python tools/bench_eviction.py                   # 8 clients x 12 s, ~3 min
    .venv/bin/python tools/bench_eviction.py --seconds 30 --out docs/bench
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from velo.ops.stack import Stack, StackConfig  # noqa: E402
from velo.runtime.security import dial  # noqa: E402
from velo.v1 import edge_pb2, edge_pb2_grpc  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
TENANT = "bench"
RULES = {"default (eviction_grace_s = 3600)": {},
         "paper's rule as written (eviction_grace_s = 0)": {"CACHE__EVICTION_GRACE_S": "0"}}


def qa_items() -> list[tuple[str, str]]:
    """Real (question, answer) pairs to warm the caches with: oasst1 and xquad (English)."""
    items = []
    for name in ("oasst1_dev.jsonl", "xquad_dev.jsonl"):
        with (DATA / name).open() as f:
            items += [(r["question"], r["answer"]) for r in map(json.loads, f)]
    return [(q, a) for q, a in items if len(q) <= 400 and len(a) <= 2000]


def new_questions() -> list[str]:
    """Questions neither edge was warmed with: Quora questions (short, real)."""
    seen, out = set(), []
    with (DATA / "qqp_pairs_dev.jsonl").open() as f:
        for row in map(json.loads, f):
            for q in (row["a"], row["b"]):
                if q not in seen and 10 <= len(q) <= 200:
                    seen.add(q)
                    out.append(q)
    return out


async def warm(stub: edge_pb2_grpc.EdgeServiceStub, pairs: list[tuple[str, str]]) -> None:
    """Import the pairs, then reuse every other one once (their values rise, eq. 5)."""
    await stub.ImportEntries(edge_pb2.ImportEntriesRequest(
        tenant=TENANT, pairs=[edge_pb2.ImportedPair(question=q, answer=a) for q, a in pairs]),
        timeout=600)
    for question, _ in pairs[::2]:
        await stub.Ask(edge_pb2.AskRequest(prompt=question, tenant=TENANT, max_tokens=1024),
                       timeout=120)


async def load(stub: edge_pb2_grpc.EdgeServiceStub, questions: list[str], clients: int,
               seconds: float, max_tokens: int) -> tuple[int, list[int], int]:
    """(requests answered, ids of the answers stored, failures) of `clients` clients asking
    new questions for `seconds`."""
    queue = list(reversed(questions))
    deadline = time.monotonic() + seconds
    stored: list[int] = []
    answered = failed = 0

    async def client() -> None:
        nonlocal answered, failed
        while queue and time.monotonic() < deadline:
            try:
                reply = await stub.Ask(edge_pb2.AskRequest(
                    prompt=queue.pop(), tenant=TENANT, max_tokens=max_tokens), timeout=120)
            except grpc.aio.AioRpcError:
                failed += 1
                continue
            answered += 1
            if reply.stored:
                stored.append(reply.stored_entry_id)

    await asyncio.gather(*(client() for _ in range(clients)))
    return answered, stored, failed


async def settle(stub: edge_pb2_grpc.EdgeServiceStub) -> dict:
    """Wait until the eviction passes the load triggered are done (evictions stop moving)."""
    last, still = None, 0
    while still < 3:
        await asyncio.sleep(1.0)
        stats = await stub.GetStats(edge_pb2.GetStatsRequest(), timeout=30)
        still = still + 1 if stats.evicted_rows == last else 0
        last = stats.evicted_rows
    return {"evicted_rows": stats.evicted_rows, "cached_rows": stats.cached_rows,
            "requests": stats.requests}


async def findable(stub: edge_pb2_grpc.EdgeServiceStub, ids: list[int]) -> int:
    found = 0
    for entry_id in ids:
        try:
            await stub.GetEntry(edge_pb2.GetEntryRequest(id=entry_id), timeout=30)
            found += 1
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
    return found


async def measure(address: str, warm_pairs: list[tuple[str, str]], questions: list[str],
                  args: argparse.Namespace) -> dict:
    async with dial(address) as channel:
        stub = edge_pb2_grpc.EdgeServiceStub(channel)
        await warm(stub, warm_pairs)
        before = await settle(stub)
        started = time.monotonic()
        answered, stored, failed = await load(stub, questions, args.clients, args.seconds,
                                              args.max_tokens)
        elapsed = time.monotonic() - started
        after = await settle(stub)
        found = await findable(stub, stored)
    return {"answered": answered, "failed": failed, "req_per_s": round(answered / elapsed, 2),
            "stored": len(stored), "findable": found,
            "findable_share": round(found / len(stored), 4) if stored else None,
            "evicted_rows_during_load": after["evicted_rows"] - before["evicted_rows"],
            "cached_rows_before": before["cached_rows"], "cached_rows_after": after["cached_rows"]}


def markdown(results: dict[str, dict], args: argparse.Namespace) -> str:
    lines = [f"{args.clients} clients asking new questions for {args.seconds:g} s "
             f"(max_tokens {args.max_tokens}) on an edge warmed with {args.warm} imported QA "
             "pairs, half of them reused once; default config but for the eviction rule.", "",
             "| eviction | answers | req/s | stored | findable right after | rows evicted "
             "during the load | cached rows before / after |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for rule, r in results.items():
        share = f"{r['findable_share']:.1%}" if r["findable_share"] is not None else "-"
        lines.append(f"| {rule} | {r['answered']} | {r['req_per_s']} | {r['stored']} | "
                     f"{r['findable']} ({share}) | {r['evicted_rows_during_load']} | "
                     f"{r['cached_rows_before']} / {r['cached_rows_after']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=12.0, help="length of the load")
    parser.add_argument("--warm", type=int, default=300, help="QA pairs imported first")
    parser.add_argument("--max-tokens", type=int, default=16,
                        help="cap on each answer (the 2-core LLM's speed sets the load)")
    parser.add_argument("--state-dir", type=Path, default=ROOT / "var" / "bench-eviction",
                        help="Milvus data and the daemons' state (emptied first)")
    parser.add_argument("--out", type=Path, default=None,
                        help="write eviction.md and eviction.json here")
    args = parser.parse_args()

    pairs, questions = qa_items(), new_questions()
    shutil.rmtree(args.state_dir, ignore_errors=True)
    stack = Stack(StackConfig(data_dir=args.state_dir, edges=0, log_level="warning")).start()
    results: dict[str, dict] = {}
    try:
        cloud = stack.addresses["cloudd"]
        for n, (rule, settings) in enumerate(RULES.items()):
            edge = stack.add_edge(f"edge-rule{n}", CLOUD=cloud, **settings)
            share = len(questions) // len(RULES)  # each edge gets questions of its own
            results[rule] = asyncio.run(measure(
                edge.address, pairs[: args.warm], questions[n * share : (n + 1) * share],
                args))
            print(f"{rule}: {results[rule]}", flush=True)
    finally:
        stack.stop()
    text = markdown(results, args)
    print("\n" + text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        command = f"tools/bench_eviction.py {' '.join(sys.argv[1:])}"
        (args.out / "eviction.md").write_text(f"# Fresh answers kept\n\n{text}\n\n"
                                              f"Command: `{command}`\n")
        (args.out / "eviction.json").write_text(json.dumps(
            {"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2))


if __name__ == "__main__":
    main()
