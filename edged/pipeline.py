"""The edge request path, one straight line (Algorithm 2, lines 12-14):

    validate -> embed -> search top-P -> build state (eq. 6-8) -> policy -> execute A/B/C
             -> answer -> record (cache insert or eq. 4-5 update, experience, stats)

Every answered request has its experience record on disk before the answer leaves: a crash
right after the answer loses nothing. Shadow-verified records are written first and
completed with q when the LLM's fresh answer arrives (edged.spool: held records).
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import numpy as np
from google.protobuf.unknown_fields import UnknownFieldSet

from edged.batching import MicroBatcher
from edged.cloud_client import CloudClient, CloudError
from edged.config import EdgeConfig
from edged.decision import Decider, VectorDBError
from edged.metrics import EdgeMetrics
from edged.reuse import Candidate, ReuseGuard
from edged.spool import Encoder, Spool
from edged.trainer_link import ExperienceUploader, PolicyFollower
from velo import qos
from velo.cache import VectorCache
from velo.conversation import cache_scope, context_key, history_problem
from velo.embedder import Embedder, EmbedderUnavailable
from velo.logs import get_logger
from velo.names import NAME_RULE, valid_name
from velo.policy import Decision
from velo.qos import Action
from velo.security import caller
from velo.serving import MAX_REQUEST_ID_CHARS, clip, request_id_problem
from velo.state import CachedRow, EdgeState, select_row
from velo.v1 import edge_pb2, trainer_pb2

log = get_logger("edged.pipeline")
TextSink = Callable[[str], Awaitable[None]]
# Told how a request will be served (action, policy, cached entry) before its answer exists:
# a stream's HTTP headers can carry it.
DecisionSink = Callable[[edge_pb2.AskResponse], Awaitable[None]]
REPLAY_WORDS = 4  # a streamed reuse is replayed in pieces of this many words
MAX_AGE_S = 10 * 365 * 86400.0  # largest cache.max_age_s accepted (ten years)
# Reports a part of the edge up or down: (part, ok, reason).
PartReport = Callable[[str, bool, str], Awaitable[None]]
VECTOR_DB, CLOUD, TRAINER = "vector_db", "cloud", "trainer"


class RequestError(Exception):
    """A request that cannot be served; `code` and the message go back to the caller."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


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
    actions: dict[Action, ActionCounters] = field(
        default_factory=lambda: {a: ActionCounters() for a in Action})


class EdgePipeline:
    def __init__(self, cfg: EdgeConfig, embedder: Embedder, cache: VectorCache,
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
        self.background: set[asyncio.Task] = set()
        self.inflight = 0
        self.shadows = 0  # shadow verifications in flight
        self.rng = np.random.default_rng(cfg.policy.seed)
        self.decider = Decider(embedder, cache, lambda: policies.current, cfg.cache.top_p,
                               cfg.limits.max_batch, cfg.embedder_workers,
                               guard.verifier if guard is not None else None,
                               cfg.limits.prompt_vectors)
        # Concurrent requests' experience goes to disk in one transaction.
        self.spool_writes: MicroBatcher[tuple[Encoder, bool], int | None] = MicroBatcher(
            spool.append_many, 256, "spool")

    async def ask(self, request: edge_pb2.AskRequest, on_text: TextSink | None = None,
                  on_decided: DecisionSink | None = None) -> edge_pb2.AskResponse:
        if self.inflight >= self.cfg.limits.max_inflight:
            self._refused(grpc.StatusCode.RESOURCE_EXHAUSTED)
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"edge {self.cfg.edge_id} is at capacity "
                               f"({self.inflight} requests in flight); retry shortly")
        self.inflight += 1
        try:
            return await asyncio.wait_for(self._ask(request, on_text, on_decided),
                                          self.cfg.limits.request_timeout_s)
        except TimeoutError:
            self.counters.errors += 1
            self._refused(grpc.StatusCode.DEADLINE_EXCEEDED)
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"request took longer than {self.cfg.limits.request_timeout_s} s "
                               "(edged limits.request_timeout_s)") from None
        except RequestError as exc:
            self.counters.errors += 1
            self._refused(exc.code)
            raise
        finally:
            self.inflight -= 1

    async def _ask(self, request: edge_pb2.AskRequest, on_text: TextSink | None,
                   on_decided: DecisionSink | None) -> edge_pb2.AskResponse:
        tenant = self._validate(request)
        request_id = request.request_id or uuid.uuid4().hex
        max_tokens = request.max_tokens
        prompt = request.prompt
        history = [(m.role, m.content) for m in request.history]
        # Conversation-aware keys: a turn is looked up and cached within its context.
        scope = cache_scope(tenant, context_key(history))

        try:
            decided = await self.decider.decide(prompt, scope, self._usable(request.cache))
        except VectorDBError as exc:
            raise await self._vector_db_down("search", exc) from exc
        except EmbedderUnavailable as exc:  # embedder = "triton" and the server is not answering
            raise RequestError(grpc.StatusCode.UNAVAILABLE, str(exc)) from exc
        f, state, policy, decision = decided.embedding, decided.state, decided.policy, \
            decided.decision
        edge_s = decided.times.total_s

        action = decision.action
        row = self._select(state) if action is not Action.FORWARD else None
        candidate = self.guard.best(prompt, state.rows) if self.guard and state.rows else None
        if action is Action.REUSE and candidate is not None:
            if candidate.trusted:
                row = candidate.row  # the verifier's best, not eq. 4's pick
            else:  # the guard does not trust this reuse: ask the LLM instead
                self.guard.vetoed += 1
                action, row = Action.FORWARD, None
                # What the edge did (policy and guard together) is what the learner must see.
                decision = Decision(action, np.eye(3, dtype=np.float32)[action])
        head = edge_pb2.AskResponse(action=_ACTION_PB[action], request_id=request_id,
                                    edge_id=self.cfg.edge_id, policy=policy.name,
                                    policy_version=policy.version)
        if row is not None:
            head.cached_question, head.similarity = row.question, row.similarity
            head.cached_entry_id = row.pair_id
            head.cached_age_s = max(0.0, time.time() - row.created)
        if on_decided is not None:
            await on_decided(head)
        cloud_s = 0.0
        if action is Action.REUSE:
            answer = row.answer
            if on_text is not None:  # replayed as a stream, as the LLM would have sent it
                for piece in replay_pieces(answer):
                    await on_text(piece)
        else:
            context = [(row.question, row.answer)] if action is Action.AUGMENT else []
            try:
                answer, cloud_s = await self.cloud.generate(prompt, context, max_tokens,
                                                            request_id, on_text, history=history)
            except CloudError as exc:
                # Say so only when it is true for this request: its tenant has cached rows.
                hint = "; cached answers are still served" if state.rows else ""
                raise RequestError(exc.code, f"{exc}{hint}") from None
        d = qos.delay(action, edge_s, cloud_s)

        q, answer_vec = None, None
        if request.reference_answer:
            answer_vec, reference_vec = await asyncio.to_thread(
                self.embedder.embed, [answer, request.reference_answer])
            q = qos.satisfaction(answer_vec, reference_vec)

        record = _Record(request_id, scope, prompt, answer, f, answer_vec, state, decision,
                         policy.version, row, d, q, history=history, candidate=candidate,
                         store=not request.cache.no_store)
        if hasattr(policy, "observe"):  # policies that learn online (Greedy-LLM)
            policy.observe(action, q if q is not None else self.q_estimate, d)
        shadow = q is None and action is not Action.FORWARD and self._shadow_sampled()
        seq = await self._record(record, held=shadow)
        if shadow and seq is not None:
            self.shadows += 1
            self._spawn(self._shadow_verify(record, seq))
        if action is Action.FORWARD and candidate is not None:
            self._spawn(self._verify_candidate(record))  # a free verification of the best row

        response = head
        response.answer, response.delay_s, response.edge_s = answer, d, edge_s
        response.cloud_s, response.has_satisfaction = cloud_s, q is not None
        response.stored = record.stored
        if q is not None:
            response.satisfaction, response.reward = q, qos.reward(q, d, self.weights)
        if self.metrics is not None:
            self.metrics.answered(action, decided.times, cloud_s, d,
                                  row.similarity if row is not None else None)
        log.info("answered", request_id=request_id, tenant=tenant, action=action.letter,
                 delay_s=round(d, 4), edge_ms=round(edge_s * 1000, 2), policy=policy.name)
        return response

    # -- steps ------------------------------------------------------------------------------
    def _refused(self, code: grpc.StatusCode) -> None:
        if self.metrics is not None:
            self.metrics.refused(code.name)

    def _usable(self, control: edge_pb2.CacheControl) -> Callable[[CachedRow], bool] | None:
        """Which cached rows this request may use: the edge's TTL and similarity floor, made
        stricter (never looser) by the request's cache control. None: every row."""
        if control.no_cache:
            return lambda row: False
        floor = max(self.cfg.cache.min_similarity, control.min_similarity)
        ages = [age for age in (self.cfg.cache.ttl_s, control.max_age_s) if age > 0]
        if floor <= 0 and not ages:
            return None
        oldest = time.time() - min(ages) if ages else float("-inf")  # per entry, from creation
        return lambda row: row.similarity >= floor and row.created >= oldest

    def _validate(self, request: edge_pb2.AskRequest) -> str:
        """Check the request; returns the tenant it runs as (an API key's own tenant)."""
        limits = self.cfg.limits
        unknown = sorted({f.field_number for f in UnknownFieldSet(request)})
        if unknown:
            raise _invalid(f"request has unknown field(s) {unknown[:8]}: this edge speaks "
                           "velo.v1 AskRequest (prompt=1, tenant=2, request_id=3, "
                           "reference_answer=4, max_tokens=5, history=6, cache=7)")
        if not request.prompt.strip():
            raise _invalid("prompt is empty")
        if len(request.prompt) > limits.max_prompt_chars:
            raise _invalid(f"prompt is {len(request.prompt)} characters; this edge accepts at "
                           f"most {limits.max_prompt_chars} (edged limits.max_prompt_chars)")
        tenant = request.tenant
        principal = caller()
        if principal is not None:  # an API key: it is bound to one tenant
            if tenant and tenant != principal.name:
                raise RequestError(grpc.StatusCode.PERMISSION_DENIED,
                                   f"this API key may not ask as tenant {clip(tenant)}; "
                                   "leave tenant empty or use the key's own tenant")
            tenant = principal.name
        if not valid_name(tenant):
            raise _invalid(f"tenant {clip(tenant)} is invalid: use {NAME_RULE}")
        if problem := history_problem([(m.role, m.content) for m in request.history],
                                      4 * limits.max_prompt_chars):
            raise _invalid(f"{problem} (history may hold 4 x limits.max_prompt_chars)")
        if not 0 <= request.max_tokens <= limits.max_tokens:
            raise _invalid(f"max_tokens must be between 0 (default) and {limits.max_tokens}")
        if len(request.reference_answer) > limits.max_reference_chars:
            raise _invalid(f"reference_answer exceeds {limits.max_reference_chars} characters")
        if problem := request_id_problem(request.request_id):
            raise _invalid(problem)
        if problem := cache_control_problem(request.cache):
            raise _invalid(problem)
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
            if rec.store:
                pair_id = await self._vector_db(self.cache.insert_pair, rec.scope, rec.prompt,
                                                 rec.answer, rec.prompt_vec, rec.answer_vec,
                                                 q_used - rec.d)
                rec.stored = pair_id is not None
        else:
            # Write-behind (velo.cache): no Milvus call here, so no thread either.
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
        self._count(rec)
        return seq

    async def _shadow_verify(self, rec: _Record, seq: int) -> None:
        """Shadow verification: ask the LLM too (as background work: cloudd serves it only
        when a slot is free) and measure q of the served answer against the fresh one; then
        release the held record, with q when it was measured."""
        try:
            shadow_id = f"{rec.request_id[:MAX_REQUEST_ID_CHARS - 7]}-shadow"
            fresh, _ = await self.cloud.generate(rec.prompt, [], 0, shadow_id, background=True,
                                                 history=rec.history)
            served_vec, fresh_vec = await asyncio.to_thread(self.embedder.embed,
                                                            [rec.answer, fresh])
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
        if rec.candidate is not None and rec.decision.action is Action.REUSE:
            self.guard.observe(rec.candidate, rec.q, reused=True)
        self.counters.shadow_verified += 1
        self.q_estimate += 0.05 * (rec.q - self.q_estimate)
        c = self.counters.actions[rec.decision.action]
        c.satisfaction_count += 1
        c.satisfaction_sum += rec.q
        c.reward_sum += qos.reward(rec.q, rec.d, self.weights)

    async def _verify_candidate(self, rec: _Record) -> None:
        """After a forward: would the best cached row have been right? Its answer against the
        fresh one is a verified outcome at no LLM cost (edged.reuse)."""
        row_vec = await asyncio.to_thread(self.embedder.embed_one, rec.candidate.row.answer)
        self.guard.observe(rec.candidate, qos.satisfaction(row_vec, rec.answer_vec),
                           reused=False)

    def _count(self, rec: _Record) -> None:
        self.counters.requests += 1
        c = self.counters.actions[rec.decision.action]
        c.requests += 1
        c.delay_sum_s += rec.d
        if rec.q is not None:
            c.satisfaction_count += 1
            c.satisfaction_sum += rec.q
            c.reward_sum += qos.reward(rec.q, rec.d, self.weights)
        if self.counters.requests % self.cfg.cache.eviction_every == 0:
            self.eviction_due.set()

    def _shadow_sampled(self) -> bool:
        if self.cloud.stub is None or self.rng.random() >= self.cfg.policy.shadow_rate:
            return False
        if self.shadows >= self.cfg.policy.shadow_max_inflight:
            self.counters.shadow_skipped += 1  # its own small budget: users come first
            return False
        return True

    async def _vector_db(self, method: Callable, *args: object) -> object:
        try:
            return await asyncio.to_thread(method, *args)
        except Exception as exc:  # pymilvus raises many types; the caller needs one status
            raise await self._vector_db_down(method.__name__, exc) from exc

    async def _vector_db_down(self, call: str, exc: Exception) -> RequestError:
        reason = f"vector database unavailable ({self.cfg.vector_db.uri}): {clip(str(exc), 300)}"
        log.error("vector database call failed", call=call, error=str(exc))
        await self.report(VECTOR_DB, False, reason)
        return RequestError(grpc.StatusCode.UNAVAILABLE, reason)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task) -> None:
        self.background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background step failed", error=repr(task.exception()))

    # -- eviction (its own task, Algorithm 2 lines 15-22) -------------------------------------
    async def eviction_loop(self, period_s: float = 60.0) -> None:
        """Every xi requests: below-mean eviction; every `period_s` anyway: cap and TTL."""
        cache_cfg = self.cfg.cache
        while True:
            try:
                await asyncio.wait_for(self.eviction_due.wait(), timeout=period_s)
                below_mean = True
            except TimeoutError:
                below_mean = False
            self.eviction_due.clear()
            if self.guard is not None:
                await asyncio.to_thread(self.guard.save)
            try:
                if below_mean:
                    below_mean = await asyncio.to_thread(self.cache.count) >= \
                        cache_cfg.eviction_min_rows
                dropped = await asyncio.to_thread(self.cache.evict, below_mean=below_mean,
                                                  max_rows=cache_cfg.max_rows,
                                                  ttl_s=cache_cfg.ttl_s)
            except Exception as exc:
                log.error("eviction failed; will retry", error=str(exc))
                continue
            if dropped:
                self.counters.evicted_rows += dropped
                log.info("evicted", rows=dropped, below_mean=below_mean)

    async def flush_loop(self) -> None:
        """Write the pending hit counts and values back to Milvus in one batch (velo.cache)."""
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
    scope: str  # the cache scope: the tenant, or its conversation scope (velo.conversation)
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
    history: list[tuple[str, str]] = field(default_factory=list)
    candidate: Candidate | None = None  # the reuse guard's best row, when the guard is on
    store: bool = True  # cache the answer of a forward (the request's cache.no_store unset)
    stored: bool = False  # it was cached

    def experience_encoder(self, edge_id: str) -> Encoder:
        def encode(seq: int) -> bytes:
            return trainer_pb2.Experience(
                edge_id=edge_id, seq=seq, unix_time=time.time(),
                correlation=self.state.correlation.ravel().tolist(),
                top_p=self.state.correlation.shape[1],
                embedding=self.state.embedding.tolist(),
                action_mask=self.state.action_mask.tolist(),
                action=int(self.decision.action), action_probs=self.decision.probs.tolist(),
                policy_version=self.policy_version, delay_s=self.d,
                has_satisfaction=self.q is not None, satisfaction=self.q or 0.0,
                shadow_verified=self.shadow, request_id=self.request_id,
            ).SerializeToString()
        return encode


_ACTION_PB = {Action.REUSE: edge_pb2.ACTION_REUSE, Action.FORWARD: edge_pb2.ACTION_FORWARD,
              Action.AUGMENT: edge_pb2.ACTION_AUGMENT}


def cache_control_problem(control: edge_pb2.CacheControl) -> str | None:
    """Why a request's cache control cannot be honoured, or None."""
    if not 0.0 <= control.max_age_s <= MAX_AGE_S:  # also false for NaN
        return f"cache.max_age_s must be between 0 (any age) and {MAX_AGE_S:.0f} seconds"
    if not 0.0 <= control.min_similarity <= 1.0:
        return "cache.min_similarity must be between 0 and 1 (a cosine similarity)"
    return None


def replay_pieces(answer: str, words: int = REPLAY_WORDS) -> list[str]:
    """A cached answer cut into stream pieces of a few words each (whitespace kept, so the
    pieces join back to the answer exactly)."""
    tokens = re.findall(r"\s*\S+", answer)
    if not tokens:
        return [answer]
    pieces = ["".join(tokens[i : i + words]) for i in range(0, len(tokens), words)]
    pieces[-1] += answer[sum(map(len, tokens)):]  # trailing whitespace
    return pieces


def _invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)
