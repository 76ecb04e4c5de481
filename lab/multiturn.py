"""Multi-turn reuse (`velo experiment --multiturn`): conversation-aware keys against a cache
keyed on the last message alone, on `multiturn_dev.jsonl`.

Every turn of every conversation is cached under its context (velo.conversation); the
last-message baseline caches the same rows in one scope (the tenant). Then:
  * restated turns: each `nc-*` turn's restatement is asked after its own history; a hit is
    right when it serves that turn;
  * foreign follow-ups: each `cq-*` follow-up is asked after *another* conversation's first
    turn; its cached answer was given after a different first turn, so any hit is wrong.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from velo.conversation import Turn, context_key

THRESHOLDS = (0.7, 0.8, 0.85, 0.9)


def load_turns(path: Path) -> list[dict]:
    turns = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            row["scope"] = context_key(Turn(m["role"], m["content"])
                                       for m in row.get("history") or ())
            turns.append(row)
    return turns


def questions(turns: list[dict]) -> list[tuple[str, str, str | None]]:
    """(asked text, scope it is asked in, the question a right answer was cached for or None:
    a cached row is right when it holds that question in that same context)."""
    asked = []
    for t in turns:
        if t["id"].startswith("nc-"):
            asked += [(p, t["scope"], t["question"]) for p in t.get("paraphrases") or ()]
    follow_ups = [t for t in turns if t["id"].startswith("cq-") and t.get("turn") == 1]
    for n, t in enumerate(follow_ups):  # after the next conversation's first turn
        other = follow_ups[(n + 1) % len(follow_ups)]
        asked.append((t["question"], other["scope"], None))
    return asked


def run(turns: list[dict], vectors, context_aware: bool, threshold: float) -> dict[str, float]:
    cached = [(t["question"], t["scope"]) for t in turns]
    matrix = np.stack([vectors[q] for q, _ in cached])
    scopes = np.array([s for _, s in cached], dtype=object)
    restated = {"asked": 0, "right": 0, "wrong": 0}
    foreign = {"asked": 0, "wrong": 0}
    for text, scope, right_question in questions(turns):
        sims = matrix @ vectors[text]
        if context_aware:
            sims = np.where(scopes == scope, sims, -np.inf)
        best = int(np.argmax(sims))
        hit = bool(sims[best] >= threshold)
        if right_question is None:
            foreign["asked"] += 1
            foreign["wrong"] += hit
        else:
            restated["asked"] += 1
            right = cached[best] == (right_question, scope)
            restated["right"] += hit and right
            restated["wrong"] += hit and not right
    return {"restated_asked": restated["asked"],
            "restated_hit_rate": (restated["right"] + restated["wrong"]) / restated["asked"],
            "restated_right": restated["right"], "restated_wrong": restated["wrong"],
            "foreign_asked": foreign["asked"], "foreign_wrong_reuses": foreign["wrong"]}


def markdown(rows: list[dict]) -> str:
    lines = ["| keys | threshold | restated turns: hit rate | right | wrong | foreign follow-ups "
             "asked | wrong reuses |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['keys']} | {r['threshold']} | {r['restated_hit_rate']:.1%} "
                     f"| {r['restated_right']} | {r['restated_wrong']} | {r['foreign_asked']} "
                     f"| {r['foreign_wrong_reuses']} |")
    return "\n".join(lines)
