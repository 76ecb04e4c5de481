"""`velo experiment --pairs` (the labelled false-hit benchmark) and `--live` (the real stack next
to the simulator on the same requests)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainerd.experiment import QUICK, Job, Setting, calibrate, live_experiment
from trainerd.pairs import load_pairs
from velo.models import ROOT

from .conftest import SHARED_DATA

DATA = ROOT / "data" / "oasst1_dev.jsonl"
LATENCIES = ROOT / "data" / "llm_latency_llmperf.jsonl"


def test_pairs_load_both_formats(tmp_path: Path) -> None:
    lines = tmp_path / "pairs.jsonl"
    lines.write_text('{"a": "x?", "b": "y?", "label": 0}\n{"a": "p", "b": "q"}\n')
    assert [(p.a, p.b, p.label) for p in load_pairs(lines)] == [("x?", "y?", 0), ("p", "q", 1)]
    gptcache = tmp_path / "mock.json"
    gptcache.write_text(json.dumps([{"text_a": "u", "text_b": "v", "label": 1}]))
    assert [(p.a, p.b, p.label) for p in load_pairs(gptcache)] == [("u", "v", 1)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": "only a"}\n')
    with pytest.raises(ValueError, match="record 1"):
        load_pairs(bad)


def test_pairs_benchmark_counts_hits_and_respects_the_bound(exported_embedder, tmp_path) -> None:
    source = SHARED_DATA / "paraphrase_pairs_dev.jsonl"
    if not source.exists():
        pytest.skip("needs ../shared/data/paraphrase_pairs_dev.jsonl")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(source.read_text().splitlines(keepends=True)[:300]))
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "velo.cli", "experiment", "--quick", "--data", str(DATA),
         "--pairs", str(pairs), "--delta", "0.1", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "pairs.png").read_bytes()[:4] == b"\x89PNG"
    with open(out / "pairs.csv") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        assert int(r["hits"]) == int(r["right_hits"]) + int(r["wrong_hits"])
        assert int(r["hits"]) + int(r["misses"]) == int(r["queries"]) == 300
    static = [r for r in rows if r["policy"].startswith("cache-")]
    hit_rates = [float(r["hit_rate"]) for r in static]
    assert hit_rates == sorted(hit_rates) and hit_rates[-1] > hit_rates[0]  # θ up, hits up
    # About half of the `a` sides are left out: only the other half's `b` can be a right hit.
    positives = {round(int(r["right_hits"]) / float(r["recall"]))
                 for r in static if float(r["recall"]) > 0}
    assert len(positives) == 1 and 100 < positives.pop() < 200
    assert any(r["policy"] == "lrs" for r in rows)
    md = (out / "pairs.md").read_text()
    assert "Bound δ = 0.1" in md and ("held" in md or "FAILED" in md)


@pytest.mark.llm
def test_live_experiment_runs_the_real_stack_next_to_the_simulator(
        milvus, exported_embedder, tmp_path) -> None:
    cache_dir = ROOT / "var" / "train" / "cache"
    job = Job(Setting(), 0, ("lrs",), QUICK, DATA, LATENCIES, cache_dir,
              calibrate(tmp_path, DATA, cache_dir))
    report = live_experiment(job, tmp_path, requests=6, state_dir=tmp_path / "stack",
                             max_tokens=8, milvus_uri=milvus.uri, milvus_token=milvus.token)
    assert (tmp_path / "live.md").read_text() == report
    rows = [line for line in report.splitlines() if line.startswith("| ") and "policy" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["cache-0.5", "greedy-0.5", "random", "lrs"]
    assert not any("no answers" in r for r in rows)
