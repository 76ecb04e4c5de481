"""`velo experiment WHAT`: each experiment is a subcommand (SUMMARY lists them) whose
function here parses nothing and calls its lab module: figures lab.experiment, pairs lab.pairs,
reuse lab.reuse_bench, feedback lab.feedback, multiturn lab.multiturn, multilingual
lab.multilingual, ablation lab.ablation, load and burst lab.under_load, live lab.live."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from velo.core.models import ROOT
from velo_cli.data import SHARED, latencies, qa_data, trace

if TYPE_CHECKING:
    from lab.experiment import Job, Scale

CACHE_DIR = ROOT / "var" / "train" / "cache"  # embeddings of each data set, computed once
VERIFIER = ROOT / "docs" / "reuse" / "verifier.onnx"


SUMMARY = {  # one line each in `velo experiment --help`; the subcommand's --help says more
    "figures": "the paper's Fig. 4-10 over seeds",
    "pairs": "the labelled false-hit benchmark on question pairs",
    "reuse": "the verifier against cosine, δ calibrated by cache size",
    "feedback": "static thresholds against per-row calibration",
    "multiturn": "conversation-aware keys against last-message keys",
    "multilingual": "cross-lingual reuse, MiniLM against multilingual USE",
    "ablation": "LRS on the paper's state against the verified state",
    "load": "LRS on a loaded cloud against tuned baselines (issue 24's targets)",
    "live": "the simulator next to the real daemons and LLM",
    "burst": "a load-aware edge and a static one through a burst, live",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    ex = sub.add_parser("experiment", help="the paper's evaluation and the benchmarks "
                        "(needs the trainer extra); `velo experiment WHAT --help`")
    whats = ex.add_subparsers(dest="what", required=True, metavar="WHAT",
                              help="which experiment")

    def what(name: str, help: str, run: Callable[[argparse.Namespace], None], *,
             data: bool = False, scale: bool = False) -> argparse.ArgumentParser:
        p = whats.add_parser(name, help=SUMMARY[name], description=help)
        p.set_defaults(run=run)
        p.add_argument("--out", type=Path, default=ROOT / "var" / "experiment",
                       help="folder for the reports, CSVs and figures")
        if data:
            p.add_argument("--data", type=Path, default=None,
                           help="QA JSON lines LRS trains on (default: oasst1 dev)")
            p.add_argument("--recalibrate", action="store_true",
                           help="measure the edge time again instead of reusing "
                           "OUT/calibration.json")
        if scale:
            p.add_argument("--quick", action="store_true",
                           help="a small version (60 items, few updates): minutes")
            p.add_argument("--seeds", type=int, default=0, help="runs per setting (default 3)")
            p.add_argument("--updates", type=int, default=0,
                           help="updates per learned policy")
        return p

    def jobs(p: argparse.ArgumentParser) -> None:
        p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                       help="worker processes (default: one per core)")

    def files(p: argparse.ArgumentParser, default: str) -> None:
        p.add_argument("files", nargs="*", type=Path, metavar="FILE",
                       help=f"QA JSON lines (default: {default})")

    def verifier(p: argparse.ArgumentParser, help: str) -> None:
        p.add_argument("--verifier", type=Path, default=VERIFIER, help=help)

    p = what("figures", "the paper's Fig. 4-10 over seeds: figures, results.csv and results.md",
             figures, data=True, scale=True)
    p.add_argument("--figure", type=int, action="append", choices=range(4, 11),
                   metavar="{4..10}", help="reproduce this figure (repeatable; default: all)")
    jobs(p)

    p = what("pairs", "the labelled false-hit benchmark on question pairs (writes pairs.md)",
             pairs, data=True, scale=True)
    p.add_argument("file", type=Path, help="JSON lines a/b/label, or GPTCache's "
                   "text_a/text_b/label list")
    p.add_argument("--holdout", type=float, default=0.5,
                   help="for pairs of positives only: share of `a` sides left out of the "
                   "cache to make negatives (0: cache all, as GPTCache's benchmark)")
    p.add_argument("--delta", type=float, default=None,
                   help="a bound on the error rate (wrong answers served / queries); each "
                   "reuse rule's threshold is calibrated for it on a calibration split and "
                   "checked on the test split")
    p.add_argument("--no-lrs", action="store_true",
                   help="skip training LRS (the verifier and cosine curves only)")
    verifier(p, "the verifier scored with --no-retrain")
    p.add_argument("--no-retrain", action="store_true",
                   help="score --verifier as it is (its own thresholds) on the whole file, "
                   "train nothing")

    p = what("reuse", "reuse at any scale: train the verifier on each file's training split, "
             "calibrate δ by cache size, and print the δ table at three sizes, the share of "
             "contradictions served and the gap to the cosine threshold on every test split "
             "(writes reuse.md and verifier.onnx)", reuse)
    p.add_argument("files", nargs="*", type=Path, metavar="FILE",
                   help="a/b/label pairs, or QA lines whose `paraphrases` restate the question "
                   "(default: the shared qqp, negation and paraphrase pairs and multiturn_dev)")
    p.add_argument("--delta", type=float, default=0.05, help="the bound on wrong answers")
    verifier(p, "the verifier scored with --no-retrain")
    p.add_argument("--no-retrain", action="store_true",
                   help="score --verifier as it is (its own thresholds) on the test splits, "
                   "train nothing")

    p = what("feedback", "learning from feedback: static thresholds against per-row "
             "calibration (writes feedback.md)", feedback)
    p.add_argument("files", nargs="*", type=Path, metavar="FILE",
                   help="recognised from its content: a/b/label pairs (duplicate clusters), QA "
                   "lines with `paraphrases` (restatements; conversation-scoped with "
                   "`history`, multilingual USE when not English); default: the shared "
                   "qqp_pairs_dev, multiturn_dev and xquad_dev files")

    p = what("multiturn", "conversation-aware keys against last-message keys; says what the "
             "file cannot measure (writes multiturn.md)", multiturn)
    p.add_argument("file", type=Path, help="QA lines with `history`, restated turns with "
                   "`paraphrases`, such as multiturn_dev.jsonl")

    p = what("multilingual", "cross-lingual reuse with MiniLM and multilingual USE "
             "(writes multilingual.md)", multilingual)
    p.add_argument("file", type=Path, help="an xquad-style file")
    p.add_argument("--delta", type=float, default=0.05, help="the bound on wrong answers")

    p = what("ablation", "LRS on the paper's state and on the verified state, under eq. 2's "
             "and the correctness-aware reward, both modes, next to the baselines (Cache-θ "
             "tuned on the training split); writes ablation.md", ablation,
             data=True, scale=True)
    files(p, "--data and multiturn_dev.jsonl")
    verifier(p, "the verifier of the verified state")
    jobs(p)

    p = what("load", "the learned scheduler on a loaded cloud (8 slots, Azure-trace arrivals, "
             "one queue for every edge) at utilisations 0.5, 0.9 and 1.2, both modes, both "
             "rewards, against Cache-θ and the load-adaptive threshold tuned on the training "
             "split; prints issue 24's targets met or missed (writes load.md)", load,
             data=True, scale=True)
    files(p, "--data and multiturn_dev.jsonl")
    verifier(p, "the verifier of the verifier-threshold baseline (skipped if missing)")
    p.add_argument("--paper-state", action="store_true",
                   help="also LRS on the paper's state (the ablation)")
    jobs(p)

    p = what("live", "a small version through the real daemons and the real local LLM, next "
             "to the simulator on the same requests (writes live.md)", live,
             data=True, scale=True)
    p.add_argument("--requests", type=int, default=40, help="requests to each of the 4 edges")

    p = what("burst", "a load-aware LRS edge and a tuned static edge through a calm phase, a "
             "burst and a calm phase on one shared cloudd, live (writes burst.md)", burst,
             data=True, scale=True)
    p.add_argument("--requests", type=int, default=40, help="requests to the 2 edges")
    p.add_argument("--no-guard", action="store_true",
                   help="run the edges without the reuse guard (default: both run it with "
                        "the shipped verifier, docs/reuse/verifier.onnx, at the default δ)")


def run(args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    args.run(args)


# -- the experiments ---------------------------------------------------------------------------
def figures(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from lab.experiment import FIGURES, plan, run_experiment, write_reports

    data, scale = qa_data(args.data), _scale(args)
    chosen = sorted(set(args.figure or FIGURES))
    runs = plan(chosen, scale)
    print(f"velo experiment figures {', '.join(map(str, chosen))} on {data}: {len(runs)} runs "
          f"({scale.seeds} seeds), {args.jobs} workers; results in {args.out}")
    started = time.monotonic()
    results = run_experiment(
        chosen, scale, data, latencies(), args.out, CACHE_DIR, jobs=args.jobs,
        recalibrate=args.recalibrate,
        progress=lambda it, total: tqdm(it, total=total, desc="runs", unit="run"))
    write_reports(results, chosen, scale, args.out, data, started)
    print((args.out / "results.md").read_text().split("\n## ")[0])
    print(f"done in {time.monotonic() - started:.0f} s: {args.out / 'results.md'}, "
          f"results.csv, runs.csv, fig*.png")


def pairs(args: argparse.Namespace) -> None:
    from lab.experiment import pairs_benchmark
    from lab.pairs import markdown

    verifier = _readable(args.verifier, "--verifier") if args.no_retrain else None
    print(f"velo experiment pairs {args.file}: "
          + (f"scoring {verifier} on every pair" if verifier else "training the verifier")
          + f"{'' if args.no_lrs else f' and LRS (on {qa_data(args.data)})'}, "
          "then the benchmark...")
    print(markdown(pairs_benchmark(_readable(args.file, "FILE"), _job(args), args.out,
                                   args.delta, args.holdout, lrs=not args.no_lrs,
                                   verifier=verifier)))
    print(f"\n{args.out / 'pairs.md'}, pairs.csv, pairs.png"
          + ("" if verifier else ", verifier.onnx"))


def reuse(args: argparse.Namespace) -> None:
    from lab import reuse_bench

    files = [_readable(p, "FILE") for p in args.files] or [
        SHARED / f for f in ("qqp_pairs_dev.jsonl", "negation_pairs_dev.jsonl",
                             "paraphrase_pairs_dev.jsonl", "multiturn_dev.jsonl")]
    distractors = [p for p in (SHARED / "oasst1_dev.jsonl", SHARED / "xquad_dev.jsonl")
                   if p.exists()]
    verifier = _readable(args.verifier, "--verifier") if args.no_retrain else None
    print(f"velo experiment reuse: {', '.join(p.name for p in files)}"
          + (f", scoring {verifier}" if verifier else ", training the verifier") + "...")
    try:
        reuse_bench.run(files, args.out, CACHE_DIR, args.delta, verifier_path=verifier,
                        distractor_paths=distractors)
    except ValueError as exc:
        raise SystemExit(f"velo experiment reuse: {exc}") from None
    print((args.out / "reuse.md").read_text())
    print(f"{args.out / 'reuse.md'}" + ("" if verifier else ", verifier.onnx"))


def feedback(args: argparse.Namespace) -> None:
    from lab.experiment import feedback_experiment

    defaults = [SHARED / f"{name}_dev.jsonl" for name in ("qqp_pairs", "multiturn", "xquad")]
    print(feedback_experiment(args.out, args.files or [p for p in defaults if p.exists()],
                              CACHE_DIR))


def multiturn(args: argparse.Namespace) -> None:
    from lab.experiment import multiturn_experiment

    print(multiturn_experiment(args.out, args.file, CACHE_DIR))


def multilingual(args: argparse.Namespace) -> None:
    from lab.experiment import multilingual_experiment

    print(multilingual_experiment(args.out, args.file, CACHE_DIR, args.delta))


def ablation(args: argparse.Namespace) -> None:
    from lab import ablation

    datas = _qa_files(args.files, qa_data(args.data), "ablation")
    cases = [ablation.Case(d, mode, reward, seed) for d in datas
             for mode in ("nearest", "all") for reward in ablation.REWARDS
             for seed in range(args.seeds or 1)]
    print(f"velo experiment ablation: {len(cases)} cases, 2 LRS trainings each...")
    results = ablation.run_all(cases, _scale(args), args.verifier, latencies(), CACHE_DIR,
                               _edge_s(args), args.jobs)
    text = f"# Ablation: the paper's state against the verified state\n\n" \
           f"{ablation.markdown(results)}\n"
    (args.out / "ablation.md").write_text(text)
    print(text)


def load(args: argparse.Namespace) -> None:
    from lab import under_load

    datas = _qa_files(args.files, qa_data(args.data), "load")
    scale = replace(under_load.QUICK if args.quick else under_load.SCALE,
                    **{k: v for k, v in (("seeds", args.seeds), ("updates", args.updates)) if v})
    cases = under_load.cases_for(datas, scale.seeds)
    print(f"velo experiment load: {len(cases)} runs ({len(datas)} data sets x 2 modes x "
          f"2 rewards x {len(under_load.UTILISATIONS)} loads x {scale.seeds} seeds), "
          f"{scale.updates} LRS updates each...")
    verifier = args.verifier if args.verifier.is_file() else None
    results = under_load.run_all(cases, scale, latencies(), trace(), CACHE_DIR, _edge_s(args),
                                 args.jobs, args.paper_state, verifier)
    text = under_load.report(results, scale)
    (args.out / "load.md").write_text(text)
    print(text)


def live(args: argparse.Namespace) -> None:
    from lab.experiment import live_experiment

    print(f"velo experiment live: training LRS on {qa_data(args.data)}, then the stack "
          f"({args.requests} requests to each of 4 edges)...")
    print(live_experiment(_job(args), args.out, args.requests, args.out / "stack"))
    print(f"{args.out / 'live.md'}")


def burst(args: argparse.Namespace) -> None:
    from lab import under_load

    data = qa_data(args.data)
    scale = replace(under_load.QUICK if args.quick else under_load.SCALE,
                    **{k: v for k, v in (("updates", args.updates),) if v})
    print(f"velo experiment burst: training LRS on the loaded simulator ({data}), then a burst "
          f"through the stack ({args.requests} requests to 2 edges)...")
    print(under_load.live_burst(data, args.out, args.requests, args.out / "stack",
                                latencies(), trace(), CACHE_DIR, _edge_s(args), scale,
                                verifier=None if args.no_guard else VERIFIER))


# -- shared by several ---------------------------------------------------------------------
def _scale(args: argparse.Namespace) -> Scale:
    from lab.experiment import QUICK, Scale

    scale = QUICK if args.quick else Scale()
    if args.seeds:
        scale = replace(scale, seeds=args.seeds)
    if args.updates:
        scale = replace(scale, updates=args.updates)
    return scale


def _edge_s(args: argparse.Namespace) -> float:
    """The edge's own time per request, measured once and kept in OUT/calibration.json."""
    from lab.experiment import calibrate

    return calibrate(args.out, qa_data(args.data), CACHE_DIR, args.recalibrate)


def _job(args: argparse.Namespace) -> Job:
    """One LRS training at the chosen scale, on --data (pairs, live)."""
    from lab.design import Setting
    from lab.experiment import Job

    return Job(Setting(), 0, ("lrs",), _scale(args), qa_data(args.data), latencies(), CACHE_DIR,
               _edge_s(args))


def _qa_files(given: list[Path], data: Path, what: str) -> list[Path]:
    """The QA files to run on (default: `data` and the conversation data), each checked now: a
    bad file stops here, not in a worker after the first trainings."""
    from velo.core.records import load_qa

    conversations = SHARED / "multiturn_dev.jsonl"
    datas = given or [data] + [p for p in [conversations] if p.exists()]
    for path in datas:
        try:
            load_qa(path)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"velo experiment {what}: {exc}") from exc
    return datas


def _readable(path: Path, name: str) -> Path:
    if not path.is_file():
        raise SystemExit(f"velo experiment: {name} {path} is not a readable file")
    return path
