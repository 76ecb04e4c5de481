"""The edge decision, the part of every request that runs before any answer exists:

    embed the prompt -> search the tenant's top-P rows -> build the state (eq. 6-8) -> policy

Concurrent requests share embedding runs and vector searches (edged.batching); each stage is
timed so that operators and `tools/bench_edge.py` see where the time goes. A learned policy's
forward pass runs on its own thread, never on the event loop: a large policy must slow only
the decisions, not health checks or the answers already on their way.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from edged.batching import MicroBatcher
from velo.core.policy import Decision, Policy
from velo.core.state import CachedRow, EdgeState, build_state
from velo.core.verifier import OnnxVerifier
from velo.edge.cache import VectorCache
from velo.edge.embedder import TextEmbedder


class VectorDBError(Exception):
    """The vector database failed a search; the message says how."""


@dataclass(frozen=True)
class StageTimes:
    embed_s: float
    search_s: float
    state_s: float
    policy_s: float

    @property
    def total_s(self) -> float:
        return self.embed_s + self.search_s + self.state_s + self.policy_s


@dataclass(frozen=True)
class Decided:
    embedding: np.ndarray
    state: EdgeState
    policy: Policy  # the policy that decided (one read: a swap mid-request cannot mix versions)
    decision: Decision
    times: StageTimes


class PromptVectors:
    """The exact-match layer in front of the semantic one: the embeddings of the most recent
    distinct prompts (an embedding depends only on the text), so that a repeated prompt is
    never embedded twice. Least recently used first out."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._vectors: OrderedDict[str, np.ndarray] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, prompt: str) -> np.ndarray | None:
        vector = self._vectors.get(prompt)
        if vector is None:
            self.misses += 1
            return None
        self._vectors.move_to_end(prompt)
        self.hits += 1
        return vector

    def put(self, prompt: str, vector: np.ndarray) -> None:
        if self.capacity <= 0:
            return
        vector.flags.writeable = False  # shared by every request with this prompt
        self._vectors[prompt] = vector
        self._vectors.move_to_end(prompt)
        while len(self._vectors) > self.capacity:
            self._vectors.popitem(last=False)


class Decider:
    def __init__(self, embedder: TextEmbedder, cache: VectorCache,
                 current_policy: Callable[[], Policy], top_p: int, max_batch: int = 32,
                 embed_workers: int = 2,
                 verifier: OnnxVerifier | None = None, prompt_vectors: int = 0,
                 search_timeout_s: float = 10.0,
                 load: Callable[[], np.ndarray] | None = None) -> None:
        """`prompt_vectors`: how many distinct prompts' embeddings to keep (0: none).
        `search_timeout_s`: the longest a request waits for its search, queueing behind a
        batch in flight included (vector_db.timeout_s bounds each Milvus call; a request that
        arrives during a frozen call would otherwise wait for it and then its own).
        `load`: what the edge sees of the cloud's load now (velo.core.load), for load-aware
        policies."""
        self.load = load
        self.top_p, self.current_policy, self.verifier = top_p, current_policy, verifier
        self.search_timeout_s = search_timeout_s
        self.prompt_vectors = PromptVectors(prompt_vectors)
        # Embedding runs in parallel on `embed_workers` threads (onnxruntime releases the GIL),
        # each request answered when its run is done; vector searches are batched on one.
        self.embeddings: MicroBatcher[str, np.ndarray] = MicroBatcher.in_parts(
            embedder.embed_parts, max_batch, "embed", workers=embed_workers)
        self.searches: MicroBatcher[tuple[str, np.ndarray], list[CachedRow]] = MicroBatcher(
            lambda queries: cache.search_many(queries, top_p), max_batch, "search")
        self._policy_thread = ThreadPoolExecutor(1, thread_name_prefix="policy")

    async def decide(self, prompt: str, tenant: str,
                     keep: Callable[[list[CachedRow]], list[CachedRow]] | None = None,
                     ) -> Decided:
        """`keep`: the searched rows (nearest first) this request may use (cache control, TTL,
        answer fit); the policy sees only those, so a state never offers a row the edge would
        not serve."""
        t0 = time.perf_counter()
        f = self.prompt_vectors.get(prompt)
        if f is None:
            f = await self.embeddings.submit(prompt)
            self.prompt_vectors.put(prompt, f)
        t1 = time.perf_counter()
        try:
            async with asyncio.timeout(self.search_timeout_s):  # no extra task per request
                rows = await self.searches.submit((tenant, f))
        except TimeoutError as exc:
            raise VectorDBError(f"Milvus did not answer within vector_db.timeout_s = "
                                f"{self.search_timeout_s} s") from exc
        except Exception as exc:  # pymilvus raises many types; the caller needs one
            raise VectorDBError(str(exc)) from exc
        if keep is not None:
            rows = keep(rows)
        t2 = time.perf_counter()
        policy = self.current_policy()
        state = build_state(f, rows, self.top_p, self._verify(policy, prompt),
                            self.load() if self.load is not None else None)
        t3 = time.perf_counter()
        if policy.runs_model:
            decision = await asyncio.get_running_loop().run_in_executor(
                self._policy_thread, policy.decide, state)
        else:  # a baseline: a comparison or two, cheaper than a thread hop
            decision = policy.decide(state)
        t4 = time.perf_counter()
        return Decided(f, state, policy, decision, StageTimes(t1 - t0, t2 - t1, t3 - t2, t4 - t3))

    def _verify(self, policy: Policy, prompt: str,
                ) -> Callable[[tuple[CachedRow, ...]], np.ndarray] | None:
        """The verified state's scorer when the policy was trained on it (velo.core.state)."""
        if policy.state != "verified" or self.verifier is None:
            return None
        return self.verifier.scorer_for(prompt)

    def close(self) -> None:
        self.embeddings.close()
        self.searches.close()
        self._policy_thread.shutdown(wait=False, cancel_futures=True)
