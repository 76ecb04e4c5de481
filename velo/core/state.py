"""The agent's local state (eq. 6-8), built the same way on the edge and in the trainer.

The ONNX policy contract (every learned policy, exported by trainerd; a policy trained on the
`verified` state, metadata velo.state = "verified", reads P(same) in place of c^s):
  inputs  correlation [B, 3, P] float32  rows c^s, c^k, c^r of the top-P cached rows (eq. 6)
          embedding   [B, H]    float32  the request embedding f, input of T[.] (eq. 7)
          action_mask [B, 3]    float32  1 where the action is valid, order A, B, C
  output  probs       [B, 3]    float32  action probabilities, 0 for masked actions
A policy trained on the load-aware state has a fourth input and names it in its metadata
(velo.load = "cloud_wait_s,forward_s", velo.core.load.LOAD_FEATURES):
          load        [B, 2]    float32  the cloud's estimated wait and the edge's recent
                                         forward latency, seconds
An edge refuses a policy whose inputs it cannot fill (velo.core.policy).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from velo.core.qos import Action
from velo.core.shape import AnswerFacts

QUESTION, ANSWER = 1, 2  # c^k: the kind of a cached row


@dataclass(frozen=True)
class CachedRow:
    """One row returned by a vector search, with its L2 distance J to the request."""

    id: int
    pair_id: int
    kind: int
    question: str
    answer: str
    hits: int
    value: float
    created: float
    distance: float
    vector: np.ndarray | None = None
    facts: AnswerFacts = field(default_factory=AnswerFacts)  # where its answer ends, why

    @property
    def similarity(self) -> float:
        return 1.0 - self.distance / 2.0


@dataclass(frozen=True)
class EdgeState:
    correlation: np.ndarray  # [3, P]
    embedding: np.ndarray  # [H]
    action_mask: np.ndarray  # [3] bool
    rows: tuple[CachedRow, ...]  # the top-P rows, nearest first (may be fewer than P)
    # What the edge sees of the cloud's load (velo.core.load, LOAD_FEATURES order); zeros where
    # nobody reported it, read only by policies trained on the load-aware state.
    load: np.ndarray = field(default_factory=lambda: np.zeros(2, dtype=np.float32))

    @property
    def min_distance(self) -> float:
        """J_min of the nearest row; infinity when the search found nothing."""
        return self.rows[0].distance if self.rows else float("inf")


def select_row(rows: tuple[CachedRow, ...], phi1: float, phi2: float,
               margin: float) -> CachedRow:
    """The row A or C uses: eq. 4, argmax phi1*c^s + phi2*c^f, among the rows whose
    similarity is within `margin` of the best (so a popular but distant row never wins)."""
    best = max(r.similarity for r in rows)
    near = [r for r in rows if r.similarity >= best - margin]
    return max(near, key=lambda r: phi1 * r.similarity + phi2 * r.hits)


def build_state(embedding: np.ndarray, rows: list[CachedRow], top_p: int,
                verify: Callable[[tuple[CachedRow, ...]], np.ndarray] | None = None,
                load: np.ndarray | None = None) -> EdgeState:
    """Eq. 6-8: the 3 x P correlation matrix (zero-padded) next to the request embedding.

    A and C need a cached row, so they are masked out when the search returned nothing.
    `verify` (the `verified` state): the first row holds the verifier's P(same) of each cached
    row instead of its similarity c^s (velo.core.verifier), the same shape, so the policy contract
    is unchanged and the policy learns from what tells a near-miss from a paraphrase.
    """
    rows = sorted(rows, key=lambda r: r.distance)[:top_p]
    correlation = np.zeros((3, top_p), dtype=np.float32)
    for p, row in enumerate(rows):
        correlation[:, p] = (row.similarity, row.kind, row.value)
    if verify is not None and rows:
        correlation[0, : len(rows)] = verify(tuple(rows))
    mask = np.ones(3, dtype=bool)
    if not rows:
        mask[Action.REUSE] = mask[Action.AUGMENT] = False
    return EdgeState(correlation, embedding.astype(np.float32), mask, tuple(rows),
                     np.zeros(2, np.float32) if load is None else np.asarray(load, np.float32))
