"""Train the verifier of reuse (velo.core.verifier) on labelled pairs and export it to ONNX.

Honest splits: questions are grouped into connected components (two questions are connected
when a pair holds both), and whole components go to train, calibration or test, so no test
question (nor its paraphrase) was seen in training or calibration.

Training examples are what an edge meets: cache every `a` side of the split, ask every `b`,
and label each of the top-K cached candidates right when it is the `b`'s labelled paraphrase
(label 1). The model is a small MLP on the features of velo.core.verifier, standardised inside the
graph, trained with a class-balanced logistic loss.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np

from lab.memory_cache import MemoryCache
from lab.pairs import Pair, components, served_right, wilson_upper
from velo.core.verifier import FEATURES, pair_features

TENANT = "verify"


@dataclass
class VerifierConfig:
    hidden: int = 32  # width of the one hidden layer
    epochs: int = 40  # passes over the training examples
    batch: int = 256  # examples per step
    lr: float = 3e-3  # Adam
    weight_decay: float = 1e-4  # L2 on the weights: the dev data is small
    candidates: int = 3  # top-K cached rows per asked question become training examples
    seed: int = 0


def split_by_component(pairs: list[Pair], shares: tuple[float, ...], seed: int,
                       ) -> list[list[Pair]]:
    """Pairs grouped by connected components of their texts, components shuffled and dealt
    to len(shares) parts of about those shares of the pairs."""
    root = components([t for p in pairs for t in (p.a, p.b)], [(p.a, p.b) for p in pairs])
    groups: dict[str, list[Pair]] = {}
    for p in pairs:
        groups.setdefault(root[p.a], []).append(p)
    keys = sorted(groups)
    order = np.random.default_rng(seed).permutation(len(keys))
    bounds = np.cumsum(shares) / sum(shares) * len(pairs)
    parts: list[list[Pair]] = [[] for _ in shares]
    taken = 0
    for index in order:
        group = groups[keys[index]]
        part = min(int(np.searchsorted(bounds, taken, side="right")), len(shares) - 1)
        parts[part].extend(group)
        taken += len(group)
    return parts


def candidate_examples(pairs: list[Pair], vectors, dim: int, k: int,
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of the top-k cached `a` candidates of every asked `b`."""
    cache = MemoryCache(dim)
    for a in sorted({p.a for p in pairs}):
        cache.insert_pair(TENANT, a, a, vectors[a], vectors[a], 0.0)
    right: dict[str, set[str]] = {}
    for p in pairs:
        if p.label == 1:
            right.setdefault(p.b, set()).add(p.a)
    features, labels = [], []
    for b in sorted({p.b for p in pairs}):
        for row in cache.search(vectors[b], TENANT, k):
            features.append(pair_features(b, row.question, row.similarity))
            labels.append(float(served_right(b, row.question, right.get(b, set()))))
    return np.stack(features), np.asarray(labels, np.float32)


def train_verifier(features: np.ndarray, labels: np.ndarray, cfg: VerifierConfig,
                   name: str = "verifier-mlp", weights: np.ndarray | None = None) -> bytes:
    """Fit the MLP and return the ONNX bytes (contract in velo.core.verifier). `weights`: one per
    example (default 1): how much a data set's examples count against the others'."""
    import onnx
    import torch
    from torch import nn

    torch.manual_seed(cfg.seed)
    x = torch.tensor(features, dtype=torch.float32)
    y = torch.tensor(labels, dtype=torch.float32)
    w = torch.ones_like(y) if weights is None else torch.tensor(weights, dtype=torch.float32)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-3)

    class Verifier(nn.Module):
        mean: torch.Tensor  # buffers: saved and exported with the weights
        std: torch.Tensor

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", mean)
            self.register_buffer("std", std)
            self.mlp = nn.Sequential(nn.Linear(len(FEATURES), cfg.hidden), nn.Tanh(),
                                     nn.Linear(cfg.hidden, 1))

        def logits(self, f: torch.Tensor) -> torch.Tensor:
            return self.mlp((f - self.mean) / self.std).squeeze(-1)

        def forward(self, f: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.logits(f))

    model = Verifier()
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # Balanced classes: most candidates are wrong, and the threshold is calibrated later anyway.
    pos_weight = ((1 - y) * w).sum() / (y * w).sum().clamp_min(1.0)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight, reduction="none")
    generator = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.epochs):
        for batch in torch.randperm(len(x), generator=generator).split(cfg.batch):
            optimiser.zero_grad()
            (loss_fn(model.logits(x[batch]), y[batch]) * w[batch]).mean().backward()
            optimiser.step()
    model.eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        # A file object is a documented target; torch's annotation names paths only.
        torch.onnx.export(model, (torch.zeros(1, len(FEATURES)),), buffer,  # type: ignore[arg-type]
                          input_names=["features"], output_names=["p_same"],
                          dynamic_axes={"features": {0: "batch"}, "p_same": {0: "batch"}},
                          opset_version=17, dynamo=False)
    graph = onnx.load_from_string(buffer.getvalue())
    for key, value in (("velo.verifier.features", ",".join(FEATURES)),
                       ("velo.verifier.name", name)):
        graph.metadata_props.add(key=key, value=value)
    return graph.SerializeToString()


DELTAS = (0.01, 0.02, 0.05, 0.1)  # the bounds a verifier file carries thresholds for
# Cache sizes (cached questions a tenant's search can meet) the file gives thresholds for; an
# edge interpolates between them in log(rows).
ROWS = (100, 300, 1_000, 3_000, 10_000, 30_000, 100_000, 300_000, 1_000_000)
NEVER = 1.01  # a threshold no P(same) reaches: no threshold holds δ at that size


@dataclass
class SizeRun:
    """The verifier's best score per calibration query, and whether serving it is wrong, in a
    cache of `rows` cached questions (the calibration `a` sides plus other real questions)."""

    rows: int
    scores: np.ndarray  # [queries] float
    wrong: np.ndarray  # [queries] bool: the best row is not a labelled paraphrase


def thresholds_by_rows(runs: list[SizeRun], delta: float,
                       rows: tuple[int, ...] = ROWS) -> list[tuple[int, float]]:
    """The reuse threshold for δ at each cache size in `rows`, from calibration caches of a few
    sizes (runs[0] the smallest).

    A bigger cache offers more near-misses. Each extra cached question adds a small chance that
    it, not the right row, is served above the threshold; so the wrong hits at threshold τ grow
    about linearly with the rows: W(τ, N) = W(τ, N0) + (N - N0) * slope(τ), with slope fitted
    by least squares (through the smallest cache) to the growth seen in the larger calibration
    caches. Below N0 no shrink is assumed. Linear growth over-counts once near-misses crowd
    each other out, so extrapolating it errs on the safe side. The threshold
    is the lowest τ at which, and at every τ above which, the one-sided 95 % upper bound of
    W / queries stays <= δ (scanning down from the top: a lucky dip in the counts lower down
    does not open the gate)."""
    base, larger = runs[0], runs[1:]
    n = len(base.scores)
    candidates = np.unique(np.concatenate([r.scores for r in runs]))[::-1]  # high to low

    def wrong_at(run: SizeRun, tau: float) -> int:
        return int(np.sum((run.scores >= tau) & run.wrong))

    table = []
    for size in rows:
        chosen = NEVER
        for tau in candidates:
            w0 = wrong_at(base, tau)
            xs = np.array([r.rows - base.rows for r in larger], dtype=float)
            ys = np.array([wrong_at(r, tau) - w0 for r in larger], dtype=float)
            slope = float(xs @ ys / (xs @ xs)) if len(xs) and xs @ xs > 0 else 0.0
            predicted = w0 + max(size - base.rows, 0) * max(slope, 0.0)
            if wilson_upper(predicted, n) > delta:
                break
            chosen = float(tau)
        table.append((size, chosen))
    return table


def with_thresholds(model: bytes, table: dict[float, list[tuple[int, float]]]) -> bytes:
    """The verifier file with its calibrated thresholds, {δ: [(cached rows, threshold), ...]}
    (read by edges, [reuse]; velo.core.verifier.OnnxVerifier.threshold_for)."""
    import json

    import onnx

    graph = onnx.load_from_string(model)
    kept = [p for p in graph.metadata_props if p.key != "velo.verifier.thresholds"]
    del graph.metadata_props[:]
    graph.metadata_props.extend(kept)
    graph.metadata_props.add(key="velo.verifier.thresholds", value=json.dumps(
        {str(k): [[rows, tau] for rows, tau in v] for k, v in table.items()}))
    return graph.SerializeToString()


def mark_state(policy: bytes, state: str) -> bytes:
    """An ONNX policy labelled with the state it was trained on (velo.core.policy.STATES)."""
    import onnx

    graph = onnx.load_from_string(policy)
    graph.metadata_props.add(key="velo.state", value=state)
    return graph.SerializeToString()
