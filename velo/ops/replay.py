"""Replay a QA workload through running edges over gRPC and summarise QoS per edge and action.

Each user is served by its nearest edge (user u -> edge u mod N). Requests carry the item's
reference answer, so the edges measure satisfaction q (eq. 2) and reward r = phi1*q - phi2*d.
A reuse (A) is a false hit when the cached question it served belongs to another QA item.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import defaultdict
from dataclasses import dataclass

import grpc

from velo.core.records import QAItem
from velo.ops.workload import Arrival
from velo.runtime.security import TLSConfig, dial
from velo.v1 import edge_pb2, edge_pb2_grpc

LETTER = {edge_pb2.ACTION_REUSE: "A", edge_pb2.ACTION_FORWARD: "B", edge_pb2.ACTION_AUGMENT: "C"}


@dataclass
class Outcome:
    edge: str
    action: str  # "A", "B", "C" or "error"
    delay_s: float = 0.0
    satisfaction: float | None = None
    reward: float | None = None
    false_hit: bool = False
    error: str = ""


async def replay(arrivals: list[Arrival], edges: list[str], items: list[QAItem], *,
                 tenant: str = "demo", max_tokens: int = 64, concurrency: int = 3,
                 progress: bool = True, to_every_edge: bool = False,
                 tls: TLSConfig | None = None, api_key: str = "") -> list[Outcome]:
    """Send each arrival to its user's edge, or, with `to_every_edge`, to every edge (one
    policy per edge, all on the same workload); arrivals are sent in order, `concurrency` at
    a time."""
    owner = {text: item.id for item in items for text in (item.question, *item.paraphrases)}
    channels = [dial(a, tls, api_key) for a in edges]
    stubs = [edge_pb2_grpc.EdgeServiceStub(c) for c in channels]
    outcomes: list[Outcome] = []
    sends = ([(a, n) for a in arrivals for n in range(len(edges))] if to_every_edge
             else [(a, a.user % len(edges)) for a in arrivals])
    total = len(sends)
    gate = asyncio.Semaphore(concurrency)
    started = time.monotonic()

    async def one(arrival: Arrival, n: int) -> None:
        request = edge_pb2.AskRequest(prompt=arrival.text, tenant=tenant, max_tokens=max_tokens,
                                      reference_answer=arrival.item.answer)
        async with gate:
            try:
                reply = await stubs[n].Ask(request, timeout=300)
                action = LETTER[reply.action]
                outcomes.append(Outcome(
                    edges[n], action, reply.delay_s,
                    reply.satisfaction if reply.has_satisfaction else None,
                    reply.reward if reply.has_satisfaction else None,
                    action == "A" and owner.get(reply.cached_question) != arrival.item.id))
            except grpc.aio.AioRpcError as exc:
                outcomes.append(Outcome(edges[n], "error",
                                        error=f"{exc.code().name}: {exc.details() or ''}"))
        if progress:
            done = len(outcomes)
            bar = "#" * (30 * done // total)
            elapsed = time.monotonic() - started
            print(f"\r  replay [{bar:<30}] {done}/{total}  {elapsed:5.1f} s",
                  end="", file=sys.stderr, flush=True)

    try:
        await asyncio.gather(*(one(a, n) for a, n in sends))
    finally:
        if progress:
            print(file=sys.stderr)
        for channel in channels:
            await channel.close()
    return outcomes


def summary_table(outcomes: list[Outcome], names: dict[str, str] | None = None) -> str:
    """A Markdown table: one row per edge and action, then a total row per edge."""
    names = names or {}
    groups: dict[tuple[str, str], list[Outcome]] = defaultdict(list)
    for o in outcomes:
        groups[(o.edge, o.action)].append(o)
        groups[(o.edge, "all")].append(o)
    lines = ["| edge | action | requests | A/B/C | hit rate | false hits | mean delay s "
             "| mean q | mean reward (w=0.1) |", "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for edge in sorted({o.edge for o in outcomes}, key=lambda e: names.get(e, e)):
        for action in ("A", "B", "C", "error", "all"):
            rows = groups.get((edge, action))
            if not rows:
                continue
            served = [o for o in rows if o.action != "error"]
            counts = "/".join(str(sum(o.action == a for o in rows)) for a in "ABC")
            hits = sum(o.action == "A" for o in rows)
            q = [o.satisfaction for o in served if o.satisfaction is not None]
            r = [o.reward for o in served if o.reward is not None]
            lines.append(
                f"| {names.get(edge, edge)} | {action} | {len(rows)} | {counts} "
                f"| {hits / len(rows):.0%} | {sum(o.false_hit for o in rows)} "
                f"| {_mean([o.delay_s for o in served]):.3f} | {_mean(q):.3f} | {_mean(r):.3f} |")
    return "\n".join(lines)


LEGEND = """\
What the columns mean:
  action        A: the edge served a cached answer (reuse); B: it asked the cloud LLM;
                C: it asked the LLM with the nearest cached question and answer as context;
                error: no answer; all: every request of the edge
  A/B/C         how many requests took each action
  hit rate      share of requests served from the cache (A)
  false hits    reuses whose cached question belongs to another question of the data set:
                the user got an answer to something else
  mean delay s  what the user waited, as the edge measured it (a reuse: milliseconds;
                the LLM: seconds, longer while the cloud's queue is long)
  mean q        answer quality: minus the distance between the answer's embedding and the
                reference answer's (0 is best, -2 the worst)
  mean reward   q - 0.1 x delay: what the policies maximise (higher is better)"""


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
