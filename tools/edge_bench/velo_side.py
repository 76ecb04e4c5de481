"""VELO's side: the edge decision in process (edged.decision.Decider), a real velo-edged process
asked over gRPC, and py-spy's profile of it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import grpc

from edge_bench.data import COLLECTION, TENANT, Variant
from edge_bench.measure import closed_loop, cpu_seconds, memory_mb, pct
from edged.decision import Decider
from velo.core.policy import OnnxPolicy
from velo.core.verifier import OnnxVerifier
from velo.ops.stack import Daemon
from velo.v1 import edge_pb2, edge_pb2_grpc


async def bench_decision(decider: Decider, queries: list[str], requests: int,
                         clients: list[int], lrs: OnnxPolicy | None,
                         verifier: OnnxVerifier | None = None) -> dict:
    for prompt in queries[:20]:  # warm the sessions and the search path
        await decider.decide(prompt, TENANT)
    stages: dict[str, list[float]] = {"embed": [], "search": [], "state": [], "policy": [],
                                      "total": []}
    states, prompts, reused = [], [], 0
    for i in range(requests):
        prompts.append(queries[i % len(queries)])
        decided = await decider.decide(prompts[-1], TENANT)
        t = decided.times
        for name, value in (("embed", t.embed_s), ("search", t.search_s), ("state", t.state_s),
                            ("policy", t.policy_s), ("total", t.total_s)):
            stages[name].append(value)
        states.append(decided.state)
        reused += decided.decision.action.letter == "A"
    out: dict = {"single_stream": {k: pct(v) for k, v in stages.items()},
                 "hit_share": reused / requests}
    if lrs is not None:
        times = []
        for state in states:
            t = time.perf_counter()
            lrs.decide(state)
            times.append(time.perf_counter() - t)
        out["lrs_policy"] = pct(times)
    if verifier is not None:  # the reuse guard's P(same) of the top-P rows (edged [reuse])
        times = []
        for prompt, state in zip(prompts, states, strict=True):
            t = time.perf_counter()
            verifier.scorer_for(prompt)(state.rows)
            times.append(time.perf_counter() - t)
        out["verifier"] = pct(times)
    out["throughput"] = {}
    for c in clients:
        embeddings, searches = decider.embeddings, decider.searches
        e0, s0 = (embeddings.calls, embeddings.items), (searches.calls, searches.items)
        rps, lat = await closed_loop(lambda p: decider.decide(p, TENANT), queries, c,
                                     max(requests, 8 * c))
        out["throughput"][str(c)] = {
            "rps": rps, **pct(lat),
            "embed_batch": (embeddings.items - e0[1]) / max(1, embeddings.calls - e0[0]),
            "search_batch": (searches.items - s0[1]) / max(1, searches.calls - s0[0])}
    return out


def edged_process(milvus_uri: str, milvus_token: str, workdir: Path, port: int,
                  variant: Variant, prompt_vectors: int = 0,
                  overrides: dict[str, str] | None = None) -> Daemon:
    """A real velo-edged serving the benchmark collection, no cloud, no trainer, started the
    way `velo up` starts its edges (velo.ops.stack.Daemon); wait with `await ready(it)`,
    stop with `stop(it)`. `overrides`: edged settings (environment keys without their
    VELO_EDGED__ prefix) over the benchmark's own."""
    settings = {
        # 0: every request embeds its prompt, as GPTCache does (the semantic path).
        "LIMITS__PROMPT_VECTORS": str(prompt_vectors),
        "EMBEDDER_FILE": variant.file, "EMBEDDER_THREADS": str(variant.threads),
        "EMBEDDER_WORKERS": str(variant.workers), "EDGE_ID": "bench", "CLOUD": "", "TRAINER": "",
        "DATA_DIR": str(workdir / "edged"), "VECTOR_DB__URI": milvus_uri,
        "VECTOR_DB__TOKEN": milvus_token, "VECTOR_DB__COLLECTION": COLLECTION,
        # Hit traffic only updates values; keep every row for the whole run: no below-mean
        # pass, and no row cap (edged's default, 100,000 rows, evicted ~40 % of a 10^6-row
        # cache while the runs of 2026-12-07 measured it).
        "CACHE__EVICTION_EVERY": "1000000000", "CACHE__MAX_ROWS": "1000000000",
        "POLICY__SHADOW_RATE": "0", **(overrides or {})}
    daemon = Daemon.configured("edged", "edged", f"127.0.0.1:{port}", settings,
                               workdir / "edged.log", log_level="warning")
    daemon.spawn()
    return daemon


async def ready(edged: Daemon, timeout_s: float = 1200) -> None:
    # An edge rebuilds its in-process index from Milvus before it serves: minutes at 10^6 rows.
    if not await asyncio.to_thread(edged.wait_serving, timeout_s):
        raise TimeoutError(f"velo-edged did not come up; see {edged.log_path}")


def stop(edged: Daemon) -> None:
    edged.terminate()
    edged.wait_stopped(30)


class Profiler:
    """py-spy sampling a process while the busiest load runs: where the time goes."""

    CATEGORIES: ClassVar[dict[str, str]] = {  # a sample counts for the first found in its stack
        "embedding (onnxruntime run)": "Embedder._run",
        "embedding (tokenizer)": "Embedder.embed",
        "vector search (pymilvus + wait)": "search_many",
        "experience spool (SQLite)": "Spool.append",
        "write-back flush (Milvus upsert)": "flush_updates",
        "policy": "decide (velo/core/policy.py",
        "gRPC server / event loop": "",
    }

    def __init__(self, pid: int, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.raw = out / f"edged-{pid}.txt"
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(pid),
             "--rate", "200", "--format", "raw", "--output", str(self.raw), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> dict:
        self.proc.send_signal(2)  # py-spy writes its file on SIGINT
        self.proc.wait(timeout=30)
        if not self.raw.exists():
            return {"error": "py-spy wrote nothing (needs ptrace permission)"}
        shares = dict.fromkeys(self.CATEGORIES, 0)
        total = 0
        for line in self.raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            total += int(count)
            for name, marker in self.CATEGORIES.items():
                if marker in stack:
                    shares[name] += int(count)
                    break
        return {"samples": total, "file": str(self.raw),
                "shares": {k: v / max(1, total) for k, v in shares.items()}}


async def bench_grpc(edged: Daemon, queries: list[str], requests: int,
                     clients: list[int], profile: Path | None) -> dict:
    assert edged.proc is not None  # started (edged_process)
    pid = edged.proc.pid
    async with grpc.aio.insecure_channel(edged.address) as channel:
        stub = edge_pb2_grpc.EdgeServiceStub(channel)
        actions: dict[str, int] = {}
        edge_s: list[float] = []  # the decision as timed inside velo-edged

        async def ask(prompt: str) -> None:
            try:
                reply = await stub.Ask(edge_pb2.AskRequest(prompt=prompt, tenant=TENANT),
                                       timeout=30)
            except grpc.aio.AioRpcError as exc:  # a miss: this edge has no cloud to ask
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                actions["miss"] = actions.get("miss", 0) + 1
                return
            edge_s.append(reply.edge_s)
            letter = "ABC"[reply.action - 1]
            actions[letter] = actions.get(letter, 0) + 1

        for prompt in queries[:20]:
            await ask(prompt)
        edge_s.clear()
        _, single = await closed_loop(ask, queries, 1, requests)
        out: dict = {"single_stream": pct(single), "decision_in_edged": pct(edge_s),
                     "throughput": {}}
        for c in clients:
            # Where the cores went: edged and this load generator share them. Enough requests
            # that the ramp-up and the last stragglers (fewer clients left) weigh little.
            edged_cpu, own_cpu, t = cpu_seconds(pid), time.process_time(), time.perf_counter()
            rps, lat = await closed_loop(ask, queries, c, max(requests, 8 * c))
            wall = time.perf_counter() - t
            out["throughput"][str(c)] = {
                "rps": rps, **pct(lat),
                "edged_cores": (cpu_seconds(pid) - edged_cpu) / wall,
                "client_cores": (time.process_time() - own_cpu) / wall}
        if profile:
            # A run of its own: py-spy's sampling takes CPU from the cores edged runs on, so
            # the throughput above is measured without it.
            profiler = Profiler(pid, profile)
            await closed_loop(ask, queries, max(clients), max(requests, 4 * max(clients)))
            out["profile"] = profiler.stop()
        out["actions"] = actions
    out["edged_rss_mb"] = memory_mb(pid)["rss"]
    return out
