"""A simulated multi-edge VELO, built from the real edge code, for training and experiments.

Real: one Milvus collection per edge (`velo.edge.cache.VectorCache`, the edge's own class), the
state of eq. 6-8 (`velo.core.state`), the row selection of eq. 4, the cache value of eq. 5, the
below-mean eviction of Algorithm 2, the ONNX MiniLM embeddings (computed once per data set with
the real embedder and kept on disk) and the edge delay (search + state, measured on every step,
plus the embedder's latency measured at start). Experiments that run thousands of episodes
use `MemoryCache` instead of Milvus (same rows, checked against Milvus by a test) and a
calibrated constant edge time (measured once, so that a rerun gives the same numbers).

Simulated, because a GPU LLM cannot answer thousands of training requests here, and honestly:
- Action B's answer is a *second human answer* to the same prompt (`alt_answers`), never the
  reference itself. For an item without one (data sets with a single answer, e.g. xquad),
  B's answer is a fixed vector at distance delta from the reference, delta drawn once per item
  from the distances between second answers and references measured on oasst1 (mean 0.762,
  std 0.251 over 197 items): as good as a second human answer on average, never the reference.
- Action C's answer depends on the context: when the added QA belongs to the same question, the
  LLM answers at least as well as B and as well as the cached answer (it can use it); when it
  belongs to another question, the LLM answers as B would, except that with probability
  `mislead` it parrots the wrong context.
- Cloud delay is drawn from measured end-to-end latencies (shared/data/llm_latency_llmperf.jsonl,
  13b models, median 3.5 s; the paper's Qwen14b: 3.34 s). With `utilisation` > 0 the cloud is
  a shared, finite resource (lab.cloud): requests arrive by the Azure trace, forwards and
  augments of every edge wait in one queue for `cloud_slots` slots, and the delay is that wait
  plus the drawn service time plus the edge's distance to the cloud (`edge_rtts_s`). Each
  state then carries what the edge sees of the load (velo.core.load): cloudd's estimated wait as of
  the step's start and the edge's own recent forward latency.

Training draws the original questions of the training items; testing draws every item, asked
as one of its paraphrases when the data has them. Each step, every edge gets one request
(nearest-edge mode: users are spread over the edges) or all edges get the same request and the
fastest answer is served (all-edges mode). Each step also computes the hindsight outcome of
every valid action: the Oracle and the expert demonstrations use it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edged.config import CacheConfig
from lab.cloud import Arrivals, EdgeLink, SharedCloud, trace_gaps
from lab.memory_cache import MemoryCache, SimCache
from velo.core import qos
from velo.core.load import load_vector
from velo.core.qos import Action
from velo.core.records import QAItem
from velo.core.state import EdgeState, build_state, select_row
from velo.core.verifier import OnnxVerifier
from velo.edge.cache import VectorCache, VectorDBConfig
from velo.edge.embedder import Embedder, TextEmbedder

TENANT = "sim"


EDGE = CacheConfig()  # an edge's defaults: the simulator's are the same rules (edged.config)


@dataclass
class SimConfig:
    edges: int = 3  # N agents
    mode: str = "nearest"  # "nearest": one request per edge and step; "all": one for all edges
    top_p: int = EDGE.top_p  # P
    phi1: float = EDGE.phi1  # reward weight of satisfaction q
    phi2: float = EDGE.phi2  # reward weight of delay d (w = phi2/phi1)
    select_margin: float = EDGE.select_margin  # eq. 4's band (edged's cache.select_margin)
    eviction_every: int = EDGE.eviction_every  # xi
    eviction_min_rows: int = EDGE.eviction_min_rows
    max_rows: int = EDGE.max_rows
    skew: float = 1.1  # Zipf popularity of the items
    mislead: float = 0.3  # chance that C with a wrong context parrots it
    latency_source: str = "13b"  # which llmperf latencies model the cloud
    # ||B answer - reference|| for items without a second answer: N(mean, std), clipped;
    # measured between oasst1's second answers and references (197 items).
    b_distance: tuple[float, float] = (0.762, 0.251)
    train_items: int = 0  # training set: the N most popular items (0: all); tests use all
    edge_s: float = 0.0  # > 0: a calibrated constant edge time (reproducible runs); 0: measured
    # The correctness-aware reward: subtracted from r whenever the served answer belongs to
    # another question (a false hit, or C parroting a wrong context). 0: eq. 2's reward alone,
    # the paper's. 1.0 makes a wrong answer cost as much as 10 s of delay at w = 0.1.
    false_hit_penalty: float = 0.0
    # The cloud's load (lab.cloud): its mean utilisation when the edges send it
    # `cloud_per_arrival` requests per arrival of the trace (forwards and augments of every
    # edge); the arrival rate is utilisation * slots / (mean service time * cloud_per_arrival).
    # 0: an unloaded cloud, every delay a fresh draw, as the paper simulates. cloud_per_arrival
    # 1 is "every request forwarded once"; lab.under_load sets what the hindsight Oracle sends
    # on an idle cloud, so that a cache that forwards only what it must loads the cloud by
    # `utilisation` (a cache that reuses less loads it more).
    utilisation: float = 0.0
    cloud_per_arrival: float = 1.0
    cloud_slots: int = 8  # concurrent LLM requests (a vLLM batch)
    # Edges that differ (all-edges mode, paper §II): edge n's compute time is edge_speeds[n]
    # times the calibrated one, and its round trip to the cloud edge_rtts_s[n]; () : all alike.
    edge_speeds: tuple[float, ...] = ()
    edge_rtts_s: tuple[float, ...] = ()
    seed: int = 0


@dataclass
class Outcome:
    """What one action gives for one request (q of eq. 2, d of eq. 3, r = phi1 q - phi2 d)."""

    q: float
    d: float
    r: float
    answer_vec: np.ndarray
    answer_item: int  # which item the served answer belongs to
    row_id: int | None = None  # the cached row used (A and C)


class Oracle:
    """The Oracle baseline: each step's hindsight-best actions (SimEnv.best_actions), read from
    outcomes no edge can see. Not a Policy of the state: evaluate() asks the environment."""

    name = "oracle"
    version = 0


ORACLE = Oracle()


@dataclass
class StepResult:
    actions: list[Action]
    outcomes: list[Outcome]  # per edge
    best: list[Action]  # hindsight-best action per edge (the Oracle / the expert)
    served: int  # in all-edges mode, the edge whose answer was served (fastest); else -1
    false_hits: list[bool] = field(default_factory=list)
    reusable: list[bool] = field(default_factory=list)  # A would serve the right answer

    @property
    def rewards(self) -> list[float]:
        """Each agent's reward: its own (nearest-edge), or the served answer's (all-edges,
        where the edges act as one team)."""
        if self.served >= 0:
            return [self.outcomes[self.served].r] * len(self.outcomes)
        return [o.r for o in self.outcomes]


def item_texts(items: list[QAItem]) -> set[str]:
    return {t for i in items for t in (i.question, i.answer, *i.alt_answers, *i.paraphrases)}


class EmbeddedTexts:
    """Every text of a data set embedded once with the real ONNX embedder, cached on disk."""

    def __init__(self, texts: set[str], embedder: TextEmbedder, cache_dir: Path) -> None:
        ordered = sorted(texts)
        digest = hashlib.sha256(json.dumps(ordered).encode()).hexdigest()[:16]
        path = cache_dir / f"embeddings-{digest}-{embedder.dim}.npz"
        if path.exists():
            vectors = np.load(path)["vectors"]
        else:
            vectors = np.concatenate([embedder.embed(ordered[i : i + 64])
                                      for i in range(0, len(ordered), 64)])
            cache_dir.mkdir(parents=True, exist_ok=True)
            np.savez(path, vectors=vectors)
        self.index = {t: i for i, t in enumerate(ordered)}
        self.vectors = vectors

    def __getitem__(self, text: str) -> np.ndarray:
        return self.vectors[self.index[text]]


class SimEnv:
    def __init__(self, cfg: SimConfig, items: list[QAItem], embedder: Embedder,
                 milvus_uri: str | None, latencies_path: Path, cache_dir: Path,
                 milvus_token: str = "", verifier: OnnxVerifier | None = None,
                 trace_path: Path | None = None) -> None:
        """`milvus_uri` None: each edge's cache is a `MemoryCache` (same rows, no server).
        `milvus_token`: its token ("user:password"), when it has authentication on.
        `verifier`: the agents see the `verified` state (velo.core.state.build_state).
        `trace_path`: the Azure LLM trace whose arrivals load the cloud (cfg.utilisation > 0)."""
        self.cfg = cfg
        self.verifier = verifier
        self.items = list(items)
        if len(self.items) < 2:
            raise ValueError("the simulator needs at least 2 QA items")
        self.vec = EmbeddedTexts(item_texts(self.items), embedder, cache_dir)
        self.llm_vecs = [self._llm_answer(n, item) for n, item in enumerate(self.items)]
        self.embed_s = (0.0 if cfg.edge_s > 0
                        else measure_embedding(embedder, [i.question for i in self.items[:20]]))
        self.latencies = _load_latencies(latencies_path, cfg.latency_source)
        for key in ("edge_speeds", "edge_rtts_s"):
            if getattr(cfg, key) and len(getattr(cfg, key)) != cfg.edges:
                raise ValueError(f"{key} has {len(getattr(cfg, key))} values for "
                                 f"{cfg.edges} edges")
        self.speeds = cfg.edge_speeds or (1.0,) * cfg.edges
        self.rtts = cfg.edge_rtts_s or (0.0,) * cfg.edges
        self.cloud = SharedCloud(cfg.cloud_slots, float(self.latencies.mean()))
        rate = 0.0
        if cfg.utilisation > 0:
            if trace_path is None:
                raise ValueError("utilisation > 0 needs the arrival trace (trace_path)")
            if cfg.cloud_per_arrival <= 0:
                raise ValueError("cloud_per_arrival must be > 0, not "
                                 f"{cfg.cloud_per_arrival}")
            rate = cfg.utilisation * cfg.cloud_slots / (float(self.latencies.mean())
                                                        * cfg.cloud_per_arrival)
        self.clock = Arrivals(trace_gaps(trace_path) if rate and trace_path else np.ones(1), rate)
        self.links = [EdgeLink() for _ in range(cfg.edges)]
        self.rng = np.random.default_rng(cfg.seed)
        self.zipf = 1.0 / np.arange(1, len(self.items) + 1) ** cfg.skew
        self.order = self.rng.permutation(len(self.items))  # popularity rank -> item
        self.split = "train"
        run = uuid.uuid4().hex[:8]
        self.caches: list[SimCache] = [
            VectorCache(VectorDBConfig(uri=milvus_uri, token=milvus_token), f"sim_{run}_{n}",
                        embedder.dim)
            if milvus_uri else MemoryCache(embedder.dim) for n in range(cfg.edges)]
        for cache in self.caches:
            cache.open()
        self.pairs: list[dict[int, tuple[int, np.ndarray, str]]] = [{} for _ in self.caches]
        self.steps = 0
        self.arrivals: list[tuple[int, str]] = []
        self.states: list[EdgeState] = []

    # -- the loop: observe -> (policy) -> step ---------------------------------------------------
    def reset(self, seed: int | None = None, split: str = "train") -> list[EdgeState]:
        """Empty every edge's cache and draw the first requests (the same stream per seed).

        split "train": the original questions of the training items (the `train_items` most
        popular); "test": every item, asked as one of its paraphrases when it has any (the
        paper trains on the questions and tests on restated ones).
        """
        if split not in {"train", "test"}:
            raise ValueError(f"split must be 'train' or 'test', not {split!r}")
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        # The trace's starting point has its own stream, so a load leaves the requests alike.
        self.clock.reset(np.random.default_rng([0xC10D, seed if seed is not None
                                                else int(self.rng.integers(2**31))]))
        self.cloud.reset()
        for link in self.links:
            link.reset()
        self.steps, self.split = 0, split
        for cache, pairs in zip(self.caches, self.pairs, strict=True):
            cache.clear()
            pairs.clear()
        return self.observe()

    def cloud_load(self) -> tuple[float, float]:
        """Since the last reset: the cloud's requests per arrival of the trace, and its
        utilisation (service time of those requests over its slots' time; 0 when unloaded)."""
        waiting = len(self.arrivals) if self.cfg.mode != "all" else 1  # drawn, not yet served
        arrivals = max(self.clock.count - waiting, 1)
        utilisation = (self.cloud.busy_s / (self.cfg.cloud_slots * self.clock.now)
                       if self.cfg.utilisation > 0 and self.clock.now > 0 else 0.0)
        return self.cloud.requests / arrivals, utilisation

    def observe(self) -> list[EdgeState]:
        """Draw this step's requests and build each edge's state (its edge time is measured)."""
        count = 1 if self.cfg.mode == "all" else self.cfg.edges
        pool = len(self.items)
        if self.split == "train" and self.cfg.train_items:
            pool = min(self.cfg.train_items, pool)
        weights = self.zipf[:pool] / self.zipf[:pool].sum()
        picks = self.rng.choice(pool, size=count, p=weights)
        self.arrivals = []
        for pick in picks:
            item_index = int(self.order[pick])
            item = self.items[item_index]
            texts = ((item.paraphrases or (item.question,)) if self.split == "test"
                     else (item.question,))
            self.arrivals.append((item_index, texts[self.rng.integers(len(texts))]))
        if self.cfg.mode == "all":
            self.arrivals = self.arrivals * self.cfg.edges
        return self.observe_arrivals(self.arrivals)

    def observe_arrivals(self, arrivals: list[tuple[int, str]]) -> list[EdgeState]:
        """Build each edge's state for these (item index, text) requests, one per edge."""
        if len(arrivals) != len(self.caches):
            raise ValueError(f"{len(arrivals)} arrivals for {len(self.caches)} edges")
        self.arrivals = list(arrivals)
        # This step's randomness is drawn now, so the hindsight outcomes are the real ones.
        self.cloud_s = [float(self.rng.choice(self.latencies)) for _ in self.caches]
        self.misled = [bool(self.rng.random() < self.cfg.mislead) for _ in self.caches]
        # Nearest-edge mode: one request per edge, each at its own time of the trace;
        # all-edges mode: one request reaches every edge at once.
        if self.cfg.mode == "all":
            self.times = [self.clock.next()] * len(self.caches)
        else:
            self.times = [self.clock.next() for _ in self.caches]
        self.states, self.edge_s = [], []
        for n, (cache, (_, text)) in enumerate(zip(self.caches, self.arrivals, strict=True)):
            start = time.perf_counter()
            f = self.vec[text]
            t = self.times[n]
            load = load_vector(self.cloud.estimated_wait(t), self.links[n].forward_s(t))
            state = build_state(f, cache.search(f, TENANT, self.cfg.top_p), self.cfg.top_p,
                                self.verifier.scorer_for(text) if self.verifier else None, load)
            edge_s = self.cfg.edge_s or self.embed_s + time.perf_counter() - start
            self.edge_s.append(edge_s * self.speeds[n])
            self.states.append(state)
        return self.states

    def step(self, actions: list[Action]) -> tuple[StepResult, list[EdgeState]]:
        """Execute each edge's action, update its cache (eq. 4-5, insert, eviction)."""
        best = self.best_actions()
        outcomes, false_hits, reusable = [], [], []
        for n, action in enumerate(actions):
            candidates = self._candidates(n, self.cloud)
            reuse = candidates.get(Action.REUSE)
            reusable.append(reuse is not None and reuse.answer_item == self.arrivals[n][0])
            if action not in candidates:
                raise ValueError(f"edge {n}: action {action.letter} is masked in this state")
            outcome = candidates[action]
            false_hits.append(action is Action.REUSE
                              and outcome.answer_item != self.arrivals[n][0])
            if action is not Action.REUSE:  # the request joins the cloud's queue
                self.cloud.submit(self.times[n], self.cloud_s[n])
                self.links[n].sent(self.times[n], outcome.d)
            self._apply(n, action, outcome)
            outcomes.append(outcome)
        served = int(np.argmin([o.d for o in outcomes])) if self.cfg.mode == "all" else -1
        self.steps += 1
        if self.steps % self.cfg.eviction_every == 0:
            for cache in self.caches:
                if cache.count() >= self.cfg.eviction_min_rows:
                    cache.evict(below_mean=True, max_rows=self.cfg.max_rows, ttl_s=0)
        result = StepResult(list(actions), outcomes, best, served, false_hits, reusable)
        return result, self.observe()

    # -- what each action would give ------------------------------------------------------------
    def best_actions(self) -> list[Action]:
        """The hindsight-best actions for this step's requests (the Oracle): per edge in
        nearest-edge mode, each in its turn in the cloud's queue after the earlier edges'
        best; in all-edges mode the joint choice whose served (fastest) answer has the best
        reward. Myopic: it does not weigh what its forwards cost later requests."""
        edges = range(len(self.caches))
        if self.cfg.mode != "all":
            cloud, best = self.cloud.copy(), []
            for n in edges:
                c = self._candidates(n, cloud)
                best.append(max(c, key=lambda a: c[a].r))
                if best[-1] is not Action.REUSE:
                    cloud.submit(self.times[n], self.cloud_s[n])
            return best
        valid = [self._candidates(n, self.cloud) for n in edges]

        def served_reward(joint: Iterable[Action]) -> tuple[float, float]:
            """The served answer's reward; among equals, the edges' own rewards: an edge
            whose answer is not served gets the action that would be best were it served
            (its label as a demonstration), not whichever comes first."""
            cloud, outcomes = self.cloud.copy(), []
            for n, a in zip(edges, joint, strict=True):
                outcomes.append(self._candidates(n, cloud)[a])
                if a is not Action.REUSE:
                    cloud.submit(self.times[n], self.cloud_s[n])
            return min(outcomes, key=lambda o: o.d).r, sum(o.r for o in outcomes)

        return list(max(itertools.product(*valid), key=served_reward))

    def _candidates(self, n: int, cloud: SharedCloud | None = None) -> dict[Action, Outcome]:
        """What each valid action gives edge n, with `cloud`'s queue as it stands (default:
        the simulator's)."""
        cloud = cloud or self.cloud
        # B and C wait for a slot, then run, plus the edge's round trip to the cloud.
        cloud_s = self.rtts[n] + cloud.wait_at(self.times[n]) + self.cloud_s[n]
        misled = self.misled[n]
        item_index, _ = self.arrivals[n]
        item, state, edge_s = self.items[item_index], self.states[n], self.edge_s[n]
        reference = self.vec[item.answer]
        weights = qos.QosWeights(self.cfg.phi1, self.cfg.phi2)

        def outcome(action: Action, answer_vec: np.ndarray, answer_item: int,
                    row_id: int | None = None) -> Outcome:
            q = qos.satisfaction(answer_vec, reference)
            d = qos.delay(action, edge_s, cloud_s)
            r = qos.reward(q, d, weights)
            if answer_item != item_index:
                r -= self.cfg.false_hit_penalty
            return Outcome(q, d, r, answer_vec, answer_item, row_id)

        # B: the LLM's answer is a second human answer to the same prompt.
        llm_vec = self.llm_vecs[item_index]
        candidates = {Action.FORWARD: outcome(Action.FORWARD, llm_vec, item_index)}
        if state.rows:
            row = select_row(state.rows, self.cfg.phi1, self.cfg.phi2, self.cfg.select_margin)
            cached_item, cached_vec, _ = self.pairs[n][row.pair_id]
            candidates[Action.REUSE] = outcome(Action.REUSE, cached_vec, cached_item, row.id)
            if cached_item == item_index:  # the context answers the question
                better = max((llm_vec, cached_vec),
                             key=lambda v: qos.satisfaction(v, reference))
                candidates[Action.AUGMENT] = outcome(Action.AUGMENT, better, item_index, row.id)
            else:
                vec, owner = (cached_vec, cached_item) if misled else (llm_vec, item_index)
                candidates[Action.AUGMENT] = outcome(Action.AUGMENT, vec, owner, row.id)
        return candidates

    def _apply(self, n: int, action: Action, outcome: Outcome) -> None:
        cache, state = self.caches[n], self.states[n]
        item_index, text = self.arrivals[n]
        if action is Action.FORWARD:
            item = self.items[item_index]
            answer = item.alt_answers[0] if item.alt_answers else f"[simulated answer: {item.id}]"
            pair_id = cache.insert_pair(TENANT, text, answer, state.embedding, outcome.answer_vec,
                                        qos.initial_value(outcome.q, outcome.d))
            if pair_id is not None:
                self.pairs[n][pair_id] = (item_index, outcome.answer_vec, answer)
            return
        row = next(r for r in state.rows if r.id == outcome.row_id)
        cache.update_row(row, TENANT, row.hits + 1, qos.updated_value(row.value, outcome.q,
                                                                      outcome.d))

    def _llm_answer(self, n: int, item: QAItem) -> np.ndarray:
        """What the simulated LLM answers to item n with Action B (see the module docstring)."""
        if item.alt_answers:
            return self.vec[item.alt_answers[0]]
        reference = self.vec[item.answer].astype(np.float64)
        rng = np.random.default_rng([n, 0xB])  # the same answer on every visit and run
        mean, std = self.cfg.b_distance
        delta = float(np.clip(rng.normal(mean, std), 0.05, 1.4))
        other = rng.normal(size=reference.shape)
        other -= other @ reference * reference  # orthogonal to the reference
        other /= np.linalg.norm(other)
        cos = 1.0 - delta**2 / 2.0  # unit vectors at L2 distance delta
        return (cos * reference + np.sqrt(1.0 - cos**2) * other).astype(np.float32)

    def close(self) -> None:
        for cache in self.caches:
            cache.drop()
            cache.close()


def measure_embedding(embedder: Embedder, texts: list[str]) -> float:
    """The embedder's median latency for one request, measured here (edge time is never assumed)."""
    embedder.embed_one(texts[0])  # warm-up
    times = []
    for text in texts:
        start = time.perf_counter()
        embedder.embed_one(text)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _load_latencies(path: Path, source: str) -> np.ndarray:
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    values = [r["e2e_s"] for r in rows if r["source"].endswith(source)]
    if not values:
        raise ValueError(f"{path}: no latencies from sources ending in {source!r}")
    return np.array(values)
