"""Does the int8 embedder make more wrong hits than float32 at the same hit rate? (issue 26, 2)

The rule: make `model-int8.onnx` the edge's default only if, on the labelled pairs (all 12,129
QQP dev pairs and the 999 paraphrase pairs), its wrong hits at the same hit rate are no higher
than float32's. Each model embeds both the cached and the asked side (an int8 edge embeds both);
the bench's mixed setting (int8 queries against rows float32 embedded, how
tools/bench_edge.py measures it) is printed beside them for reference.

Measurements (a hit = the nearest cached row at cosine >= the threshold; the edge's cache-0.5 is
L2 <= 0.5 between unit vectors, cosine >= 0.875; scores here are 1 - L2^2 / 2, the cosine the
edge's L2 rule implies for the vectors as the model emits them):
  * qqp-cache   every `a` side cached (deduplicated by text), every `b` side asked (12,129
                queries). Right when the nearest `a` text and the asked `b` form a label-1 pair
                (the query's own pair, or another pair with the same `a` text); else wrong.
  * qqp-pairs   per pair, cosine(a, b): a hit at >= threshold, wrong when the label is 0.
  * paraphrase  tools/edge_bench's construction, its own code (BenchData, load_labelled, tally):
                the `a` side of every other pair is cached with an oasst1 answer vector beside
                it (two rows per pair, as the edge stores them), every `b` is asked; a hit is
                right only when it serves its own pair's answer. The bench searches Milvus
                (IVF); this searches exactly, which a check against `tally` confirms.

At the same hit rate: int8's threshold is chosen so that its hit count equals float32's (at
cosine 0.875, and at float32 hit rates of 10, 20 and 30 % of the queries), i.e. both reuse their
k best-scored queries; the table compares their wrong hits there. `±` is a 95 % paired margin on
the difference (1.96 sqrt of the wrong hits only one model makes), to tell a real difference
from noise.

    .venv/bin/python tools/int8_wrong_hits.py            # ~10 min on 2 cores; var/bench/int8.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from edge_bench.data import DATA, THETA, BenchData  # noqa: E402
from edge_bench.wrong_hits import load_labelled, tally  # noqa: E402

from lab.pairs import Pair, load_pairs  # noqa: E402
from velo.core.models import embedder_dir  # noqa: E402
from velo.edge.embedder import Embedder  # noqa: E402

QQP = DATA / "qqp_pairs_dev.jsonl"
DEFAULT_COS = 1 - THETA**2 / 2  # cache-0.5: L2 <= 0.5 between unit vectors
MODELS = {"float32": "model.onnx", "int8": "model-int8.onnx"}
# (name, model of the cached rows, model of the queries)
SETTINGS = (("float32", "float32", "float32"), ("int8", "int8", "int8"),
            ("int8 q / f32 rows", "float32", "int8"))
RATES = (0.10, 0.20, 0.30)
CHUNK = 1024  # queries per distance block


class MemoEmbedder(Embedder):
    """The edge's Embedder, fed `batch` texts at a time, each distinct text embedded once."""

    def __init__(self, model_file: str, threads: int, batch: int) -> None:
        super().__init__(embedder_dir(), threads=threads, model_file=model_file)
        self.model_file, self.batch = model_file, batch
        self.memo: dict[str, np.ndarray] = {}
        self.seconds = 0.0

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of strings")
        missing = list(dict.fromkeys(t for t in texts if t not in self.memo))
        t0 = time.perf_counter()
        for start in range(0, len(missing), self.batch):
            chunk = missing[start : start + self.batch]
            for text, vec in zip(chunk, super().embed(chunk), strict=True):
                self.memo[text] = vec
            done = start + len(chunk)
            if done % (self.batch * 40) < self.batch or done == len(missing):
                print(f"  {self.model_file}: {done}/{len(missing)} new texts "
                      f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        self.seconds += time.perf_counter() - t0
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self.memo[t] for t in texts])


@dataclass
class Scored:
    """Per query: the score of what it would be served (1 - L2^2/2) and whether serving it is
    right; a hit at threshold t is score >= t."""

    score: np.ndarray  # float64 [queries]
    right: np.ndarray  # bool [queries]
    same_text: np.ndarray  # bool [queries]: the served cached text is the query's text

    def at(self, threshold: float) -> dict[str, Any]:
        hit = self.score >= threshold
        return self._counts(hit, threshold)

    def top(self, k: int) -> tuple[dict[str, Any], np.ndarray]:
        """The k best-scored queries as hits (ties broken by query order)."""
        order = np.argsort(-self.score, kind="stable")
        hit = np.zeros(len(self.score), dtype=bool)
        hit[order[:k]] = True
        threshold = float(self.score[order[k - 1]]) if k else float("inf")
        return self._counts(hit, threshold), hit

    def wrong_curve(self) -> np.ndarray:
        """wrong[k-1] = wrong hits among the k best-scored queries."""
        order = np.argsort(-self.score, kind="stable")
        return np.cumsum(~self.right[order])

    def _counts(self, hit: np.ndarray, threshold: float) -> dict[str, Any]:
        hits, right = int(hit.sum()), int((hit & self.right).sum())
        n = len(self.score)
        return {"threshold_cos": threshold,
                "threshold_l2": math.sqrt(max(0.0, 2 - 2 * threshold))
                if math.isfinite(threshold) else None,
                "queries": n, "hits": hits, "hit_rate": hits / n, "right": right,
                "wrong": hits - right, "wrong_per_hit": (hits - right) / max(1, hits),
                "wrong_per_query": (hits - right) / n,
                "wrong_same_text": int((hit & ~self.right & self.same_text).sum())}


def nearest(queries: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact nearest row by L2 for each query: (row index, 1 - d^2/2)."""
    q, r = queries.astype(np.float64), rows.astype(np.float64)
    r_sq = (r * r).sum(1)
    index = np.empty(len(q), dtype=np.int64)
    score = np.empty(len(q), dtype=np.float64)
    for start in range(0, len(q), CHUNK):
        block = q[start : start + CHUNK]
        d2 = (block * block).sum(1)[:, None] + r_sq[None, :] - 2 * block @ r.T
        best = d2.argmin(1)
        index[start : start + CHUNK] = best
        score[start : start + CHUNK] = 1 - np.maximum(d2[np.arange(len(block)), best], 0) / 2
    return index, score


def qqp_cache(pairs: list[Pair], cache_emb: Embedder, query_emb: Embedder) -> Scored:
    cached = list(dict.fromkeys(p.a for p in pairs))
    positive = {(p.a, p.b) for p in pairs if p.label == 1}
    index, score = nearest(query_emb.embed([p.b for p in pairs]), cache_emb.embed(cached))
    served = [cached[i] for i in index]
    return Scored(score,
                  np.array([(t, p.b) in positive for t, p in zip(served, pairs, strict=True)]),
                  np.array([t == p.b for t, p in zip(served, pairs, strict=True)]))


def qqp_pairs(pairs: list[Pair], a_emb: Embedder, b_emb: Embedder) -> Scored:
    a = a_emb.embed([p.a for p in pairs]).astype(np.float64)
    b = b_emb.embed([p.b for p in pairs]).astype(np.float64)
    score = 1 - ((a - b) ** 2).sum(1) / 2
    return Scored(score, np.array([p.label == 1 for p in pairs]),
                  np.array([p.a == p.b for p in pairs]))


class Rows:
    """Stands in for VectorCache in edge_bench.wrong_hits.load_labelled: keeps the imported rows
    (question and answer vector per pair, as VectorCache.import_pairs writes them)."""

    def __init__(self) -> None:
        self.questions: list[str] = []
        self.answers: list[str] = []
        self.vecs = np.zeros((0, 0), dtype=np.float32)

    def import_pairs(self, tenant: str, questions: list[str], answers: list[str],
                     question_vecs: np.ndarray, answer_vecs: np.ndarray, value: float) -> int:
        self.questions, self.answers = list(questions), list(answers)
        self.vecs = np.concatenate([question_vecs, answer_vecs]).astype(np.float32)
        return 2 * len(questions)


def paraphrase(cache_data: BenchData, query_data: BenchData) -> Scored:
    rows = Rows()
    _, answers = load_labelled(cache_data, rows)  # type: ignore[arg-type]
    row_answer = rows.answers * 2  # row i and row n + i belong to pair i
    row_question = rows.questions * 2
    index, score = nearest(query_data.b_vecs, rows.vecs)
    pairs = query_data.pairs
    scored = Scored(score, np.array([row_answer[r] == answers[i] for i, r in enumerate(index)]),
                    np.array([row_question[r] == pairs[i].b for i, r in enumerate(index)]))
    # The bench's own tally on the same decisions: the exact search agrees with its counting.
    served = [row_answer[r] if s >= DEFAULT_COS else None for r, s in zip(index, score,
                                                                           strict=True)]
    theirs, ours = tally(served, answers), scored.at(DEFAULT_COS)
    assert (theirs["hits"], theirs["right"]) == (ours["hits"], ours["right"]), (theirs, ours)
    return scored


def compare(results: dict[str, Scored]) -> dict[str, Any]:
    """int8 (and the mixed setting) against float32 at float32's hit counts."""
    ref, n = results["float32"], len(results["float32"].score)
    points = [("f32 @ cos 0.875", ref.at(DEFAULT_COS)["hits"])]
    points += [(f"f32 hit rate {r:.0%}", round(r * n)) for r in RATES]
    out: dict[str, Any] = {"at_default": {name: s.at(DEFAULT_COS) for name, s in results.items()},
                           "matched": []}
    for label, k in points:
        f32, f32_hit = ref.top(k)
        f32_wrong = f32_hit & ~ref.right
        row: dict[str, Any] = {"point": label, "hits": k, "float32": f32}
        for name, s in results.items():
            if name == "float32":
                continue
            other, hit = s.top(k)
            wrong = hit & ~s.right
            only_f32, only_other = int((f32_wrong & ~wrong).sum()), int((wrong & ~f32_wrong).sum())
            row[name] = other | {
                "delta_wrong": other["wrong"] - f32["wrong"],
                "wrong_only_float32": only_f32, "wrong_only_this": only_other,
                "margin95": 1.96 * math.sqrt(only_f32 + only_other),
                "no_more_wrong": other["wrong"] <= f32["wrong"]}
        out["matched"].append(row)
    # Every hit count up to the largest matched point, not only the four above.
    top_k = max(k for _, k in points)
    ref_curve = ref.wrong_curve()[:top_k]
    out["curve"] = {}
    for name, s in results.items():
        if name == "float32":
            continue
        excess = s.wrong_curve()[:top_k] - ref_curve
        worst = int(excess.argmax())
        out["curve"][name] = {"hit_counts": top_k, "worse_at": int((excess > 0).sum()),
                              "better_at": int((excess < 0).sum()),
                              "max_excess": int(excess[worst]), "max_excess_at_hits": worst + 1,
                              "min_excess": int(excess.min())}
    out["int8_no_more_wrong_at_every_point"] = all(r["int8"]["no_more_wrong"]
                                                   for r in out["matched"])
    return out


def print_measurement(name: str, what: str, cmp: dict[str, Any]) -> None:
    print(f"\n## {name}: {what}")
    print(f"(a) at the edge default, cosine >= {DEFAULT_COS:.3f} (L2 <= {THETA}):")
    print(f"  {'setting':<18} {'queries':>7} {'hits':>6} {'hit%':>6} {'right':>6} {'wrong':>6} "
          f"{'wrong/hits':>10} {'same-text wrong':>15}")
    for setting, c in cmp["at_default"].items():
        print(f"  {setting:<18} {c['queries']:>7} {c['hits']:>6} {c['hit_rate']:>6.1%} "
              f"{c['right']:>6} {c['wrong']:>6} {c['wrong_per_hit']:>10.3f} "
              f"{c['wrong_same_text']:>15}")
    print("(b) at matched hit counts (each model reuses its k best-scored queries):")
    print(f"  {'point':<20} {'hits':>5} | {'f32 cos':>7} {'wrong':>5} | {'int8 cos':>8} "
          f"{'wrong':>5} {'Δ':>4} {'±95%':>5} {'int8≤f32':>8} | {'mixed wrong':>11}")
    for r in cmp["matched"]:
        f, i, m = r["float32"], r["int8"], r["int8 q / f32 rows"]
        print(f"  {r['point']:<20} {r['hits']:>5} | {f['threshold_cos']:>7.4f} {f['wrong']:>5} "
              f"| {i['threshold_cos']:>8.4f} {i['wrong']:>5} {i['delta_wrong']:>+4d} "
              f"{i['margin95']:>5.1f} {'yes' if i['no_more_wrong'] else 'NO':>8} "
              f"| {m['wrong']:>11}")
    c = cmp["curve"]["int8"]
    print(f"  every hit count 1..{c['hit_counts']}: int8 more wrong at {c['worse_at']}, fewer at "
          f"{c['better_at']}; its excess ranges {c['min_excess']:+d}..{c['max_excess']:+d} "
          f"(max at {c['max_excess_at_hits']} hits)")
    verdict = cmp["int8_no_more_wrong_at_every_point"]
    print(f"  => int8 wrong hits <= float32's at every matched point: "
          f"{'YES' if verdict else 'NO'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "var" / "bench" / "int8.json")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    ap.add_argument("--batch", type=int, default=64, help="texts per Embedder.embed call")
    ap.add_argument("--qqp-limit", type=int, default=0, help="first N QQP pairs (0: all)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    embedders = {name: MemoEmbedder(f, args.threads, args.batch) for name, f in MODELS.items()}
    qqp = load_pairs(QQP)[: args.qqp_limit or None]
    bench = {name: BenchData(e) for name, e in embedders.items()}  # the 999 pairs + oasst1

    measurements = {
        "qqp-cache": ("QQP dev, every a cached (deduplicated), every b asked",
                      {s: qqp_cache(qqp, embedders[c], embedders[q]) for s, c, q in SETTINGS}),
        "qqp-pairs": ("QQP dev, cosine(a, b) per pair, wrong when label 0",
                      {s: qqp_pairs(qqp, embedders[c], embedders[q]) for s, c, q in SETTINGS}),
        "paraphrase": ("999 paraphrase pairs, the bench's construction (every other a cached "
                       "with an oasst1 answer row, every b asked)",
                       {s: paraphrase(bench[c], bench[q]) for s, c, q in SETTINGS}),
    }
    report: dict[str, Any] = {
        "machine": f"{platform.node()} {platform.machine()} {platform.processor()}",
        "embedder_dir": str(embedder_dir()), "threads": args.threads, "batch": args.batch,
        "default_cos": DEFAULT_COS, "qqp_pairs": len(qqp),
        "paraphrase_pairs": len(bench["float32"].pairs),
        "embed_seconds": {n: round(e.seconds, 1) for n, e in embedders.items()},
        "texts_embedded": {n: len(e.memo) for n, e in embedders.items()},
        "measurements": {},
    }
    print(f"int8 vs float32 wrong hits; {len(qqp)} QQP pairs, "
          f"{len(bench['float32'].pairs)} paraphrase pairs; embedders {embedder_dir()}, "
          f"{args.threads} threads; 'mixed' = int8 queries on float32-embedded rows (the "
          "bench's setting)")
    for name, (what, results) in measurements.items():
        cmp = compare(results)
        report["measurements"][name] = {"what": what, **cmp}
        print_measurement(name, what, cmp)

    dataset_ok = {
        "qqp": report["measurements"]["qqp-cache"]["int8_no_more_wrong_at_every_point"]
        and report["measurements"]["qqp-pairs"]["int8_no_more_wrong_at_every_point"],
        "paraphrase": report["measurements"]["paraphrase"]["int8_no_more_wrong_at_every_point"],
    }
    report["int8_no_more_wrong"] = dataset_ok
    report["int8_qualifies_as_default"] = all(dataset_ok.values())
    report["seconds"] = round(time.perf_counter() - t0, 1)
    print("\nint8 no more wrong hits than float32 at every matched point: "
          + ", ".join(f"{k} {'YES' if v else 'NO'}" for k, v in dataset_ok.items())
          + f" => int8 {'qualifies' if report['int8_qualifies_as_default'] else 'does NOT qualify'}"
          " as the default by issue 26's rule")
    print(f"({report['seconds']:.0f} s; embedding {report['embed_seconds']}) -> {args.out}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
