"""A labelled false-hit benchmark in the GPTCache / vCache style (`velo experiment --pairs`).

Cache the `a` side of labelled question pairs, ask the `b` side, and count for each policy the
right hits (A served the `a` that the pair says is the same question), wrong hits (A served
anything else) and misses. Files: JSON lines `{"a", "b", "label"}` or the GPTCache benchmark's
list of `{"text_a", "text_b", "label"}` (or `{"origin", "similar"}`, all positives).

When a file holds only positives (as `paraphrase_pairs_dev.jsonl` does), negatives are built
as the data README says, by leaving out a random half of the `a` sides: their `b` has no right
answer in the cache, so any hit on it is wrong.

The static thresholds (Cache-θ, GPTCache's rule: reuse when J_min <= θ) trace a curve of hit
rate against false-hit rate; so does the learned policy, by reusing when P(A) >= τ. With a
bound δ, τ is calibrated on one half of the queries (the smallest τ whose false-hit rate stays
<= δ there) and the other half reports whether the bound held, as vCache promises.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainerd.memory_cache import MemoryCache
from velo.policy import OnnxPolicy
from velo.qos import Action
from velo.state import EdgeState, build_state

TENANT = "pairs"
THETAS = tuple(round(x, 2) for x in np.arange(0.05, 1.01, 0.05))
TAU_QUANTILES = np.linspace(0.0, 0.95, 20)  # τ at these quantiles of P(A): an even curve


@dataclass(frozen=True)
class Pair:
    a: str
    b: str
    label: int


def load_pairs(path: Path) -> list[Pair]:
    """JSON lines of {"a", "b", "label"} or a JSON list in the GPTCache benchmark's format."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    pairs = []
    for number, row in enumerate(rows, 1):
        a = row.get("a", row.get("text_a", row.get("origin")))
        b = row.get("b", row.get("text_b", row.get("similar")))
        if not isinstance(a, str) or not isinstance(b, str):
            raise ValueError(f"{path}: record {number} has no a/b (or text_a/text_b) strings")
        pairs.append(Pair(a, b, int(row.get("label", 1))))
    if not pairs:
        raise ValueError(f"{path}: no pairs")
    return pairs


@dataclass
class Query:
    """One asked `b`: its local state, the probability the learned policy gives A, and which
    cached `a` texts would be a right answer."""

    state: EdgeState
    right: frozenset[str]
    served: str | None  # the `a` text of the nearest row (what A would serve)
    p_reuse: float = 0.0


def build_queries(pairs: list[Pair], vectors, dim: int, value: float, seed: int,
                  holdout: float = 0.5, top_p: int = 5) -> list[Query]:
    """Cache the `a` sides (leaving out a `holdout` share of them when the file has no
    negatives; 0 caches all, as GPTCache's own benchmark does) and build the state each `b`
    would meet. `value` is c^r of a freshly cached pair."""
    rng = np.random.default_rng(seed)
    has_negatives = any(p.label == 0 for p in pairs)
    cached = {p.a for p in pairs} if has_negatives else {
        p.a for p, out in zip(pairs, rng.random(len(pairs)) < holdout, strict=True) if not out}
    cache = MemoryCache(dim)
    for a in sorted(cached):
        cache.insert_pair(TENANT, a, a, vectors[a], vectors[a], value)
    queries = []
    for p in pairs:
        f = vectors[p.b]
        state = build_state(f, cache.search(f, TENANT, top_p), top_p)
        right = frozenset({p.a} if p.label == 1 and p.a in cached else ())
        queries.append(Query(state, right, state.rows[0].question if state.rows else None))
    return queries


def count(queries: list[Query], reuse: list[bool]) -> dict[str, float]:
    hits = sum(reuse)
    wrong = sum(r and q.served not in q.right for q, r in zip(queries, reuse, strict=True))
    positives = sum(bool(q.right) for q in queries)
    precision = (hits - wrong) / hits if hits else 1.0
    recall = (hits - wrong) / positives if positives else 0.0
    return {"queries": len(queries), "hits": hits, "right_hits": hits - wrong,
            "wrong_hits": wrong, "misses": len(queries) - hits,
            "hit_rate": hits / len(queries), "false_hit_rate": wrong / hits if hits else 0.0,
            "error_rate": wrong / len(queries), "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0}


def benchmark(queries: list[Query], policy: OnnxPolicy | None, delta: float | None,
              seed: int) -> dict:
    """Every static threshold, the learned policy (argmax and the τ sweep), and the δ bound."""
    rows = []
    for theta in THETAS:
        reuse = [q.state.min_distance <= theta for q in queries]
        rows.append({"policy": f"cache-{theta}", "param": theta, **count(queries, reuse)})
    report: dict = {"rows": rows}
    if policy is None:
        return report
    argmax = []
    for q in queries:
        decision = policy.decide(q.state) if q.state.rows else None
        q.p_reuse = float(decision.probs[Action.REUSE]) if decision else 0.0
        argmax.append(decision is not None and decision.action is Action.REUSE)
    report["learned"] = {"policy": "lrs", "param": "argmax", **count(queries, argmax)}
    taus = np.unique(np.quantile([q.p_reuse for q in queries if q.state.rows], TAU_QUANTILES))
    for tau in taus:
        tau = round(float(tau), 4)
        rows.append({"policy": "lrs-tau", "param": tau,
                     **count(queries, [q.p_reuse >= tau for q in queries])})
    if delta is not None:
        report["delta"] = calibrate_tau(queries, delta, seed)
    return report


def calibrate_tau(queries: list[Query], delta: float, seed: int) -> dict:
    """Pick τ on a calibration half (smallest τ with false-hit rate <= δ), check it on the
    other half."""
    order = np.random.default_rng(seed).permutation(len(queries))
    calib = [queries[i] for i in order[: len(order) // 2]]
    test = [queries[i] for i in order[len(order) // 2:]]
    tau = 1.01  # reuse nothing if no τ meets the bound
    for candidate in sorted({round(q.p_reuse, 6) for q in calib if q.p_reuse > 0}):
        if count(calib, [q.p_reuse >= candidate for q in calib])["false_hit_rate"] <= delta:
            tau = candidate
            break
    held_out = count(test, [q.p_reuse >= tau for q in test])
    return {"delta": delta, "tau": tau, **held_out,
            "held": held_out["false_hit_rate"] <= delta}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 5))
    for name, style in (("cache", dict(color="tab:brown", marker="s", label="Cache-θ (static)")),
                        ("lrs-tau", dict(color="tab:red", marker="o",
                                         label="LRS, reuse when P(A) ≥ τ"))):
        rows = [r for r in report["rows"] if r["policy"].startswith(name)]
        if rows:
            ax.plot([r["false_hit_rate"] for r in rows], [r["hit_rate"] for r in rows], **style)
    if "learned" in report:
        r = report["learned"]
        ax.plot(r["false_hit_rate"], r["hit_rate"], "*", color="black", markersize=14,
                label="LRS (argmax)")
    if "delta" in report:
        d = report["delta"]
        ax.axvline(d["delta"], color="gray", linestyle="--", label=f"δ = {d['delta']}")
        ax.plot(d["false_hit_rate"], d["hit_rate"], "P", color="tab:green", markersize=12,
                label=f"LRS, τ = {d['tau']:.2f} (held-out half)")
    ax.set_xlabel("false-hit rate (wrong hits / hits)")
    ax.set_ylabel("hit rate (hits / queries)")
    ax.set_title("Labelled pairs: hit rate against false-hit rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(report: dict) -> str:
    lines = ["| policy | θ / τ | hits | right | wrong | misses | hit rate | false-hit rate "
             "| error rate | recall | F1 |", "|---|" + "---:|" * 10]
    rows = list(report["rows"])
    if "learned" in report:
        rows.append(report["learned"])
    for r in rows:
        lines.append(f"| {r['policy'].split('-')[0] if r['policy'] != 'lrs-tau' else 'lrs'} "
                     f"| {r['param']} | {r['hits']} | {r['right_hits']} | {r['wrong_hits']} "
                     f"| {r['misses']} | {r['hit_rate']:.1%} | {r['false_hit_rate']:.1%} "
                     f"| {r['error_rate']:.1%} | {r['recall']:.1%} | {r['f1']:.3f} |")
    text = "\n".join(lines)
    if "delta" in report:
        d = report["delta"]
        text += (f"\n\nBound δ = {d['delta']}: τ = {d['tau']:.3f} chosen on half of the queries; "
                 f"on the other half the false-hit rate is {d['false_hit_rate']:.1%} at a hit "
                 f"rate of {d['hit_rate']:.1%}: the bound {'held' if d['held'] else 'FAILED'}.")
    return text
