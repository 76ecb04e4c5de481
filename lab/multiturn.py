"""Multi-turn reuse (`velo experiment multiturn FILE`): conversation-aware keys against a cache
keyed on the last message alone, on any conversation file in the QA format (the data README):
one turn a line, `question`, and `history` (the earlier turns as chat messages; empty or absent
for a first turn). `multiturn_dev.jsonl` is one.

Every turn of every conversation is cached under its context (velo.core.conversation); the
last-message baseline caches the same rows in one scope (the tenant). Then:
  * restated turns (those with `paraphrases`): each restatement is asked after its turn's own
    history; a hit is right when it serves that turn;
  * foreign follow-ups (the other turns with a history): each is asked after the context of the
    next follow-up in the file with a different context; its cached answer was given after
    another context, so a hit is wrong (unless it serves the same question cached after that
    very context: "Name a landmark there." in two conversations about different cities).
What a file cannot measure (no `paraphrases`; follow-ups in fewer than two contexts) is said
in the report (`unmeasured`), never guessed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from velo.core.conversation import Turn, context_key

THRESHOLDS = (0.7, 0.8, 0.85, 0.9)


def load_turns(path: Path) -> list[dict]:
    """The file's turns, each with its context's `scope`; SystemExit naming the file and line
    for anything that is not a turn (the command stops with that message, not a traceback)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise SystemExit(f"{path}: cannot read it ({exc})") from exc
    turns = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"{path}:{number}: not a JSON line ({exc})") from exc
        if problem := record_problem(row):
            raise SystemExit(f"{path}:{number}: {problem}")
        row["scope"] = context_key(Turn(m["role"], m["content"])
                                   for m in row.get("history") or ())
        turns.append(row)
    if not turns:
        raise SystemExit(f"{path}: no turns (one JSON object a line, with a `question`)")
    return turns


def record_problem(row: object) -> str | None:
    """Why a JSON line is not a QA record this reads (a turn, or a restated question), or None."""
    if not isinstance(row, dict) or not isinstance(row.get("question"), str):
        return "not a QA record (a JSON object with a `question` string)"
    if not _strings(row.get("paraphrases") or []):
        return "`paraphrases` is not a list of strings"
    history = row.get("history") or []
    if not isinstance(history, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in history):
        return "`history` is not a list of chat messages ({\"role\", \"content\"} strings)"
    return None


def _strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def follow_ups(turns: list[dict]) -> list[dict]:
    """Turns asked after a history; the restated ones are measured as restated turns instead."""
    return [t for t in turns if t.get("history") and not t.get("paraphrases")]


def unmeasured(turns: list[dict]) -> list[str]:
    """What this file cannot measure, in words for the report."""
    notes = []
    if not any(t.get("paraphrases") for t in turns):
        notes.append("no restated turns (no `paraphrases`): restated-turn hit rate not measured")
    ups = follow_ups(turns)
    if not ups:
        notes.append("no follow-ups (turns with a `history` and no `paraphrases`): foreign "
                     "follow-ups not measured")
    elif len({t["scope"] for t in ups}) < 2:
        notes.append("fewer than 2 conversations with follow-ups (different contexts): foreign "
                     "follow-ups not measured")
    return notes


def questions(turns: list[dict]) -> list[tuple[str, str, str | None]]:
    """(asked text, scope it is asked in, the question a right answer was cached for or None:
    a cached row is right when it holds that question in that same context)."""
    asked = [(p, t["scope"], t["question"]) for t in turns for p in t.get("paraphrases") or ()]
    ups = follow_ups(turns)
    for n, t in enumerate(ups):  # after the next follow-up's context, if not its own context
        others = (ups[(n + k) % len(ups)] for k in range(1, len(ups)))
        other = next((o for o in others if o["scope"] != t["scope"]), None)
        if other is not None:
            asked.append((t["question"], other["scope"], None))
    return asked


def run(turns: list[dict], vectors, context_aware: bool, threshold: float,
        ) -> dict[str, float | None]:
    """Counts and the restated turns' hit rate (None when the file has no restated turn)."""
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
            foreign["wrong"] += hit and cached[best] != (text, scope)
        else:
            restated["asked"] += 1
            right = cached[best] == (right_question, scope)
            restated["right"] += hit and right
            restated["wrong"] += hit and not right
    hits = restated["right"] + restated["wrong"]
    return {"restated_asked": restated["asked"],
            "restated_hit_rate": hits / restated["asked"] if restated["asked"] else None,
            "restated_right": restated["right"], "restated_wrong": restated["wrong"],
            "foreign_asked": foreign["asked"], "foreign_wrong_reuses": foreign["wrong"]}


def markdown(rows: list[dict], notes: Iterable[str] = ()) -> str:
    """The table ("—" where nothing was asked; none when nothing was), then what was not
    measured."""
    bullets = [f"- {n}" for n in notes]
    if not any(r["restated_asked"] or r["foreign_asked"] for r in rows):
        return "\n".join(["Nothing to measure in this file:", *bullets])
    lines = ["| keys | threshold | restated turns: hit rate | right | wrong | foreign follow-ups "
             "asked | wrong reuses |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        restated = (f"{r['restated_hit_rate']:.1%} | {r['restated_right']} | "
                    f"{r['restated_wrong']}" if r["restated_asked"] else "— | — | —")
        foreign = r["foreign_wrong_reuses"] if r["foreign_asked"] else "—"
        lines.append(f"| {r['keys']} | {r['threshold']} | {restated} | {r['foreign_asked']} "
                     f"| {foreign} |")
    return "\n".join(lines + (["", *bullets] if bullets else []))
