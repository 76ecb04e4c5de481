"""The QA record: the format of shared/data/README.md, which `velo cache export` writes
and the import paths (HTTP, `velo cache import`) read back."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from velo.core.conversation import is_scope
from velo.v1 import edge_pb2


@dataclass(frozen=True)
class QAItem:
    id: str
    question: str
    answer: str
    alt_answers: tuple[str, ...] = ()
    paraphrases: tuple[str, ...] = ()


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


def importable_pairs(lines: Iterable[str]) -> tuple[list[tuple[str, str]], int]:
    """The (question, answer) pairs of QA records (this format, or `velo cache export`'s) to
    cache, and how many records were left out: bad lines, and entries exported from a
    conversation's or an answer shape's scope (`velo.scope` "~..."), which would otherwise be
    served as answers to the bare question."""
    pairs, skipped = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            question, answer = row["question"], row["answer"]
            scope = (row.get("velo") or {}).get("scope", "")
        except (ValueError, KeyError, TypeError, AttributeError):
            skipped += 1
            continue
        if not isinstance(question, str) or not isinstance(answer, str) or is_scope(str(scope)):
            skipped += 1
            continue
        pairs.append((question, answer))
    return pairs, skipped


def entry_record(entry: edge_pb2.CacheEntry) -> dict[str, Any]:
    """A cached entry as a QA record (`velo cache export`, the HTTP export), with what VELO
    knows of it under `velo`: `importable_pairs` reads such lines back."""
    return {"id": str(entry.id), "question": entry.question, "answer": entry.answer,
            "alt_answers": [], "paraphrases": [],
            "velo": {"tenant": entry.tenant, "scope": entry.scope, "hits": entry.hits,
                     "value": entry.value, "created": entry.created_unix_s,
                     "age_s": round(entry.age_s, 3), "finish_reason": entry.finish_reason,
                     "usage": {"prompt_tokens": entry.usage.prompt_tokens,
                               "completion_tokens": entry.usage.completion_tokens,
                               "estimated": entry.usage.estimated}}}
