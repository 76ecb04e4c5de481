"""The paper's QoS equations, computed identically by the edge, the trainer and the tools.

Embeddings are L2-normalised, so the L2 distance J (eq. 1) lies in [0, 2] and the
similarity c^s = 1 - J/2 lies in [0, 1] (SPEC §3).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np


class Action(enum.IntEnum):
    """Index order used everywhere (policy outputs, masks, experience): A, B, C."""

    REUSE = 0  # A: serve the cached answer
    FORWARD = 1  # B: ask the cloud LLM, cache the new QA
    AUGMENT = 2  # C: ask the cloud LLM with the best cached QA as context

    @property
    def letter(self) -> str:
        return "ABC"[self]


@dataclass(frozen=True)
class QosWeights:
    """phi1 weighs satisfaction, phi2 delay; w = phi2/phi1 (paper default w = 0.1)."""

    phi1: float = 1.0
    phi2: float = 0.1


def satisfaction(answer_vec: np.ndarray, reference_vec: np.ndarray) -> float:
    """Eq. 2: q = -||f^a - f^r||_2, in [-2, 0]; 0 means the answer says what the reference says."""
    return -float(np.linalg.norm(answer_vec - reference_vec))


def delay(action: Action, edge_s: float, cloud_s: float) -> float:
    """Eq. 3: A costs the edge time, B the cloud time, C both."""
    if action is Action.REUSE:
        return edge_s
    if action is Action.FORWARD:
        return cloud_s
    return edge_s + cloud_s


def reward(q: float, d: float, weights: QosWeights) -> float:
    """Eq. 11 per request: r = phi1*q - phi2*d (the trainer scales it x10, paper IV-C)."""
    return weights.phi1 * q - weights.phi2 * d


def initial_value(q: float, d: float) -> float:
    """A new row's cache value c^r: what its answer was worth when it was asked, q - d."""
    return q - d


def updated_value(value: float, q: float, d: float) -> float:
    """Eq. 5: the cache value of a used row moves halfway toward q - d."""
    return (value + q - d) / 2.0

