"""LRS: MAPPO with a Transformer request encoder and expert demonstrations (paper §III).

The algorithm in one file, CleanRL style. Canonical MAPPO details (marlbenchmark/on-policy):
one actor shared by all agents, a centralised critic on the global state (eq. 9) plus the
agent's id, GAE, PPO-clip, value normalisation, advantage normalisation, orthogonal init,
action masking and a clipped value loss. Expert demonstrations (Algorithm 1) add a
behaviour-cloning term on l_g / u demonstrations per update u, stopping below l_min^g.

Variants (paper §IV-B): MAPPO (neither), G-MAPPO (demos), T-MAPPO (encoder), LRS (both).
Without the encoder the request embedding f reaches the policy through one linear layer.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical

from velo.core.load import LOAD_FEATURES
from velo.core.policy import LoadAdaptivePolicy

MASKED_LOGIT = -1e9  # a masked action's logit: softmax gives it exactly 0, and no inf - inf


@dataclass
class LRSConfig:
    top_p: int = 5  # P: rows of the correlation matrix c (eq. 6)
    embed_dim: int = 384  # H: dimension of the request embedding f
    use_encoder: bool = True  # T[.] of eq. 7 (T-MAPPO, LRS); else one linear layer
    use_demos: bool = True  # expert demonstrations in updates (G-MAPPO, LRS)
    # The load-aware state (velo.core.load): the cloud's estimated wait and the edge's recent
    # forward latency join s_n; the exported policy gets a `load` input. False: the paper's.
    use_load: bool = False
    patches: int = 12  # C: f is split into C patches of H/C values
    # z layers of width encoder_dim: measured on the dev data (20 updates, 2 seeds), 1 x 32
    # trains 2x faster than 2 x 64 at the same reward (-0.932/-0.974 vs -0.937/-0.949).
    encoder_layers: int = 1  # z: Transformer encoder layers
    encoder_heads: int = 4  # attention heads per layer
    encoder_dim: int = 32  # model width inside the encoder
    feature_dim: int = 32  # |f'|: request features after the final linear layer (eq. 7)
    hidden: int = 64  # width of the actor and critic MLPs
    lr_actor: float = 3e-4  # paper IV-B
    lr_critic: float = 1e-3  # paper IV-B
    gamma: float = 0.99  # discount (eq. 12)
    gae_lambda: float = 0.95  # lambda of GAE (eq. 14)
    clip: float = 0.2  # epsilon of PPO-clip (eq. 18)
    value_clip: float = 0.2  # clip of the value loss around the old prediction
    value_coef: float = 0.5  # c1 of eq. 17
    entropy_coef: float = 0.01  # c2 of eq. 17
    # PPO epochs and minibatches per update; measured on the dev data: 10 x 4 reaches in 20
    # updates the reward that 5 x 2 had not reached in 20 (-0.83 vs -0.93, Oracle -0.74).
    epochs: int = 10
    minibatches: int = 4
    max_grad_norm: float = 10.0  # gradient clipping (on-policy default)
    reward_scale: float = 10.0  # rewards x10 for training (paper IV-C)
    bc_coef: float = 1.0  # weight of the behaviour-cloning loss on demonstrations
    demos_first: int = 512  # l_g: demonstrations mixed into the first update
    demos_min: int = 32  # l_min^g: below this many, demonstrations stop
    # Epochs of behaviour cloning on every demonstration before update 1, so PPO starts from
    # the expert instead of from chance (0: the paper's schedule alone). Not in the paper.
    warm_start_epochs: int = 0
    warm_start_lr: float = 1e-3  # its learning rate
    # (theta0, k) of a load-adaptive threshold (velo.core.policy.LoadAdaptivePolicy) the actor
    # starts from: its logits are the rule's plus what the network learns, so PPO searches
    # for corrections to a tuned rule instead of for the rule (residual policy learning,
    # Silver et al. 2018). Not in the paper; None: the paper's actor.
    prior: tuple[float, float] | None = None
    prior_sharpness: float = 20.0  # the prior's logit of A per unit of J below the threshold
    prior_augment: float = -3.0  # the prior's logit of C (B's is 0): C is explored, rarely
    seed: int = 0

    def demos_for_update(self, u: int) -> int:
        """Algorithm 1, line 8: l_g^u = l_g / u, and none once below l_min^g (u counts from 1)."""
        if not self.use_demos:
            return 0
        count = self.demos_first // max(u, 1)
        return count if count >= self.demos_min else 0


def orthogonal(layer: nn.Linear, gain: float = math.sqrt(2)) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


class RequestEncoder(nn.Module):
    """T[.] of eq. 7: patches of f + positional encoding -> z encoder layers -> mean -> linear."""

    def __init__(self, cfg: LRSConfig) -> None:
        super().__init__()
        if cfg.embed_dim % cfg.patches:
            raise ValueError(f"embed_dim {cfg.embed_dim} is not divisible by {cfg.patches} patches")
        self.patches, self.patch_size = cfg.patches, cfg.embed_dim // cfg.patches
        self.embed = orthogonal(nn.Linear(self.patch_size, cfg.encoder_dim), 1.0)
        position = torch.arange(cfg.patches).unsqueeze(1)
        freq = torch.exp(torch.arange(0, cfg.encoder_dim, 2)
                         * (-math.log(10000.0) / cfg.encoder_dim))
        pe = torch.zeros(cfg.patches, cfg.encoder_dim)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(position * freq), torch.cos(position * freq)
        self.register_buffer("positional", pe)
        layer = nn.TransformerEncoderLayer(cfg.encoder_dim, cfg.encoder_heads,
                                           dim_feedforward=2 * cfg.encoder_dim, dropout=0.0,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.encoder_layers, enable_nested_tensor=False)
        self.out = orthogonal(nn.Linear(cfg.encoder_dim, cfg.feature_dim))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        x = self.embed(f.reshape(-1, self.patches, self.patch_size)) + self.positional
        return torch.tanh(self.out(self.encoder(x).mean(dim=1)))


class LocalState(nn.Module):
    """s_n = {c, f'} (eq. 8): the flattened correlation matrix next to the request features,
    and with `use_load` what the edge sees of the cloud's load (velo.core.load)."""

    def __init__(self, cfg: LRSConfig) -> None:
        super().__init__()
        self.features = (RequestEncoder(cfg) if cfg.use_encoder
                         else nn.Sequential(orthogonal(nn.Linear(cfg.embed_dim, cfg.feature_dim)),
                                            nn.Tanh()))
        self.use_load = cfg.use_load
        self.dim = 3 * cfg.top_p + cfg.feature_dim + (len(LOAD_FEATURES) if cfg.use_load else 0)

    def forward(self, correlation: torch.Tensor, embedding: torch.Tensor,
                load: torch.Tensor | None = None) -> torch.Tensor:
        # c^s is in [0, 1] and c^k in {0 (padding), 1, 2}, but the cache value c^r = (q - d)
        # averages is unbounded below (a slow LLM answer costs seconds): squash it.
        similarity, kind, value = correlation.unbind(dim=1)
        c = torch.stack([similarity, kind - 1.0, torch.tanh(value)], dim=1)
        parts = [c.flatten(1), self.features(embedding)]
        if self.use_load:  # seconds, 0 .. minutes: log1p keeps a long queue in range
            assert load is not None  # LRS._load gives a load-aware learner one (zeros if none)
            parts.append(torch.log1p(load.clamp(min=0.0)))
        return torch.cat(parts, dim=1)


class ThresholdPrior(nn.Module):
    """The logits of a load-adaptive threshold: A when J_min <= theta0 + k * cloud wait, else B
    (velo.core.policy.LoadAdaptivePolicy), as a soft step the actor's network adds to."""

    def __init__(self, cfg: LRSConfig) -> None:
        super().__init__()
        assert cfg.prior is not None
        self.rule = LoadAdaptivePolicy(*cfg.prior)
        self.sharpness, self.augment = cfg.prior_sharpness, cfg.prior_augment

    def forward(self, correlation: torch.Tensor, load: torch.Tensor | None) -> torch.Tensor:
        # c^s of the nearest row is 1 - J/2 (velo.core.state.CachedRow.similarity); with no
        # row A and C are masked, so the padding's 0 never decides.
        j_min = 2.0 * (1.0 - correlation[:, 0, 0])
        wait = load[:, 0] if load is not None else torch.zeros_like(j_min)
        reuse = self.sharpness * (self.rule.threshold(wait) - j_min)
        return torch.stack([reuse, torch.zeros_like(reuse),
                            torch.full_like(reuse, self.augment)], dim=1)


class Actor(nn.Module):
    """pi_theta(a | s_n), shared by every agent; masked actions get probability 0. With a
    prior (LRSConfig.prior) the network's logits are added to the rule's."""

    def __init__(self, cfg: LRSConfig) -> None:
        super().__init__()
        self.state = LocalState(cfg)
        self.mlp = nn.Sequential(orthogonal(nn.Linear(self.state.dim, cfg.hidden)), nn.Tanh(),
                                 orthogonal(nn.Linear(cfg.hidden, cfg.hidden)), nn.Tanh(),
                                 orthogonal(nn.Linear(cfg.hidden, 3), 0.01))
        self.prior = ThresholdPrior(cfg) if cfg.prior is not None else None

    def logits(self, correlation: torch.Tensor, embedding: torch.Tensor,
               action_mask: torch.Tensor, load: torch.Tensor | None = None) -> torch.Tensor:
        return self.masked_logits(self.state(correlation, embedding, load), action_mask,
                                  self.prior_logits(correlation, load))

    def prior_logits(self, correlation: torch.Tensor,
                     load: torch.Tensor | None) -> torch.Tensor | None:
        return None if self.prior is None else self.prior(correlation, load)

    def masked_logits(self, local: torch.Tensor, action_mask: torch.Tensor,
                      prior: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.mlp(local) if prior is None else self.mlp(local) + prior
        return torch.where(action_mask > 0.5, logits, torch.full_like(logits, MASKED_LOGIT))

    def forward(self, correlation: torch.Tensor, embedding: torch.Tensor,
                action_mask: torch.Tensor, load: torch.Tensor | None = None) -> torch.Tensor:
        """The exported graph: probabilities of A, B, C (the contract in velo.core.state)."""
        return torch.softmax(self.logits(correlation, embedding, action_mask, load), dim=-1)


class Critic(nn.Module):
    """V(s, n): the global state (every agent's local state, eq. 9) plus the agent's one-hot.

    The local states are the actor's s_n = {c, f'} (its T[.] included), detached: the
    critic values the state the policy sees and does not run a second encoder, which
    would double the cost of an update on a small CPU.
    """

    def __init__(self, cfg: LRSConfig, agents: int, local_dim: int) -> None:
        super().__init__()
        self.agents = agents
        self.mlp = nn.Sequential(
            orthogonal(nn.Linear(agents * local_dim + agents, cfg.hidden)), nn.Tanh(),
            orthogonal(nn.Linear(cfg.hidden, cfg.hidden)), nn.Tanh(),
            orthogonal(nn.Linear(cfg.hidden, 1), 1.0))

    def forward(self, local: torch.Tensor) -> torch.Tensor:
        """local states [B, N, D] -> values [B, N]."""
        b, n = local.shape[:2]
        joint = local.detach().reshape(b, 1, -1).expand(b, n, -1)
        agent = torch.eye(n, device=local.device).expand(b, n, n)
        return cast(torch.Tensor, self.mlp(torch.cat([joint, agent], dim=-1))).squeeze(-1)


class ValueNorm:
    """Running mean/std of value targets (on-policy's ValueNorm); the critic predicts in
    normalised units, GAE works in real units."""

    def __init__(self, beta: float = 0.99999, eps: float = 1e-5) -> None:
        self.beta, self.eps = beta, eps
        self.mean = self.mean_sq = self.debias = 0.0

    def update(self, x: torch.Tensor) -> None:
        self.mean = self.beta * self.mean + (1 - self.beta) * float(x.mean())
        self.mean_sq = self.beta * self.mean_sq + (1 - self.beta) * float((x**2).mean())
        self.debias = self.beta * self.debias + (1 - self.beta)

    def _stats(self) -> tuple[float, float]:
        mean = self.mean / max(self.debias, self.eps)
        var = max(self.mean_sq / max(self.debias, self.eps) - mean**2, 1e-2)
        return mean, math.sqrt(var)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats()
        return (x - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats()
        return x * std + mean


def gae(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor,
        last_value: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 14: A(t) = sum_k (gamma*lambda)^k delta(t+k), delta(t) = r + gamma V(t+1) - V(t).

    rewards, values: [T, N]; dones[t] = 1 when the episode ended after step t; last_value:
    V of the state after step T-1. Returns (advantages, returns = advantages + values).
    """
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(last_value)
    for t in reversed(range(rewards.shape[0])):
        next_value = last_value if t == rewards.shape[0] - 1 else values[t + 1]
        live = 1.0 - dones[t].unsqueeze(-1) if dones.dim() == 1 else 1.0 - dones[t]
        delta = rewards[t] + gamma * next_value * live - values[t]
        running = delta + gamma * lam * live * running
        advantages[t] = running
    return advantages, advantages + values


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                        clip: float) -> torch.Tensor:
    """Eq. 18, as a loss to minimise: -E[min(psi A, clip(psi, 1-eps, 1+eps) A)]."""
    ratio = torch.exp(logp - old_logp)
    return -torch.min(ratio * advantages,
                      torch.clamp(ratio, 1 - clip, 1 + clip) * advantages).mean()


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, targets: torch.Tensor,
                       clip: float) -> torch.Tensor:
    """L_E of eq. 17 with MAPPO's clipping around the value predicted at rollout time."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * torch.max((values - targets) ** 2, (clipped - targets) ** 2).mean()


@dataclass
class Rollout:
    """T steps of N agents, as numpy arrays (what the environment or trainerd collected)."""

    correlation: np.ndarray  # [T, N, 3, P]
    embedding: np.ndarray  # [T, N, H]
    action_mask: np.ndarray  # [T, N, 3]
    actions: np.ndarray  # [T, N]
    logp: np.ndarray  # [T, N] log pi_old(a | s)
    rewards: np.ndarray  # [T, N] r = phi1 q - phi2 d (unscaled)
    dones: np.ndarray  # [T] 1 where an episode ended after the step
    last_correlation: np.ndarray  # [N, 3, P] state after the last step (for bootstrapping)
    last_embedding: np.ndarray  # [N, H]
    load: np.ndarray | None = None  # [T, N, 2] the load seen (velo.core.load); with use_load
    last_load: np.ndarray | None = None  # [N, 2]


@dataclass
class Demos:
    """Expert demonstrations E_g: local states and the expert's actions."""

    correlation: np.ndarray  # [M, 3, P]
    embedding: np.ndarray  # [M, H]
    action_mask: np.ndarray  # [M, 3]
    actions: np.ndarray  # [M]
    load: np.ndarray | None = None  # [M, 2], with use_load


class LRS:
    """The learner: `act` for rollouts, `update` for Algorithm 1 lines 7-21, `export_onnx`."""

    def __init__(self, cfg: LRSConfig, agents: int) -> None:
        torch.manual_seed(cfg.seed)
        self.cfg, self.agents = cfg, agents
        self.actor = Actor(cfg)
        self.critic = Critic(cfg, agents, self.actor.state.dim)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=cfg.lr_actor, eps=1e-5)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=cfg.lr_critic, eps=1e-5)
        self.value_norm = ValueNorm()
        self.updates = 0  # u
        self.rng = np.random.default_rng(cfg.seed)

    @torch.no_grad()
    def act(self, correlation: np.ndarray, embedding: np.ndarray, action_mask: np.ndarray,
            greedy: bool = False, load: np.ndarray | None = None,
            ) -> tuple[np.ndarray, np.ndarray]:
        """Actions and their log-probabilities for a batch of local states."""
        logits = self.actor.logits(torch.as_tensor(correlation), torch.as_tensor(embedding),
                                   torch.as_tensor(action_mask, dtype=torch.float32),
                                   self._load(load, len(correlation)))
        dist = Categorical(logits=logits)
        actions = logits.argmax(-1) if greedy else dist.sample()
        return actions.numpy(), dist.log_prob(actions).numpy()

    @torch.no_grad()
    def probabilities(self, correlation: np.ndarray, embedding: np.ndarray,
                      action_mask: np.ndarray, load: np.ndarray | None = None,
                      actor: Actor | None = None) -> np.ndarray:
        """pi(. | s) for a batch of local states, by this actor or another (a saved copy)."""
        actor = actor or self.actor
        return cast(torch.Tensor, actor(torch.as_tensor(correlation), torch.as_tensor(embedding),
                                        torch.as_tensor(action_mask, dtype=torch.float32),
                                        self._load(load, len(correlation)))).numpy()

    def update(self, rollout: Rollout, demos: Demos | None = None) -> dict[str, float]:
        """One network update u (Algorithm 1, lines 8-21)."""
        cfg = self.cfg
        self.updates += 1
        t = {k: torch.as_tensor(v) for k, v in vars(rollout).items() if v is not None}
        steps, n = t["actions"].shape
        if cfg.use_load and "load" not in t:
            raise ValueError("this learner reads the load (use_load): the rollout has none")
        with torch.no_grad():
            old_values_n = self.critic(self._local(t["correlation"], t["embedding"],
                                                   t.get("load")))
            last_load = t.get("last_load")
            last_value_n = self.critic(self._local(
                t["last_correlation"][None], t["last_embedding"][None],
                None if last_load is None else last_load[None]))[0]
            values = self.value_norm.denormalize(old_values_n)
            rewards = t["rewards"].float() * cfg.reward_scale
            advantages, returns = gae(rewards, values, t["dones"].float(),
                                      self.value_norm.denormalize(last_value_n), cfg.gamma,
                                      cfg.gae_lambda)
            self.value_norm.update(returns)
            targets = self.value_norm.normalize(returns)
            # How much of the returns' variance the critic explained before this update (CleanRL)
            explained_var = 1.0 - float((returns - values).var() / (returns.var() + 1e-8))
            # Advantage normalisation over all agents' samples (all agents are active here).
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)

        def flat(x: torch.Tensor) -> torch.Tensor:  # [T, N, ...] -> [T*N, ...]
            return x.reshape(steps * n, *x.shape[2:])

        corr, emb, mask = flat(t["correlation"]), flat(t["embedding"]), flat(t["action_mask"])
        # Only a load-aware actor reads the load: the prior's wait is then 0, as on the edge.
        load = flat(t["load"]).float() if cfg.use_load else None
        actions, old_logp, adv = flat(t["actions"]), flat(t["logp"]), flat(advantages)
        mask = mask.float()
        demo_count = cfg.demos_for_update(self.updates) if demos is not None else 0
        # Algorithm 1, lines 10-13: E'_g, l_g^u demonstrations sampled once per update, joins
        # the experience: every epoch passes over both, split into the same minibatches.
        picked = (self.rng.choice(len(demos.actions), size=min(demo_count, len(demos.actions)),
                                  replace=False)
                  if demo_count and demos is not None  # demo_count is 0 without demos
                  else np.zeros(0, dtype=np.int64))
        shares = torch.bincount(actions.long(), minlength=3).float() / len(actions)
        stats: dict[str, float] = {"demos": float(len(picked)), "explained_var": explained_var,
                                   **{f"share_{a}": float(shares[i])
                                      for i, a in enumerate("ABC")}}
        kls, clipped = [], []
        for _ in range(cfg.epochs):
            order = torch.randperm(steps)
            demo_order = self.rng.permutation(picked)
            for chunk, demo_chunk in zip(order.chunk(cfg.minibatches),
                                         np.array_split(demo_order, cfg.minibatches),
                                         strict=False):
                rows = (chunk[:, None] * n + torch.arange(n)).reshape(-1)  # every agent of a step
                step_load = None if load is None else load[rows]
                local = self.actor.state(corr[rows], emb[rows], step_load)
                dist = Categorical(logits=self.actor.masked_logits(
                    local, mask[rows], self.actor.prior_logits(corr[rows], step_load)))
                logp = dist.log_prob(actions[rows])
                policy_loss = clipped_policy_loss(logp, old_logp[rows], adv[rows], cfg.clip)
                with torch.no_grad():  # CleanRL's approx KL (k3 estimator) and clip fraction
                    log_ratio = logp - old_logp[rows]
                    kls.append(float(((log_ratio.exp() - 1) - log_ratio).mean()))
                    clipped.append(float(((log_ratio.exp() - 1).abs() > cfg.clip).float().mean()))
                entropy = dist.entropy().mean()
                loss = policy_loss - cfg.entropy_coef * entropy
                if len(demo_chunk):
                    assert demos is not None  # picked from them
                    loss = loss + cfg.bc_coef * self._bc_loss(demos, demo_chunk)
                self.actor_opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(self.actor.parameters(), cfg.max_grad_norm)
                self.actor_opt.step()

                values_now = self.critic(local.reshape(len(chunk), n, -1))
                value_loss = clipped_value_loss(values_now, old_values_n[chunk], targets[chunk],
                                                cfg.value_clip)
                self.critic_opt.zero_grad()
                (cfg.value_coef * value_loss).backward()
                nn.utils.clip_grad_norm_(self.critic.parameters(), cfg.max_grad_norm)
                self.critic_opt.step()
                stats.update(policy_loss=policy_loss.item(), value_loss=value_loss.item(),
                             entropy=entropy.item())
        stats.update(approx_kl=float(np.mean(kls)), clip_frac=float(np.mean(clipped)))
        return stats

    def warm_start(self, demos: Demos, epochs: int, batch: int = 256) -> float:
        """Behaviour cloning of the actor on all of E_g for `epochs` passes; the share of the
        expert's actions the actor's argmax then agrees with."""
        # Its own optimiser: cloning a fixed target takes larger steps than PPO may, and
        # PPO's Adam then starts without moments from a different loss.
        optimiser = torch.optim.Adam(self.actor.parameters(), lr=self.cfg.warm_start_lr)
        for _ in range(epochs):
            for pick in np.array_split(self.rng.permutation(len(demos.actions)),
                                       max(1, len(demos.actions) // batch)):
                loss = self._bc_loss(demos, pick)
                optimiser.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(self.actor.parameters(), self.cfg.max_grad_norm)
                optimiser.step()
        with torch.no_grad():
            agreed = (self._bc_logits(demos, np.arange(len(demos.actions))).argmax(-1)
                      == torch.as_tensor(demos.actions))
        return float(agreed.float().mean())

    def _load(self, load: np.ndarray | torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """The load input as a tensor; zeros (an idle cloud) when a load-aware learner is
        given none, None when the learner does not read it."""
        if not self.cfg.use_load:
            return None
        if load is None:
            return torch.zeros(batch, len(LOAD_FEATURES))
        return torch.as_tensor(load, dtype=torch.float32)

    def _local(self, correlation: torch.Tensor, embedding: torch.Tensor,
               load: torch.Tensor | None = None) -> torch.Tensor:
        """[B, N, 3, P], [B, N, H] (, [B, N, 2]) -> the actor's local states [B, N, D]."""
        b, n = correlation.shape[:2]
        return cast(torch.Tensor, self.actor.state(
            correlation.reshape(b * n, *correlation.shape[2:]), embedding.reshape(b * n, -1),
            self._load(None if load is None else load.reshape(b * n, -1), b * n),
        )).reshape(b, n, -1)

    def _bc_loss(self, demos: Demos, pick: np.ndarray) -> torch.Tensor:
        """Behaviour cloning: cross-entropy of the expert's actions on demonstrations E'_g."""
        return nn.functional.cross_entropy(self._bc_logits(demos, pick),
                                           torch.as_tensor(demos.actions[pick]).long())

    def _bc_logits(self, demos: Demos, pick: np.ndarray) -> torch.Tensor:
        return self.actor.logits(torch.as_tensor(demos.correlation[pick]),
                                 torch.as_tensor(demos.embedding[pick]),
                                 torch.as_tensor(demos.action_mask[pick], dtype=torch.float32),
                                 self._load(None if demos.load is None else demos.load[pick],
                                            len(pick)))

    def export_onnx(self) -> bytes:
        """The actor as an ONNX policy (inputs correlation, embedding, action_mask; output
        probs), runnable by onnxruntime on the edge."""
        cfg = self.cfg
        self.actor.eval()
        example = (torch.zeros(1, 3, cfg.top_p), torch.zeros(1, cfg.embed_dim),
                   torch.ones(1, 3), *([torch.zeros(1, len(LOAD_FEATURES))] if cfg.use_load
                                       else []))
        inputs = ["correlation", "embedding", "action_mask", *(["load"] if cfg.use_load else [])]
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                # annotated as a path, but the TorchScript exporter (dynamo=False) also
                # writes to a file object
                self.actor, example, buffer,  # type: ignore[arg-type]
                dynamo=False, opset_version=17,
                input_names=inputs, output_names=["probs"],
                dynamic_axes={name: {0: "batch"} for name in (*inputs, "probs")})
        self.actor.train()
        if not cfg.use_load:
            return buffer.getvalue()
        import onnx  # the contract an edge checks before it runs the policy (velo.core.state)

        graph = onnx.load_from_string(buffer.getvalue())
        graph.metadata_props.add(key="velo.load", value=",".join(LOAD_FEATURES))
        return cast(bytes, graph.SerializeToString())  # protobuf: Any to mypy
