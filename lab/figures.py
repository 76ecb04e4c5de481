"""PNG figures in the style of the paper's Fig. 4-10: four panels, (a) reward, (b) satisfaction,
(c) delay, (d) LLM direct-request frequency; mean over seeds with the spread shaded or as bars."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt
import numpy as np

from lab.design import Figure, RunResult

PANELS = (("reward", "(a) reward"), ("q", "(b) satisfaction q"), ("d", "(c) delay d (s)"),
          ("llm_freq", "(d) LLM direct-request frequency"))
X_LABEL = {"w": "weight ratio w", "edges": "number of edge servers",
           "train_share": "training-set size (share of the QA items)"}
STYLE: dict[str, dict[str, Any]] = {  # one fixed look per policy across every figure
    "random": dict(color="tab:gray", marker="x"),
    "greedy-0.1": dict(color="tab:blue", marker="v"),
    "greedy-0.3": dict(color="tab:cyan", marker="^"),
    "greedy-0.5": dict(color="tab:olive", marker="<"),
    "cache-0.5": dict(color="tab:brown", marker="s"),
    "greedy-llm": dict(color="tab:purple", marker="D"),
    "mappo": dict(color="tab:green", marker="."),
    "g-mappo": dict(color="tab:orange", marker="."),
    "t-mappo": dict(color="tab:pink", marker="."),
    "lrs": dict(color="tab:red", marker="o", linewidth=2.2),
    "oracle": dict(color="black", linestyle=":", marker=""),
}


def plot_sweep(points: list[tuple[object, dict[str, dict]]], figure: Figure, path: Path) -> None:
    """points: (x value, aggregated rows of that setting by policy), in x order."""
    positions = np.arange(len(points))
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    for (key, title), ax in zip(PANELS, axes, strict=True):
        for policy in figure.policies:
            rows = [at.get(policy) for _, at in points]
            means = [r[key] if r else np.nan for r in rows]
            stds = [r[f"{key}_std"] if r else np.nan for r in rows]
            ax.errorbar(positions, means, yerr=stds, label=policy, capsize=3,
                        **STYLE.get(policy, dict(marker=".")))
        ax.set_xticks(positions, [str(x) for x, _ in points])
        ax.set_title(title)
        ax.set_xlabel(X_LABEL[figure.vary])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"Fig. {figure.number}: {figure.title}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(runs: list[RunResult], figure: Figure, path: Path) -> None:
    """Fig. 4: the rollouts' measures during training over `runs` (one per seed; mean, std
    shaded); the grey area in (a) is the demonstrations mixed into each update (right axis)."""
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    for policy in figure.policies:
        curves = [r.curves[policy] for r in runs if policy in r.curves]
        if not curves:
            continue
        length = min(len(c) for c in curves)
        updates = np.arange(1, length + 1)
        for (key, title), ax in zip(PANELS, axes, strict=True):
            values = np.array([[c[u][key] for u in range(length)] for c in curves])
            mean, std = values.mean(axis=0), values.std(axis=0)
            line = ax.plot(updates, mean, label=policy, **STYLE.get(policy, {}))[0]
            ax.fill_between(updates, mean - std, mean + std, alpha=0.15, color=line.get_color())
            ax.set_title(title)
            ax.set_xlabel("update u")
            ax.grid(alpha=0.3)
        if policy == "lrs":
            demos = axes[0].twinx()
            demos.fill_between(updates, [curves[0][u]["demos"] for u in range(length)],
                               color="gray", alpha=0.12, step="mid")
            demos.set_ylabel("demonstrations per update", color="gray")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Fig. {figure.number}: {figure.title}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
