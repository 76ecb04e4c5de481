"""Cross-lingual reuse (`velo experiment multilingual FILE`): xquad's questions cached in
English, asked in Spanish, German, Chinese and Russian (human translations), with MiniLM and
with the multilingual USE embedder (velo.edge.embedder).

Items are split in two halves: on the calibration half each embedder's cosine threshold is set
for the error bound δ (the lowest threshold whose error rate, plus a one-sided 95 % Wilson
margin, stays <= δ; lab.pairs.wilson_upper); on the test half every cached English question is
asked in each other language. A hit is right when it serves the same item.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lab.pairs import wilson_upper


def load_items(path: Path) -> list[dict]:
    items = []
    for line in path.read_text(encoding="utf-8").split("\n"):
        row = json.loads(line) if line.strip() else None
        if row and row.get("paraphrases") and row.get("paraphrase_langs"):
            items.append(row)
    return items


def texts_of(items: list[dict]) -> set[str]:
    return {t for i in items for t in (i["question"], *i["paraphrases"])}


def asked(items: list[dict], vectors) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(language, best cosine, right) for every translation asked against the English cache."""
    matrix = np.stack([vectors[i["question"]] for i in items])
    langs, scores, right = [], [], []
    for n, item in enumerate(items):
        for text, lang in zip(item["paraphrases"], item["paraphrase_langs"], strict=True):
            sims = matrix @ vectors[text]
            best = int(np.argmax(sims))
            langs.append(lang)
            scores.append(float(sims[best]))
            right.append(best == n)
    return langs, np.array(scores), np.array(right)


def calibrate(scores: np.ndarray, right: np.ndarray, delta: float) -> float:
    for t in np.unique(scores):
        hits = scores >= t
        if wilson_upper(int((hits & ~right).sum()), len(scores)) <= delta:
            return float(t)
    return float("inf")


def run(items: list[dict], vectors, delta: float, seed: int) -> dict:
    order = np.random.default_rng(seed).permutation(len(items))
    calib = [items[i] for i in order[: len(items) // 2]]
    test = [items[i] for i in order[len(items) // 2:]]
    _, scores, right = asked(calib, vectors)
    threshold = calibrate(scores, right, delta)
    langs, scores, right = asked(test, vectors)
    rows = {}
    for lang in [*sorted(set(langs)), "all"]:
        keep = np.array([lang in ("all", x) for x in langs])
        hits = (scores >= threshold) & keep
        rows[lang] = {"asked": int(keep.sum()), "hit_rate": float(hits.sum() / keep.sum()),
                      "error_rate": float((hits & ~right).sum() / keep.sum()),
                      "nearest_is_right": float(right[keep].mean())}
    return {"threshold": threshold, "by_lang": rows}


def markdown(results: dict[str, dict], delta: float) -> str:
    lines = [f"| embedder | threshold (δ = {delta}) | language | asked | nearest row is right "
             "| hit rate | error rate |", "|---|---:|---|---:|---:|---:|---:|"]
    for name, result in results.items():
        for lang, r in result["by_lang"].items():
            lines.append(f"| {name} | {result['threshold']:.3f} | {lang} | {r['asked']} "
                         f"| {r['nearest_is_right']:.1%} | {r['hit_rate']:.1%} "
                         f"| {r['error_rate']:.2%} |")
    return "\n".join(lines)
