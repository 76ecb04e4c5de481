"""`velo experiment live`: a small version of the experiment through the real daemons and the
real local LLM, next to the simulator's numbers for the same policies and the same requests.
`velo experiment burst` (run_burst): a load-aware LRS edge and a tuned static edge share one cloud
through a calm phase, a burst and a calm phase again.

One edge per policy (Cache-0.5, Greedy-0.5, Random and LRS); every request of the test stream
goes to every edge, so each edge is one policy run on the same workload. LRS is trained on the
simulator, published to trainerd and pulled by its edge (the production path); the baseline
edges do not follow trainerd. The simulator then runs the same policies on one simulated edge
with the same arrivals. Live answers come from SmolLM2-135M (small, fast, often wrong), so live
q and d differ from the simulator's human second answers and 13b latencies: the point is to
see both side by side, not to expect equal numbers.
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from pathlib import Path

import numpy as np

from lab.train import Metrics
from velo.core.policy import Policy
from velo.core.records import QAItem
from velo.ops.replay import Outcome, replay
from velo.ops.stack import Stack, StackConfig
from velo.ops.workload import Arrival

LIVE_POLICIES = ("cache-0.5", "greedy-0.5", "random", "lrs")


def evaluation_arrivals(items: list[QAItem], requests: int, seed: int) -> list[Arrival]:
    """The test stream: Zipf-popular items, asked as a paraphrase when the data has one."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(items))
    weights = 1.0 / np.arange(1, len(items) + 1) ** 1.1
    arrivals = []
    for pick in rng.choice(len(items), size=requests, p=weights / weights.sum()):
        item = items[order[pick]]
        texts = item.paraphrases or (item.question,)
        arrivals.append(Arrival(item, texts[rng.integers(len(texts))], 0))
    return arrivals


def run_live(onnx: bytes, items: list[QAItem], arrivals: list[Arrival], state_dir: Path,
             max_tokens: int = 48, milvus_uri: str = "", milvus_token: str = "",
             ) -> dict[str, dict[str, float]]:
    """Start the stack with one edge per policy, publish LRS, replay, and measure each edge.

    Every edge starts from an empty cache: a fresh state directory and collections of its own.
    """
    shutil.rmtree(state_dir, ignore_errors=True)
    stack = Stack(StackConfig(data_dir=state_dir, edges=len(LIVE_POLICIES),
                              edge_policies=LIVE_POLICIES, log_level="warning",
                              milvus_uri=milvus_uri, milvus_token=milvus_token,
                              run_tag=f"-live-{uuid.uuid4().hex[:8]}", policy_file=None))
    stack.start()
    try:
        edges = stack.edge_addresses
        stack.publish("lrs", onnx)
        outcomes = asyncio.run(replay(arrivals, edges, items, tenant="live",
                                      max_tokens=max_tokens, concurrency=len(edges),
                                      to_every_edge=True))
    finally:
        stack.stop()
    return {policy: live_metrics([o for o in outcomes if o.edge == edge])
            for policy, edge in zip(LIVE_POLICIES, edges, strict=True)}


def run_burst(onnx: bytes, static: str, items: list[QAItem],
              phases: list[tuple[str, list[Arrival], int]], state_dir: Path,
              max_tokens: int = 48, edge_settings: dict[str, str] | None = None,
              ) -> dict[str, dict[str, dict[str, float]]]:
    """The load-aware LRS edge beside a tuned static edge on one shared cloud (cloudd with its
    one llama.cpp slot, the stack's), through `phases` of (name, arrivals, concurrency):
    every request goes to both edges, so their forwards wait in the same queue. Both edges
    get `edge_settings` (e.g. a reuse guard). Returns phase -> policy -> measures
    (live_metrics, with the p95 delay)."""
    shutil.rmtree(state_dir, ignore_errors=True)
    policies = ("lrs", static)
    stack = Stack(StackConfig(data_dir=state_dir, edges=2, edge_policies=policies,
                              log_level="warning", run_tag=f"-burst-{uuid.uuid4().hex[:8]}",
                              policy_file=None, edge_settings=edge_settings or {}))
    stack.start()
    measured: dict[str, dict[str, dict[str, float]]] = {}
    try:
        edges = stack.edge_addresses
        stack.publish("lrs", onnx)
        for name, arrivals, concurrency in phases:
            outcomes = asyncio.run(replay(arrivals, edges, items, tenant="burst",
                                          max_tokens=max_tokens, concurrency=concurrency,
                                          to_every_edge=True))
            measured[name] = {
                policy: {**live_metrics(mine := [o for o in outcomes if o.edge == edge]),
                         "p95_d": float(np.percentile([o.delay_s for o in mine
                                                       if o.action != "error"] or [0], 95))}
                for policy, edge in zip(policies, edges, strict=True)}
    finally:
        stack.stop()
    return measured


def live_metrics(outcomes: list[Outcome]) -> dict[str, float]:
    """The measures of SPEC §5 from the edges' own replies (q against the reference answer)."""
    served = [o for o in outcomes if o.action in "ABC" and o.satisfaction is not None]
    if not served:
        return {"requests": 0.0, "errors": float(len(outcomes))}
    reuses = sum(o.action == "A" for o in served)
    false_hits = sum(o.false_hit for o in served)
    return {
        "requests": float(len(served)), "errors": float(len(outcomes) - len(served)),
        "reward": float(np.mean([o.reward for o in served])),
        "q": float(np.mean([o.satisfaction for o in served])),
        "d": float(np.mean([o.delay_s for o in served])),
        "llm_freq": sum(o.action == "B" for o in served) / len(served),
        "hit_rate": reuses / len(served),
        "false_hit_rate": false_hits / reuses if reuses else 0.0,
        # What δ bounds ([reuse] delta): wrong reuses among all requests, not among reuses.
        "wrong_rate": false_hits / len(served),
    }


def simulated(env, policies: dict[str, Policy], arrivals: list[Arrival]) -> dict[str, dict]:
    """The same arrivals through the simulator (one edge, empty cache) for each policy."""
    index = {item.id: n for n, item in enumerate(env.items)}
    results = {}
    for name, policy in policies.items():
        metrics = Metrics()
        env.reset(0, split="test")
        for arrival in arrivals:
            if arrival.item.id not in index:
                continue  # no second answer: the simulator cannot answer it with B
            states = env.observe_arrivals([(index[arrival.item.id], arrival.text)])
            result, _ = env.step([policy.decide(states[0]).action])
            policy.observe(result.actions[0], result.outcomes[0].q, result.outcomes[0].d)
            metrics.add(result)
        results[name] = metrics.summary()
    return results
