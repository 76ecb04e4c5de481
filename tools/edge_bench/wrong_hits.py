"""Right and wrong hits on the labelled pairs, VELO's and GPTCache's, at the same threshold."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from edge_bench.data import GPTCACHE_T, PAIRS_TENANT, BenchData
from edge_bench.gptcache_side import GPTCacheSide
from edged.decision import Decider
from velo.edge.cache import VectorCache
from velo.edge.embedder import Embedder


def load_labelled(data: BenchData, cache: VectorCache) -> tuple[np.ndarray, list[str]]:
    """Cache the `a` side of every other pair (its own tenant); returns which and the answers."""
    held_in = np.flatnonzero(np.arange(len(data.pairs)) % 2 == 0)
    answers = [f"answer of pair {i}" for i in range(len(data.pairs))]
    cache.import_pairs(PAIRS_TENANT, [data.pairs[i].a for i in held_in],
                       [answers[i] for i in held_in], data.a_vecs[held_in],
                       data.answer_vecs[held_in % len(data.answers)], 0.0)
    return held_in, answers


def tally(served: list[str | None], answers: list[str]) -> dict:
    """A hit is right only when it serves the answer of the query's own pair (held-out pairs
    have none cached, so any hit on them is wrong)."""
    right = sum(s == answers[i] for i, s in enumerate(served) if s is not None)
    hits = sum(s is not None for s in served)
    return {"queries": len(served), "hits": hits, "right": right, "wrong": hits - right,
            "wrong_hit_rate": (hits - right) / max(1, hits),
            "wrong_per_request": (hits - right) / len(served)}


async def velo_wrong_hits(data: BenchData, decider: Decider, answers: list[str]) -> dict:
    served = []
    for p in data.pairs:
        decided = await decider.decide(p.b, PAIRS_TENANT)
        served.append(decided.state.rows[0].answer
                      if decided.decision.action.letter == "A" else None)
    return tally(served, answers)


def gptcache_wrong_hits(data: BenchData, embedder: Embedder, workdir: Path,
                        held_in: np.ndarray, answers: list[str]) -> dict:
    out = {}
    for name, threshold in ((f"gptcache T={GPTCACHE_T:.4f}", GPTCACHE_T),
                            ("gptcache T=0.8 (its default)", 0.8)):
        side = GPTCacheSide(embedder, Path(tempfile.mkdtemp(dir=workdir)), threshold)
        side.add([data.pairs[i].a for i in held_in], [answers[i] for i in held_in],
                 data.a_vecs[held_in])
        out[name] = tally([side.get(p.b) for p in data.pairs], answers)
    return out
