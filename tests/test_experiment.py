"""`velo experiment figures --quick`: every figure's outputs exist and are well formed, the measures
obey what their definitions force, and a run repeated with the same seed gives the same numbers."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from lab.experiment import QUICK, Job, Setting, calibrate, run_job
from velo.core.models import ROOT

# The quick run takes about 4 min on an idle 2-core machine; CI's shared runners are slower.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

DATA = ROOT / "data" / "oasst1_dev.jsonl"
LATENCIES = ROOT / "data" / "llm_latency_llmperf.jsonl"


@pytest.fixture(scope="module")
def quick_run(exported_embedder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("experiment")
    result = subprocess.run(
        [sys.executable, "-m", "velo_cli", "experiment", "figures", "--quick", "--data",
         str(DATA), "--out", str(out), "--jobs", "2"],
        capture_output=True, text=True, cwd=ROOT, timeout=1100)
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


def test_quick_run_policies_keep_to_their_rules(quick_run: Path) -> None:
    """What each policy may do, seen in the measures of a real quick run (how the measures are
    counted: tests/test_train.py::test_measures_count_a_known_episode)."""
    runs = read_rows(quick_run / "runs.csv")
    by_run: dict[tuple, dict[str, dict]] = {}
    for r in runs:
        key = (r["mode"], r["w"], r["edges"], r["train_share"], r["seed"])
        by_run.setdefault(key, {})[r["policy"]] = {k: float(v) for k, v in r.items()
                                                   if k not in {"mode", "policy"}}
    for key, policies in by_run.items():
        for name, m in policies.items():
            for share in ("llm_freq", "hit_rate", "false_hit_rate", "precision", "recall"):
                assert 0.0 <= m[share] <= 1.0, (key, name, share)
            assert m["q"] <= 0.0 and m["d"] > 0.0, (key, name)  # q = -distance, d = time
        for theta in ("0.1", "0.3", "0.5"):
            assert policies[f"greedy-{theta}"]["hit_rate"] == 0.0  # Greedy-θ never reuses
        for name in ("cache-0.5", "greedy-llm"):  # they reuse or forward, never augment
            m = policies[name]
            assert m["hit_rate"] + m["llm_freq"] == pytest.approx(1.0), (key, name)
    # In nearest-edge mode the Oracle (each edge's hindsight-best action) is an upper bound on
    # average over the seeds. Not in all-edges mode: there it also picks the actions of the
    # edges whose answer is not served (their own best), which shape their caches, and a
    # policy that reuses on every edge can end an episode ahead (w = 1: greedy-llm -1.26
    # against -1.30); nor under load, where it is myopic (lab.under_load).
    rows = read_rows(quick_run / "results.csv")
    oracle = {tuple(r[k] for k in ("mode", "w", "edges", "train_share")): float(r["reward"])
              for r in rows if r["policy"] == "oracle"}
    for r in rows:
        key = tuple(r[k] for k in ("mode", "w", "edges", "train_share"))
        if r["mode"] == "nearest":
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
    from velo.core.records import QAItem
    from velo.edge.embedder import Embedder

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


# -- experiment commands that take any file (issue 22) ---------------------------------------
def _write_lines(path: Path, rows: list[object]) -> Path:
    import json

    path.write_text("".join(f"{json.dumps(r)}\n" for r in rows), encoding="utf-8")
    return path


def _turn(id_: str, question: str, first: str | None = None, **extra: object) -> dict:
    history = [{"role": "user", "content": first}, {"role": "assistant", "content": "..."}]
    return {"id": id_, "question": question, "answer": "...", "history": history if first else [],
            **extra}


def _vectors(turns: list[dict]):
    """Unrelated random unit vectors (cosine about 0), a restatement on its question's."""
    import numpy as np

    rng = np.random.default_rng(0)
    vectors = {}
    for t in turns:
        v = rng.normal(size=64).astype(np.float32)
        vectors[t["question"]] = v / np.linalg.norm(v)
        vectors |= {p: vectors[t["question"]] for p in t.get("paraphrases") or ()}
    return vectors


def test_multiturn_without_restated_turns_says_what_it_cannot_measure(tmp_path) -> None:
    from lab import multiturn

    path = _write_lines(tmp_path / "chats.jsonl", [
        _turn("a", "What is the capital of France?"),
        _turn("b", "Name a famous landmark there.", "What is the capital of France?"),
        _turn("c", "What is the capital of Italy?"),
        _turn("d", "What food is it known for?", "What is the capital of Italy?"),
        _turn("e", "What is the capital of Spain?"),
        _turn("f", "Name a famous landmark there.", "What is the capital of Spain?")])
    turns = multiturn.load_turns(path)
    last_message = multiturn.run(turns, _vectors(turns), context_aware=False, threshold=0.8)
    aware = multiturn.run(turns, _vectors(turns), context_aware=True, threshold=0.8)
    # b after Italy and d after Spain are served their own rows: wrong. f after France is
    # served b, the same question cached after France: right, with either keys.
    assert last_message["foreign_asked"] == 3 and last_message["foreign_wrong_reuses"] == 2
    assert aware["foreign_asked"] == 3 and aware["foreign_wrong_reuses"] == 0
    assert aware["restated_asked"] == 0 and aware["restated_hit_rate"] is None
    notes = multiturn.unmeasured(turns)
    assert notes == ["no restated turns (no `paraphrases`): restated-turn hit rate not measured"]
    table = multiturn.markdown([{"keys": "context-aware", "threshold": 0.8, **aware}], notes)
    assert "| context-aware | 0.8 | — | — | — | 3 | 0 |" in table and notes[0] in table


def test_multiturn_measures_restated_turns_whatever_their_ids(tmp_path) -> None:
    from lab import multiturn

    path = _write_lines(tmp_path / "chats.jsonl", [
        _turn("first", "What are the parts of a computer?",
              paraphrases=["Which components make up a computer?"]),
        _turn("second", "Which one is the brain?", "What are the parts of a computer?",
              paraphrases=["What part does the thinking?"])])
    turns = multiturn.load_turns(path)
    for aware in (False, True):
        result = multiturn.run(turns, _vectors(turns), aware, threshold=0.8)
        assert result["restated_asked"] == result["restated_right"] == 2
        assert result["restated_hit_rate"] == 1.0 and result["foreign_asked"] == 0
    assert multiturn.unmeasured(turns) == [
        "no follow-ups (turns with a `history` and no `paraphrases`): foreign follow-ups not "
        "measured"]
    one_context = [*turns, *multiturn.load_turns(_write_lines(tmp_path / "more.jsonl", [
        _turn("third", "And the memory?", "What are the parts of a computer?")]))]
    assert multiturn.unmeasured(one_context) == [
        "fewer than 2 conversations with follow-ups (different contexts): foreign follow-ups "
        "not measured"]


def test_a_file_that_is_not_conversations_stops_with_its_name_and_line(tmp_path) -> None:
    from lab import multiturn
    from lab.experiment import multiturn_experiment

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "fine"}\nnot json\n', encoding="utf-8")
    with pytest.raises(SystemExit, match=rf"{bad}:2: not a JSON line"):
        multiturn.load_turns(bad)
    pairs = _write_lines(tmp_path / "pairs.jsonl", [{"a": "x", "b": "y", "label": 1}])
    with pytest.raises(SystemExit, match=rf"{pairs}:1: not a QA record .*`question`"):
        multiturn_experiment(tmp_path, pairs, tmp_path)
    # A plain QA file is read, and the report says there is nothing to measure (no embedding).
    plain = _write_lines(tmp_path / "plain.jsonl", [_turn("q", "What is 2 + 2?")])
    text = multiturn_experiment(tmp_path / "out", plain, tmp_path)
    assert "Nothing to measure" in text and "foreign follow-ups not measured" in text
    assert (tmp_path / "out" / "multiturn.md").read_text() == text


def test_feedback_recognises_each_file_by_its_content(tmp_path) -> None:
    from lab.experiment import _embedder, feedback_experiment, feedback_workload
    from velo.edge.embedder import MultilingualEmbedder

    pairs = _write_lines(tmp_path / "pairs.jsonl", [
        {"a": f"How do I learn language {n}?", "b": f"Best way to learn language {n}?",
         "label": 1} for n in range(20)])
    name, intents, scopes, make = feedback_workload(pairs)
    assert "duplicate clusters" in name and intents and scopes is None and make is _embedder
    chats = _write_lines(tmp_path / "chats.jsonl", [
        _turn("a", "Which one is the brain?", "What are the parts of a computer?",
              paraphrases=["What part does the thinking?"])])
    name, intents, scopes, make = feedback_workload(chats)
    assert "conversation" in name and scopes is not None and make is _embedder
    languages = _write_lines(tmp_path / "languages.jsonl", [
        _turn("x", "Where is Paris?", paraphrases=["¿Dónde está París?"], lang="en",
              paraphrase_langs=["es"])])
    name, intents, scopes, make = feedback_workload(languages)
    assert "2 languages" in name and scopes is None and make is MultilingualEmbedder
    plain = _write_lines(tmp_path / "plain.jsonl", [_turn("q", "What is 2 + 2?")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{}\n{oops\n", encoding="utf-8")
    with pytest.raises(SystemExit) as stopped:  # nothing usable: why, file by file
        feedback_experiment(tmp_path, [plain, bad, tmp_path / "missing.jsonl"], tmp_path)
    message = str(stopped.value)
    assert f"{plain}: QA records without `paraphrases`" in message
    assert f"{bad}:2: not a JSON line" in message and "missing.jsonl: cannot read it" in message


def test_each_experiment_is_a_subcommand_with_its_own_options() -> None:
    from velo_cli import experiment
    from velo_cli.main import build_parser

    parser = build_parser()
    args = parser.parse_args(["experiment", "feedback", "a.jsonl", "b.jsonl", "--out", "o"])
    assert args.run is experiment.feedback and args.files == [Path("a.jsonl"), Path("b.jsonl")]
    args = parser.parse_args(["experiment", "ablation", "c.jsonl", "--quick"])
    assert args.run is experiment.ablation and args.files == [Path("c.jsonl")] and args.quick
    args = parser.parse_args(["experiment", "load"])  # no files: the defaults
    assert args.run is experiment.load and args.files == []
    with pytest.raises(SystemExit):  # an option of another experiment
        parser.parse_args(["experiment", "feedback", "--paper-state"])
    with pytest.raises(SystemExit):  # which experiment must be said
        parser.parse_args(["experiment", "--quick"])
