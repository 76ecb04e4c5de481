"""`velo experiment --pairs` (the labelled false-hit benchmark) and `--live` (the real stack next
to the simulator on the same requests)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lab.experiment import QUICK, Job, Setting, calibrate, live_experiment
from lab.pairs import load_pairs
from velo.models import ROOT
from velo.verifier import OnnxVerifier

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
        [sys.executable, "-m", "velo_cli", "experiment", "--quick", "--data", str(DATA),
         "--pairs", str(pairs), "--delta", "0.1", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "pairs.png").read_bytes()[:4] == b"\x89PNG"
    with open(out / "pairs.csv") as f:
        rows = list(csv.DictReader(f))
    queries = {int(r["queries"]) for r in rows}
    assert len(queries) == 1 and 30 < queries.pop() < 100  # the test split only (about 20 %)
    for r in rows:
        assert int(r["hits"]) == int(r["right_hits"]) + int(r["wrong_hits"])
        assert int(r["hits"]) + int(r["misses"]) == int(r["queries"])
    for rule in ("cosine", "verifier", "lrs"):  # threshold up, hits down
        hit_rates = [float(r["hit_rate"]) for r in rows
                     if r["policy"] == rule and r["param"] != "argmax"]
        assert hit_rates and hit_rates == sorted(hit_rates, reverse=True)
        assert rule == "lrs" or hit_rates[0] > hit_rates[-1]
    md = (out / "pairs.md").read_text()
    assert "δ = 0.1 (verifier)" in md and "δ = 0.1 (cosine)" in md
    verifier = OnnxVerifier(out / "verifier.onnx")  # what an edge loads ([reuse] verifier)
    assert 0.1 in verifier.thresholds or "FAILED to find a useful point" in md


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
