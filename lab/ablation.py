"""`velo experiment ablation`: does LRS stop reusing wrong answers when it sees the verifier?

For each workload (QA files), offload mode and reward, LRS is trained twice on the simulator,
once on the paper's state and once on the `verified` state (c^s replaced by the verifier's
P(same), velo.core.state), and both are evaluated on the same test stream next to the baselines.
Cache-θ's θ is tuned on the training split (the best mean reward over THETAS there), never on
the test stream. Rewards: eq. 2's (the paper's) and the correctness-aware one
(SimConfig.false_hit_penalty: a served answer of another question costs `penalty` more).
Normalised reward: Random 0, Oracle 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lab.sim import ORACLE, SimConfig, SimEnv
from lab.train import collect_demos, evaluate
from lab.workers import run_cases
from velo.core.policy import CachePolicy, GreedyLLMPolicy, RandomPolicy
from velo.core.records import load_qa
from velo.core.verifier import OnnxVerifier

THETAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # L2 distance thresholds (cosine 0.955 ... 0.68)
REWARDS = {"paper": 0.0, "correct": 1.0}


@dataclass(frozen=True)
class Case:
    data: Path
    mode: str
    reward: str
    seed: int


def run_case(case: Case, scale, verifier: Path, latencies: Path, cache_dir: Path,
             edge_s: float) -> dict[str, dict[str, float]]:
    from lab.experiment import _embedder, normalise, train_policy

    items = load_qa(case.data)[: scale.items or None]
    cfg = SimConfig(mode=case.mode, seed=case.seed, edge_s=edge_s,
                    false_hit_penalty=REWARDS[case.reward])
    results: dict[str, dict[str, float]] = {}
    env = SimEnv(cfg, items, _embedder(), None, latencies, cache_dir)
    tuning = {t: evaluate(env, CachePolicy(t), scale.eval_steps, case.seed + 500,
                          split="train")["reward"] for t in THETAS}
    theta = max(tuning, key=lambda t: tuning[t])
    results[f"cache-{theta} (tuned)"] = evaluate(env, CachePolicy(theta), scale.eval_steps,
                                                 case.seed + 1000)
    results["random"] = evaluate(env, RandomPolicy(case.seed), scale.eval_steps, case.seed + 1000)
    results["greedy-llm"] = evaluate(env, GreedyLLMPolicy(), scale.eval_steps, case.seed + 1000)
    results["oracle"] = evaluate(env, ORACLE, scale.eval_steps, case.seed + 1000)
    for state in ("paper", "verified"):
        if state == "verified":
            env.close()
            env = SimEnv(cfg, items, _embedder(), None, latencies, cache_dir,
                         verifier=OnnxVerifier(verifier))
        demos = collect_demos(env, scale.demos, case.seed + 1)
        policy, _ = train_policy(env, "lrs", scale, case.seed, demos)
        results[f"lrs ({state} state)"] = evaluate(env, policy, scale.eval_steps,
                                                   case.seed + 1000)
    env.close()
    normalise(results)
    return results


def run_all(cases: list[Case], scale, verifier: Path, latencies: Path, cache_dir: Path,
            edge_s: float, jobs: int) -> list[tuple[Case, dict]]:
    return run_cases(run_case, cases, (scale, verifier, latencies, cache_dir, edge_s), jobs)


def markdown(results: list[tuple[Case, dict]]) -> str:
    lines = ["| data | mode | reward | policy | mean reward | normalised | hit rate "
             "| false-hit share | LLM freq |", "|---|---|---|---|---:|---:|---:|---:|---:|"]
    verdicts = []
    for case, metrics in results:
        for name, m in metrics.items():
            lines.append(f"| {case.data.stem} | {case.mode} | {case.reward} | {name} "
                         f"| {m['reward']:.3f} | {m.get('normalized', float('nan')):.2f} "
                         f"| {m['hit_rate']:.1%} | {m['false_hit_rate']:.1%} "
                         f"| {m['llm_freq']:.1%} |")
        baselines = {k: v for k, v in metrics.items() if not k.startswith(("lrs", "oracle"))}
        best = max(baselines, key=lambda k: baselines[k]["reward"])
        for state in ("paper", "verified"):
            lrs = metrics[f"lrs ({state} state)"]
            verdicts.append(
                f"- {case.data.stem}, {case.mode}, {case.reward} reward, {state} state: LRS "
                f"{lrs['reward']:.3f} vs best baseline {best} {baselines[best]['reward']:.3f} "
                f"({'≥' if lrs['reward'] >= baselines[best]['reward'] else 'below'}); "
                f"normalised {lrs.get('normalized', float('nan')):.2f} "
                f"({'≥' if lrs.get('normalized', 0) >= 0.9 else 'below'} 0.9)")
    return "\n".join(lines) + "\n\n" + "\n".join(verdicts)
