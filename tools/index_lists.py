"""How many IVF lists the edge's in-process index should have at a size (issue 26).

The edge's index (velo/edge/index.py) is IVF over 8-bit vectors with nprobe 10; a rebuild sizes
a scope's lists to ~sqrt(rows) instead of Milvus's nlist 128. This checks what that costs in hits:
the cached sides of GPTCache's 999 labelled paraphrase pairs (every other pair, as
tools/edge_bench builds them) are mixed, in random order as the edge's random row ids put them,
into filler rows up to `--rows`; every `b` side is asked; a hit is the nearest row at L2 <= 0.5
(cache-0.5), right when it is the query's own pair. Printed per number of lists: hits / right /
wrong against exact search, and the time of one probe on one thread, for the edge's own
RowIndex as a scope grown at run time holds it (nlist lists) and as a rebuild builds it.

    .venv/bin/python tools/index_lists.py --rows 1000000   # ~5 min on 2 cores
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from edge_bench.data import THETA, BenchData

from velo.core.models import embedder_dir
from velo.core.state import CachedRow
from velo.edge.embedder import Embedder
from velo.edge.index import EXACT_UP_TO, RowIndex


def tally(squared: np.ndarray, found: np.ndarray, own: np.ndarray) -> tuple[int, int, int]:
    hit = np.sqrt(np.maximum(squared[:, 0], 0)) <= THETA
    right = hit & (found[:, 0] == own)
    return int(hit.sum()), int(right.sum()), int((hit & ~right).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--nlist", type=int, default=128, help="vector_db.nlist")
    parser.add_argument("--nprobe", type=int, default=10, help="vector_db.nprobe")
    args = parser.parse_args()
    data = BenchData(Embedder(embedder_dir(), threads=2))
    held = np.flatnonzero(np.arange(len(data.pairs)) % 2 == 0)
    parts, done = [data.a_vecs[held]], len(held)
    while done < args.rows:
        _, _, qv, av = data.filler(done, min(50_000, (args.rows - done) // 2))
        parts += [qv, av]
        done += 2 * len(qv)
    rows = np.concatenate(parts).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(rows))
    rows = rows[order]
    own = np.full(len(data.pairs), -1)
    own[held] = np.argsort(order)[: len(held)]  # where each cached side went
    queries = data.b_vecs.astype(np.float32)
    exact = faiss.IndexFlatL2(rows.shape[1])
    exact.add(rows)
    squared, found = exact.search(queries, 1)
    print(f"{len(rows)} rows, {len(queries)} queries; hits / right / wrong at L2 <= {THETA}")
    print(f"  exact                       {tally(squared, found, own)}")
    # The edge's own index, as a scope grown while the edge ran holds it (trained at
    # EXACT_UP_TO rows on the configured nlist) and as a rebuild that knew its size does.
    for label, expect in (("grown at run time", False), ("rebuilt", True)):
        index = RowIndex(rows.shape[1], args.nlist, args.nprobe)
        if expect:
            index.expect("t", len(rows))
        for start in range(0, len(rows), 4096):
            index.add("t", [CachedRow(id=i, pair_id=i // 2, kind=i % 2 + 1, question="",
                                      answer="", hits=0, value=0.0, created=0.0, distance=0.0,
                                      vector=rows[i])
                            for i in range(start, min(start + 4096, len(rows)))])
        t = time.perf_counter()
        nearest = index.search("t", queries, 1)
        ms = (time.perf_counter() - t) / len(queries) * 1000
        found_ivf = np.array([[r[0].id] for r in nearest])
        squared_ivf = np.array([[r[0].distance ** 2] for r in nearest])
        same = float((found_ivf[:, 0] == found[:, 0]).mean())
        lists = index.lists_for(len(rows) if expect else EXACT_UP_TO + 1)
        print(f"  {label:<17} {lists:5d} lists: {tally(squared_ivf, found_ivf, own)}, "
              f"nearest row as exact for {same:.1%}, {ms:.2f} ms a probe")

if __name__ == "__main__":
    main()
