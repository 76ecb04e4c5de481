"""Zipf-skewed request workloads over a QA data set (the demo, replays, the simulator)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from velo.core.records import QAItem


@dataclass(frozen=True)
class Arrival:
    item: QAItem
    text: str  # the question as this user asks it: the original or one of its paraphrases
    user: int


def zipf_workload(items: list[QAItem], requests: int, *, users: int = 30, skew: float = 1.1,
                  seed: int = 0, max_chars: int | None = None) -> list[Arrival]:
    """Draw `requests` arrivals: item popularity ~ 1/rank^skew, text = question or paraphrase."""
    rng = np.random.default_rng(seed)
    if max_chars is not None:
        items = [i for i in items if len(i.question) <= max_chars]
    order = rng.permutation(len(items))
    weights = 1.0 / np.arange(1, len(items) + 1) ** skew
    picks = rng.choice(len(items), size=requests, p=weights / weights.sum())
    arrivals = []
    for pick in picks:
        item = items[order[pick]]
        texts = (item.question, *item.paraphrases)
        arrivals.append(Arrival(item, texts[rng.integers(len(texts))], int(rng.integers(users))))
    return arrivals
