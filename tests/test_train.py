"""LRS on the simulator (real Milvus collections, real embeddings, measured edge time): with
fixed seeds and a bounded number of updates it must beat Random and every Greedy baseline."""

from __future__ import annotations

import numpy as np
import pytest

from lab.sim import SimConfig, SimEnv
from lab.train import run, table
from trainerd.lrs import LRSConfig
from velo.embedder import Embedder
from velo.models import ROOT
from velo.qos import Action

DATA = ROOT / "data"


@pytest.fixture(scope="module")
def env(milvus, exported_embedder, tmp_path_factory):
    from velo.workload import load_qa

    items = load_qa(DATA / "oasst1_dev.jsonl")[:60]
    sim = SimEnv(SimConfig(edges=3, seed=0), items, Embedder(exported_embedder), milvus.uri,
                 DATA / "llm_latency_llmperf.jsonl", tmp_path_factory.mktemp("embeddings"),
                 milvus_token=milvus.token)
    yield sim
    sim.close()


def test_simulated_llm_is_honest(env: SimEnv) -> None:
    states = env.reset(3)
    assert all(not s.rows for s in states)  # empty caches: only B is possible
    result, _ = env.step([Action.FORWARD] * 3)
    for outcome in result.outcomes:
        assert outcome.q < 0  # B answers with a second human answer, never the reference
        assert outcome.d in env.latencies  # a measured cloud latency
    # Asking the same questions again: the cached answer is there, reuse costs edge time only.
    for _ in range(30):
        result, states = env.step(env.best_actions())
    reuses = [o for a, o in zip(result.actions, result.outcomes, strict=True)
              if a is Action.REUSE]
    assert all(o.d < 0.5 for o in reuses)
    assert result.best == result.actions  # the Oracle's choice is the hindsight-best one


def test_lrs_beats_random_and_every_greedy_baseline(env: SimEnv) -> None:
    greedy = ["greedy-0.1", "greedy-0.3", "greedy-0.5", "greedy-llm"]
    policies = ["random", *greedy, "lrs", "oracle"]
    results = run(env, policies=policies, lrs_cfg=LRSConfig(seed=0), updates=20,
                  rollout_steps=64, eval_steps=150, demos_count=512, seed=0, log=lambda s: None)
    print("\n" + table(results))
    lrs = results["lrs"]["reward"]
    for baseline in ("random", *greedy):
        assert lrs > results[baseline]["reward"], (baseline, results)
    assert all(results["oracle"]["reward"] >= r["reward"] for r in results.values())
    assert np.isclose(results["random"]["normalized"], 0) and results["oracle"]["normalized"] == 1
