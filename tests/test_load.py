"""The cloud's load: the simulator's shared cloud (lab.cloud), what an edge sees of it
(velo.core.load), the load-aware policy contract and the load-adaptive baseline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lab.cloud import Arrivals, EdgeLink, SharedCloud, trace_gaps
from velo.core.load import LOAD_FEATURES, estimated_wait
from velo.core.models import ROOT
from velo.core.policy import LoadAdaptivePolicy, OnnxPolicy, PolicyRejected, baseline_from_name
from velo.core.qos import Action
from velo.core.state import CachedRow, build_state
from velo.learning.lrs import LRS, LRSConfig, Rollout

TRACE = ROOT / "data" / "azure_llm_trace_conv_2023.csv"


def test_one_requests_service_delays_the_next_in_the_shared_queue() -> None:
    cloud = SharedCloud(slots=2, mean_service_s=4.0)
    assert cloud.submit(0.0, 10.0) == 0.0  # both slots free
    assert cloud.submit(1.0, 3.0) == 0.0
    assert cloud.wait_at(2.0) == pytest.approx(2.0)  # the 3 s request frees its slot at 4
    assert cloud.submit(2.0, 5.0) == pytest.approx(2.0)  # runs 4 .. 9
    assert cloud.submit(2.5, 1.0) == pytest.approx(6.5)  # the next slot frees at 9
    # What cloudd would report at 3.0: 2 in flight, 2 queued -> (2 + 1) * 4 / 2
    assert cloud.estimated_wait(3.0) == pytest.approx(6.0)
    assert cloud.estimated_wait(100.0) == 0.0  # all done: slots free


def test_estimated_wait_is_zero_while_a_slot_is_free() -> None:
    assert estimated_wait(in_flight=3, queued=0, slots=4, mean_service_s=5.0) == 0.0
    assert estimated_wait(in_flight=4, queued=0, slots=4, mean_service_s=5.0) == 1.25
    assert estimated_wait(in_flight=4, queued=7, slots=4, mean_service_s=5.0) == 10.0


def test_arrivals_keep_the_traces_bursts_at_the_chosen_rate() -> None:
    gaps = trace_gaps(TRACE)
    clock = Arrivals(gaps, rate=2.0)
    clock.reset(np.random.default_rng(0))
    times = np.array([clock.next() for _ in range(len(gaps))])  # once round the trace
    assert len(times) / times[-1] == pytest.approx(2.0)
    counts = np.bincount((times // 10).astype(int))[:-1]  # requests per 10 s
    # Poisson arrivals at 20 per window would vary by 1/sqrt(20) = 22 %; the trace's by more.
    assert counts.std() / counts.mean() > 0.3


def test_an_edge_learns_its_forward_latency_when_the_answer_is_back() -> None:
    link = EdgeLink()
    link.sent(0.0, 5.0)
    assert link.forward_s(4.9) == 0.0  # not back yet: nothing known
    assert link.forward_s(5.0) == 5.0
    link.sent(6.0, 15.0)
    assert link.forward_s(30.0) == pytest.approx(5.0 + 0.2 * (15.0 - 5.0))


def _row(distance: float) -> CachedRow:
    return CachedRow(1, 1, 1, "q", "a", 0, 0.0, 0.0, distance)


def test_the_adaptive_threshold_reuses_more_as_the_cloud_waits_longer() -> None:
    policy = baseline_from_name("adaptive-0.4-0.05")
    assert isinstance(policy, LoadAdaptivePolicy)
    f = np.ones(384, np.float32) / np.sqrt(384)
    idle = build_state(f, [_row(0.6)], 5, load=np.array([0.0, 3.0]))
    busy = build_state(f, [_row(0.6)], 5, load=np.array([10.0, 3.0]))
    assert policy.decide(idle).action is Action.FORWARD  # 0.6 > 0.4
    assert policy.decide(busy).action is Action.REUSE  # 0.6 <= 0.4 + 0.05 * 10


def test_a_load_aware_policy_names_and_reads_its_load_input() -> None:
    lrs = LRS(LRSConfig(use_encoder=False, use_load=True), agents=1)
    with torch.no_grad():  # make the choice hinge on the load: A's logit grows with the wait
        last = lrs.actor.mlp[-1]
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.0, 1.0, -5.0]))
    first, middle = lrs.actor.mlp[0], lrs.actor.mlp[2]
    with torch.no_grad():  # hidden unit 0 of both layers carries log1p(wait) (the state's
        first.weight[0].zero_()  # last but one value) to A's logit
        first.weight[0, -2] = 1.0
        first.bias[0] = 0.0
        middle.weight[0].zero_()
        middle.weight[0, 0] = 3.0
        middle.bias[0] = 0.0
        last.weight[0, 0] = 4.0
    policy = OnnxPolicy(lrs.export_onnx(), 1, "lrs", top_p=5, embed_dim=384, sample=False)
    assert policy.load_features == LOAD_FEATURES
    f = np.ones(384, np.float32) / np.sqrt(384)
    idle = build_state(f, [_row(0.5)], 5, load=np.array([0.0, 0.0]))
    busy = build_state(f, [_row(0.5)], 5, load=np.array([30.0, 0.0]))
    assert policy.decide(idle).action is Action.FORWARD
    assert policy.decide(busy).action is Action.REUSE


def test_a_policy_wanting_load_inputs_this_edge_does_not_fill_is_refused() -> None:
    import onnx

    graph = onnx.load_from_string(LRS(LRSConfig(use_encoder=False, use_load=True),
                                      agents=1).export_onnx())
    for prop in graph.metadata_props:
        if prop.key == "velo.load":
            prop.value = "cloud_wait_s,gpu_temperature"
    with pytest.raises(PolicyRejected, match="gpu_temperature"):
        OnnxPolicy(graph.SerializeToString(), 3, "lrs", top_p=5, embed_dim=384)
    # A `load` input the metadata does not announce breaks the contract as well.
    del graph.metadata_props[:]
    with pytest.raises(PolicyRejected, match="load"):
        OnnxPolicy(graph.SerializeToString(), 4, "lrs", top_p=5, embed_dim=384)


def test_update_reports_cleanrls_diagnostics_of_the_rollout() -> None:
    rng = np.random.default_rng(0)
    lrs = LRS(LRSConfig(use_encoder=False, use_load=True, epochs=2), agents=2)
    corr = rng.normal(size=(32, 2, 3, 5)).astype(np.float32)
    emb = rng.normal(size=(32, 2, 384)).astype(np.float32)
    mask = np.ones((32, 2, 3), np.float32)
    load = rng.uniform(0, 20, size=(32, 2, 2)).astype(np.float32)
    actions = np.where(np.arange(64).reshape(32, 2) < 16, 0, 1)  # 16 A, 48 B
    _, logp = lrs.act(corr.reshape(-1, 3, 5), emb.reshape(-1, 384), mask.reshape(-1, 3),
                      load=load.reshape(-1, 2))
    logp = np.log(np.full((32, 2), 1 / 3, np.float32))
    rewards = rng.normal(size=(32, 2)).astype(np.float32)
    stats = lrs.update(Rollout(corr, emb, mask, actions, logp, rewards, np.zeros(32, np.float32),
                               corr[-1], emb[-1], load, load[-1]))
    assert (stats["share_A"], stats["share_B"], stats["share_C"]) == (0.25, 0.75, 0.0)
    assert stats["approx_kl"] >= 0.0 and 0.0 <= stats["clip_frac"] <= 1.0
    assert stats["explained_var"] <= 1.0
    with pytest.raises(ValueError, match="load"):  # a load-aware learner given no load
        lrs.update(Rollout(corr, emb, mask, actions, logp, rewards, np.zeros(32, np.float32),
                           corr[-1], emb[-1]))


def test_an_edge_without_a_load_report_refuses_a_load_aware_policy(tmp_path) -> None:
    import hashlib

    from edged.trainer_link import PolicyFollower
    from velo.core.policy import RandomPolicy

    body = LRS(LRSConfig(use_encoder=False, use_load=True), agents=1).export_onnx()
    digest = hashlib.sha256(body).hexdigest()
    args = dict(top_p=5, embed_dim=384, sample=False, seed=0, max_bytes=1 << 22)
    blind = PolicyFollower(None, RandomPolicy(), tmp_path, **args, fills_load=lambda: False)
    with pytest.raises(PolicyRejected, match="reads the cloud's load"):
        blind._verify(body, 1, "lrs", digest)
    seeing = PolicyFollower(None, RandomPolicy(), tmp_path, **args, fills_load=lambda: True)
    assert seeing._verify(body, 1, "lrs", digest).load_features == LOAD_FEATURES


@pytest.fixture(scope="module")
def sim(exported_embedder, tmp_path_factory):
    """Simulators of 3 edges at a given cloud utilisation: in-memory caches, the real
    embeddings (computed once), 2 cloud slots."""
    from lab.sim import SimConfig, SimEnv
    from velo.core.records import load_qa
    from velo.edge.embedder import Embedder

    items = load_qa(ROOT / "data" / "oasst1_dev.jsonl")[:60]
    cache_dir, embedder, envs = tmp_path_factory.mktemp("embeddings"), \
        Embedder(exported_embedder), []

    def make(utilisation: float):
        envs.append(SimEnv(SimConfig(edges=3, seed=0, edge_s=0.012, utilisation=utilisation,
                                     cloud_slots=2), items, embedder, None,
                           ROOT / "data" / "llm_latency_llmperf.jsonl", cache_dir,
                           trace_path=TRACE))
        return envs[-1]

    yield make
    for env in envs:
        env.close()


def test_every_edges_forwards_wait_in_the_same_queue(sim) -> None:
    """Edge 2's forward waits longer when edges 0 and 1 forward in the same step than when
    they do not: one queue for all (with an unloaded cloud it would not matter)."""
    env = sim(1.2)
    env.reset(7)
    for _ in range(10):  # fill the cloud: every edge forwards
        env.step([Action.FORWARD] * 3)
    alone = env._candidates(2, env.cloud)[Action.FORWARD].d
    crowded = env.cloud.copy()
    for n in (0, 1):
        crowded.submit(env.times[n], env.cloud_s[n])
    assert env._candidates(2, crowded)[Action.FORWARD].d > alone
    # What the edges see of it: the queue cloudd would report, and their own latency.
    assert all(s.load[0] > 0 and s.load[1] > 0 for s in env.states)


def _forward_delays(env, policy, steps: int, seed: int) -> float:
    """The mean delay of the forwards (B) of `policy` on the test stream of `seed`."""
    states, delays = env.reset(seed, split="test"), []
    for _ in range(steps):
        result, states = env.step([policy.decide(s).action for s in states])
        delays += [o.d for a, o in zip(result.actions, result.outcomes, strict=True)
                   if a is Action.FORWARD]
    return float(np.mean(delays))


def test_the_delay_follows_the_utilisation_and_reuse_relieves_it(sim) -> None:
    never_reuse = baseline_from_name("cache-0")  # J_min <= 0: never reuses a restatement
    reuse = baseline_from_name("cache-1.0")  # reuses most near matches: far fewer forwards
    loaded, calm = sim(1.2), sim(0.3)
    assert _forward_delays(calm, never_reuse, 60, 1000) \
        < _forward_delays(loaded, never_reuse, 60, 1000)
    # On the loaded cloud, reuses take requests out of the queue: every forward waits less.
    assert _forward_delays(loaded, reuse, 60, 1000) \
        < _forward_delays(loaded, never_reuse, 60, 1000)


def test_the_gate_keeps_the_cloned_expert_unless_a_checkpoint_beats_it_beyond_noise(sim) -> None:
    """lab.train.train with a warm start: the gate scores the cloned expert first. A later
    checkpoint with a higher mean reward that is within the noise of the same requests does
    not replace it (a gate on the highest mean took such lucky checkpoints); one that beats
    it clearly does. Without the warm start, the first PPO checkpoint is the first kept."""
    from lab.train import collect_demos, train

    env = sim(0.9)
    demos = collect_demos(env, 64, seed=1, expert=LoadAdaptivePolicy(0.7, 0.1))
    rng = np.random.default_rng(0)
    base = rng.normal(-1.0, 0.5, 300)  # the clone's reward on each of the gate's requests
    lucky = base + 0.1 + rng.normal(0.0, 2.0, 300)  # higher mean, far inside its noise
    better = base + 0.3 + rng.normal(0.0, 0.1, 300)
    seen: list[dict] = []

    def trained(warm_start_epochs: int, scores: list[np.ndarray]) -> LRS:
        seen.clear()

        def gate(lrs: LRS) -> np.ndarray:
            seen.append({k: v.clone() for k, v in lrs.actor.state_dict().items()})
            return scores[len(seen) - 1]

        cfg = LRSConfig(use_encoder=False, use_load=True, warm_start_epochs=warm_start_epochs,
                        demos_first=64, epochs=2, seed=0)
        return train(env, cfg, updates=2, rollout_steps=8, demos=demos, episode_steps=8,
                     log=lambda _: None, gate=gate, gate_every=1)

    def same(lrs: LRS, weights: dict) -> bool:
        return all(torch.equal(v, weights[k]) for k, v in lrs.actor.state_dict().items())

    assert lucky.mean() > base.mean()
    cloned = trained(5, [base, lucky, base - 0.5])
    assert len(seen) == 3  # the clone, then updates 1 and 2
    assert same(cloned, seen[0])
    fresh = LRS(LRSConfig(use_encoder=False, use_load=True, seed=0), agents=3)
    assert not all(torch.equal(v, fresh.actor.state_dict()[k]) for k, v in seen[0].items())
    beaten = trained(5, [base, better, base - 0.5])
    assert same(beaten, seen[1])
    plain = trained(0, [base, base - 0.5])
    assert len(seen) == 2  # updates 1 and 2 only
    assert same(plain, seen[0])


def test_the_cloud_is_loaded_by_what_must_reach_it_not_by_every_request(
        exported_embedder, tmp_path) -> None:
    """In nearest-edge mode a cache answers most requests. Scaled as if every request were
    forwarded once, a cache that forwards the rest left the cloud at a fraction of the asked
    utilisation; lab.under_load.loaded_env scales the arrivals by what the Oracle sends on an
    idle cloud, and the same cache then loads it to about the utilisation asked."""
    from dataclasses import replace

    from lab.experiment import _embedder
    from lab.sim import SimEnv
    from lab.train import play
    from lab.under_load import Case, loaded_env
    from velo.core.records import load_qa

    data = ROOT / "data" / "oasst1_dev.jsonl"
    latencies = ROOT / "data" / "llm_latency_llmperf.jsonl"
    items = load_qa(data)[:60]
    case = Case(data, "nearest", "paper", 0.9, 0)
    cache = baseline_from_name("cache-0.7")

    def carried(env) -> float:  # the cloud's utilisation under the cache, 3 test streams
        return float(np.mean([play(env, cache, 100, seed).cloud[1] for seed in range(3)]))

    env = loaded_env(case, items, 0.01, latencies, TRACE, tmp_path, 100)
    assert env.cfg.cloud_per_arrival < 0.6  # the Oracle reuses most requests
    # Measured: 0.28 scaled the old way, 1.17 by loaded_env (utilisation 0.9).
    every_request = SimEnv(replace(env.cfg, cloud_per_arrival=1.0), items, _embedder(),
                           None, latencies, tmp_path, trace_path=TRACE)
    try:
        assert carried(every_request) < 0.6 * case.utilisation
        assert 0.7 * case.utilisation < carried(env) < 1.6 * case.utilisation
    finally:
        env.close()
        every_request.close()
