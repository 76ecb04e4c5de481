"""A/B runs of one velo-edged under a closed loop of gRPC clients, on a cache the benchmark left.

`tools/bench_edge.py` measures everything once; this runs one setting of the edge again and
again (cheap: no fill, no floor), so that two settings can be compared in turns on a noisy
machine. It starts the embedded Milvus on the benchmark's work folder (`--workdir` of
bench_edge.py, after a run), one velo-edged on its collection with the settings given, asks the
benchmark's hit queries (every prompt embedded: `limits.prompt_vectors` = 0), and prints
requests per second, the cores edged used, and each of edged's threads' share of a core (the
embedding workers, the event loop, ...).

    .venv/bin/python tools/edged_load.py --workdir var/bench --embedder model.onnx@1x2 \\
        LIMITS__MAX_BATCH=16

Settings are edged's environment keys without their VELO_EDGED__ prefix (the embedder's
file, threads and workers come from --embedder).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc
import numpy as np
import uvloop
from edge_bench.data import TENANT, BenchData, Variant
from edge_bench.measure import closed_loop, cpu_seconds
from edge_bench.velo_side import edged_process, ready, stop

from velo.core.models import ROOT, embedder_dir
from velo.edge.embedder import Embedder
from velo.ops.milvus_server import EmbeddedMilvus
from velo.v1 import edge_pb2, edge_pb2_grpc


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds so far of each thread of a process, by thread id."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[task.name] = cpu_seconds(pid, int(task.name))
        except FileNotFoundError:  # the thread ended meanwhile
            continue
    return out


async def run(args: argparse.Namespace) -> None:
    workdir = Path(args.workdir).resolve()
    queries = BenchData(Embedder(embedder_dir(), threads=2)).hit_queries
    milvus = EmbeddedMilvus(workdir / "milvus").start()
    edged = edged_process(milvus.uri, milvus.token, workdir, args.port, args.variant,
                          overrides=args.settings)
    try:
        await ready(edged)
        assert edged.proc is not None
        pid = edged.proc.pid
        async with grpc.aio.insecure_channel(edged.address) as channel:
            stub = edge_pb2_grpc.EdgeServiceStub(channel)

            async def ask(prompt: str) -> None:
                await stub.Ask(edge_pb2.AskRequest(prompt=prompt, tenant=TENANT), timeout=30)

            await closed_loop(ask, queries, 1, 50)  # warm
            _, single = await closed_loop(ask, queries, 1, args.requests)
            print(f"single stream: p50 {np.percentile(single, 50) * 1000:.2f} ms")
            for _ in range(args.rounds):
                before, cpu0, t = thread_cpu(pid), cpu_seconds(pid), time.perf_counter()
                rps, _ = await closed_loop(ask, queries, args.clients, args.load_requests)
                wall = time.perf_counter() - t
                after = thread_cpu(pid)
                print(f"{args.variant.name} {args.settings}: {args.clients} clients "
                      f"{rps:.1f} req/s, edged {(cpu_seconds(pid) - cpu0) / wall:.2f} cores")
            shares = sorted(((cpu - before.get(tid, 0.0)) / wall, tid)
                            for tid, cpu in after.items())[::-1]
            print("  threads (core share, id; the main thread runs the event loop, id "
                  f"{pid}): " + " ".join(f"{share:.2f}:{tid}" for share, tid in shares
                                          if share > 0.005))
    finally:
        stop(edged)
        milvus.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("settings", nargs="*", help="KEY=VALUE edged settings")
    parser.add_argument("--workdir", default=str(ROOT / "var" / "bench"),
                        help="a work folder tools/bench_edge.py filled")
    parser.add_argument("--embedder", default="model.onnx@2x2", help="FILE@THREADSxWORKERS")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=200, help="single-stream requests")
    parser.add_argument("--load-requests", type=int, default=600, help="requests per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--port", type=int, default=50159)
    args = parser.parse_args(argv)
    args.variant = Variant.parse(args.embedder)
    args.settings = dict(s.split("=", 1) for s in args.settings)
    uvloop.run(run(args))


if __name__ == "__main__":
    main()
