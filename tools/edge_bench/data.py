"""The benchmark's data: real cached pairs and hit queries, filler rows, and the settings it
compares."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lab.pairs import load_pairs
from velo.core.models import ROOT
from velo.core.records import load_qa
from velo.edge.embedder import Embedder

DATA = ROOT.parent / "shared" / "data"
PAIRS = DATA / "paraphrase_pairs_dev.jsonl"
QA = DATA / "oasst1_dev.jsonl"
THETA = 0.5  # the edge's default policy, cache-0.5
GPTCACHE_T = 1 - THETA**2 / 4  # GPTCache hits when 4 - d^2 >= 4T, d the L2 distance
CACHED_PAIRS = 400
GPTCACHE, GPTCACHE_PATCHED = "GPTCache 0.1.44 as shipped", "GPTCache + question_id index (patched)"
FILLER_DISTANCE = 0.8
TENANT, PAIRS_TENANT = "bench", "pairs"
COLLECTION = "velo_bench"


@dataclass(frozen=True)
class Variant:
    """An embedder setting of the edge: ONNX file, onnxruntime intra-op threads per run and
    runs at once (edged `embedder_file`, `embedder_threads`, `embedder_workers`)."""

    file: str
    threads: int
    workers: int

    @property
    def name(self) -> str:
        return f"{self.file.removesuffix('.onnx')} {self.threads}x{self.workers}"

    @classmethod
    def parse(cls, text: str) -> Variant:
        file, _, shape = text.partition("@")
        threads, _, workers = (shape or "1").partition("x")
        return cls(file, int(threads), int(workers or 1))


class BenchData:
    """Real cached pairs and hit queries, and a deterministic source of filler rows."""

    def __init__(self, embedder: Embedder, pairs_limit: int = 0, seed: int = 0) -> None:
        pairs = [p for p in load_pairs(PAIRS) if p.label == 1][: pairs_limit or None]
        qa = load_qa(QA)
        self.pairs = pairs
        self.answers = [item.answer for item in qa]
        self.questions = [item.question for item in qa]
        self.a_vecs = embedder.embed([p.a for p in pairs])
        self.b_vecs = embedder.embed([p.b for p in pairs])
        self.answer_vecs = embedder.embed(self.answers)
        self.pool = np.concatenate([self.a_vecs, self.b_vecs, self.answer_vecs,
                                    embedder.embed(self.questions)])
        self.rng = np.random.default_rng(seed)

        n = min(CACHED_PAIRS, len(pairs))
        self.cached_q = [p.a for p in pairs[:n]]
        self.cached_a = [self.answers[i % len(self.answers)] for i in range(n)]
        self.cached_qv = self.a_vecs[:n]
        self.cached_av = self.answer_vecs[np.arange(n) % len(self.answers)]
        rows = np.concatenate([self.cached_qv, self.cached_av])
        nearest = np.sqrt(((self.b_vecs[:n, None, :] - rows[None]) ** 2).sum(-1)).min(1)
        # A margin under THETA: the int8 embedder and the approximate index must not turn
        # a query of this set into a miss (a miss needs the cloud, which this bench has not).
        self.hit_queries = [pairs[i].b for i in np.flatnonzero(nearest <= THETA - 0.1)]

    def filler(self, start: int, pairs: int) -> tuple[list[str], list[str], np.ndarray,
                                                     np.ndarray]:
        """`pairs` filler QA pairs (two vectors each), numbered from `start`."""
        base = self.pool[self.rng.integers(0, len(self.pool), size=2 * pairs)]
        # ~FILLER_DISTANCE from a real vector: |noise| = tan(angle) for a unit vector.
        sigma = np.tan(2 * np.arcsin(FILLER_DISTANCE / 2)) / np.sqrt(base.shape[1])
        vecs = base + self.rng.normal(0, sigma, size=base.shape).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        qs = [f"{self.questions[(start + i) % len(self.questions)]} #{start + i}"
              for i in range(pairs)]
        ans = [self.answers[(start + i) % len(self.answers)] for i in range(pairs)]
        return qs, ans, vecs[:pairs].astype(np.float32), vecs[pairs:].astype(np.float32)
