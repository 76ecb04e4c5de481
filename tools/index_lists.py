"""How many IVF lists the edge's in-process index should have at a size (issue 26).

The edge's index (velo/edge/index.py) is IVF over 8-bit vectors with nprobe 10; a rebuild sizes
a scope's lists to ~sqrt(rows) instead of Milvus's nlist 128. This checks what that costs in hits:
the cached sides of GPTCache's 999 labelled paraphrase pairs (every other pair, as
tools/edge_bench builds them) are mixed, in random order as the edge's random row ids put them,
into filler rows up to `--rows`; every `b` side is asked; a hit is the nearest row at L2 <= 0.5
(cache-0.5), right when it is the query's own pair. Printed per number of lists: hits / right /
wrong against exact search, and the time of one probe on one thread.

    .venv/bin/python tools/index_lists.py --rows 1000000 --lists 128,1024   # ~5 min on 2 cores
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
from velo.edge.embedder import Embedder
from velo.edge.index import TRAIN_PER_LIST


def tally(squared: np.ndarray, found: np.ndarray, own: np.ndarray) -> tuple[int, int, int]:
    hit = np.sqrt(np.maximum(squared[:, 0], 0)) <= THETA
    right = hit & (found[:, 0] == own)
    return int(hit.sum()), int(right.sum()), int((hit & ~right).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--lists", default="128,1024", help="numbers of IVF lists to compare")
    parser.add_argument("--nprobe", type=int, default=10)
    args = parser.parse_args()
    faiss.omp_set_num_threads(1)  # as the edge searches
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
    print(f"  exact                 {tally(squared, found, own)}")
    for nlist in (int(n) for n in args.lists.split(",")):
        ivf = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatL2(rows.shape[1]), rows.shape[1],
                                            nlist, faiss.ScalarQuantizer.QT_8bit,
                                            faiss.METRIC_L2)
        ivf.cp.min_points_per_centroid = 1
        ivf.train(rows[: max(8193, TRAIN_PER_LIST * nlist)])  # as RowIndex trains a scope
        ivf.add(rows)
        ivf.nprobe = args.nprobe
        t = time.perf_counter()
        squared_ivf, found_ivf = ivf.search(queries, 1)
        ms = (time.perf_counter() - t) / len(queries) * 1000
        same = float((found_ivf[:, 0] == found[:, 0]).mean())
        print(f"  {nlist:5d} lists, nprobe {args.nprobe}: {tally(squared_ivf, found_ivf, own)}, "
              f"nearest row as exact for {same:.1%}, {ms:.2f} ms a probe")


if __name__ == "__main__":
    main()
