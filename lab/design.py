"""The shape of an experiment: what a figure varies, one point of it, one run's result.

Shared by the runner (lab.experiment) and the plots (lab.figures), so neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Setting:
    """One point of a figure: offload mode, reward weight, number of edges, training set."""

    mode: str = "nearest"  # "nearest" or "all" (fastest of all edges wins)
    w: float = 0.1  # w = phi2 / phi1
    edges: int = 3  # N
    train_share: float = 1.0  # share of the QA items in the training set (most popular first)


@dataclass(frozen=True)
class Figure:
    number: int
    title: str
    vary: str  # the Setting field on the x axis, or "update" for training curves
    mode: str
    policies: tuple[str, ...]


@dataclass
class RunResult:
    setting: Setting
    seed: int
    metrics: dict[str, dict[str, float]]  # policy -> measures
    curves: dict[str, list[dict[str, float]]] = field(default_factory=dict)  # learned policies
    seconds: float = 0.0
