"""`velo experiment --quick`: every figure's outputs exist and are well formed, the measures
obey what their definitions force, and a run repeated with the same seed gives the same numbers."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from lab.experiment import QUICK, Job, Setting, calibrate, run_job
from velo.models import ROOT

DATA = ROOT / "data" / "oasst1_dev.jsonl"
LATENCIES = ROOT / "data" / "llm_latency_llmperf.jsonl"


@pytest.fixture(scope="module")
def quick_run(exported_embedder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("experiment")
    result = subprocess.run(
        [sys.executable, "-m", "velo_cli", "experiment", "--quick", "--data", str(DATA),
         "--out", str(out), "--jobs", "2"],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LRS reward vs the best baseline" in result.stdout
    return out


def read_rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_quick_experiment_writes_every_figure_and_table(quick_run: Path) -> None:
    for number in range(4, 11):
        png = quick_run / f"fig{number}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    md = (quick_run / "results.md").read_text()
    assert all(f"## Fig. {n}:" in md for n in range(4, 11))
    rows = read_rows(quick_run / "results.csv")
    assert {r["mode"] for r in rows} == {"nearest", "all"}
    assert {float(r["w"]) for r in rows} == set(QUICK.w_values)
    assert {int(r["edges"]) for r in rows} == set(QUICK.edge_counts)
    assert all(int(r["seeds"]) == QUICK.seeds for r in rows)
    policies = {r["policy"] for r in rows}
    assert {"lrs", "mappo", "g-mappo", "t-mappo", "oracle", "random", "cache-0.5"} <= policies


def test_measures_obey_their_definitions(quick_run: Path) -> None:
    runs = read_rows(quick_run / "runs.csv")
    by_run: dict[tuple, dict[str, dict]] = {}
    for r in runs:
        key = (r["mode"], r["w"], r["edges"], r["train_share"], r["seed"])
        by_run.setdefault(key, {})[r["policy"]] = {k: float(v) for k, v in r.items()
                                                   if k not in {"mode", "policy"}}
    for key, policies in by_run.items():
        assert policies["random"]["normalized"] == pytest.approx(0.0), key
        assert policies["oracle"]["normalized"] == pytest.approx(1.0), key
        for name, m in policies.items():
            for share in ("llm_freq", "hit_rate", "false_hit_rate", "precision", "recall"):
                assert 0.0 <= m[share] <= 1.0, (key, name, share)
            assert m["q"] <= 0.0 and m["d"] > 0.0, (key, name)  # q = -distance, d = time
            if m["hit_rate"] > 0:
                assert m["precision"] == pytest.approx(1 - m["false_hit_rate"]), (key, name)
            assert m["cloud_calls"] == pytest.approx(1 - m["hit_rate"]), (key, name)
        for theta in ("0.1", "0.3", "0.5"):
            assert policies[f"greedy-{theta}"]["hit_rate"] == 0.0  # Greedy-θ never reuses
        cache = policies["cache-0.5"]  # Cache-θ reuses or forwards, never augments
        assert cache["hit_rate"] + cache["llm_freq"] == pytest.approx(1.0)
    # The Oracle (hindsight-best action) is an upper bound on average over the seeds.
    rows = read_rows(quick_run / "results.csv")
    oracle = {tuple(r[k] for k in ("mode", "w", "edges", "train_share")): float(r["reward"])
              for r in rows if r["policy"] == "oracle"}
    for r in rows:
        key = tuple(r[k] for k in ("mode", "w", "edges", "train_share"))
        assert oracle[key] >= float(r["reward"]) - 1e-9, r


def test_a_rerun_with_the_same_seed_gives_the_same_numbers(exported_embedder, tmp_path) -> None:
    cache_dir = ROOT / "var" / "train" / "cache"
    edge_s = calibrate(tmp_path, DATA, cache_dir)
    assert calibrate(tmp_path, DATA, cache_dir) == edge_s  # kept in calibration.json
    job = Job(Setting(mode="all", edges=2), seed=7, policies=("random", "lrs", "oracle"),
              scale=QUICK, data=DATA, latencies=LATENCIES, cache_dir=cache_dir, edge_s=edge_s)
    first, second = run_job(job), run_job(job)
    assert first.metrics == second.metrics
    assert first.curves == second.curves


def test_items_without_a_second_answer_get_an_honest_simulated_llm(exported_embedder,
                                                                   tmp_path) -> None:
    import numpy as np

    from lab.sim import SimConfig, SimEnv
    from velo.embedder import Embedder
    from velo.workload import QAItem

    items = [QAItem(f"x{n}", f"How many points did team {n} score?", f"{300 + n} points",
                    paraphrases=(f"Points scored by team {n}?",)) for n in range(4)]
    env = SimEnv(SimConfig(edges=1, edge_s=0.01), items, Embedder(exported_embedder), None,
                 LATENCIES, tmp_path)
    for n, item in enumerate(items):
        distance = float(np.linalg.norm(env.llm_vecs[n] - env.vec[item.answer]))
        assert 0.05 - 1e-4 <= distance <= 1.4 + 1e-4  # never the reference itself
        assert abs(float(np.linalg.norm(env.llm_vecs[n])) - 1.0) < 1e-4
    again = SimEnv(SimConfig(edges=1, edge_s=0.01, seed=5), items, Embedder(exported_embedder),
                   None, LATENCIES, tmp_path)
    assert all(np.array_equal(a, b) for a, b in zip(env.llm_vecs, again.llm_vecs, strict=True))
    states = env.reset(0, split="test")
    assert env.arrivals[0][1] in items[env.arrivals[0][0]].paraphrases  # tests ask paraphrases
    result, _ = env.step([env.best_actions()[0]])
    assert result.outcomes[0].q < 0 and not states[0].rows
