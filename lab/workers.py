"""Independent experiment runs on worker processes, one per core."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

C = TypeVar("C")
R = TypeVar("R")


def run_cases(run: Callable[..., R], cases: Sequence[C], args: tuple[Any, ...],
              jobs: int) -> list[tuple[C, R]]:
    """`run(case, *args)` for every case, on `jobs` processes (one PyTorch thread each);
    results in the order of the cases."""
    if jobs <= 1:
        return [(c, run(c, *args)) for c in cases]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with ProcessPoolExecutor(jobs) as pool:
        futures = [pool.submit(run, c, *args) for c in cases]
        return [(c, f.result()) for c, f in zip(cases, futures, strict=True)]
