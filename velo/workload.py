"""QA data sets (the format of shared/data/README.md) and Zipf-skewed request workloads."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class QAItem:
    id: str
    question: str
    answer: str
    alt_answers: tuple[str, ...] = ()
    paraphrases: tuple[str, ...] = ()


@dataclass(frozen=True)
class Arrival:
    item: QAItem
    text: str  # the question as this user asks it: the original or one of its paraphrases
    user: int


def load_qa(path: str | Path) -> list[QAItem]:
    """Read one JSON object a line; unknown fields are ignored, bad lines name their number."""
    items = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                items.append(QAItem(str(row["id"]), row["question"], row["answer"],
                                    tuple(row.get("alt_answers") or ()),
                                    tuple(row.get("paraphrases") or ())))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{number}: not a QA record ({exc!r})") from exc
    if not items:
        raise ValueError(f"{path}: no QA records")
    return items


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
