"""`velo experiment reuse`: is reuse right at any scale, on every data set we have?

Trains the verifier of reuse (velo.core.verifier) on the training splits of the given files,
calibrates its thresholds against the cache size, and measures on the test splits:

  1. δ at any size: the main pairs file's test questions cached among other real questions
     (the training and calibration texts of every file: never a test text) at 10³, 10⁴ and as
     many rows as there are; the false-hit rate at each size against δ, the hit rate beside the
     best static thresholds meeting δ (chosen in hindsight on the same test), and how many
     counted errors are unlabelled duplicates;
  2. negation and antonym near-misses: the share of contradicting pairs served at δ;
  3. generalisation: at 24 % hits, the verifier's error against the cosine threshold's on
     every file's test split (a file of contradictions only is mixed into the main test split:
     alone, every hit of it is wrong whatever the rule);
  4. the verifier's time per decision (features of the top-P rows and the ONNX run).

Files: labelled pairs (`a`, `b`, `label`; lab.pairs.load_pairs) or QA records whose
`paraphrases` are restatements in the question's language (each becomes a label-1 pair). The
first file with both labels is the main one (δ is calibrated on its calibration split); it and
a contradictions-only file are split by connected component (lab.verifier.split_by_component:
no test text, nor its paraphrase, is seen in training or calibration). A file of restatements
only (label 1) trains on its training split and is tested on the rest (no δ is calibrated on
it), with half its `a` sides left out of the cache so that a hit can be wrong.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lab.pairs import Pair, error_at_hit_rate, load_pairs, served_right
from lab.verifier import (
    DELTAS,
    SizeRun,
    VerifierConfig,
    split_by_component,
    thresholds_by_rows,
    train_verifier,
    with_thresholds,
)
from velo.core.verifier import OnnxVerifier, content_stems, pair_features

TOP_P = 5  # cached questions the verifier scores per request, as on the edge
SHARES = (0.6, 0.2, 0.2)  # train, calibration, test
CONTRADICTION_WEIGHT = 0.5  # weight of a contradictions-only file's training examples
TEST_ROWS = (1_000, 10_000)  # plus "everything there is" (>= 2·10⁴ with the dev files)
HIT_RATE = 0.24  # where the generalisation gap is read


@dataclass
class DataSet:
    name: str
    pairs: list[Pair]
    train: list[Pair] = field(default_factory=list)
    calib: list[Pair] = field(default_factory=list)
    test: list[Pair] = field(default_factory=list)

    @property
    def contradictions_only(self) -> bool:
        return all(p.label == 0 for p in self.pairs)

    @property
    def labelled_both_ways(self) -> bool:
        return not self.contradictions_only and any(p.label == 0 for p in self.pairs)


def load_set(path: Path, seed: int) -> DataSet:
    """Pairs, or the restatements of QA records (English ones: the edge's MiniLM is English)."""
    text = path.read_text(encoding="utf-8")
    first = text.lstrip().split("\n", 1)[0]
    try:
        record = json.loads(first) if first.startswith("{") else {}
    except ValueError:
        record = {}
    if "question" in record:
        pairs = []
        for number, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                langs = row.get("paraphrase_langs") or ["en"] * len(row.get("paraphrases") or ())
                pairs += [Pair(row["question"], p, 1)
                          for p, lang in zip(row.get("paraphrases") or (), langs, strict=False)
                          if lang == "en" and isinstance(p, str) and p != row["question"]]
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{number}: not a QA record ({exc})") from None
        if not pairs:
            raise ValueError(f"{path}: no English restatements (`paraphrases`) to pair")
    else:
        pairs = load_pairs(path)
    data = DataSet(path.stem, pairs)
    data.train, data.calib, data.test = split_by_component(pairs, SHARES, seed)
    if all(p.label == 1 for p in pairs):  # δ is calibrated on the main file only: test on both
        data.calib, data.test = [], data.calib + data.test
    return data


def edge_similarity(cosine: float) -> float:
    """c^s as the edge hands it to the verifier (velo.core.state.CachedRow.similarity: 1 - J/2, J
    the L2 distance of the unit embeddings), from their cosine."""
    return 1.0 - math.sqrt(max(2.0 - 2.0 * cosine, 0.0)) / 2.0


class Index:
    """Cached questions as a matrix; the top-P by cosine for a batch of asked texts."""

    def __init__(self, texts: Sequence[str], vectors) -> None:
        self.texts = list(dict.fromkeys(texts))
        self.matrix = np.stack([vectors[t] for t in self.texts]) if self.texts else None

    def __len__(self) -> int:
        return len(self.texts)

    def top(self, asked: Sequence[str], vectors, k: int = TOP_P) -> list[list[tuple[str, float]]]:
        found: list[list[tuple[str, float]]] = []
        if self.matrix is None:
            return [[] for _ in asked]
        k = min(k, len(self.texts))
        for start in range(0, len(asked), 512):
            sims = np.stack([vectors[t] for t in asked[start:start + 512]]) @ self.matrix.T
            part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            for row, idx in zip(sims, part, strict=True):
                order = idx[np.argsort(-row[idx])]
                found.append([(self.texts[j], float(row[j])) for j in order])
        return found


@dataclass
class Scored:
    """One asked text: the cosine rule's and the verifier's best row, and what is right."""

    asked: str
    right: frozenset[str]
    cosine: float
    cosine_row: str | None
    p_same: float
    verifier_row: str | None

    def wrong(self, rule: str) -> bool:
        return not served_right(self.asked, self.cosine_row if rule == "cosine"
                                else self.verifier_row, self.right)

    def score(self, rule: str) -> float:
        return self.cosine if rule == "cosine" else self.p_same


def score(pairs: list[Pair], index: Index, vectors, verifier: OnnxVerifier) -> list[Scored]:
    """Ask every `b` of `pairs` against `index` (which holds their `a` sides)."""
    right: dict[str, set[str]] = {}
    for p in pairs:
        right.setdefault(p.b, set())
        if p.label == 1:
            right[p.b].add(p.a)
    asked = list(right)
    out = []
    for text, rows in zip(asked, index.top(asked, vectors), strict=True):
        if not rows:
            out.append(Scored(text, frozenset(right[text]), -1.0, None, -1.0, None))
            continue
        p_same = verifier.p_same(np.stack([pair_features(text, r, edge_similarity(s))
                                           for r, s in rows]))
        best = int(np.argmax(p_same))
        out.append(Scored(text, frozenset(right[text]), rows[0][1], rows[0][0],
                          float(p_same[best]), rows[best][0]))
    return out


def rates(scored: list[Scored], rule: str, threshold: float) -> dict[str, float]:
    hits = [s for s in scored if s.score(rule) >= threshold]
    wrong = [s for s in hits if s.wrong(rule)]
    return {"queries": len(scored), "hits": len(hits), "wrong": len(wrong),
            "hit_rate": len(hits) / max(len(scored), 1),
            "error_rate": len(wrong) / max(len(scored), 1)}


def curve(scored: list[Scored], rule: str) -> list[dict]:
    """Hit rate and error rate at every threshold (each distinct score)."""
    order = sorted(scored, key=lambda s: -s.score(rule))
    n, wrong, rows = len(order), 0, []
    for i, s in enumerate(order, 1):
        wrong += s.wrong(rule)
        rows.append({"hit_rate": i / n, "error_rate": wrong / n, "threshold": s.score(rule)})
    return rows


def best_static(scored: list[Scored], rule: str, delta: float) -> dict | None:
    """The hindsight-best static threshold of `rule` on this very test: most hits at error <= δ."""
    ok = [r for r in curve(scored, rule) if r["error_rate"] <= delta]
    return max(ok, key=lambda r: r["hit_rate"]) if ok else None


def same_words(a: str, b: str) -> bool:
    """An unlabelled duplicate, judged strictly: the same content words (stemmed, stop words,
    case and punctuation aside), in any order. Conservative: real duplicates that reword are
    not counted, so the share of "wrong" hits that are really right is at least this."""
    return content_stems(a) == content_stems(b)


# -- the benchmark ----------------------------------------------------------------------------
def train_on(sets: list[DataSet], vectors, cfg: VerifierConfig) -> bytes:
    """The verifier trained on every file's training split (top-3 candidates of each asked
    text in a cache of that split's `a` sides)."""
    features, labels, weights = [], [], []
    for data in sets:
        index = Index(sorted({p.a for p in data.train}), vectors)
        right: dict[str, set[str]] = {}
        for p in data.train:
            right.setdefault(p.b, set())
            if p.label == 1:
                right[p.b].add(p.a)
        asked = sorted(right)
        weight = CONTRADICTION_WEIGHT if data.contradictions_only else 1.0
        for text, rows in zip(asked, index.top(asked, vectors, cfg.candidates), strict=True):
            for row, sim in rows:
                features.append(pair_features(text, row, edge_similarity(sim)))
                labels.append(float(row in right[text]))
                weights.append(weight)
    return train_verifier(np.stack(features), np.asarray(labels, np.float32), cfg,
                          name="verifier-mlp:" + "+".join(d.name for d in sets),
                          weights=np.asarray(weights, np.float32))


def size_runs(calib: list[Pair], pool: list[str], vectors, verifier: OnnxVerifier,
              ) -> list[SizeRun]:
    """The calibration pairs' `a` sides alone, then among 1/4, 1/2 and all of `pool` (other
    real questions, none of them a test text)."""
    runs = []
    base = sorted({p.a for p in calib})
    for share in (0.0, 0.25, 0.5, 1.0):
        cached = base + pool[: int(len(pool) * share)]
        scored = score(calib, Index(cached, vectors), vectors, verifier)
        runs.append(SizeRun(len(set(cached)), np.array([s.p_same for s in scored]),
                            np.array([s.wrong("verifier") for s in scored])))
    return runs


def run(paths: list[Path], out: Path, cache_dir: Path, delta: float = 0.05, seed: int = 0,
        verifier_path: Path | None = None, distractor_paths: Sequence[Path] = ()) -> dict:
    """The whole benchmark; writes OUT/reuse.md (and OUT/verifier.onnx when it trains)."""
    from lab.experiment import _embedder
    from lab.sim import EmbeddedTexts
    from velo.core.records import load_qa

    started = time.monotonic()
    sets = [load_set(p, seed) for p in paths]
    mains = [d for d in sets if d.labelled_both_ways]
    if not mains:
        raise ValueError("it needs one pairs file with both labels (the main one, e.g. "
                         "qqp_pairs_dev.jsonl): δ is calibrated and checked on it")
    main = mains[0]
    extra = sorted({i.question for p in distractor_paths for i in load_qa(p)})
    embedder = _embedder()
    vectors = _Vectors([EmbeddedTexts({t for p in d.pairs for t in (p.a, p.b)}, embedder,
                                      cache_dir) for d in sets]
                       + ([EmbeddedTexts(set(extra), embedder, cache_dir)] if extra else []))
    report: dict = {"files": [d.name for d in sets], "main": main.name, "delta": delta}
    out.mkdir(parents=True, exist_ok=True)
    test_texts = {t for d in sets for p in d.test for t in (p.a, p.b)}
    rng = np.random.default_rng(seed)
    calib_pool = [t for t in sorted({t for p in main.train for t in (p.a, p.b)})]
    rng.shuffle(calib_pool)
    if verifier_path is None:
        onnx = train_on(sets, vectors, VerifierConfig(seed=seed))
        verifier = OnnxVerifier(onnx)
        runs = size_runs(main.calib, calib_pool, vectors, verifier)
        table = {d: thresholds_by_rows(runs, d) for d in sorted({*DELTAS, delta})}
        onnx = with_thresholds(onnx, table)
        (out / "verifier.onnx").write_bytes(onnx)
        verifier = OnnxVerifier(onnx)
        report["calibration"] = {"queries": len(runs[0].scores),
                                 "rows": [r.rows for r in runs]}
    else:
        verifier = OnnxVerifier(verifier_path)
    report["verifier"] = verifier.name
    report["thresholds"] = verifier.thresholds.get(delta)
    plain = None  # the same recipe without the contradiction files: what refusing them costs
    if verifier_path is None and any(d.contradictions_only for d in sets):
        others = [d for d in sets if not d.contradictions_only]
        model = train_on(others, vectors, VerifierConfig(seed=seed))
        runs = size_runs(main.calib, calib_pool, vectors, OnnxVerifier(model))
        plain = OnnxVerifier(with_thresholds(model, {delta: thresholds_by_rows(runs, delta)}))

    # 1. δ at three sizes: test questions among every non-test text there is.
    # Distractors are other real questions: the contradiction corpora are statements.
    pool = [t for t in sorted({t for d in sets if not d.contradictions_only
                               for p in d.train + d.calib for t in (p.a, p.b)} | set(extra))
            if t not in test_texts]
    rng.shuffle(pool)
    test_a = sorted({p.a for p in main.test})
    small = _subset_with_rows(main.test, TEST_ROWS[0], seed)
    sizes = []
    for label, pairs, cached in (
            ("10³", small, sorted({p.a for p in small})),
            ("10⁴", main.test, test_a + pool[: max(TEST_ROWS[1] - len(test_a), 0)]),
            ("all", main.test, test_a + pool)):
        index = Index(cached, vectors)
        scored = score(pairs, index, vectors, verifier)
        tau = verifier.threshold_for(delta, len(index))
        measured = rates(scored, "verifier", tau)
        wrong = [s for s in scored if s.p_same >= tau and s.wrong("verifier")]
        duplicates = [s for s in wrong if same_words(s.asked, s.verifier_row or "")]
        sizes.append({"size": label, "rows": len(index), "threshold": tau, **measured,
                      "held": measured["error_rate"] <= delta,
                      "unlabelled_duplicates": len(duplicates),
                      "from_other_rows": sum(s.verifier_row not in test_a for s in wrong),
                      "best_cosine": best_static(scored, "cosine", delta),
                      "best_verifier": best_static(scored, "verifier", delta),
                      "examples": [(s.asked, s.verifier_row) for s in wrong[:4]]})
    report["sizes"] = sizes

    # 2. Contradictions served at δ (each such file's test split, its `a` sides cached).
    report["contradictions"] = []
    for data in (d for d in sets if d.contradictions_only):
        index = Index(sorted({p.a for p in data.test}), vectors)
        scored = score(data.test, index, vectors, verifier)
        tau = verifier.threshold_for(delta, len(index))
        cosine_tau, main_hits = _cosine_at_same_hits(main, vectors, verifier, delta)
        entry = {"name": data.name, "pairs": len(scored), "rows": len(index), "threshold": tau,
                 "served": rates(scored, "verifier", tau)["hit_rate"],
                 "cosine_threshold": cosine_tau, "main_hit_rate": main_hits,
                 "cosine_served": rates(scored, "cosine", cosine_tau)["hit_rate"]}
        if plain is not None:
            plain_scored = score(data.test, index, vectors, plain)
            entry["plain_served"] = rates(plain_scored, "verifier",
                                          plain.threshold_for(delta, len(index)))["hit_rate"]
            entry["plain_main_hit_rate"] = _cosine_at_same_hits(main, vectors, plain, delta)[1]
        report["contradictions"].append(entry)

    # 3. The generalisation gap at 24 % hits, on every file's test split.
    report["gaps"] = []
    for data in sets:
        pairs = main.test + data.test if data.contradictions_only else data.test
        cached = sorted({p.a for p in pairs})
        if all(p.label == 1 for p in pairs):  # positives only: leave half the `a` sides out,
            keep = np.random.default_rng(seed).random(len(cached)) >= 0.5  # as lab.pairs does
            cached = [a for a, k in zip(cached, keep, strict=True) if k]
        index = Index(cached, vectors)
        scored = score(pairs, index, vectors, verifier)
        ec = error_at_hit_rate(curve(scored, "cosine"), HIT_RATE)
        ev = error_at_hit_rate(curve(scored, "verifier"), HIT_RATE)
        top = sorted(scored, key=lambda s: -s.p_same)[: int(HIT_RATE * len(scored))]
        report["gaps"].append({
            "name": data.name + (f" + {main.name}" if data.contradictions_only else ""),
            "queries": len(scored), "cosine": ec, "verifier": ev,
            "gain": 1 - ev / ec if ec > 0 else math.nan,
            "examples": [(s.asked, s.verifier_row) for s in top if s.wrong("verifier")][:3]})

    # 4. Time per decision on this machine: features of TOP_P rows and the ONNX run.
    timing = []
    rows_of = Index(test_a, vectors).top([p.b for p in main.test[:500]], vectors)
    for p, rows in zip(main.test[:500], rows_of, strict=True):
        begin = time.perf_counter()
        verifier.p_same(np.stack([pair_features(p.b, r, edge_similarity(s)) for r, s in rows]))
        timing.append(time.perf_counter() - begin)
    report["decision_ms"] = {"p50": 1000 * float(np.median(timing)),
                             "p99": 1000 * float(np.quantile(timing, 0.99))}
    report["seconds"] = time.monotonic() - started
    (out / "reuse.md").write_text(markdown(report))
    (out / "reuse.json").write_text(json.dumps(report, indent=1, default=str))
    return report


class _Vectors:
    """Several EmbeddedTexts read as one mapping text -> vector."""

    def __init__(self, parts) -> None:
        self.parts = parts

    def __getitem__(self, text: str) -> np.ndarray:
        for part in self.parts:
            if text in part.index:
                return part[text]
        raise KeyError(text)


def _subset_with_rows(pairs: list[Pair], rows: int, seed: int) -> list[Pair]:
    """Pairs of whole `a` groups until about `rows` distinct `a` sides are cached."""
    by_a: dict[str, list[Pair]] = {}
    for p in pairs:
        by_a.setdefault(p.a, []).append(p)
    keys = sorted(by_a)
    order = np.random.default_rng(seed).permutation(len(keys))
    return [p for i in order[:rows] for p in by_a[keys[i]]]


def _cosine_at_same_hits(main: DataSet, vectors, verifier: OnnxVerifier, delta: float,
                         ) -> tuple[float, float]:
    """The verifier's hit rate at δ on the main test split (its `a` sides cached), and the
    cosine threshold that reuses as much: the similarity rule contradictions are compared with."""
    index = Index(sorted({p.a for p in main.test}), vectors)
    scored = score(main.test, index, vectors, verifier)
    hit_rate = rates(scored, "verifier", verifier.threshold_for(delta, len(index)))["hit_rate"]
    cosines = sorted((s.cosine for s in scored), reverse=True)
    return cosines[max(int(hit_rate * len(cosines)) - 1, 0)], hit_rate


def markdown(report: dict) -> str:
    d = report["delta"]
    lines = [f"# Reuse at any scale (δ = {d})\n",
             f"Files: {', '.join(report['files'])}; main: {report['main']}. Verifier: "
             f"`{report['verifier']}`. Thresholds for δ by cached rows: "
             + ", ".join(f"{r:,}: {t:.3f}" for r, t in report["thresholds"] or []) + ".\n",
             "## 1. δ at any size (test questions among other real questions)\n",
             "| cached rows | threshold | hit rate | false-hit rate | δ held | best static cosine "
             "(hit rate, θ) | best static verifier τ (hit rate) | wrong hits | from other rows "
             "| unlabelled duplicates |", "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for s in report["sizes"]:
        bc, bv = s["best_cosine"], s["best_verifier"]
        lines.append(
            f"| {s['rows']:,} | {s['threshold']:.3f} | {s['hit_rate']:.1%} "
            f"| {s['error_rate']:.2%} | {'yes' if s['held'] else '**no**'} "
            f"| {bc['hit_rate']:.1%} (θ {bc['threshold']:.3f}) | "
            f"{bv['hit_rate']:.1%} (τ {bv['threshold']:.3f}) | {s['wrong']} "
            f"| {s['from_other_rows']} | {s['unlabelled_duplicates']} |"
            if bc and bv else f"| {s['rows']:,} | {s['threshold']:.3f} | {s['hit_rate']:.1%} "
            f"| {s['error_rate']:.2%} | {'yes' if s['held'] else '**no**'} | — | — "
            f"| {s['wrong']} | {s['from_other_rows']} | {s['unlabelled_duplicates']} |")
    lines.append("\nUnlabelled duplicates: wrong hits whose served question has the same content "
                 "words as the asked one (stemmed, any order) — a strict rule, so a lower bound.")
    for s in report["sizes"][-1:]:
        lines.append(f"\nThe first wrong hits counted at {s['rows']:,} rows (read them: several "
                     "are duplicates in other words):\n")
        for asked, served in s["examples"]:
            lines.append(f"- asked “{asked}” → served “{served}”")
    lines += ["\n## 2. Contradictions served at δ\n",
              "| file | pairs | cached rows | served by the verifier | served by cosine at the "
              f"same {report['main']} hit rate | {report['main']} hit rate at δ "
              "| trained without contradictions: served, hit rate |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for c in report["contradictions"]:
        plain = (f"{c['plain_served']:.1%}, {c['plain_main_hit_rate']:.1%}"
                 if "plain_served" in c else "—")
        lines.append(f"| {c['name']} | {c['pairs']} | {c['rows']:,} | {c['served']:.1%} "
                     f"| {c['cosine_served']:.1%} (θ {c['cosine_threshold']:.3f}) "
                     f"| {c['main_hit_rate']:.1%} | {plain} |")
    lines += [f"\n## 3. Generalisation: error at {HIT_RATE:.0%} hits on each test split\n",
              "| test split | queries | cosine threshold | verifier | lower error |",
              "|---|---:|---:|---:|---:|"]
    for g in report["gaps"]:
        gain = "— (no cosine error to lower)" if math.isnan(g["gain"]) else f"{g['gain']:+.0%}"
        lines.append(f"| {g['name']} | {g['queries']} | {g['cosine']:.2%} | {g['verifier']:.2%} "
                     f"| {gain} |")
    for g in report["gaps"][1:]:
        if g["examples"]:
            lines.append(f"\nWrong hits of the verifier counted on {g['name']} (the first "
                         "three; the label says another item, read whether it means the same):\n")
            lines += [f"- asked “{a}” → served “{b}”" for a, b in g["examples"]]
    t = report["decision_ms"]
    lines.append(f"\n## 4. Time per decision\n\nFeatures of the top {TOP_P} rows and the ONNX "
                 f"run, one thread: p50 {t['p50']:.3f} ms, p99 {t['p99']:.3f} ms.\n\n"
                 f"({report['seconds']:.0f} s in all.)\n")
    return "\n".join(lines)
