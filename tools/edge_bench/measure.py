"""How the benchmark measures: percentiles, closed loops of concurrent clients (asyncio and
threads), a process's CPU time and memory, and a Milvus that has gone quiet."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from velo.edge.cache import VectorCache
from velo.ops.milvus_server import EmbeddedMilvus


def pct(samples_s: list[float]) -> dict[str, float]:
    ms = np.asarray(samples_s) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()), "n": len(ms)}


def settle(cache: VectorCache, milvus: EmbeddedMilvus | None, timeout_s: float = 900) -> None:
    """Compact the collection, wait for its index, then for Milvus to go quiet. After a bulk
    fill Milvus merges small segments and rebuilds their indexes in the background for minutes;
    measured meanwhile, every number (the floor's too) measures that merge on the same cores."""
    deadline = time.monotonic() + timeout_s
    job = cache.client.compact(cache.collection)
    while cache.client.get_compaction_state(job) != "Completed" and time.monotonic() < deadline:
        time.sleep(1.0)
    cache.wait_indexed(max(deadline - time.monotonic(), 1.0))
    pid = milvus.pid if milvus is not None else None
    if pid is None:  # another machine's server: its load is not ours to see
        return
    while time.monotonic() < deadline:
        before = cpu_seconds(pid)
        time.sleep(3.0)
        if (cpu_seconds(pid) - before) / 3.0 < 0.1:  # under a tenth of a core
            return
    print("Milvus still busy after settling; measuring anyway", flush=True)


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User + system CPU time of a process (or of one of its threads) so far."""
    where = f"/proc/{pid}" if thread is None else f"/proc/{pid}/task/{thread}"
    fields = Path(f"{where}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_mb(pid: int) -> dict[str, float]:
    """Resident memory of a process and its children (the embedded Milvus runs as a child):
    `rss` in all, `anon` the part only swap could free, `file` mapped file pages (with mmap,
    Milvus's segments: the kernel can drop them and read them back)."""
    keys = {"VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file"}
    total = dict.fromkeys(keys.values(), 0.0)
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, *value = line.split()
            if name in keys:
                total[keys[name]] += int(value[0]) / 1024
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        for child in children.read_text().split():
            for key, mb in memory_mb(int(child)).items():
                total[key] += mb
    return total


async def closed_loop(call, queries: list[str], clients: int, total: int) -> tuple[float, list]:
    """`clients` concurrent loops issuing `total` calls in all; returns (req/s, latencies)."""
    latencies: list[float] = []
    next_index = 0

    async def client() -> None:
        nonlocal next_index
        while next_index < total:
            prompt = queries[next_index % len(queries)]
            next_index += 1
            t = time.perf_counter()
            await call(prompt)
            latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return total / (time.perf_counter() - start), latencies


def threaded_loop(call, queries: list[str], clients: int, total: int,
                  initializer=None) -> tuple[float, list, dict[str, int]]:
    """`closed_loop` for a synchronous library: `clients` threads, `total` calls in all.
    A call that raises is counted under its error (and not as throughput); the worker goes
    on. Returns (successful calls per second, their latencies, errors by message)."""
    lock, latencies, errors = threading.Lock(), [], {}
    counter = iter(range(total))

    def worker() -> None:
        for i in counter:
            t = time.perf_counter()
            try:
                call(queries[i % len(queries)])
            except Exception as exc:
                with lock:
                    key = f"{type(exc).__name__}: {str(exc)[:80]}"
                    errors[key] = errors.get(key, 0) + 1
                continue
            with lock:
                latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients, initializer=initializer) as pool:
        for _ in range(clients):
            pool.submit(worker)
    return len(latencies) / (time.perf_counter() - start), latencies, errors
