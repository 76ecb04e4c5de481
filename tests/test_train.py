"""LRS on the simulator (real Milvus collections, real embeddings, measured edge time): with
fixed seeds and a bounded number of updates it must beat Random and every Greedy baseline."""

from __future__ import annotations

import numpy as np
import pytest

from lab.sim import Outcome, SimConfig, SimEnv, StepResult
from lab.train import Metrics, run, table
from velo.core.models import ROOT
from velo.core.qos import Action
from velo.edge.embedder import Embedder
from velo.learning.lrs import LRSConfig

DATA = ROOT / "data"


@pytest.fixture(scope="module")
def env(milvus, exported_embedder, tmp_path_factory):
    from velo.core.records import load_qa

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
    # Popular questions come back: their cached answers are reused at edge time only, and the
    # Oracle's choice is, edge by edge, the action whose outcome has the best reward.
    reuses = []
    for _ in range(30):
        options = [env._candidates(n) for n in range(3)]
        chosen = env.best_actions()
        for n, outcomes in enumerate(options):
            assert outcomes[chosen[n]].r == max(o.r for o in outcomes.values())
        result, states = env.step(chosen)
        reuses += [o for a, o in zip(result.actions, result.outcomes, strict=True)
                   if a is Action.REUSE]
    assert reuses, "the Oracle never reused in 30 steps of Zipf-popular questions"
    assert all(o.d < 0.5 for o in reuses)


def _outcome(q: float, d: float) -> Outcome:
    return Outcome(q, d, q - 0.1 * d, np.zeros(4, np.float32), 0)


def test_measures_count_a_known_episode() -> None:
    """SPEC §5's measures on an episode counted by hand: 6 requests in nearest-edge mode (3
    reuses, one of them false, 4 requests where a reuse would have been right, 2 forwards,
    1 augment), then an all-edges step where only the served edge counts."""
    a, b, c = Action.REUSE, Action.FORWARD, Action.AUGMENT
    metrics = Metrics()
    for actions, false_hits, reusable in (([a, b], [False, False], [True, False]),
                                          ([a, c], [True, False], [False, True]),
                                          ([b, a], [False, False], [True, True])):
        metrics.add(StepResult(actions, [_outcome(-0.2, 1.0), _outcome(-0.4, 2.0)], actions,
                               -1, false_hits, reusable))
    nearest = metrics.summary()
    assert nearest["hit_rate"] == pytest.approx(0.5)
    assert nearest["false_hit_rate"] == pytest.approx(1 / 3)
    assert nearest["precision"] == pytest.approx(2 / 3)
    assert nearest["recall"] == pytest.approx(0.5)
    assert nearest["llm_freq"] == pytest.approx(1 / 3)
    assert nearest["cloud_calls"] == pytest.approx(0.5)
    assert nearest["q"] == pytest.approx(-0.3) and nearest["d"] == pytest.approx(1.5)
    assert nearest["reward"] == pytest.approx(-0.45)
    # All-edges: edge 1 served (a false reuse); edge 0's forward is not a served request.
    metrics.add(StepResult([b, a], [_outcome(-0.2, 3.0), _outcome(-0.9, 0.01)], [b, a], 1,
                           [False, True], [False, False]))
    both = metrics.summary()
    assert both["hit_rate"] == pytest.approx(4 / 7)
    assert both["false_hit_rate"] == pytest.approx(0.5)
    assert both["llm_freq"] == pytest.approx(2 / 7)
    assert both["d"] == pytest.approx(9.01 / 7)


@pytest.mark.slow
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
