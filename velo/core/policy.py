"""Policies: map an edge state to an action A, B or C.

Baselines are plain Python; learned policies are ONNX files run by onnxruntime (the edge
never imports PyTorch). All share one interface, `decide(state) -> Decision`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, Protocol, cast

import numpy as np

from velo.core.load import LOAD_FEATURES
from velo.core.onnx import load_session
from velo.core.qos import Action
from velo.core.state import EdgeState


@dataclass(frozen=True)
class Decision:
    action: Action
    probs: np.ndarray  # [3] probabilities of A, B, C under the policy


STATES = ("paper", "verified")  # the states a policy may read (velo.core.state)


class Policy(Protocol):
    """What an edge and the simulator ask of a policy. The policies here subclass it for its
    defaults: the paper's state, no model to run, nothing learned from outcomes."""

    name: str
    version: int  # 0 for baselines; the trainer's version for learned policies
    state: str = "paper"  # the state it reads, one of STATES ("verified" needs a verifier)
    runs_model: bool = False  # a real forward pass: edged runs decide() off the event loop

    def decide(self, state: EdgeState) -> Decision: ...

    def observe(self, action: Action, q: float, d: float) -> None:
        """The outcome of one of its decisions: q (eq. 2) and delay d. Most ignore it."""
        return None  # a body of its own: subclasses need not override it


def _one_hot(action: Action) -> Decision:
    probs = np.zeros(3, dtype=np.float32)
    probs[action] = 1.0
    return Decision(action, probs)


class CachePolicy(Policy):
    """Cache-theta (GPTCache semantics): reuse when J_min <= theta, otherwise forward."""

    version = 0

    def __init__(self, theta: float) -> None:
        self.theta = theta
        self.name = f"cache-{theta:g}"

    def decide(self, state: EdgeState) -> Decision:
        return _one_hot(Action.REUSE if state.min_distance <= self.theta else Action.FORWARD)


class LoadAdaptivePolicy(Policy):
    """Adaptive-theta0-k: Cache-theta whose threshold follows the load, reuse when
    J_min <= theta0 + k * cloud_wait_s (velo.core.load). The hand-written policy a careful engineer
    ships instead of a learned one: the longer the cloud's queue, the more a near match is
    worth; theta0 and k are tuned per workload (lab.under_load)."""

    version = 0

    def __init__(self, theta0: float, k: float) -> None:
        self.theta0, self.k = theta0, k
        self.name = f"adaptive-{theta0:g}-{k:g}"

    def threshold(self, cloud_wait_s: Any) -> Any:
        """θ at that wait: a float, or an array or tensor of waits (LRS's prior, which runs in
        torch, so not typed narrower here: velo.core never imports torch)."""
        return self.theta0 + self.k * cloud_wait_s

    def decide(self, state: EdgeState) -> Decision:
        theta = self.threshold(float(state.load[0]))
        return _one_hot(Action.REUSE if state.min_distance <= theta else Action.FORWARD)


class VerifierThresholdPolicy(Policy):
    """Verifier-tau: reuse when the verifier's P(same) of the nearest row is at least tau,
    otherwise forward. It reads the `verified` state, so an edge runs it with a verifier."""

    version = 0
    state = "verified"

    def __init__(self, tau: float) -> None:
        self.tau = tau
        self.name = f"verifier-{tau:g}"

    def decide(self, state: EdgeState) -> Decision:
        reuse = bool(state.rows) and float(state.correlation[0, 0]) >= self.tau
        return _one_hot(Action.REUSE if reuse else Action.FORWARD)


class GreedyPolicy(Policy):
    """Greedy-theta (the paper's baseline): forward when J_min > theta, otherwise augment."""

    version = 0

    def __init__(self, theta: float) -> None:
        self.theta = theta
        self.name = f"greedy-{theta:g}"

    def decide(self, state: EdgeState) -> Decision:
        return _one_hot(Action.FORWARD if state.min_distance > self.theta else Action.AUGMENT)


class RandomPolicy(Policy):
    """Uniform over the valid actions."""

    version = 0
    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def decide(self, state: EdgeState) -> Decision:
        probs = state.action_mask.astype(np.float32) / state.action_mask.sum()
        return Decision(Action(int(self.rng.choice(3, p=probs))), probs)


class GreedyLLMPolicy(Policy):
    """Greedy-LLM (paper IV-B): reuse when the best match's cache value c^r beats a running
    estimate of what asking the LLM directly is worth (q - d of past B requests), otherwise
    forward. `observe` feeds it every outcome."""

    version = 0
    name = "greedy-llm"

    def __init__(self, smoothing: float = 0.1) -> None:
        self.smoothing = smoothing
        self.estimate: float | None = None  # running value of Action B

    def decide(self, state: EdgeState) -> Decision:
        reuse = bool(state.rows) and self.estimate is not None \
            and state.rows[0].value > self.estimate
        return _one_hot(Action.REUSE if reuse else Action.FORWARD)

    def observe(self, action: Action, q: float, d: float) -> None:
        if action is Action.FORWARD:
            value = q - d
            self.estimate = value if self.estimate is None else \
                self.estimate + self.smoothing * (value - self.estimate)


def baseline_from_name(name: str, seed: int = 0) -> Policy:
    """'cache-0.5', 'greedy-0.3', 'adaptive-0.4-0.05', 'verifier-0.9', 'greedy-llm' or
    'random'; ValueError otherwise."""
    if name == "random":
        return RandomPolicy(seed)
    if name == "greedy-llm":
        return GreedyLLMPolicy()
    number = r"([0-9]*\.?[0-9]+)"
    if match := re.fullmatch(rf"adaptive-{number}-{number}", name):
        return LoadAdaptivePolicy(float(match.group(1)), float(match.group(2)))
    if match := re.fullmatch(rf"verifier-{number}", name):
        if float(match.group(1)) > 1.0:
            raise ValueError(f"{name}: tau is a probability (0..1)")
        return VerifierThresholdPolicy(float(match.group(1)))
    match = re.fullmatch(r"(cache|greedy)-([0-9]*\.?[0-9]+)", name)
    if not match:
        raise ValueError(f"unknown baseline {name!r}; use cache-<theta>, greedy-<theta>, "
                         "adaptive-<theta0>-<k>, verifier-<tau>, greedy-llm or random")
    theta = float(match.group(2))
    if not 0.0 <= theta <= 2.0:
        raise ValueError(f"theta {theta} is not an L2 distance between unit vectors (0..2)")
    return CachePolicy(theta) if match.group(1) == "cache" else GreedyPolicy(theta)


class PolicyRejected(ValueError):
    """An ONNX policy failed verification; the message says why."""


class OnnxPolicy(Policy):
    """A learned policy exported to ONNX (contract in velo.core.state), run by onnxruntime."""

    runs_model = True  # its forward pass is real work: edged runs it off the event loop

    def __init__(self, onnx_bytes: bytes, version: int, name: str, *, top_p: int, embed_dim: int,
                 sample: bool = True, seed: int = 0) -> None:
        try:  # a policy comes from the network: load_session refuses external weights
            self.session = load_session(onnx_bytes)
        except Exception as exc:  # onnxruntime raises several unrelated types
            raise PolicyRejected(f"onnxruntime cannot load policy v{version}: "
                                 f"{str(exc)[:500]}") from exc
        # The state it was trained on: "paper" (c^s in the first row) or "verified" (the
        # verifier's P(same) there; an edge runs it only with a verifier, velo.core.state).
        self.state = self.session.get_modelmeta().custom_metadata_map.get("velo.state", "paper")
        if self.state not in STATES:
            raise PolicyRejected(f"policy v{version} wants state {self.state[:40]!r}; this edge "
                                 f"builds {', '.join(STATES)}")
        # A load-aware policy names its `load` input's features (velo.core.load); this edge fills
        # exactly LOAD_FEATURES, so any other list means a contract it cannot keep.
        wanted = self.session.get_modelmeta().custom_metadata_map.get("velo.load", "")
        self.load_features = tuple(wanted.split(",")) if wanted else ()
        if self.load_features and self.load_features != LOAD_FEATURES:
            raise PolicyRejected(f"policy v{version} wants load inputs {wanted[:80]!r}; this "
                                 f"edge fills {','.join(LOAD_FEATURES)}")
        self.version, self.name = version, f"onnx:{name}:v{version}"
        self.top_p, self.embed_dim, self.sample = top_p, embed_dim, sample
        self.sha256 = hashlib.sha256(onnx_bytes).hexdigest()
        self.rng = np.random.default_rng(seed)
        self._probe()

    def _probe(self) -> None:
        """Run a padded empty state and a full one; the output must be [1, 3] probabilities."""
        names = {i.name for i in self.session.get_inputs()}
        expected = {"correlation", "embedding", "action_mask", *(["load"] if self.load_features
                                                                  else [])}
        if names != expected:
            raise PolicyRejected(f"policy inputs are {sorted(names)}; expected "
                                 f"{', '.join(sorted(expected))} (metadata velo.load "
                                 f"{'names' if self.load_features else 'does not name'} a "
                                 "load input)")
        for mask in ([0, 1, 0], [1, 1, 1]):
            probs = self.probabilities(np.zeros((1, 3, self.top_p), np.float32),
                                       np.zeros((1, self.embed_dim), np.float32),
                                       np.array([mask], np.float32))
            if probs.shape != (1, 3) or not np.all(np.isfinite(probs)):
                raise PolicyRejected(f"policy output has shape {probs.shape}; expected (1, 3)")
            if abs(float(probs.sum()) - 1.0) > 1e-3 or np.any(probs[0][np.array(mask) == 0] > 1e-6):
                raise PolicyRejected("policy output is not a masked probability distribution")

    def probabilities(self, correlation: np.ndarray, embedding: np.ndarray,
                      action_mask: np.ndarray, load: np.ndarray | None = None) -> np.ndarray:
        feeds = {"correlation": correlation, "embedding": embedding, "action_mask": action_mask}
        if self.load_features:
            feeds["load"] = (np.zeros((len(correlation), len(self.load_features)), np.float32)
                             if load is None else load)
        try:
            (probs,) = self.session.run(["probs"], feeds)
        except Exception as exc:
            raise PolicyRejected(f"policy v{self.version} failed on a probe state: {exc}") from exc
        return cast(np.ndarray, probs)

    def decide(self, state: EdgeState) -> Decision:
        probs = self.probabilities(state.correlation[None], state.embedding[None],
                                   state.action_mask[None].astype(np.float32),
                                   state.load[None])[0]
        probs = np.where(state.action_mask, np.clip(probs, 0.0, None), 0.0)
        probs = probs / probs.sum()
        action = int(self.rng.choice(3, p=probs)) if self.sample else int(np.argmax(probs))
        return Decision(Action(action), probs.astype(np.float32))
