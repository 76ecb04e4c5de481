"""Offline training and evaluation on the simulator (`velo train`): Algorithm 1 on simulated
multi-edge experience, then every policy on the same request stream.

    MAPPO, G-MAPPO, T-MAPPO and LRS are trained here; the baselines need no training; the
    Oracle takes the hindsight-best action of each step (not deployable; myopic, so not a
    bound over an episode in all-edges mode or on a loaded cloud).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from lab.sim import ORACLE, Oracle, SimEnv, StepResult
from velo.core.policy import OnnxPolicy, Policy, baseline_from_name
from velo.core.qos import Action
from velo.learning.lrs import LRS, Demos, LRSConfig, Rollout

# A checkpoint replaces the one the gate keeps only when its gain over it, request by request
# on the gate's stream (the same requests for both), is this many standard errors above 0
# (one-sided, 95 %): the highest of ten noisy scores is mostly the luckiest, and a lucky
# checkpoint replacing the tuned rule cost up to 0.09 normalised reward on the test stream.
GATE_Z = 1.645

LEARNED = {  # name -> (use_encoder, use_demos)
    "mappo": (False, False),
    "g-mappo": (False, True),
    "t-mappo": (True, False),
    "lrs": (True, True),
}


@dataclass
class Metrics:
    """Per policy: the measures of SPEC §5, over every served request."""

    rewards: list[float] = field(default_factory=list)
    q: list[float] = field(default_factory=list)
    d: list[float] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)
    false_hits: int = 0
    reusable: int = 0  # requests where A would have served the right answer
    cloud: tuple[float, float] = (0.0, 0.0)  # SimEnv.cloud_load(): requests per arrival, util.

    def add(self, result: StepResult) -> None:
        edges = [result.served] if result.served >= 0 else range(len(result.outcomes))
        for n in edges:
            o = result.outcomes[n]
            self.rewards.append(o.r)
            self.q.append(o.q)
            self.d.append(o.d)
            self.actions.append(result.actions[n])
            self.false_hits += result.false_hits[n]
            self.reusable += result.reusable[n]

    def summary(self) -> dict[str, float]:
        """Reward, q, d, LLM direct-request frequency, hit rate, false-hit rate (SPEC §5), and
        the precision and recall of A (recall: right reuses over the requests where the
        selected cached row answered the question), the share of requests sent to the LLM, and
        what the cloud carried (every edge's requests per arrival, and its utilisation)."""
        count = len(self.actions)
        reuses = sum(a is Action.REUSE for a in self.actions)
        right = reuses - self.false_hits
        return {
            "reward": float(np.mean(self.rewards)), "q": float(np.mean(self.q)),
            "d": float(np.mean(self.d)),
            "llm_freq": sum(a is Action.FORWARD for a in self.actions) / count,
            "hit_rate": reuses / count,
            "false_hit_rate": self.false_hits / reuses if reuses else 0.0,
            "precision": right / reuses if reuses else 1.0,
            "recall": right / self.reusable if self.reusable else 1.0,
            "cloud_calls": 1.0 - reuses / count,
            "cloud_per_arrival": self.cloud[0], "cloud_util": self.cloud[1],
        }


def collect_demos(env: SimEnv, count: int, seed: int, expert: Policy | None = None) -> Demos:
    """E_g: states visited by the Oracle with its hindsight-best actions, or by `expert` with
    its actions."""
    states, actions = env.reset(seed), list[int]()
    corr, emb, mask, load = [], [], [], []
    while len(actions) < count:
        chosen = env.best_actions() if expert is None else [expert.decide(s).action
                                                             for s in states]
        _, next_states = env.step(chosen)
        for state, best in zip(states, chosen, strict=True):
            corr.append(state.correlation)
            emb.append(state.embedding)
            mask.append(state.action_mask.astype(np.float32))
            load.append(state.load)
            actions.append(int(best))
        states = next_states
    return Demos(np.stack(corr), np.stack(emb), np.stack(mask), np.array(actions),
                 np.stack(load))


def train(env: SimEnv, cfg: LRSConfig, updates: int, rollout_steps: int,
          demos: Demos | None, episode_steps: int, log: Callable[[str], None] = print,
          curve: list[dict[str, float]] | None = None,
          gate: Callable[[LRS], np.ndarray] | None = None, gate_every: int = 10) -> LRS:
    """Algorithm 1 on simulated experience: rollouts of `rollout_steps` steps, one update each.

    Episodes of `episode_steps` start from empty caches, as evaluation does, so the policy
    also learns the cold start (when most near matches answer another question). `curve`,
    when given, receives each rollout's measures and the update's diagnostics (CleanRL's:
    approx KL, clip fraction, explained variance, entropy, action shares).

    `gate`: the policy's reward on each request of one held-back stream of training requests
    (never the test stream; the same requests on every call), every `gate_every` updates and
    at the end. The actor returned is the one the gate kept: a checkpoint replaces it only
    when it beats it by GATE_Z standard errors (`beats`), as trainerd publishes a version only
    when it beats the current one. PPO on a noisy reward can drift below where it was; the
    gate keeps what it had.
    """
    lrs = LRS(cfg, agents=env.cfg.edges)
    best: tuple[np.ndarray, int, dict] | None = None  # (gate rewards, update, actor weights)
    episode = 0
    if demos is not None and cfg.warm_start_epochs:
        agree = lrs.warm_start(demos, cfg.warm_start_epochs)
        log(f"  warm start: {cfg.warm_start_epochs} epochs of behaviour cloning, "
            f"{agree:.0%} of the expert's actions")
    starts_from_expert = cfg.prior is not None or (demos is not None
                                                   and cfg.warm_start_epochs > 0)
    if gate is not None and starts_from_expert:
        # What PPO starts from (the rule of the prior, or the cloned expert) is a candidate
        # like any checkpoint: a later one replaces it only by beating it beyond noise.
        best = (gate(lrs), 0, copy.deepcopy(lrs.actor.state_dict()))
        log(f"  gate before the first update: {best[0].mean():+.3f}")
    states, in_episode = env.reset(cfg.seed), 0
    for u in range(1, updates + 1):
        buf: dict[str, list] = {k: [] for k in ("corr", "emb", "mask", "load", "act", "logp",
                                                "rew")}
        dones = np.zeros(rollout_steps, np.float32)
        measured = Metrics()
        for t in range(rollout_steps):
            corr = np.stack([s.correlation for s in states])
            emb = np.stack([s.embedding for s in states])
            mask = np.stack([s.action_mask for s in states]).astype(np.float32)
            load = np.stack([s.load for s in states])
            actions, logp = lrs.act(corr, emb, mask, load=load)
            result, states = env.step([Action(int(a)) for a in actions])
            measured.add(result)
            for key, value in zip(buf, (corr, emb, mask, load, actions, logp,
                                        result.rewards), strict=True):
                buf[key].append(np.asarray(value))
            in_episode += 1
            if in_episode == episode_steps:
                episode += 1
                dones[t], in_episode = 1.0, 0
                states = env.reset(cfg.seed + episode)
        rollout = Rollout(
            np.stack(buf["corr"]), np.stack(buf["emb"]), np.stack(buf["mask"]),
            np.stack(buf["act"]), np.stack(buf["logp"]).astype(np.float32),
            np.stack(buf["rew"]).astype(np.float32), dones,
            np.stack([s.correlation for s in states]), np.stack([s.embedding for s in states]),
            np.stack(buf["load"]), np.stack([s.load for s in states]))
        stats = lrs.update(rollout, demos)
        if curve is not None:
            curve.append({**measured.summary(), "update": u, **stats})
        log(f"  update {u}/{updates}: mean reward {rollout.rewards.mean():+.3f}, "
            f"demos {int(stats['demos'])}, entropy {stats['entropy']:.3f}, "
            f"approx KL {stats['approx_kl']:.4f}, clip frac {stats['clip_frac']:.2f}, "
            f"explained var {stats['explained_var']:+.2f}, actions A/B/C "
            f"{stats['share_A']:.0%}/{stats['share_B']:.0%}/{stats['share_C']:.0%}")
        if gate is not None and (u % gate_every == 0 or u == updates):
            rewards = gate(lrs)
            if best is None or beats(rewards, best[0]):
                best = (rewards, u, copy.deepcopy(lrs.actor.state_dict()))
            log(f"  gate after update {u}: {rewards.mean():+.3f} (kept: update {best[1]}, "
                f"{best[0].mean():+.3f})")
            episode += 1  # the gate ran the simulator: start a fresh episode
            states, in_episode = env.reset(cfg.seed + episode), 0
    if best is not None:
        lrs.actor.load_state_dict(best[2])
    return lrs


def beats(new: np.ndarray, kept: np.ndarray) -> bool:
    """Whether rewards `new` beat `kept` on the same requests: their mean difference is more
    than GATE_Z standard errors above 0."""
    gain = np.asarray(new, np.float64) - np.asarray(kept, np.float64)
    if len(gain) < 2:
        return bool(gain.sum() > 0)
    return bool(gain.mean() > GATE_Z * gain.std(ddof=1) / np.sqrt(len(gain)))


def evaluate(env: SimEnv, policy: Policy | Oracle, steps: int, seed: int,
             split: str = "test") -> dict[str, float]:
    """Run one policy on a fresh cache and the request stream of `seed` ("train": the training
    questions, for tuning a baseline without seeing the test stream)."""
    return play(env, policy, steps, seed, split).summary()


def play(env: SimEnv, policy: Policy | Oracle, steps: int, seed: int,
         split: str = "test") -> Metrics:
    """evaluate's run, every served request's measures kept."""
    metrics = Metrics()
    states = env.reset(seed, split=split)
    for _ in range(steps):
        if isinstance(policy, Oracle):
            result, states = env.step(env.best_actions())
        else:
            result, states = env.step([policy.decide(s).action for s in states])
            for a, o in zip(result.actions, result.outcomes, strict=True):
                policy.observe(a, o.q, o.d)
        metrics.add(result)
    metrics.cloud = env.cloud_load()
    return metrics


def run(env: SimEnv, *, policies: list[str], lrs_cfg: LRSConfig, updates: int,
        rollout_steps: int, eval_steps: int, demos_count: int, seed: int,
        log: Callable[[str], None] = print) -> dict[str, dict[str, float]]:
    """Train the learned policies, evaluate everything, normalise reward (Random 0, Oracle 1)."""
    results: dict[str, dict[str, float]] = {}
    demos = None
    if any(LEARNED.get(p, (False, False))[1] for p in policies):
        demos = collect_demos(env, demos_count, seed + 1)
    for name in policies:
        started = time.monotonic()
        if name in LEARNED:
            encoder, use_demos = LEARNED[name]
            cfg = replace(lrs_cfg, use_encoder=encoder, use_demos=use_demos)
            log(f"training {name} ({updates} updates x {rollout_steps} steps x "
                f"{env.cfg.edges} edges)")
            lrs = train(env, cfg, updates, rollout_steps, demos if use_demos else None,
                        eval_steps, log)
            # Evaluated greedy (argmax), as MAPPO evaluates: an edge runs it so with
            # `policy.sample = false` (sampling keeps exploring, which online learning needs).
            policy: Policy | Oracle = OnnxPolicy(lrs.export_onnx(), 1, name, top_p=cfg.top_p,
                                              embed_dim=cfg.embed_dim, sample=False)
        elif name == "oracle":
            policy = ORACLE
        else:
            policy = baseline_from_name(name, seed)
        results[name] = evaluate(env, policy, eval_steps, seed + 1000)
        results[name]["seconds"] = time.monotonic() - started
        log(f"{name}: reward {results[name]['reward']:+.3f} ({results[name]['seconds']:.0f} s)")
    if "random" in results and "oracle" in results:
        low, high = results["random"]["reward"], results["oracle"]["reward"]
        for r in results.values():
            r["normalized"] = (r["reward"] - low) / (high - low) if high != low else float("nan")
    return results


def table(results: dict[str, dict[str, float]]) -> str:
    lines = ["| policy | reward | q | d (s) | LLM freq | hit rate | false-hit rate | normalised |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['reward']:+.3f} | {r['q']:.3f} | {r['d']:.3f} "
                     f"| {r['llm_freq']:.0%} | {r['hit_rate']:.0%} | {r['false_hit_rate']:.0%} "
                     f"| {r.get('normalized', float('nan')):.2f} |")
    return "\n".join(lines)
