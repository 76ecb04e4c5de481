"""Algorithm 1 inside trainerd: learn from the edges' experience streams and publish policies.

Each round waits until every known edge has sent at least l_min^m new records (line 7), builds
one joint rollout from them, runs one LRS update (lines 8-21), exports the actor to ONNX and
publishes it (line 23); the registry's watch stream pushes it to every edge.

From production experience to a MAPPO rollout:
- Agents: the edges. Edges do not act in lock-step, so the t-th new record of every edge forms
  joint step t (the global state of eq. 9 is the edges' t-th local states).
- Reward r = phi1*q - phi2*d. Where q was not measured (no reference, not shadow-verified), the
  mean measured q of the same edge and action stands in; a round without any measured q for an
  action uses `satisfaction_prior`.
- Behaviour log-probabilities come from the action probabilities the edge logged (a baseline's
  one-hot gives log 1 = 0; PPO's clipped ratio keeps that first step small).
- Expert demonstrations: shadow-verified reuses tell, in hindsight, whether reuse beat asking
  the LLM (q_A - w d_A versus the fresh answer's 0 - w d_B, with d_B the mean cloud delay seen).
- The gate: the last `holdback` share of each round's steps is not trained on. The new actor
  is scored on them off-policy (self-normalised importance sampling with the probabilities the
  edges logged) against the version last published (the edges' own policy before the first),
  and published only if it scores at least as well: an update that made things worse never
  reaches the edges, and the next round trains on.
- `use_load`: the load-aware state (velo.core.load); each record carries the load its edge saw.
"""

from __future__ import annotations

import asyncio
import copy
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from trainerd.registry import PolicyRegistry
from trainerd.store import ExperienceStore
from velo.core import qos
from velo.runtime.logs import get_logger
from velo.v1 import trainer_pb2

if TYPE_CHECKING:  # velo.learning needs torch: imported where a round trains
    from velo.learning.lrs import LRS, Actor

log = get_logger("trainerd.learner")


@dataclass
class LearnerConfig:
    enabled: bool = False  # train and publish policies from the experience streams
    min_records: int = 256  # l_min^m: new records every edge must have sent before a round
    max_records: int = 2048  # at most this many new records per edge and round
    edges: list[str] | None = None  # the agents; None: every edge that has reported
    phi1: float = 1.0  # reward weights, as on the edges
    phi2: float = 0.1  # w of the reward q - w * d
    satisfaction_prior: float = -0.6  # q used when no q was measured at all
    check_every_s: float = 5.0  # how often to look for enough new experience
    use_encoder: bool = True  # LRS's Transformer request encoder T[.] (false: one linear layer)
    use_demos: bool = True  # demonstrations from shadow verification in the first updates
    use_load: bool = False  # train load-aware policies (edges' records carry the load)
    holdback: float = 0.25  # share of a round's steps kept back to gate the new version
    # theta0 of a load-adaptive threshold (reuse when J_min <= theta0 + k * cloud wait) that
    # policies start from: the network learns corrections to it (LRSConfig.prior). Unset: the
    # paper's actor. Tune theta0 and k as `velo experiment load` does; it reads c^s, so not
    # for edges on the verified state.
    prior_theta0: float | None = None
    prior_slope: float = 0.0  # k of that threshold, per second of the cloud's wait
    seed: int = 0  # of the learner's initial weights and minibatches


class OnlineLearner:
    def __init__(self, cfg: LearnerConfig, store: ExperienceStore,
                 registry: PolicyRegistry) -> None:
        self.cfg, self.store, self.registry = cfg, store, registry
        self.weights = qos.QosWeights(cfg.phi1, cfg.phi2)  # the edges' reward (eq. 11)
        self.cursor: dict[str, int] = {}  # edge -> last seq used for training
        self.lrs: LRS | None = None  # created at the first round, once P and H are known
        self.published: Actor | None = None  # a copy of the actor last published (the gate's bar)
        self.rounds = 0
        self.held_back = 0  # rounds whose version the gate did not publish

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.check_every_s)
            try:
                await self.round_if_ready()
            except Exception as exc:  # a bad round must not stop the trainer
                log.exception("training round failed", error=str(exc))

    async def round_if_ready(self) -> bool:
        """Algorithm 1, line 7: train only when every edge has l_min^m new records."""
        batches = await asyncio.to_thread(self._new_records)
        if batches is None:
            return False
        onnx = await asyncio.to_thread(self._train, batches)
        if onnx is None:
            return True
        published = await self.registry.publish(f"lrs-r{self.rounds}", onnx)
        log.info("policy trained and published", version=published.version,
                 edges=len(batches), records=sum(len(b) for b in batches.values()))
        return True

    def _new_records(self) -> dict[str, list[trainer_pb2.Experience]] | None:
        edges = self.cfg.edges or sorted(self.store.edges())
        if not edges:
            return None
        batches = {e: self.store.read(e, self.cursor.get(e, 0), self.cfg.max_records)
                   for e in edges}
        if min(len(b) for b in batches.values()) < self.cfg.min_records:
            return None
        return batches

    def _train(self, batches: dict[str, list[trainer_pb2.Experience]]) -> bytes | None:
        """One round: an update on the first steps, the gate on the rest; the ONNX policy to
        publish, or None when the gate held it back."""
        from velo.core.load import LOAD_FEATURES
        from velo.learning.lrs import LRS, Demos, LRSConfig, Rollout

        edges = sorted(batches)
        steps = min(len(b) for b in batches.values())
        first = batches[edges[0]][0]
        top_p, embed_dim = first.top_p, len(first.embedding)
        if self.lrs is None:
            self.lrs = LRS(LRSConfig(top_p=top_p, embed_dim=embed_dim,
                                     use_encoder=self.cfg.use_encoder,
                                     use_demos=self.cfg.use_demos,
                                     use_load=self.cfg.use_load, seed=self.cfg.seed,
                                     prior=None if self.cfg.prior_theta0 is None
                                     else (self.cfg.prior_theta0, self.cfg.prior_slope)),
                           agents=len(edges))
        records = [batches[e][:steps] for e in edges]  # [N][T]
        width = len(LOAD_FEATURES)  # records of edges older than the load report: zeros
        load = np.array([[list(r.load) if len(r.load) == width else [0.0] * width for r in b]
                         for b in records], np.float32).transpose(1, 0, 2)
        q_mean = self._mean_satisfaction(records)
        cloud_d = np.mean([r.delay_s for b in records for r in b if r.action != 0] or [1.0])
        corr = np.array([[np.reshape(r.correlation, (3, top_p)) for r in b] for b in records],
                        np.float32).transpose(1, 0, 2, 3)
        emb = np.array([[r.embedding for r in b] for b in records], np.float32).transpose(1, 0, 2)
        mask = np.array([[r.action_mask for r in b] for b in records],
                        np.float32).transpose(1, 0, 2)
        actions = np.array([[r.action for r in b] for b in records]).T
        logp = np.array([[np.log(max(r.action_probs[r.action], 1e-6)) if r.action_probs else 0.0
                          for r in b] for b in records], np.float32).T
        rewards = np.array([[qos.reward(r.satisfaction if r.has_satisfaction
                                        else q_mean[(r.edge_id, r.action)], r.delay_s,
                                        self.weights)
                             for r in b] for b in records], np.float32).T
        held = max(1, int(steps * self.cfg.holdback)) if self.cfg.holdback > 0 else 0
        if steps - held < 2:  # too few to both train and gate: train, publish ungated
            held = 0
        t = steps - held  # steps trained on; [t, steps) gate the new version
        rollout = Rollout(corr[: t - 1], emb[: t - 1], mask[: t - 1], actions[: t - 1],
                          logp[: t - 1], rewards[: t - 1], np.zeros(t - 1, np.float32),
                          corr[t - 1], emb[t - 1], load[: t - 1], load[t - 1])
        demos = self._demos(records, top_p, cloud_d)
        stats = self.lrs.update(rollout, Demos(*demos) if demos else None)
        for e in edges:
            self.cursor[e] = batches[e][steps - 1].seq
        self.rounds += 1
        log.info("lrs update", round=self.rounds, steps=t - 1, **stats)
        if held:
            flat = [x[t:].reshape(held * len(edges), *x.shape[2:])
                    for x in (corr, emb, mask, load, actions, logp, rewards)]
            new = self._score(*flat, actor=self.lrs.actor)
            old = (float(flat[-1].mean()) if self.published is None  # the edges' own policy
                   else self._score(*flat, actor=self.published))
            if new < old:
                self.held_back += 1
                log.warning("new version held back: it scored below the current one on "
                            "held-back experience", round=self.rounds, new=round(new, 4),
                            current=round(old, 4))
                return None
            log.info("gate passed", round=self.rounds, new=round(new, 4), current=round(old, 4))
        self.published = copy.deepcopy(self.lrs.actor)
        return self.lrs.export_onnx()

    def _score(self, corr: np.ndarray, emb: np.ndarray, mask: np.ndarray, load: np.ndarray,
               actions: np.ndarray, logp: np.ndarray, rewards: np.ndarray, *,
               actor: Actor) -> float:
        """`actor`'s mean reward on logged steps, estimated off-policy (self-normalised
        importance sampling: weights pi(a|s) / mu(a|s), mu the probabilities logged)."""
        assert self.lrs is not None  # only _train scores, once it has made self.lrs
        probs = self.lrs.probabilities(corr, emb, mask, load, actor=actor)
        weights = probs[np.arange(len(actions)), actions] / np.exp(logp)
        return float((weights * rewards).sum() / max(weights.sum(), 1e-9))

    def _mean_satisfaction(self, records: list[list[trainer_pb2.Experience]],
                           ) -> dict[tuple[str, int], float]:
        sums: dict[tuple[str, int], list[float]] = defaultdict(list)
        for b in records:
            for r in b:
                if r.has_satisfaction:
                    sums[(r.edge_id, r.action)].append(r.satisfaction)
        measured = [q for qs in sums.values() for q in qs]
        fallback = float(np.mean(measured)) if measured else self.cfg.satisfaction_prior
        return defaultdict(lambda: fallback, {k: float(np.mean(v)) for k, v in sums.items()})

    def _demos(self, records: list[list[trainer_pb2.Experience]], top_p: int,
               cloud_d: float | np.floating[Any],
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """Hindsight-best A-or-B for shadow-verified reuses (the production expert)."""
        picks = [r for b in records for r in b if r.shadow_verified and r.action == 0]
        if not picks:
            return None
        # A beat B when its measured reward beats that of the fresh answer (q = 0, taken as
        # the reference) after the mean cloud delay.
        best = [0 if qos.reward(r.satisfaction, r.delay_s, self.weights)
                > qos.reward(0.0, float(cloud_d), self.weights) else 1 for r in picks]
        return (np.array([np.reshape(r.correlation, (3, top_p)) for r in picks], np.float32),
                np.array([r.embedding for r in picks], np.float32),
                np.array([r.action_mask for r in picks], np.float32), np.array(best))
