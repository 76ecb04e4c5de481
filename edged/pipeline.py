"""The edge request path, one straight line (Algorithm 2, lines 12-14):

    validate -> embed -> search top-P -> keep the rows that fit -> build state (eq. 6-8)
             -> policy -> execute A/B/C -> answer -> record (cache insert or eq. 4-5 update,
             experience, stats)

It knows no transport: it takes an `EdgeRequest` and yields events (edged.contract), and
refuses with `EdgeError`s that each front maps once. A request whose shape the cache cannot
serve (tools, tool turns, logprobs: velo.core.shape) is a pass-through: straight to the LLM, not
cached, no policy decision, no experience.

Every answered request has its experience record on disk before the answer leaves: a crash
right after the answer loses nothing. Shadow-verified records are written first and
completed with q when the LLM's fresh answer arrives (edged.spool: held records).
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar, cast

import numpy as np

from edged.batching import MicroBatcher
from edged.cloud_client import CloudClient, CloudError, Generation
from edged.config import EdgeConfig
from edged.contract import (
    Answered,
    Decided,
    EdgeError,
    EdgeRequest,
    ErrorKind,
    Event,
    Piece,
    Usage,
    invalid,
)
from edged.decision import Decider, VectorDBError
from edged.metrics import EdgeMetrics
from edged.reuse import Candidate, ReuseGuard
from edged.spool import Encoder, Spool
from edged.trainer_link import ExperienceUploader, PolicyFollower
from velo.core import qos
from velo.core.bad_input import MAX_REQUEST_ID_CHARS, clip, request_id_problem
from velo.core.conversation import (
    Turn,
    cache_scope,
    context_key,
    history_problem,
    prompt_problem,
)
from velo.core.names import NAME_RULE, valid_name
from velo.core.policy import Decision
from velo.core.qos import Action
from velo.core.shape import (
    AnswerFacts,
    Shape,
    bypass_reasons,
    fits,
    keyed_fields,
    shape_key,
    shape_problem,
    storable,
)
from velo.core.state import CachedRow, EdgeState, select_row
from velo.edge.cache import VectorCache
from velo.edge.embedder import EmbedderUnavailable, TextEmbedder
from velo.runtime.logs import get_logger
from velo.runtime.serving import PartReport
from velo.v1 import trainer_pb2

log = get_logger("edged.pipeline")
P = ParamSpec("P")
R = TypeVar("R")
Emit = Callable[[Event], Awaitable[None]]
REPLAY_WORDS = 4  # a streamed reuse is replayed in pieces of this many words
PASS_THROUGH = "pass-through"  # the "policy" of a request no policy decided
# Reports a part of the edge up or down: (part, ok, reason).
VECTOR_DB, CLOUD, TRAINER = "vector_db", "cloud", "trainer"


@dataclass
class ActionCounters:
    requests: int = 0
    delay_sum_s: float = 0.0
    satisfaction_count: int = 0
    satisfaction_sum: float = 0.0
    reward_sum: float = 0.0


@dataclass
class Counters:
    requests: int = 0
    errors: int = 0
    evicted_rows: int = 0
    shadow_verified: int = 0
    shadow_skipped: int = 0
    bypassed: int = 0  # pass-through requests (tools, tool turns, logprobs)
    entries_superseded: int = 0  # replaced by a no-cache request's fresh answer
    # Shadow-verified reuses and those judged wrong (q below [reuse] right_q), counted with or
    # without a reuse guard: every edge has a false-hit estimate.
    reuses_verified: int = 0
    reuses_judged_wrong: int = 0
    actions: dict[Action, ActionCounters] = field(
        default_factory=lambda: {a: ActionCounters() for a in Action})

    @property
    def false_hit_estimate(self) -> float:
        """Share of verified reuses judged wrong; 0 before any (GetStats says so; /metrics
        says NaN, edged.metrics)."""
        return self.reuses_judged_wrong / self.reuses_verified if self.reuses_verified else 0.0


class _Fit:
    """The rows a request may use: the edge's TTL and similarity floor made stricter (never
    looser) by the request's cache control, and the answer-fit rule (velo.core.shape.fits). It
    remembers whether the nearest usable row was dropped only because its answer does not fit
    the request's token limit (said to the caller as bypass "max_tokens")."""

    def __init__(self, floor: float, oldest: float, max_tokens: int) -> None:
        self.floor, self.oldest, self.max_tokens = floor, oldest, max_tokens
        self.misfit = False

    def __call__(self, rows: list[CachedRow]) -> list[CachedRow]:
        usable = [r for r in rows if r.similarity >= self.floor and r.created >= self.oldest]
        fitting = [r for r in usable if fits(r.facts, self.max_tokens)]
        self.misfit = bool(usable) and usable[0] not in fitting
        return fitting


class EdgePipeline:
    def __init__(self, cfg: EdgeConfig, embedder: TextEmbedder, cache: VectorCache,
                 cloud: CloudClient, policies: PolicyFollower, spool: Spool,
                 uploader: ExperienceUploader, report: PartReport,
                 guard: ReuseGuard | None = None, metrics: EdgeMetrics | None = None) -> None:
        self.cfg, self.embedder, self.cache, self.cloud = cfg, embedder, cache, cloud
        self.metrics = metrics
        self.guard = guard
        self.policies, self.spool, self.uploader = policies, spool, uploader
        self.report = report
        self.weights = qos.QosWeights(cfg.cache.phi1, cfg.cache.phi2)
        self.counters = Counters()
        self.q_estimate = cfg.cache.satisfaction_prior  # running mean of measured q
        self.eviction_due = asyncio.Event()
        self.background: set[asyncio.Task[None]] = set()
        self.inflight = 0
        self.shadows = 0  # shadow verifications in flight
        self.rng = np.random.default_rng(cfg.policy.seed)
        self.decider = Decider(embedder, cache, lambda: policies.current, cfg.cache.top_p,
                               cfg.limits.max_batch, cfg.embedder_workers,
                               guard.verifier if guard is not None else None,
                               cfg.limits.prompt_vectors, cfg.vector_db.timeout_s,
                               cloud.load.vector)
        # Concurrent requests' experience goes to disk in one transaction.
        self.spool_writes: MicroBatcher[tuple[Encoder, bool], int | None] = MicroBatcher(
            spool.append_many, 256, "spool")

    # -- the two ways in ---------------------------------------------------------------------
    async def ask(self, request: EdgeRequest, emit: Emit | None = None) -> Answered:
        """Serve one request; `emit` is told the decision and each piece of text as they come
        (then the answer is returned, not emitted)."""
        if self.inflight >= self.cfg.limits.max_inflight:
            self._refused(ErrorKind.RESOURCE_EXHAUSTED)
            raise EdgeError(ErrorKind.RESOURCE_EXHAUSTED,
                            f"edge {self.cfg.edge_id} is at capacity ({self.inflight} requests "
                            "in flight); retry shortly")
        self.inflight += 1
        try:
            # asyncio.timeout, not wait_for: no second task per request (~0.1 ms each).
            async with asyncio.timeout(self.cfg.limits.request_timeout_s):
                return await self._serve(request, emit)
        except TimeoutError:
            self.counters.errors += 1
            self._refused(ErrorKind.DEADLINE_EXCEEDED)
            raise EdgeError(ErrorKind.DEADLINE_EXCEEDED,
                            f"request took longer than {self.cfg.limits.request_timeout_s} s "
                            "(edged limits.request_timeout_s)") from None
        except EdgeError as exc:
            self.counters.errors += 1
            self._refused(exc.kind)
            raise
        finally:
            self.inflight -= 1

    async def stream(self, request: EdgeRequest) -> AsyncGenerator[Event, None]:
        """Serve one request as events: Decided, Pieces of text, then Answered. An error is
        raised where it happens (before Decided: nothing was served). Leaving the iteration
        early cancels the request: nothing partial is cached."""
        events: asyncio.Queue[Event | None] = asyncio.Queue()
        task = asyncio.create_task(self.ask(request, events.put))
        task.add_done_callback(lambda _: events.put_nowait(None))
        try:
            while (event := await events.get()) is not None:
                yield event
            yield task.result()
        finally:
            if not task.done():
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    # -- the request line ---------------------------------------------------------------------
    async def _serve(self, request: EdgeRequest, emit: Emit | None) -> Answered:
        tenant = self._validate(request)
        request_id = request.request_id or uuid.uuid4().hex
        max_tokens = request.max_tokens or self.cfg.limits.default_max_tokens
        history = list(request.history)
        conversation = context_key(history)
        keyed_on = (("history",) if conversation else ()) + tuple(keyed_fields(request.shape))
        if bypass := bypass_reasons(request.shape, history):
            return await self._pass_through(request, tenant, request_id, max_tokens,
                                            tuple(bypass), keyed_on, emit)
        # The cache key: the tenant, its conversation's context and the answer's shape.
        scope = cache_scope(tenant, conversation, shape_key(request.shape))
        fit = self._fit(request, max_tokens)
        try:
            decided = await self.decider.decide(request.prompt, scope, fit)
        except VectorDBError as exc:
            raise await self._vector_db_down("search", exc) from exc
        except EmbedderUnavailable as exc:  # embedder = "triton" and the server is not answering
            raise EdgeError(ErrorKind.UNAVAILABLE, str(exc)) from exc
        f, state, policy, decision = decided.embedding, decided.state, decided.policy, \
            decided.decision
        edge_s = decided.times.total_s

        action = decision.action
        row = self._select(state) if action is not Action.FORWARD else None
        candidate = self.guard.best(request.prompt, state.rows) \
            if self.guard and state.rows else None
        if action is Action.REUSE and candidate is not None:
            if candidate.trusted:
                row = candidate.row  # the verifier's best, not eq. 4's pick
            else:  # the guard does not trust this reuse: ask the LLM instead
                assert self.guard is not None  # a candidate comes from the guard only
                self.guard.vetoed += 1
                action, row = Action.FORWARD, None
        bypass = []
        superseded: tuple[int, ...] = ()
        if request.cache.no_cache:
            # The LLM answers; what this request would have been served from is replaced.
            if action is Action.REUSE:
                assert row is not None  # only a FORWARD leaves row None
                superseded = self._would_serve(state, row)
            action, row = Action.FORWARD, None
            bypass.append("no-cache")
        elif fit.misfit and action is not Action.REUSE:
            bypass.append("max_tokens")
        if action is not decision.action:
            # What the edge did (policy, guard and cache control together) is what the
            # learner must see.
            decision = Decision(action, np.eye(3, dtype=np.float32)[action])
        head = Decided(action, policy.name, policy.version, request_id, self.cfg.edge_id, row,
                       tuple(bypass), keyed_on)
        if emit is not None:
            await emit(head)

        cloud_s, saved, generation = 0.0, None, None
        if action is Action.REUSE:
            assert row is not None  # only a FORWARD leaves row None
            answer, facts = row.answer, row.facts
            usage = saved = Usage(facts.prompt_tokens, facts.completion_tokens, facts.estimated)
            finish = facts.finish_reason
            if emit is not None:  # replayed as a stream, as the LLM would have sent it
                for piece in replay_pieces(answer):
                    await emit(Piece(piece))
        else:
            context: list[tuple[str, str]] = []
            if action is Action.AUGMENT:
                assert row is not None  # only a FORWARD leaves row None
                context = [(row.question, row.answer)]
            generation = await self._generate(request, request_id, max_tokens, context, emit,
                                              has_rows=bool(state.rows))
            answer, cloud_s, finish = generation.text, generation.cloud_s, \
                generation.finish_reason
            usage = generation.usage
        d = qos.delay(action, edge_s, cloud_s)
        q, answer_vec = await self._satisfaction(request, answer)

        record = _Record(request_id, scope, tenant, request.prompt, answer, f, answer_vec, state,
                         decision, policy.version, row, d, q, history=history,
                         candidate=candidate, max_tokens=max_tokens, shape=request.shape,
                         store=not request.cache.no_store, generation=generation)
        if hasattr(policy, "observe"):  # policies that learn online (Greedy-LLM)
            policy.observe(action, q if q is not None else self.q_estimate, d)
        shadow = q is None and action is not Action.FORWARD and self._shadow_sampled()
        seq = await self._record(record, held=shadow)
        if shadow and seq is not None:
            self.shadows += 1
            self._spawn(self._shadow_verify(record, seq))
        if action is Action.FORWARD and candidate is not None:
            self._spawn(self._verify_candidate(record))  # a free verification of the best row
        if superseded and record.pair_id:
            await self._vector_db(self.cache.delete_pairs, list(superseded))
            self.counters.entries_superseded += len(superseded)
            log.info("superseded", request_id=request_id, tenant=tenant,
                     entries=list(superseded), by=record.pair_id)
        else:
            superseded = ()

        if self.metrics is not None:
            self.metrics.answered(action, decided.times, cloud_s, d,
                                  row.similarity if row is not None else None)
            self.metrics.bypassed(head.bypass)
        log.info("answered", request_id=request_id, tenant=tenant, action=action.letter,
                 delay_s=round(d, 4), edge_ms=round(edge_s * 1000, 2), policy=policy.name,
                 finish_reason=finish)
        return Answered(
            head, answer, finish, usage, saved,
            tool_calls=generation.tool_calls if generation else None,
            logprobs=generation.logprobs if generation else None,
            delay_s=d, edge_s=edge_s, cloud_s=cloud_s, satisfaction=q,
            reward=qos.reward(q, d, self.weights) if q is not None else None,
            stored_entry_id=record.pair_id or 0, superseded=superseded)

    async def _pass_through(self, request: EdgeRequest, tenant: str, request_id: str,
                            max_tokens: int, bypass: tuple[str, ...], keyed_on: tuple[str, ...],
                            emit: Emit | None) -> Answered:
        """A request the cache cannot serve: the LLM answers, nothing is cached or learned."""
        head = Decided(Action.FORWARD, PASS_THROUGH, 0, request_id, self.cfg.edge_id,
                       bypass=bypass, keyed_on=keyed_on)
        if emit is not None:
            await emit(head)
        generation = await self._generate(request, request_id, max_tokens, [], emit,
                                          has_rows=False)
        q, _ = await self._satisfaction(request, generation.text)
        d = generation.cloud_s
        self.counters.requests += 1
        self.counters.bypassed += 1
        self._count_action(Action.FORWARD, d, q)
        if self.metrics is not None:
            self.metrics.passed_through(d, d)
            self.metrics.bypassed(bypass)
        log.info("answered", request_id=request_id, tenant=tenant, action="B",
                 delay_s=round(d, 4), policy=PASS_THROUGH, bypass=list(bypass),
                 finish_reason=generation.finish_reason)
        return Answered(
            head, generation.text, generation.finish_reason, generation.usage,
            tool_calls=generation.tool_calls, logprobs=generation.logprobs, delay_s=d,
            cloud_s=d, satisfaction=q,
            reward=qos.reward(q, d, self.weights) if q is not None else None)

    # -- steps ------------------------------------------------------------------------------
    def _refused(self, kind: ErrorKind) -> None:
        if self.metrics is not None:
            self.metrics.refused(kind.name)

    def _fit(self, request: EdgeRequest, max_tokens: int) -> _Fit:
        """Which cached rows this request may use (cache.no_cache aside: such a request still
        looks, to replace what it would have been served)."""
        control = request.cache
        floor = max(self.cfg.cache.min_similarity, control.min_similarity)
        ages = [age for age in (self.cfg.cache.ttl_s, control.max_age_s) if age > 0]
        oldest = time.time() - min(ages) if ages else float("-inf")  # per entry, from creation
        return _Fit(floor, oldest, max_tokens)

    def _would_serve(self, state: EdgeState, row: CachedRow) -> tuple[int, ...]:
        """The entries a reuse would have been served from: the chosen row's pair and every
        pair eq. 4 chose it among (similarity within select_margin of it), so that none of
        them outranks the fresh answer by its hit count afterwards."""
        band = row.similarity - self.cfg.cache.select_margin
        return tuple(dict.fromkeys(r.pair_id for r in state.rows if r.similarity >= band))

    async def _generate(self, request: EdgeRequest, request_id: str, max_tokens: int,
                        context: list[tuple[str, str]], emit: Emit | None,
                        has_rows: bool) -> Generation:
        try:
            return await self.cloud.generate(request.prompt, context, max_tokens, request_id,
                                             emit, history=request.history,
                                             shape=request.shape)
        except CloudError as exc:
            # Say so only when it is true for this request: its tenant has cached rows.
            hint = "; cached answers are still served" if has_rows else ""
            raise EdgeError(exc.kind, f"{exc}{hint}") from None

    async def _satisfaction(self, request: EdgeRequest, answer: str,
                            ) -> tuple[float | None, np.ndarray | None]:
        """q (eq. 2) of the answer against the request's reference answer, when it has one."""
        if not request.reference_answer:
            return None, None
        answer_vec, reference_vec = await asyncio.to_thread(
            self.embedder.embed, [answer, request.reference_answer])
        return qos.satisfaction(answer_vec, reference_vec), answer_vec

    def _validate(self, request: EdgeRequest) -> str:
        """Check the request; returns the tenant it runs as (an API key's own tenant)."""
        limits = self.cfg.limits
        if problem := prompt_problem(request.prompt, request.history):
            raise invalid(problem)
        if len(request.prompt) > limits.max_prompt_chars:
            raise invalid(f"prompt is {len(request.prompt)} characters; this edge accepts at "
                          f"most {limits.max_prompt_chars} (edged limits.max_prompt_chars)")
        tenant = request.tenant
        principal = request.principal
        if principal is not None:  # an API key: it is bound to one tenant
            if tenant and tenant != principal.name:
                raise EdgeError(ErrorKind.PERMISSION_DENIED,
                                f"this API key may not ask as tenant {clip(tenant)}; "
                                "leave tenant empty or use the key's own tenant")
            tenant = principal.name
        if not valid_name(tenant):
            raise invalid(f"tenant {clip(tenant)} is invalid: use {NAME_RULE}")
        if problem := history_problem(list(request.history), 4 * limits.max_prompt_chars):
            raise invalid(f"{problem} (history may hold 4 x limits.max_prompt_chars)")
        if not 0 <= request.max_tokens <= limits.max_tokens:
            raise invalid(f"max_tokens must be between 0 (the edge's default, "
                          f"{limits.default_max_tokens}) and {limits.max_tokens}")
        if len(request.reference_answer) > limits.max_reference_chars:
            raise invalid(f"reference_answer exceeds {limits.max_reference_chars} characters")
        if problem := request_id_problem(request.request_id):
            raise invalid(problem)
        if problem := request.cache.problem():
            raise invalid(problem)
        if problem := shape_problem(request.shape):
            raise invalid(problem)
        return tenant

    def _select(self, state: EdgeState) -> CachedRow:
        return select_row(state.rows, self.weights.phi1, self.weights.phi2,
                          self.cfg.cache.select_margin)

    async def _record(self, rec: _Record, held: bool = False) -> int | None:
        """Update the cache (insert on B, eq. 5 on A/C), then the experience and the stats;
        returns the experience record's sequence number (None: it could not be stored)."""
        q_used = rec.q if rec.q is not None else self.q_estimate
        if rec.decision.action is Action.FORWARD:
            if rec.answer_vec is None:  # kept on the record: the reuse guard's check needs it
                rec.answer_vec = await asyncio.to_thread(self.embedder.embed_one, rec.answer)
            if rec.store and rec.facts is not None:
                rec.pair_id = await self._vector_db(
                    self.cache.insert_pair, rec.scope, rec.prompt, rec.answer, rec.prompt_vec,
                    rec.answer_vec, qos.initial_value(q_used, rec.d), tenant=rec.tenant,
                    facts=rec.facts)
        else:
            # Write-behind (velo.edge.cache): no Milvus call here, so no thread either.
            assert rec.row is not None  # a REUSE or AUGMENT has its row
            self.cache.update_row(rec.row, rec.scope, rec.row.hits + 1,
                                  qos.updated_value(rec.row.value, q_used, rec.d))
        if rec.q is not None:
            self.q_estimate += 0.05 * (rec.q - self.q_estimate)
        try:
            seq = await self.spool_writes.submit((rec.experience_encoder(self.cfg.edge_id), held))
        except Exception as exc:  # the user's answer stands; the loss is logged and counted
            log.error("experience record not stored", request_id=rec.request_id,
                      error=str(exc))
            seq = None
        self.uploader.wake()
        self.counters.requests += 1
        self._count_action(rec.decision.action, rec.d, rec.q)
        if self.counters.requests % self.cfg.cache.eviction_every == 0:
            self.eviction_due.set()
        return seq

    async def _shadow_verify(self, rec: _Record, seq: int) -> None:
        """Shadow verification: ask the LLM too (as background work: cloudd serves it only
        when a slot is free) and measure q of the served answer against the fresh one; then
        release the held record, with q when it was measured."""
        try:
            shadow_id = f"{rec.request_id[:MAX_REQUEST_ID_CHARS - 7]}-shadow"
            fresh = await self.cloud.generate(rec.prompt, [], rec.max_tokens, shadow_id,
                                              background=True, history=rec.history,
                                              shape=rec.shape)
            served_vec, fresh_vec = await asyncio.to_thread(self.embedder.embed,
                                                            [rec.answer, fresh.text])
            rec.q, rec.shadow = qos.satisfaction(served_vec, fresh_vec), True
        except CloudError as exc:
            self.counters.shadow_skipped += 1
            log.info("shadow verification skipped", request_id=rec.request_id, reason=str(exc))
        finally:
            self.shadows -= 1
            body = rec.experience_encoder(self.cfg.edge_id)(seq)
            await asyncio.to_thread(self.spool.release, seq, body)
            self.uploader.wake()
        if rec.q is None:
            return
        if rec.decision.action is Action.REUSE:
            self.counters.reuses_verified += 1
            self.counters.reuses_judged_wrong += rec.q < self.cfg.reuse.right_q
        if rec.candidate is not None and rec.decision.action is Action.REUSE:
            assert self.guard is not None  # a candidate comes from the guard only
            self.guard.observe(rec.candidate, rec.q)
        self.counters.shadow_verified += 1
        self.q_estimate += 0.05 * (rec.q - self.q_estimate)
        c = self.counters.actions[rec.decision.action]
        c.satisfaction_count += 1
        c.satisfaction_sum += rec.q
        c.reward_sum += qos.reward(rec.q, rec.d, self.weights)

    async def _verify_candidate(self, rec: _Record) -> None:
        """After a forward: would the best cached row have been right? Its answer against the
        fresh one is a verified outcome at no LLM cost (edged.reuse)."""
        # Spawned for a FORWARD with a candidate (from the guard), after _record embedded the
        # answer.
        assert rec.candidate is not None and self.guard is not None
        assert rec.answer_vec is not None
        row_vec = await asyncio.to_thread(self.embedder.embed_one, rec.candidate.row.answer)
        self.guard.observe(rec.candidate, qos.satisfaction(row_vec, rec.answer_vec))

    def _count_action(self, action: Action, d: float, q: float | None) -> None:
        c = self.counters.actions[action]
        c.requests += 1
        c.delay_sum_s += d
        if q is not None:
            c.satisfaction_count += 1
            c.satisfaction_sum += q
            c.reward_sum += qos.reward(q, d, self.weights)

    def _shadow_sampled(self) -> bool:
        if self.cloud.stub is None or self.rng.random() >= self.cfg.policy.shadow_rate:
            return False
        if self.shadows >= self.cfg.policy.shadow_max_inflight:
            self.counters.shadow_skipped += 1  # its own small budget: users come first
            return False
        return True

    async def _vector_db(self, method: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await asyncio.to_thread(method, *args, **kwargs)
        except Exception as exc:  # pymilvus raises many types; the caller needs one status
            raise await self._vector_db_down(method.__name__, exc) from exc

    async def _vector_db_down(self, call: str, exc: Exception) -> EdgeError:
        reason = f"vector database unavailable ({self.cfg.vector_db.uri}): {clip(str(exc), 300)}"
        log.error("vector database call failed", call=call, error=str(exc))
        await self.report(VECTOR_DB, False, reason)
        return EdgeError(ErrorKind.UNAVAILABLE, reason)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self.background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background step failed", error=repr(task.exception()))

    # -- eviction (its own task, Algorithm 2 lines 15-22) -------------------------------------
    async def eviction_loop(self, period_s: float = 60.0) -> None:
        """Every xi requests: below-mean eviction; every `period_s` anyway: cap and TTL."""
        while True:
            try:  # asyncio.timeout: wait_for (3.11) loses a cancel as the event is set
                async with asyncio.timeout(period_s):
                    await self.eviction_due.wait()
                below_mean = True
            except TimeoutError:
                below_mean = False
            self.eviction_due.clear()
            await self.evict(below_mean)

    async def evict(self, below_mean: bool) -> int:
        """One eviction pass (below-mean only once the edge holds eviction_min_rows rows,
        sparing rows younger than eviction_grace_s); returns the rows dropped."""
        cache_cfg = self.cfg.cache
        if self.guard is not None:
            await asyncio.to_thread(self.guard.save)
        try:
            if below_mean:
                below_mean = await asyncio.to_thread(self.cache.count) >= \
                    cache_cfg.eviction_min_rows
            dropped = await asyncio.to_thread(
                self.cache.evict, below_mean=below_mean, max_rows=cache_cfg.max_rows,
                ttl_s=cache_cfg.ttl_s, grace_s=cache_cfg.eviction_grace_s)
        except Exception as exc:
            log.error("eviction failed; will retry", error=str(exc))
            return 0
        if dropped:
            self.counters.evicted_rows += dropped
            log.info("evicted", rows=dropped, below_mean=below_mean)
        return dropped

    async def flush_loop(self) -> None:
        """Write the pending hit counts and values back to Milvus in one batch (velo.edge.cache)."""
        while True:
            await asyncio.sleep(self.cfg.cache.flush_every_s)
            try:
                await asyncio.to_thread(self.cache.flush_updates)
            except Exception as exc:  # kept and retried: the overlay still serves them
                log.error("write-back flush failed; will retry", error=str(exc))

    async def drain(self) -> None:
        """Finish background work (shadow verification) so that held records are released;
        the ones a crash interrupts are released by the next start (edged.spool)."""
        if self.background:
            await asyncio.gather(*self.background, return_exceptions=True)

    def close(self) -> None:
        if self.guard is not None:
            self.guard.save()
        self.decider.close()
        self.spool_writes.close()


@dataclass
class _Record:
    request_id: str
    scope: str  # the cache scope: the tenant, or its conversation scope (velo.core.conversation)
    tenant: str
    prompt: str
    answer: str
    prompt_vec: np.ndarray
    answer_vec: np.ndarray | None
    state: EdgeState
    decision: Decision
    policy_version: int
    row: CachedRow | None
    d: float
    q: float | None
    shadow: bool = False
    history: list[Turn] = field(default_factory=list)
    candidate: Candidate | None = None  # the reuse guard's best row, when the guard is on
    max_tokens: int = 0  # the cap the request allowed (shadow verification asks the same)
    shape: Shape = field(default_factory=Shape)
    store: bool = True  # cache the answer of a forward (the request's cache.no_store unset)
    generation: Generation | None = None  # the LLM's answer (B and C)
    pair_id: int | None = None  # the cache entry a forward's answer became

    @property
    def facts(self) -> AnswerFacts | None:
        """What the cache keeps of a forward's answer; None: it must not be cached (a tool
        call, a content filter's cut)."""
        g = self.generation
        if g is None or g.tool_calls or not storable(g.finish_reason):
            return None
        return AnswerFacts(g.finish_reason, g.prompt_tokens, g.completion_tokens,
                           g.max_tokens or self.max_tokens, g.usage_estimated)

    def experience_encoder(self, edge_id: str) -> Encoder:
        def encode(seq: int) -> bytes:
            # protobuf's runtime is untyped here: SerializeToString is Any to mypy.
            return cast(bytes, trainer_pb2.Experience(
                edge_id=edge_id, seq=seq, unix_time=time.time(),
                correlation=self.state.correlation.ravel().tolist(),
                top_p=self.state.correlation.shape[1],
                embedding=self.state.embedding.tolist(),
                action_mask=self.state.action_mask.tolist(),
                action=int(self.decision.action), action_probs=self.decision.probs.tolist(),
                policy_version=self.policy_version, delay_s=self.d,
                has_satisfaction=self.q is not None, satisfaction=self.q or 0.0,
                shadow_verified=self.shadow, request_id=self.request_id,
                load=self.state.load.tolist(),
            ).SerializeToString())
        return encode


def replay_pieces(answer: str, words: int = REPLAY_WORDS) -> list[str]:
    """A cached answer cut into stream pieces of a few words each (whitespace kept, so the
    pieces join back to the answer exactly)."""
    tokens = re.findall(r"\s*\S+", answer)
    if not tokens:
        return [answer]
    pieces = ["".join(tokens[i : i + words]) for i in range(0, len(tokens), words)]
    pieces[-1] += answer[sum(map(len, tokens)):]  # trailing whitespace
    return pieces
