"""The LRS learner's pieces against hand-computed values, and its ONNX export against PyTorch."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from velo.core.policy import OnnxPolicy
from velo.core.state import build_state
from velo.learning.lrs import (
    LRS,
    Demos,
    LRSConfig,
    Rollout,
    clipped_policy_loss,
    clipped_value_loss,
    gae,
)


def test_gae_matches_hand_computation() -> None:
    rewards = torch.tensor([[1.0], [0.0], [2.0]])
    values = torch.tensor([[0.5], [1.0], [0.0]])
    dones = torch.tensor([0.0, 1.0, 0.0])  # the episode ends after step 1
    last = torch.tensor([3.0])
    g, lam = 0.9, 0.5
    # step 2: delta = 2 + 0.9*3 - 0 = 4.7 -> A2 = 4.7
    # step 1: done -> delta = 0 - 1 = -1, no bootstrap -> A1 = -1
    # step 0: delta = 1 + 0.9*1 - 0.5 = 1.4 -> A0 = 1.4 + 0.9*0.5*(-1) = 0.95
    adv, ret = gae(rewards, values, dones, last, g, lam)
    assert adv.squeeze(1).tolist() == pytest.approx([0.95, -1.0, 4.7])
    assert ret.squeeze(1).tolist() == pytest.approx([1.45, 0.0, 4.7])


def test_clipped_losses_match_hand_computation() -> None:
    old = torch.log(torch.tensor([0.5, 0.5]))
    new = torch.log(torch.tensor([0.8, 0.2]))  # ratios 1.6 and 0.4
    adv = torch.tensor([1.0, -1.0])
    # positive advantage: min(1.6, 1.2) * 1 = 1.2; negative: min(-0.4, -0.8) = -0.8
    assert clipped_policy_loss(new, old, adv, 0.2).item() == pytest.approx(-(1.2 - 0.8) / 2)
    values, old_values, targets = torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([1.5])
    # unclipped (2-1.5)^2 = 0.25; clipped to 1.2: (1.2-1.5)^2 = 0.09; max -> 0.25, x0.5
    assert clipped_value_loss(values, old_values, targets, 0.2).item() == pytest.approx(0.125)


def test_demonstrations_decay_as_lg_over_u_and_stop_below_the_minimum() -> None:
    cfg = LRSConfig(demos_first=512, demos_min=100)
    assert [cfg.demos_for_update(u) for u in (1, 2, 3, 5, 6)] == [512, 256, 170, 102, 0]
    assert LRSConfig(use_demos=False).demos_for_update(1) == 0


def _random_states(rng: np.random.Generator, n: int, masked: int = 0):
    corr = rng.normal(size=(n, 3, 5)).astype(np.float32)
    emb = rng.normal(size=(n, 384)).astype(np.float32)
    mask = np.ones((n, 3), np.float32)
    mask[:masked, [0, 2]] = 0
    return corr, emb, mask


@pytest.mark.parametrize("encoder", [True, False])
def test_onnx_export_equals_pytorch_and_masks_actions(encoder: bool) -> None:
    lrs = LRS(LRSConfig(use_encoder=encoder), agents=3)
    onnx = lrs.export_onnx()
    session = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
    corr, emb, mask = _random_states(np.random.default_rng(1), 32, masked=8)
    # Real states too: built by the edge's own code from a real embedding-like vector.
    f = np.random.default_rng(2).normal(size=384).astype(np.float32)
    real = build_state(f / np.linalg.norm(f), [], 5)
    corr = np.concatenate([corr, real.correlation[None]])
    emb = np.concatenate([emb, real.embedding[None]])
    mask = np.concatenate([mask, real.action_mask[None].astype(np.float32)])
    (probs,) = session.run(["probs"], {"correlation": corr, "embedding": emb,
                                       "action_mask": mask})
    with torch.no_grad():
        expected = lrs.actor(torch.as_tensor(corr), torch.as_tensor(emb),
                             torch.as_tensor(mask)).numpy()
    assert np.abs(probs - expected).max() <= 1e-5
    assert np.all(probs[:8, [0, 2]] == 0.0) and np.all(probs[-1, [0, 2]] == 0.0)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    # The edge loads it as it loads any published policy (contract + probe).
    policy = OnnxPolicy(onnx, 1, "lrs", top_p=5, embed_dim=384)
    assert policy.decide(real).action.letter == "B"  # only B is valid on an empty cache


def _bandit(reward_action: int | None, demo_action: int | None) -> tuple[np.ndarray, float]:
    """Eight updates on 64 steps x 2 agents of random states: reward 1 for `reward_action`
    (none: every reward 0), demonstrations of `demo_action` (none: no demonstrations). The
    greedy policy's share of each action afterwards, and the last update's demo count."""
    rng = np.random.default_rng(0)
    lrs = LRS(LRSConfig(use_encoder=False, demos_first=512, demos_min=16, epochs=4, seed=0),
              agents=2)
    corr, emb, mask = _random_states(rng, 64 * 2)
    corr, emb, mask = corr.reshape(64, 2, 3, 5), emb.reshape(64, 2, 384), mask.reshape(64, 2, 3)
    demos = None if demo_action is None else Demos(
        corr.reshape(-1, 3, 5), emb.reshape(-1, 384), mask.reshape(-1, 3),
        np.full(128, demo_action))
    for _ in range(8):
        actions, logp = lrs.act(corr.reshape(-1, 3, 5), emb.reshape(-1, 384),
                                mask.reshape(-1, 3))
        actions, logp = actions.reshape(64, 2), logp.reshape(64, 2)
        rewards = np.zeros((64, 2), np.float32) if reward_action is None else \
            (actions == reward_action).astype(np.float32)
        stats = lrs.update(Rollout(corr, emb, mask, actions, logp, rewards,
                                   np.ones(64, np.float32), corr[0], emb[0]), demos)
    greedy, _ = lrs.act(corr.reshape(-1, 3, 5), emb.reshape(-1, 384), mask.reshape(-1, 3),
                        greedy=True)
    return np.bincount(greedy, minlength=3) / greedy.size, stats["demos"]


def test_update_learns_a_rewarded_action() -> None:
    """The policy gradient alone (no demonstrations): reward 1 for B makes B the choice."""
    shares, demos = _bandit(reward_action=1, demo_action=None)
    assert demos == 0 and shares[1] > 0.9, shares


def test_demonstrations_teach_the_expert_action_without_any_reward() -> None:
    """Behaviour cloning alone: every reward 0, demonstrations of C. Only the BC term can make
    C the choice (without it, C was the greedy action in 29 % of states)."""
    shares, demos = _bandit(reward_action=None, demo_action=2)
    assert demos == 64  # 512 / 8 updates, still above demos_min
    assert shares[2] > 0.9, shares


def _threshold_expert(rng: np.random.Generator, n: int) -> Demos:
    """States with a random top similarity and cloud wait, labelled by the load-adaptive rule
    "reuse when the similarity beats 0.8 - 0.1 x wait, else forward". Embeddings of unit
    norm, as the embedder's are (raw normal noise in 384 dimensions is learnt by heart)."""
    corr, emb, mask = _random_states(rng, n)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    corr[:, 0, 0] = rng.uniform(0.3, 1.0, n)
    corr[:, 1:] = np.clip(corr[:, 1:], -1, 1)
    load = np.stack([rng.uniform(0.0, 5.0, n), rng.uniform(0.5, 8.0, n)], 1).astype(np.float32)
    reuse = corr[:, 0, 0] >= 0.8 - 0.1 * load[:, 0]
    return Demos(corr, emb, mask, np.where(reuse, 0, 1), load)


def test_warm_start_clones_a_load_adaptive_expert_on_states_it_has_not_seen() -> None:
    """The warm start alone (no PPO update): the actor agrees with the expert's rule on more
    than 4 in 5 fresh states (measured 0.86 after 50 epochs, 0.63 after 5; it reproduces the
    demonstrations themselves exactly); the same actor untrained agrees on 0.22."""
    rng = np.random.default_rng(3)
    demos, fresh = _threshold_expert(rng, 2048), _threshold_expert(rng, 512)
    cfg = LRSConfig(use_encoder=False, use_load=True, seed=0)

    def agreement(lrs: LRS) -> float:
        probs = lrs.probabilities(fresh.correlation, fresh.embedding, fresh.action_mask,
                                  fresh.load)
        return float((probs.argmax(-1) == fresh.actions).mean())

    cloned = LRS(cfg, agents=1)
    assert agreement(LRS(cfg, agents=1)) < 0.5
    assert cloned.warm_start(demos, epochs=50) > 0.9
    assert agreement(cloned) > 0.8


def test_an_actor_with_a_threshold_prior_decides_as_the_rule_before_any_training() -> None:
    """LRSConfig.prior: untrained, the exported policy (as an edge runs it) takes the tuned
    load-adaptive rule's action on states built by the edge's own code, across the rule's
    boundary in distance and in wait; without the prior the same actor agrees by chance."""
    from velo.core.policy import LoadAdaptivePolicy
    from velo.core.state import CachedRow

    rng = np.random.default_rng(4)
    rule = LoadAdaptivePolicy(0.6, 0.05)
    states = []
    for _ in range(400):
        f = rng.normal(size=384).astype(np.float32)
        row = CachedRow(1, 1, 1, "q", "a", 0, 0.0, 0.0, float(rng.uniform(0.2, 1.4)))
        states.append(build_state(f / np.linalg.norm(f), [row], 5,
                                  load=np.array([rng.uniform(0.0, 12.0), 1.0])))

    def agreement(prior: tuple[float, float] | None) -> float:
        cfg = LRSConfig(use_encoder=False, use_load=True, prior=prior, seed=0)
        policy = OnnxPolicy(LRS(cfg, agents=1).export_onnx(), 1, "lrs", top_p=5,
                            embed_dim=384, sample=False)
        return float(np.mean([policy.decide(s).action == rule.decide(s).action
                              for s in states]))

    reuses = np.mean([rule.decide(s).action.letter == "A" for s in states])
    assert 0.3 < reuses < 0.7  # both sides of the boundary are drawn
    assert agreement((rule.theta0, rule.k)) == 1.0
    assert agreement(None) < 0.7


def test_an_actor_that_does_not_read_the_load_gives_its_prior_no_wait_in_updates() -> None:
    """A prior on the paper's state (no `load` input) sees a wait of 0 when it acts and when
    it is exported, so an update must too, even when the rollout carries the load: the first
    minibatch of the first epoch then has ratio 1 exactly (approx KL 0)."""
    rng = np.random.default_rng(5)
    lrs = LRS(LRSConfig(use_encoder=False, prior=(0.6, 1.0), epochs=1, minibatches=1),
              agents=2)
    corr, emb, mask = _random_states(rng, 64 * 2)
    corr[:, 0, 0] = rng.uniform(0.3, 1.0, len(corr))
    actions, logp = lrs.act(corr, emb, mask)
    shape = (64, 2)
    load = np.stack([rng.uniform(2.0, 10.0, shape), np.ones(shape)], -1).astype(np.float32)
    stats = lrs.update(Rollout(corr.reshape(*shape, 3, 5), emb.reshape(*shape, 384),
                               mask.reshape(*shape, 3), actions.reshape(shape),
                               logp.reshape(shape), np.zeros(shape, np.float32),
                               np.ones(64, np.float32), corr[:2], emb[:2], load, load[0]))
    assert stats["approx_kl"] < 1e-6 and stats["clip_frac"] == 0.0, stats


@pytest.mark.parametrize("prior", [None, 0.6])
async def test_online_learner_waits_for_every_edge_then_publishes(tmp_path, prior) -> None:
    """A round runs once every edge sent l_min^m records. With `prior_theta0` the version it
    publishes starts from Cache-θ0: after the round it still reuses a near-exact match and
    forwards a far one (the network alone, untrained, does not)."""
    from trainerd.learner import LearnerConfig, OnlineLearner
    from trainerd.registry import PolicyRegistry
    from trainerd.store import ExperienceStore
    from velo.v1 import trainer_pb2

    rng = np.random.default_rng(0)
    store = ExperienceStore(tmp_path / "experience.db")
    registry = PolicyRegistry(tmp_path / "policies", max_bytes=64 * 1024 * 1024)

    def records(edge: str, first: int, count: int) -> list:
        out = []
        for seq in range(first, first + count):
            action = int(rng.integers(3))
            out.append(trainer_pb2.Experience(
                edge_id=edge, seq=seq, top_p=5, correlation=rng.random(15).tolist(),
                embedding=rng.normal(size=384).tolist(), action_mask=[True] * 3, action=action,
                action_probs=[1 / 3] * 3, delay_s=0.01 if action == 0 else 3.0,
                has_satisfaction=seq % 2 == 0, satisfaction=-0.5, shadow_verified=action == 0))
        return out

    # No gate here (holdback 0): this test is about when a round runs.
    learner = OnlineLearner(LearnerConfig(enabled=True, min_records=8, holdback=0.0,
                                          prior_theta0=prior), store, registry)
    store.add(records("edge-a", 1, 10) + records("edge-b", 1, 5))
    assert not await learner.round_if_ready()  # edge-b has only 5 < l_min^m new records
    store.add(records("edge-b", 6, 5))
    assert await learner.round_if_ready()
    info = registry.latest()
    assert info.version == 1 and info.name == "lrs-r1"
    _, onnx = registry.get(1)
    policy = OnnxPolicy(onnx, 1, info.name, top_p=5, embed_dim=384)
    assert policy.probabilities(np.zeros((1, 3, 5), np.float32), np.zeros((1, 384), np.float32),
                                np.ones((1, 3), np.float32)).shape == (1, 3)
    if prior is not None:  # c^s 0.95 is J 0.1 (reuse under 0.6), c^s 0.2 is J 1.6 (forward)
        corr = np.zeros((16, 3, 5), np.float32)
        corr[:, 0, 0] = np.repeat([0.95, 0.2], 8)
        emb = rng.normal(size=(16, 384)).astype(np.float32)
        picked = policy.probabilities(corr, emb, np.ones((16, 3), np.float32)).argmax(-1)
        assert picked.tolist() == [0] * 8 + [1] * 8
    assert not await learner.round_if_ready()  # the same records are never used twice
    store.close()


@pytest.mark.parametrize("current", [0, 1])
async def test_the_gate_publishes_only_a_version_that_beats_the_current_one(
        tmp_path, current: int) -> None:
    """Logged experience where A (reuse) earns -0.001 and B -1.3, under a uniform policy. The
    version last published always picks A (the best possible) or always B (the worst): a
    fresh update, still near uniform, is held back against the first and published over the
    second."""
    import copy

    from trainerd.learner import LearnerConfig, OnlineLearner
    from trainerd.registry import PolicyRegistry
    from trainerd.store import ExperienceStore
    from velo.v1 import trainer_pb2

    rng = np.random.default_rng(0)
    store = ExperienceStore(tmp_path / "experience.db")
    registry = PolicyRegistry(tmp_path / "policies", max_bytes=64 * 1024 * 1024)
    store.add([trainer_pb2.Experience(
        edge_id=edge, seq=seq, top_p=5, correlation=rng.random(15).tolist(),
        embedding=rng.normal(size=384).tolist(), action_mask=[True] * 3, action=seq % 2,
        action_probs=[1 / 3] * 3, delay_s=0.01 if seq % 2 == 0 else 3.0,
        has_satisfaction=True, satisfaction=0.0 if seq % 2 == 0 else -1.0)
        for edge in ("edge-a", "edge-b") for seq in range(1, 65)])
    learner = OnlineLearner(LearnerConfig(enabled=True, min_records=64, use_encoder=False,
                                          use_demos=False), store, registry)
    learner.lrs = LRS(LRSConfig(use_encoder=False, use_demos=False), agents=2)
    always = copy.deepcopy(learner.lrs.actor)
    with torch.no_grad():
        always.mlp[-1].weight.zero_()
        always.mlp[-1].bias.copy_(torch.tensor([-20.0, -20.0, -20.0]).index_fill_(
            0, torch.tensor([current]), 20.0))
    learner.published = always
    assert await learner.round_if_ready()
    if current == 0:
        assert registry.latest() is None and learner.held_back == 1
    else:
        assert registry.latest().version == 1 and learner.held_back == 0
    store.close()


def test_greedy_llm_reuses_only_when_the_cached_value_beats_asking_the_llm() -> None:
    from velo.core.policy import baseline_from_name
    from velo.core.qos import Action
    from velo.core.state import CachedRow

    policy = baseline_from_name("greedy-llm")
    f = np.ones(384, np.float32) / np.sqrt(384)
    state = build_state(f, [CachedRow(1, 1, 1, "q", "a", 3, -0.5, 0.0, 0.2)], 5)
    assert policy.decide(state).action is Action.FORWARD  # no estimate of B yet
    policy.observe(Action.FORWARD, q=-0.6, d=3.0)  # B was worth -3.6
    assert policy.decide(state).action is Action.REUSE  # the row's value -0.5 beats it
    policy.observe(Action.FORWARD, q=0.0, d=0.0)  # B gets better: estimate -3.24
    worse = build_state(f, [CachedRow(1, 1, 1, "q", "a", 3, -4.0, 0.0, 0.2)], 5)
    assert policy.decide(worse).action is Action.FORWARD


def test_onnx_equals_pytorch_on_states_built_from_real_embeddings(exported_embedder) -> None:
    from velo.core.state import CachedRow
    from velo.edge.embedder import Embedder

    texts = ["How do I bake bread?", "What is the way to make bread at home?",
             "Who won the 2010 world cup?", "Explain transformers in machine learning."]
    vectors = Embedder(exported_embedder).embed(texts)
    states = []
    for i, f in enumerate(vectors):
        rows = [CachedRow(j, j, 1 + j % 2, texts[j], "a", j, -0.3 * j, 0.0,
                          float(np.linalg.norm(f - vectors[j]))) for j in range(4) if j != i]
        states.append(build_state(f, rows, 5))
    lrs = LRS(LRSConfig(), agents=3)
    session = ort.InferenceSession(lrs.export_onnx(), providers=["CPUExecutionProvider"])
    corr = np.stack([s.correlation for s in states])
    emb = np.stack([s.embedding for s in states])
    mask = np.stack([s.action_mask for s in states]).astype(np.float32)
    (probs,) = session.run(["probs"], {"correlation": corr, "embedding": emb, "action_mask": mask})
    with torch.no_grad():
        expected = lrs.actor(torch.as_tensor(corr), torch.as_tensor(emb),
                             torch.as_tensor(mask)).numpy()
    assert np.abs(probs - expected).max() <= 1e-5
