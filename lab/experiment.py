"""`velo experiment figures`: the paper's evaluation (§IV-C, Fig. 4-10) on the simulator, over
seeds.

Each figure varies one setting around the reference point (w = 0.1, 3 edges, the whole training
set) in one offload mode; every (setting, seed) is one independent run: train the learned
policies the figure compares, then evaluate every policy on the same test stream. Runs go to
worker processes (one PyTorch thread each), so `--jobs 2` uses both cores of a small box.

Reproducible: the simulator uses in-memory caches and a calibrated constant edge time (measured
once and kept in OUT/calibration.json), PyTorch runs single-threaded with fixed seeds, so a
rerun with the same seed and the same OUT gives the same numbers.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lab.design import Figure, RunResult, Setting
from lab.figures import plot_curves, plot_sweep
from lab.memory_cache import MemoryCache
from lab.sim import (
    ORACLE,
    EmbeddedTexts,
    Oracle,
    SimConfig,
    SimEnv,
    item_texts,
    measure_embedding,
)
from lab.train import LEARNED as VARIANTS
from lab.train import collect_demos, evaluate, play, train
from velo.core import qos
from velo.core.policy import OnnxPolicy, Policy, baseline_from_name
from velo.core.records import load_qa
from velo.edge.embedder import TextEmbedder
from velo.learning.lrs import LRSConfig

if TYPE_CHECKING:
    from velo.edge.embedder import Embedder

BASELINES = ("random", "greedy-0.1", "greedy-0.3", "greedy-0.5", "cache-0.5", "greedy-llm")
LEARNED = tuple(VARIANTS)  # mappo, g-mappo, t-mappo, lrs
EVERY_POLICY = (*BASELINES, *LEARNED, "oracle")
# Fig. 7-10: the paper compares LRS with the heuristics only (MARL baselines "not revisited").
HEURISTICS_AND_LRS = (*BASELINES, "lrs", "oracle")
MEASURES = ("reward", "q", "d", "llm_freq", "hit_rate", "false_hit_rate", "precision", "recall",
            "cloud_calls", "normalized")






FIGURES = {
    4: Figure(4, "Training (w = 0.1, nearest edge)", "update", "nearest", LEARNED),
    5: Figure(5, "Reward weight w, nearest edge", "w", "nearest", EVERY_POLICY),
    6: Figure(6, "Reward weight w, all edges", "w", "all", EVERY_POLICY),
    7: Figure(7, "Number of edges, nearest edge", "edges", "nearest", HEURISTICS_AND_LRS),
    8: Figure(8, "Number of edges, all edges", "edges", "all", HEURISTICS_AND_LRS),
    9: Figure(9, "Training-set size, nearest edge", "train_share", "nearest", HEURISTICS_AND_LRS),
    10: Figure(10, "Training-set size, all edges", "train_share", "all", HEURISTICS_AND_LRS),
}


@dataclass
class Scale:
    """How big each run is. The default fits every figure in < 30 min on 2 cores."""

    seeds: int = 3  # independent runs per setting (mean +- std over them)
    updates: int = 20  # network updates u per learned policy
    rollout_steps: int = 64  # steps per update (x N edges transitions)
    eval_steps: int = 150  # test steps per policy, from empty caches
    demos: int = 2048  # l_g: expert demonstrations collected and mixed into the first update
    items: int = 0  # use the first N QA items of the data (0: all)
    w_values: tuple[float, ...] = (0.01, 0.05, 0.1, 0.5, 1.0)
    edge_counts: tuple[int, ...] = (1, 2, 3, 4, 5)
    train_shares: tuple[float, ...] = (0.25, 0.5, 1.0)
    gate_points: int = 10  # checkpoints the gate scores on the training requests
    warm_start_epochs: int = 0  # behaviour cloning before PPO (LRSConfig.warm_start_epochs)


QUICK = Scale(seeds=3, updates=10, rollout_steps=32, eval_steps=60, demos=256, items=60,
              gate_points=5, w_values=(0.01, 0.1, 1.0), edge_counts=(1, 3), train_shares=(0.5, 1.0))


def settings_of(figure: Figure, scale: Scale) -> list[Setting]:
    base = Setting(mode=figure.mode)
    values: Iterable = {"update": [None], "w": scale.w_values, "edges": scale.edge_counts,
                        "train_share": scale.train_shares}[figure.vary]
    return [base if v is None else replace(base, **{figure.vary: v}) for v in values]


# -- one run: train and evaluate in a worker process ------------------------------------------
@dataclass
class Job:
    setting: Setting
    seed: int
    policies: tuple[str, ...]
    scale: Scale
    data: Path
    latencies: Path
    cache_dir: Path
    edge_s: float




def run_job(job: Job) -> RunResult:
    """Train the learned policies of `job`, then evaluate every policy on the test stream."""
    started = time.monotonic()
    env = make_env(job)
    metrics: dict[str, dict[str, float]] = {}
    curves: dict[str, list[dict[str, float]]] = {}
    demos = None
    if any(VARIANTS.get(p, (False, False))[1] for p in job.policies):
        demos = collect_demos(env, job.scale.demos, job.seed + 1)
    for name in job.policies:
        policy: Policy | Oracle
        if name in VARIANTS:
            curves[name] = []
            policy, _ = train_policy(env, name, job.scale, job.seed, demos, curves[name],
                                     gate_seed=job.seed + 500)
        elif name == "oracle":
            policy = ORACLE
        else:
            policy = baseline_from_name(name, job.seed)
        metrics[name] = evaluate(env, policy, job.scale.eval_steps, job.seed + 1000)
    env.close()
    normalise(metrics)
    return RunResult(job.setting, job.seed, metrics, curves, time.monotonic() - started)


def make_env(job: Job) -> SimEnv:
    """The simulator of one run: in-memory caches, the calibrated edge time, one torch thread."""
    torch.set_num_threads(1)
    items = load_qa(job.data)[: job.scale.items or None]
    s = job.setting
    cfg = SimConfig(edges=s.edges, mode=s.mode, phi2=s.w, seed=job.seed, edge_s=job.edge_s,
                    train_items=max(2, round(len(items) * s.train_share)))
    return SimEnv(cfg, items, _embedder(), None, job.latencies, job.cache_dir)


def train_policy(env: SimEnv, name: str, scale: Scale, seed: int, demos,
                 curve: list[dict[str, float]] | None = None, load: bool = False,
                 gate_seed: int | None = None, prior: tuple[float, float] | None = None,
                 ) -> tuple[OnnxPolicy, bytes]:
    """Train MAPPO, G-MAPPO, T-MAPPO or LRS on `env` (`load`: on the load-aware state); its
    ONNX export, loaded as the edge runs it (argmax, as MAPPO is evaluated), and the bytes.
    `gate_seed`: keep the version that beats the others on the training requests of that
    stream (lab.train.train's gate, at `scale.gate_points` points of the training), the
    stream the baselines are tuned on. `prior`: (theta0, k) of the load-adaptive threshold
    the actor adds its logits to (LRSConfig.prior); it reads c^s, so not the verified state."""
    encoder, use_demos = VARIANTS[name]
    if prior is not None and env.verifier is not None:
        raise ValueError("a threshold prior reads c^s, which the verified state replaces")
    cfg = LRSConfig(seed=seed, use_encoder=encoder, use_demos=use_demos,
                    demos_first=scale.demos, use_load=load,
                    warm_start_epochs=scale.warm_start_epochs, prior=prior)

    def gate(lrs) -> np.ndarray:
        policy = OnnxPolicy(lrs.export_onnx(), 1, name, top_p=cfg.top_p,
                            embed_dim=cfg.embed_dim, sample=False)
        assert gate_seed is not None  # the gate runs only with a seed of its own
        return np.asarray(play(env, policy, scale.eval_steps, gate_seed, split="train").rewards)

    lrs = train(env, cfg, scale.updates, scale.rollout_steps, demos if use_demos else None,
                scale.eval_steps, log=lambda _: None, curve=curve,
                gate=gate if gate_seed is not None else None,
                gate_every=max(1, scale.updates // scale.gate_points))
    onnx = lrs.export_onnx()
    if env.verifier is not None:  # edges must build the same state to run it
        from lab.verifier import mark_state

        onnx = mark_state(onnx, "verified")
    return OnnxPolicy(onnx, 1, name, top_p=cfg.top_p, embed_dim=cfg.embed_dim,
                      sample=False), onnx


def train_lrs(env: SimEnv, job: Job) -> tuple[OnnxPolicy, bytes]:
    """LRS with its demonstrations, on `env` at `job`'s scale and seed."""
    return train_policy(env, "lrs", job.scale, job.seed,
                        collect_demos(env, job.scale.demos, job.seed + 1))


def pairs_benchmark(pairs_path: Path, job: Job, out: Path, delta: float | None,
                    holdout: float = 0.5, lrs: bool = True, verifier: Path | None = None,
                    ) -> dict:
    """The labelled false-hit benchmark (lab.pairs): the verifier trained on the train split,
    δ calibrated on the calibration split (by cache size, lab.verifier.thresholds_by_rows),
    every curve measured on the test split; LRS trained on `job`'s setting. Writes
    OUT/pairs.{md,csv,png} and the trained OUT/verifier.onnx.

    `verifier`: score that file as it is instead (no training): every pair is a test pair and
    its δ threshold is the file's own for the size of the cache the pairs make."""
    from lab import pairs
    from lab.reuse_bench import size_runs
    from lab.verifier import (
        DELTAS,
        VerifierConfig,
        candidate_examples,
        split_by_component,
        thresholds_by_rows,
        train_verifier,
        with_thresholds,
    )
    from velo.core.verifier import OnnxVerifier

    data = pairs.load_pairs(pairs_path)
    embedder = _embedder()
    vectors = EmbeddedTexts({t for p in data for t in (p.a, p.b)}, embedder, job.cache_dir)
    out.mkdir(parents=True, exist_ok=True)
    if verifier is None:
        train, calib, test = split_by_component(data, (0.6, 0.2, 0.2), job.seed)
        cfg = VerifierConfig(seed=job.seed)
        onnx = train_verifier(*candidate_examples(train, vectors, embedder.dim,
                                                  cfg.candidates), cfg)
        # The file an edge loads ([reuse] verifier) carries thresholds for each usual δ by
        # cache size: the calibration pairs alone, then among the training texts.
        pool = sorted({t for p in train for t in (p.a, p.b)})
        np.random.default_rng(job.seed).shuffle(pool)
        runs = size_runs(calib, pool, vectors, OnnxVerifier(onnx))
        onnx = with_thresholds(onnx, {d: thresholds_by_rows(runs, d)
                                      for d in sorted({*DELTAS, *([delta] if delta else [])})})
        (out / "verifier.onnx").write_bytes(onnx)
        scorer = OnnxVerifier(onnx)
    else:
        train, calib, test = [], [], data
        scorer = OnnxVerifier(verifier)
    value, policy = 0.0, None
    if lrs:
        env = make_env(job)
        policy, _ = train_lrs(env, job)
        # c^r of a freshly cached pair, as the simulator writes it: q - d of a typical B answer.
        q_b = np.median([qos.satisfaction(env.llm_vecs[n], env.vec[i.answer])
                         for n, i in enumerate(env.items)])
        value = float(q_b - np.median(env.latencies))
        env.close()
    splits = {}
    for name, part in (("calib", calib), ("test", test)):
        if part:
            queries = pairs.build_queries(part, vectors, embedder.dim, value, job.seed, holdout)
            pairs.score_verifier(queries, scorer)
            splits[name] = queries
    report: dict = {"rows": [], "split": {"train": len(train), "calib": len(calib),
                                          "test": len(test)}}
    if policy is not None:
        if "calib" in splits:
            pairs.score_policy(splits["calib"], policy)
        report["learned"] = pairs.score_policy(splits["test"], policy)
    rules = [r for r in pairs.RULES if r in splits["test"][0].scores]
    for rule in rules:
        report["rows"] += pairs.curve(splits["test"], rule)
    if delta is not None:
        cached = len({p.a for p in test})  # every `a` when the file has negatives
        report["delta"] = [pairs.at_delta(splits["test"], "verifier", delta,
                                          scorer.threshold_for(delta, cached))]
        if "calib" in splits:  # the static rules need a split to calibrate on
            report["delta"] += [pairs.calibrate(splits["calib"], splits["test"], rule, delta)
                                for rule in rules if rule != "verifier"]
    report["summary"] = pairs.targets(report)
    pairs.plot(report, out / "pairs.png")
    sizes = report["split"]
    how = (f"Split by connected component: {sizes['train']} pairs train the verifier, "
           f"{sizes['calib']} calibrate δ, {sizes['test']} test (every number below)."
           if verifier is None else
           f"The verifier `{verifier.name}` ({scorer.name}) as it is, on all {sizes['test']} "
           "pairs; its δ threshold is its own for the number of cached `a` sides.")
    (out / "pairs.md").write_text(
        f"# Labelled pairs: `{pairs_path.name}`\n\n{how}\n\n{pairs.markdown(report)}\n")
    write_csv(report["rows"] + ([report["learned"]] if "learned" in report else []),
              out / "pairs.csv")
    return report


# A `velo experiment feedback` workload: its name, the intents (texts that mean the same),
# their conversation scopes (None: one scope) and the embedder's constructor.
FeedbackWorkload = tuple[str, list[tuple[str, ...]], list[str] | None,
                         Callable[[], TextEmbedder]]


def feedback_workload(path: Path) -> FeedbackWorkload:
    """What `velo experiment feedback` learns on in PATH, recognised from its content: a/b/label
    pairs (lab.pairs.load_pairs) give the duplicate clusters of the test split of lab.verifier's
    split; QA records with `paraphrases` give restatement intents, scoped by conversation context
    when the file has `history`, embedded by multilingual USE when a restatement is not English.
    ValueError naming the file (and line) for a file it cannot use."""
    from lab import feedback
    from lab.multiturn import record_problem
    from lab.pairs import load_pairs
    from lab.verifier import split_by_component
    from velo.edge.embedder import MultilingualEmbedder

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read it ({exc})") from exc
    rows: dict[int, Any] = {}  # line number -> record
    if not text.lstrip().startswith("["):  # a JSON list is GPTCache's pairs (load_pairs)
        for number, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                rows[number] = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not a JSON line ({exc})") from exc
    first = next(iter(rows.values()), None)
    if isinstance(first, dict) and "question" in first:
        for number, row in rows.items():
            if problem := record_problem(row):
                raise ValueError(f"{path}:{number}: {problem}")
        restated = [r for r in rows.values() if r.get("paraphrases")]
        if not restated:
            raise ValueError(f"{path}: QA records without `paraphrases`, no restatements to "
                             "learn from")
        langs = {lang for r in restated
                 for lang in [r.get("lang") or "en", *(r.get("paraphrase_langs") or ())]}
        conversations = any(r.get("history") for r in rows.values())
        intents, scopes = feedback.restatement_intents(path)
        name = f"{path.name}: {'restated conversation turns' if conversations else 'restatements'}"
        if langs - {"en"}:
            return (f"{name} in {len(langs)} languages (multilingual USE)", intents,
                    scopes if conversations else None, MultilingualEmbedder)
        return f"{name} (MiniLM)", intents, scopes if conversations else None, _embedder
    try:
        pairs = load_pairs(path)
    except (ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: neither QA records (`question`) nor pairs (`a`, `b`, "
                         f"`label`): {exc}") from exc
    test = split_by_component(pairs, (0.6, 0.2, 0.2), 0)[2]
    intents = [i for i in feedback.quora_intents(test) if len(i) > 1]
    if not intents:
        raise ValueError(f"{path}: no duplicate clusters (label-1 pairs) in the test split")
    return f"{path.name}: duplicate clusters (MiniLM)", intents, None, _embedder


def feedback_experiment(out: Path, paths: Iterable[Path], cache_dir: Path, seeds: int = 3,
                        requests: int = 6000) -> str:
    """Learning from feedback (lab.feedback): static thresholds against per-row calibration on
    each file's workload (feedback_workload); a file it cannot use is skipped, and the report
    says why. Writes OUT/feedback.md and feedback-*.png."""
    from lab import feedback

    workloads, skipped = [], []
    for path in paths:
        try:
            workloads.append(feedback_workload(path))
        except ValueError as exc:
            skipped.append(f"Skipped {exc}")
    if not workloads:
        raise SystemExit("\n".join(["velo experiment feedback: no file it can use", *skipped]))
    md = ["# Learning from feedback\n",
          f"Each workload: {seeds} streams of {requests} requests, intents by Zipf popularity "
          f"(skew {SimConfig.skew}), a uniform restatement each; every forward verifies the best "
          "row for free, every reuse is shadow-verified; the verdict is the data's label (a "
          "perfect judge). Rates over the last third of each replay, averaged over the streams; "
          "cosine scores.\n", *[f"{s}\n" for s in skipped]]
    out.mkdir(parents=True, exist_ok=True)
    for number, (name, intents, scopes, make_embedder) in enumerate(workloads):
        vectors = EmbeddedTexts({t for i in intents for t in i}, make_embedder(), cache_dir)
        streams = [feedback.arrivals(intents, requests, SimConfig.skew, seed)
                   for seed in range(seeds)]
        report = feedback.compare(streams, vectors, feedback.cosine_scorer, scope_of=scopes)
        figure = f"feedback-{number}.png"
        feedback.plot(name, report, 0.8, out / figure)
        md += [feedback.markdown(f"{name}: {len(intents)} intents", report),
               f"\n![{name}]({figure})\n"]
    (out / "feedback.md").write_text("\n".join(md))
    return "\n".join(md)


def multiturn_experiment(out: Path, multiturn_path: Path, cache_dir: Path) -> str:
    """Conversation-aware keys against last-message keys (lab.multiturn) on any conversation
    file, saying what it cannot measure; OUT/multiturn.md. SystemExit for a file that is not
    one (lab.multiturn.load_turns)."""
    from lab import multiturn

    turns = multiturn.load_turns(multiturn_path)
    rows = []
    if multiturn.questions(turns):  # else nothing to ask: say why without embedding the file
        texts = ({t["question"] for t in turns}
                 | {p for t in turns for p in t.get("paraphrases") or ()})
        vectors = EmbeddedTexts(texts, _embedder(), cache_dir)
        rows = [{"keys": "context-aware" if aware else "last message", "threshold": threshold,
                 **multiturn.run(turns, vectors, aware, threshold)}
                for aware in (False, True) for threshold in multiturn.THRESHOLDS]
    table = multiturn.markdown(rows, multiturn.unmeasured(turns))
    text = f"# Multi-turn reuse: `{multiturn_path.name}`\n\n{table}\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "multiturn.md").write_text(text)
    return text


def multilingual_experiment(out: Path, path: Path, cache_dir: Path, delta: float = 0.05,
                            seed: int = 0) -> str:
    """Cross-lingual reuse with MiniLM and multilingual USE (lab.multilingual)."""
    from lab import multilingual
    from velo.edge.embedder import MultilingualEmbedder

    items = multilingual.load_items(path)
    results = {}
    for name, embedder in (("minilm", _embedder()), ("use-multilingual", MultilingualEmbedder())):
        vectors = EmbeddedTexts(multilingual.texts_of(items), embedder, cache_dir)
        results[name] = multilingual.run(items, vectors, delta, seed)
    text = (f"# Cross-lingual reuse: `{path.name}`\n\n{len(items)} items, half calibrate each "
            f"embedder's threshold for δ = {delta}, the other half is asked in four languages "
            f"against the English questions.\n\n{multilingual.markdown(results, delta)}\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "multilingual.md").write_text(text)
    return text


def live_experiment(job: Job, out: Path, requests: int, state_dir: Path, max_tokens: int = 48,
                    milvus_uri: str = "", milvus_token: str = "") -> str:
    """`velo experiment live`: LRS trained on the simulator, then the real stack and the
    simulator side by side on the same requests (lab.live). Returns the Markdown report."""
    from lab import live

    env = make_env(job)
    lrs, onnx = train_lrs(env, job)
    env.close()
    one_edge = make_env(replace(job, setting=replace(job.setting, edges=1)))
    items = [i for i in one_edge.items if len(i.question) <= 400]  # keep prompts short
    arrivals = live.evaluation_arrivals(items, requests, job.seed)
    started = time.monotonic()
    measured = live.run_live(onnx, items, arrivals, state_dir, max_tokens, milvus_uri,
                             milvus_token)
    live_s = time.monotonic() - started
    policies = {p: lrs if p == "lrs" else baseline_from_name(p, job.seed)
                for p in live.LIVE_POLICIES}
    sim = live.simulated(one_edge, policies, arrivals)
    one_edge.close()
    lines = [f"# Live vs simulated ({requests} requests, every request to every policy's edge; "
             f"live stack run {live_s:.0f} s)\n",
             f"Live: the real daemons, Milvus and SmolLM2-135M via llama.cpp (max {max_tokens} "
             "tokens); "
             "q against the reference answer, d measured by the edge. Simulated: the same "
             "requests on one simulated edge (second human answers, 13b latencies).\n",
             "| policy | live reward | sim reward | live q | sim q | live d (s) | sim d (s) "
             "| live LLM freq | sim LLM freq | live hit rate | sim hit rate | live false hits "
             "| sim false hits |", "|---|" + "---:|" * 12]
    for p in live.LIVE_POLICIES:
        a, b = measured[p], sim[p]
        if not a.get("requests"):
            lines.append(f"| {p} | no answers ({a.get('errors', 0):.0f} errors) |" + " |" * 11)
            continue
        lines.append(
            f"| {p} | {a['reward']:+.3f} | {b['reward']:+.3f} | {a['q']:.3f} | {b['q']:.3f} "
            f"| {a['d']:.3f} | {b['d']:.3f} | {a['llm_freq']:.0%} | {b['llm_freq']:.0%} "
            f"| {a['hit_rate']:.0%} | {b['hit_rate']:.0%} | {a['false_hit_rate']:.0%} "
            f"| {b['false_hit_rate']:.0%} |")
    report = "\n".join(lines) + "\n"
    (out / "live.md").write_text(report)
    return report


def normalise(metrics: dict[str, dict[str, float]]) -> None:
    """Reward normalised between Random (0) and the Oracle (1), per run."""
    if "random" not in metrics or "oracle" not in metrics:
        return
    low, high = metrics["random"]["reward"], metrics["oracle"]["reward"]
    for m in metrics.values():
        m["normalized"] = (m["reward"] - low) / (high - low) if high != low else float("nan")


_EMBEDDER: Embedder | None = None


def _embedder() -> Embedder:
    """One ONNX embedder per worker process (only needed to embed a new data set once)."""
    global _EMBEDDER
    if _EMBEDDER is None:
        from velo.core.models import embedder_dir
        from velo.edge.embedder import Embedder

        _EMBEDDER = Embedder(embedder_dir())
    return _EMBEDDER


def calibrate(out: Path, data: Path, cache_dir: Path, recalibrate: bool = False) -> float:
    """The edge time d_A used by every run: the embedder's median latency plus a top-P search,
    measured once here and kept in OUT/calibration.json so that reruns use the same value."""
    path = out / "calibration.json"
    if path.exists() and not recalibrate:
        return float(json.loads(path.read_text())["edge_s"])
    embedder = _embedder()
    items = load_qa(data)
    texts = [i.question for i in items[:50]]
    embed_s = measure_embedding(embedder, texts)
    vectors = EmbeddedTexts(item_texts(items), embedder, cache_dir)  # embedded once, on disk
    cache = MemoryCache(embedder.dim)
    for i in items[:200]:
        cache.insert_pair("t", i.question, i.answer, vectors[i.question], vectors[i.answer], 0.0)
    times = []
    for text in texts:
        start = time.perf_counter()
        cache.search(vectors[text], "t", 5)
        times.append(time.perf_counter() - start)
    edge_s = embed_s + float(np.median(times))
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"edge_s": edge_s, "embed_s": embed_s,
                                "search_s": float(np.median(times)),
                                "measured": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1))
    return edge_s


# -- the whole experiment ----------------------------------------------------------------------
def plan(figures: list[int], scale: Scale) -> dict[tuple[Setting, int], tuple[str, ...]]:
    """Every (setting, seed) run the figures need, with the union of their policies (a setting
    shared by two figures runs once)."""
    runs: dict[tuple[Setting, int], tuple[str, ...]] = {}
    for number in figures:
        figure = FIGURES[number]
        policies = figure.policies if figure.vary != "update" else (*figure.policies, "random",
                                                                     "oracle")
        for setting in settings_of(figure, scale):
            for seed in range(scale.seeds):
                known = runs.get((setting, seed), ())
                runs[(setting, seed)] = tuple(p for p in EVERY_POLICY
                                              if p in known or p in policies)
    return runs


Progress = Callable[[Iterable[RunResult], int], Iterable[RunResult]]  # (runs, count) -> runs


def run_experiment(figures: list[int], scale: Scale, data: Path, latencies: Path, out: Path,
                   cache_dir: Path, jobs: int = 2, recalibrate: bool = False,
                   progress: Progress | None = None) -> list[RunResult]:
    edge_s = calibrate(out, data, cache_dir, recalibrate)
    work = [Job(setting, seed, policies, scale, data, latencies, cache_dir, edge_s)
            for (setting, seed), policies in plan(figures, scale).items()]
    # Longest runs first, so the last worker is not left alone with a long run.
    work.sort(key=lambda j: -sum(p in LEARNED for p in j.policies) * j.setting.edges)
    with ProcessPoolExecutor(max_workers=jobs) if jobs > 1 else nullcontext() as pool:
        results = (pool.map if pool else map)(run_job, work)
        return list(progress(results, len(work)) if progress else results)


# -- aggregation and reports -------------------------------------------------------------------
def mean_std_ci95(values: list[float]) -> tuple[float, float, float]:
    """Mean, standard deviation and half-width of the normal 95 % interval over seeds (0
    and 0 for a single seed)."""
    v = np.array(values, dtype=float)
    if len(v) < 2:
        return float(np.mean(v)), 0.0, 0.0
    std = float(np.std(v, ddof=1))
    return float(np.mean(v)), std, 1.96 * std / math.sqrt(len(v))


def aggregate(results: list[RunResult]) -> list[dict]:
    """One row per setting x policy: mean, std and a 95 % interval over the seeds."""
    groups: dict[tuple[Setting, str], list[dict[str, float]]] = {}
    for r in results:
        for policy, m in r.metrics.items():
            groups.setdefault((r.setting, policy), []).append(m)
    rows = []
    for (setting, policy), runs in groups.items():
        row: dict = {**asdict(setting), "policy": policy, "seeds": len(runs)}
        for key in MEASURES:
            row[key], row[f"{key}_std"], row[f"{key}_ci95"] = mean_std_ci95(
                [m.get(key, float("nan")) for m in runs])
        rows.append(row)
    order = {p: i for i, p in enumerate(EVERY_POLICY)}
    rows.sort(key=lambda r: (r["mode"], r["w"], r["edges"], r["train_share"],
                             order.get(r["policy"], 99)))
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| policy | reward | q | d (s) | LLM freq | hit rate | false-hit rate | "
             "precision A | recall A | normalised |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['policy']} | {r['reward']:+.3f} ± {r['reward_std']:.3f} | {r['q']:.3f} "
            f"| {r['d']:.3f} | {r['llm_freq']:.0%} | {r['hit_rate']:.0%} "
            f"| {r['false_hit_rate']:.0%} | {r['precision']:.2f} | {r['recall']:.2f} "
            f"| {r['normalized']:.2f} ± {r['normalized_std']:.2f} |")
    return "\n".join(lines)


def headline(rows: list[dict], mode: str) -> str:
    """The paper's headline measures at the reference point: LRS's reward gain over the best
    baseline and its satisfaction gain over each baseline (in %, as the paper computes them)."""
    at = rows_at(rows, Setting(mode=mode))
    if "lrs" not in at:
        return ""
    lrs = at["lrs"]
    others = {p: r for p, r in at.items() if p not in {"lrs", "oracle"}}
    best = max(others, key=lambda p: others[p]["reward"])
    gain = (lrs["reward"] - others[best]["reward"]) / abs(others[best]["reward"]) * 100
    sat = ", ".join(f"{p} {(lrs['q'] - r['q']) / abs(r['q']) * 100:+.1f} %"
                    for p, r in others.items())
    return (f"LRS reward vs the best baseline ({best}): {gain:+.2f} % "
            f"(paper: +14.59 %). Satisfaction q vs each baseline: {sat}.")


def rows_at(rows: list[dict], setting: Setting) -> dict[str, dict]:
    """The aggregated rows of one setting, by policy."""
    key = asdict(setting)
    return {r["policy"]: r for r in rows if all(r[k] == v for k, v in key.items())}


def write_reports(results: list[RunResult], figures: list[int], scale: Scale, out: Path,
                  data: Path, started: float) -> list[dict]:
    rows = aggregate(results)
    write_csv(rows, out / "results.csv")
    per_seed = [{**asdict(r.setting), "seed": r.seed, "policy": p, **m}
                for r in results for p, m in r.metrics.items()]
    write_csv(per_seed, out / "runs.csv")
    (out / "curves.json").write_text(json.dumps(
        [{**asdict(r.setting), "seed": r.seed, "curves": r.curves}
         for r in results if r.curves]))
    shown = os.path.relpath(data) if data.is_absolute() else data
    md = [f"# VELO experiment\n\nData: `{shown}` ({scale.items or 'all'} items); "
          f"{scale.seeds} seeds; {scale.updates} updates x {scale.rollout_steps} steps per "
          f"learned policy; {scale.eval_steps} test steps per policy from empty caches; "
          f"{time.monotonic() - started:.0f} s on {os.cpu_count()} cores. Mean ± std over "
          "seeds; normalised reward: Random 0, Oracle 1.\n"]
    for mode in ("nearest", "all"):
        line = headline(rows, mode)
        if line:
            md.append(f"**{mode}-edge mode, w = 0.1, 3 edges.** {line}\n")
    for number in figures:
        figure = FIGURES[number]
        if figure.vary == "update":
            runs = [r for r in results if r.setting == Setting(mode=figure.mode) and r.curves]
            plot_curves(runs, figure, out / f"fig{number}.png")
            md.append(f"## Fig. {number}: {figure.title}\n\n![Fig. {number}](fig{number}.png)\n")
            continue
        points = [(getattr(s, figure.vary), rows_at(rows, s)) for s in settings_of(figure, scale)]
        plot_sweep(points, figure, out / f"fig{number}.png")
        md.append(f"## Fig. {number}: {figure.title}\n\n![Fig. {number}](fig{number}.png)\n")
        for value, at in points:
            subset = [at[p] for p in figure.policies if p in at]
            md.append(f"### {figure.vary} = {value}\n\n{markdown_table(subset)}\n")
    (out / "results.md").write_text("\n".join(md))
    return rows
