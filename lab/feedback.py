"""Learning from feedback: a replay where intents recur in several restatements.

An edge starts empty and serves a stream of questions; each arrival is one restatement of an
intent drawn with Zipf popularity (Quora duplicate clusters, the `nc-*` conversations'
restated turns, xquad's languages). A forward asks the LLM and caches the question; a reuse
serves the best-scored cached row. Verification (velo.edge.calibration) tells the edge whether the
row it reused, or the nearest row of a forward, meant the same: forwards are verified for
free (the fresh answer is there), reuses at `shadow_rate` (SPEC §3). Here the verdict is the
data's own label (same intent or not), i.e. a perfect judge; on an edge it is q of the served
answer against the fresh one.

Compared on the same stream: static thresholds (one threshold, never learning) and the
per-row calibration started from each of the same thresholds; both score candidates the same
way (cosine similarity, or the verifier's P(same)).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lab.pairs import Pair, components
from velo.edge.calibration import RowCalibration

# Scores the top candidates of one arrival: (asked text, cached texts, cosine sims) -> scores.
Scorer = Callable[[str, Sequence[str], np.ndarray], np.ndarray]


def cosine_scorer(text: str, cached: Sequence[str], sims: np.ndarray) -> np.ndarray:
    return sims


def quora_intents(pairs: list[Pair]) -> list[tuple[str, ...]]:
    """Duplicate clusters: texts joined by label-1 pairs (a text of a label-0 pair alone is
    an intent of its own, and a near-miss of its partner)."""
    root = components(sorted({t for p in pairs for t in (p.a, p.b)}),
                      [(p.a, p.b) for p in pairs if p.label == 1])
    clusters: dict[str, list[str]] = {}
    for text, r in root.items():
        clusters.setdefault(r, []).append(text)
    return [tuple(c) for c in clusters.values()]


def arrivals(intents: list[tuple[str, ...]], requests: int, skew: float, seed: int,
             ) -> list[tuple[int, str]]:
    """(intent, text) arrivals: intents by Zipf popularity, a uniform restatement each."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(intents))
    weights = 1.0 / np.arange(1, len(intents) + 1) ** skew
    chosen = order[rng.choice(len(intents), size=requests, p=weights / weights.sum())]
    return [(int(i), intents[i][rng.integers(len(intents[i]))]) for i in chosen]


@dataclass
class Replay:
    hit: np.ndarray  # [requests] bool: served from the cache
    wrong: np.ndarray  # [requests] bool: served a row of another intent

    def window(self, start: float = 2 / 3) -> dict[str, float]:
        """Hit and error rate over the last part of the replay (the learned steady state)."""
        s = int(len(self.hit) * start)
        hits, wrong = self.hit[s:], self.wrong[s:]
        return {"hit_rate": float(hits.mean()), "error_rate": float(wrong.mean()),
                "wrong_share_of_hits": float(wrong.sum() / max(hits.sum(), 1))}


def replay(stream: list[tuple[int, str]], vectors, scorer: Scorer, threshold: float,
           learn: bool, shadow_rate: float = 1.0, top_p: int = 5, seed: int = 0,
           scope_of: Sequence[str] | None = None) -> Replay:
    """One edge, empty at first, serving `stream`; `learn` turns per-row calibration on.
    Intents of different conversation scopes (`scope_of`) never see each other's rows."""
    rng = np.random.default_rng(seed)
    dim = len(vectors[stream[0][1]])
    matrix = np.zeros((len(stream), dim), np.float32)
    texts: list[str] = []
    intent_of: list[int] = []
    calibration = RowCalibration(threshold)
    hit = np.zeros(len(stream), bool)
    wrong = np.zeros(len(stream), bool)
    row_scopes = np.empty(len(stream), dtype=object)
    for n, (intent, text) in enumerate(stream):
        f = vectors[text]
        if texts:
            sims = matrix[: len(texts)] @ f
            if scope_of is not None:  # conversation-aware keys: other contexts are invisible
                sims = np.where(row_scopes[: len(texts)] == scope_of[intent], sims, -np.inf)
            top = np.argsort(-sims)[:top_p]
            scores = scorer(text, [texts[i] for i in top], sims[top])
            best = int(top[int(np.argmax(scores))])
            score = float(np.max(scores))
            if not np.isfinite(sims[best]):  # no row in this scope yet
                score = -np.inf
            correct = intent_of[best] == intent
            if score >= (calibration.threshold(best) if learn else threshold):
                hit[n], wrong[n] = True, not correct
                if learn and rng.random() < shadow_rate:
                    calibration.observe(best, score, correct)
                continue
            if learn:  # a forward: its fresh answer verifies the best row for free
                calibration.observe(best, score, correct)
        if scope_of is not None:
            row_scopes[len(texts)] = scope_of[intent]
        matrix[len(texts)] = f
        texts.append(text)
        intent_of.append(intent)
    return Replay(hit, wrong)


def error_at(curve: list[dict], hit_rate: float) -> float:
    """The error rate of a static-threshold curve at `hit_rate`: the lowest error among the
    static thresholds with at least that hit rate (the best static point that serves as much)."""
    reach = [r["error_rate"] for r in curve if r["hit_rate"] >= hit_rate - 1e-9]
    return min(reach) if reach else float("nan")


THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.70, 0.99, 0.02))
WINDOW = 500  # requests per point of the over-time plot


def compare(streams: list[list[tuple[int, str]]], vectors, scorer: Scorer,
            thresholds: Sequence[float] = THRESHOLDS, shadow_rate: float = 1.0,
            scope_of: Sequence[str] | None = None) -> dict:
    """Static thresholds and per-row calibration from each of them, on the same streams (rates
    averaged over the streams: one popular near-miss can dominate a single stream)."""
    static, learned, runs = [], [], {}
    for t in thresholds:
        pairs = [(replay(stream, vectors, scorer, t, learn=False, scope_of=scope_of),
                  replay(stream, vectors, scorer, t, learn=True, shadow_rate=shadow_rate,
                         scope_of=scope_of)) for stream in streams]
        static.append({"threshold": t, **_mean([s.window() for s, _ in pairs])})
        learned.append({"threshold": t, **_mean([lr.window() for _, lr in pairs])})
        runs[t] = pairs[0]
    for row in learned:  # against the whole static curve
        base = row["static_error_at_same_hits"] = error_at(static, row["hit_rate"])
        row["ratio"] = row["error_rate"] / base if base and base == base else float("nan")
    return {"static": static, "learned": learned, "runs": runs, "streams": len(streams)}


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def over_time(result: Replay, window: int = WINDOW) -> list[dict]:
    out = []
    for start in range(0, len(result.hit) - window + 1, window):
        h, w = result.hit[start:start + window], result.wrong[start:start + window]
        out.append({"served": start + window, "hit_rate": float(h.mean()),
                    "error_rate": float(w.mean())})
    return out


def plot(name: str, report: dict, threshold: float, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    s = report["static"]
    lr = report["learned"]
    left.plot([r["hit_rate"] for r in s], [r["error_rate"] for r in s], "s-",
              color="tab:brown", markersize=3, label="static thresholds")
    left.plot([r["hit_rate"] for r in lr], [r["error_rate"] for r in lr], "o-",
              color="tab:blue", markersize=3, label="per-row calibration (same starts)")
    left.set_xlabel("hit rate (last third of the replay)")
    left.set_ylabel("error rate (wrong hits / requests)")
    left.set_title(f"{name}: hit rate against error rate")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    static_run, learned_run = report["runs"][threshold]
    for run, label, color in ((static_run, "static", "tab:brown"),
                              (learned_run, "per-row calibration", "tab:blue")):
        points = over_time(run)
        x = [p["served"] for p in points]
        right.plot(x, [p["error_rate"] for p in points], "-", color=color,
                   label=f"{label}: error rate")
        right.plot(x, [p["hit_rate"] / 10 for p in points], "--", color=color,
                   label=f"{label}: hit rate / 10")
    right.set_xlabel("requests served")
    right.set_title(f"over time (first stream), starting threshold {threshold}")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(name: str, report: dict) -> str:
    lines = [f"### {name}\n", "| start threshold | static hit rate | static error | learned hit "
             "rate | learned error | best static error at >= that hit rate | learned / static |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for s, lr in zip(report["static"], report["learned"], strict=True):
        lines.append(f"| {s['threshold']} | {s['hit_rate']:.1%} | {s['error_rate']:.2%} "
                     f"| {lr['hit_rate']:.1%} | {lr['error_rate']:.2%} "
                     f"| {lr['static_error_at_same_hits']:.2%} | {lr['ratio']:.2f} |")
    halved = [float(lr["threshold"]) for lr in report["learned"] if lr["ratio"] <= 0.5]
    lines.append(f"\nError halved (or better) against the best static threshold at the same hit "
                 f"rate when starting from {halved or 'no threshold'}.")
    return "\n".join(lines)


def restatement_intents(path) -> tuple[list[tuple[str, ...]], list[str]]:
    """Intents of a QA file whose items carry `paraphrases` (the `nc-*` conversations, xquad):
    one intent per item with a restatement, scoped by its conversation context. Items that share
    a text in the same scope (the same first question in two conversations) are one intent."""
    import json

    from velo.core.conversation import Turn, context_key

    by_key: dict[tuple[str, str], int] = {}
    intents: list[set[str]] = []
    scopes: list[str] = []
    for line in Path(path).read_text(encoding="utf-8").split("\n"):
        if not line.strip():
            continue
        row = json.loads(line)
        if not row.get("paraphrases"):
            continue
        scope = context_key(Turn(m["role"], m["content"]) for m in row.get("history") or ())
        texts = {row["question"], *row["paraphrases"]}
        known = {by_key[(scope, t)] for t in texts if (scope, t) in by_key}
        index = min(known) if known else len(intents)
        if not known:
            intents.append(set())
            scopes.append(scope)
        intents[index] |= texts
        for t in texts:
            by_key[(scope, t)] = index
    return [tuple(sorted(i)) for i in intents], scopes
