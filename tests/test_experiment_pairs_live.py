"""`velo experiment pairs` (the labelled false-hit benchmark) and `live` (the real stack next
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
from velo.core.models import ROOT
from velo.core.verifier import OnnxVerifier

from .conftest import SHARED_DATA

pytestmark = pytest.mark.slow  # a minute or more: `make test-slow` (CI runs it)

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
        [sys.executable, "-m", "velo_cli", "experiment", "pairs", str(pairs), "--quick",
         "--data", str(DATA), "--delta", "0.1", "--out", str(out)],
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


def test_pair_files_split_only_at_newlines(tmp_path: Path) -> None:
    """JSON strings may hold U+2028 unescaped (the negation corpus does): a line is a line."""
    lines = tmp_path / "pairs.jsonl"
    lines.write_text('{"a": "one\u2028two", "b": "three", "label": 0}\n', encoding="utf-8")
    assert [(p.a, p.b) for p in load_pairs(lines)] == [("one\u2028two", "three")]


def _head(source: Path, lines: int, path: Path) -> Path:
    if not source.exists():
        pytest.skip(f"needs {source}")
    path.write_text("\n".join(source.read_text(encoding="utf-8").split("\n")[:lines]) + "\n",
                    encoding="utf-8")
    return path


def test_a_given_verifier_is_scored_on_any_pairs_without_retraining(exported_embedder,
                                                                    tmp_path) -> None:
    pairs = _head(SHARED_DATA / "qqp_pairs_dev.jsonl", 200, tmp_path / "mine.jsonl")
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "velo_cli", "experiment", "pairs", str(pairs), "--no-retrain",
         "--verifier", str(ROOT / "docs" / "reuse" / "verifier.onnx"), "--no-lrs",
         "--delta", "0.05", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (out / "verifier.onnx").exists()  # nothing trained
    with open(out / "pairs.csv") as f:
        assert {int(r["queries"]) for r in csv.DictReader(f)} == {200}  # every pair is a test
    md = (out / "pairs.md").read_text()
    assert "as it is" in md and "δ = 0.05 (verifier)" in md
    missing = subprocess.run(
        [sys.executable, "-m", "velo_cli", "experiment", "pairs", str(pairs), "--no-retrain",
         "--verifier", str(tmp_path / "nope.onnx"), "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert missing.returncode != 0 and "nope.onnx is not a readable file" in missing.stderr


def test_the_reuse_benchmark_prints_every_table_on_any_files(exported_embedder,
                                                             tmp_path) -> None:
    """Small slices of the dev files: the δ table at three sizes, contradictions served, the
    gap on each test split and the time per decision, and a verifier file an edge can load."""
    files = [_head(SHARED_DATA / name, n, tmp_path / name) for name, n in (
        ("qqp_pairs_dev.jsonl", 600), ("negation_pairs_dev.jsonl", 300),
        ("paraphrase_pairs_dev.jsonl", 100))]
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "velo_cli", "experiment", "reuse", *map(str, files),
         "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "reuse.json").read_text())
    assert len(report["sizes"]) == 3 and all(s["queries"] > 0 for s in report["sizes"])
    assert [c["name"] for c in report["contradictions"]] == ["negation_pairs_dev"]
    assert [g["name"] for g in report["gaps"]] == [
        "qqp_pairs_dev", "negation_pairs_dev + qqp_pairs_dev", "paraphrase_pairs_dev"]
    assert 0 < report["decision_ms"]["p50"] < 50
    verifier = OnnxVerifier(out / "verifier.onnx")
    rows = [r for r, _ in verifier.thresholds[0.05]]
    taus = [t for _, t in verifier.thresholds[0.05]]
    assert rows == sorted(rows) and taus == sorted(taus)  # more rows, a stricter threshold
    assert "## 1. δ at any size" in result.stdout
    only_positives = subprocess.run(
        [sys.executable, "-m", "velo_cli", "experiment", "reuse", str(files[2]),
         "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert only_positives.returncode != 0 and "both labels" in only_positives.stderr
