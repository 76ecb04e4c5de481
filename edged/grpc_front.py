"""edged's gRPC face (velo.v1.EdgeService): AskRequest -> EdgeRequest, the pipeline's events
-> AskResponse / AskChunk, EdgeError -> the status code of the same name; the admin methods
call the cache admin (edged.admin).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
from google.protobuf.unknown_fields import UnknownFieldSet

from edged.admin import Deletion
from edged.contract import (
    Answered,
    CacheRules,
    EdgeError,
    EdgeRequest,
    ErrorKind,
    Piece,
    Usage,
    invalid,
)
from velo.core.conversation import Turn
from velo.core.qos import Action
from velo.core.shape import Shape, to_json
from velo.runtime.logs import get_logger
from velo.runtime.security import caller, is_loopback
from velo.v1 import chat_pb2, edge_pb2, edge_pb2_grpc

if TYPE_CHECKING:
    from edged.server import Edged

log = get_logger("edged.grpc")

ACTIONS = {Action.REUSE: edge_pb2.ACTION_REUSE, Action.FORWARD: edge_pb2.ACTION_FORWARD,
           Action.AUGMENT: edge_pb2.ACTION_AUGMENT}
_ADMIN = frozenset({"admin"})
ROLES = {
    "/velo.v1.EdgeService/Ask": frozenset({"tenant"}),
    "/velo.v1.EdgeService/AskStream": frozenset({"tenant"}),
    "/velo.v1.EdgeService/GetStats": _ADMIN,
    **{f"/velo.v1.EdgeService/{m}": _ADMIN
       for m in ("ListEntries", "GetEntry", "DeleteEntries", "ImportEntries", "ExportEntries")},
}


def edge_request(ask: edge_pb2.AskRequest) -> EdgeRequest:
    """The pipeline's request from a gRPC AskRequest (EdgeError on what protobuf lets by)."""
    unknown = sorted({f.field_number for f in UnknownFieldSet(ask)})
    if unknown:
        raise invalid(f"request has unknown field(s) {unknown[:8]}: this edge speaks velo.v1 "
                      "AskRequest (prompt=1, tenant=2, request_id=3, reference_answer=4, "
                      "max_tokens=5, history=6, cache=7, shape=8)")
    try:
        shape = Shape.from_proto(ask.shape)
    except ValueError as exc:
        raise invalid(str(exc)) from None
    c = ask.cache
    return EdgeRequest(
        prompt=ask.prompt, tenant=ask.tenant, request_id=ask.request_id,
        history=tuple(Turn.from_proto(m) for m in ask.history), max_tokens=ask.max_tokens,
        reference_answer=ask.reference_answer,
        cache=CacheRules(c.no_cache, c.no_store, c.max_age_s, c.min_similarity), shape=shape,
        principal=caller())


def ask_response(done: Answered) -> edge_pb2.AskResponse:
    head = done.decided
    response = edge_pb2.AskResponse(
        answer=done.answer, action=ACTIONS[head.action], request_id=head.request_id,
        edge_id=head.edge_id, policy=head.policy, policy_version=head.policy_version,
        delay_s=done.delay_s, edge_s=done.edge_s, cloud_s=done.cloud_s,
        has_satisfaction=done.satisfaction is not None, satisfaction=done.satisfaction or 0.0,
        reward=done.reward or 0.0, stored=done.stored, finish_reason=done.finish_reason,
        usage=_usage(done.usage), saved=_usage(done.saved) if done.saved else None,
        tool_calls_json=to_json(done.tool_calls), logprobs_json=to_json(done.logprobs),
        bypass=head.bypass, keyed_on=head.keyed_on, stored_entry_id=done.stored_entry_id,
        superseded_entry_ids=done.superseded)
    if head.row is not None:
        response.cached_question, response.similarity = head.row.question, head.row.similarity
        response.cached_entry_id, response.cached_age_s = head.row.pair_id, head.cached_age_s
    return response


def _usage(usage: Usage) -> chat_pb2.Usage:
    return chat_pb2.Usage(prompt_tokens=usage.prompt_tokens,
                          completion_tokens=usage.completion_tokens, estimated=usage.estimated)



# grpc ships no stubs, so mypy cannot see that context.abort always raises.
async def _abort(context: grpc.aio.ServicerContext,  # type: ignore[misc]
                 exc: EdgeError) -> NoReturn:
    await context.abort(grpc.StatusCode[exc.kind.name], str(exc))


class EdgeServicer(edge_pb2_grpc.EdgeServiceServicer):
    def __init__(self, edge: Edged) -> None:
        self.edge = edge

    async def Ask(self, request: edge_pb2.AskRequest, context: grpc.aio.ServicerContext,
                  ) -> edge_pb2.AskResponse:
        try:
            return ask_response(await self.edge.pipeline.ask(edge_request(request)))
        except EdgeError as exc:
            await _abort(context, exc)

    async def AskStream(self, request: edge_pb2.AskRequest,
                        context: grpc.aio.ServicerContext) -> None:
        try:
            async for event in self.edge.pipeline.stream(edge_request(request)):
                if isinstance(event, Piece):
                    await context.write(edge_pb2.AskChunk(
                        text=event.text, logprobs_json=to_json(event.logprobs)))
                elif isinstance(event, Answered):
                    await context.write(edge_pb2.AskChunk(done=ask_response(event)))
        except EdgeError as exc:
            await _abort(context, exc)
        except asyncio.CancelledError:
            log.info("client cancelled stream", request_id=request.request_id[:128])
            raise

    async def GetStats(self, request: edge_pb2.GetStatsRequest,
                       context: grpc.aio.ServicerContext) -> edge_pb2.EdgeStats:
        edge = self.edge
        try:
            async with asyncio.timeout(5):
                rows = await asyncio.to_thread(edge.cache.count)
        except Exception:
            rows = -1  # the vector DB is down; the rest of the stats still matter
        counts: dict[str, Any] = {key: value for key, value in edge.stats(rows).items()
                  if key in edge_pb2.EdgeStats.DESCRIPTOR.fields_by_name}
        return edge_pb2.EdgeStats(
            edge_id=edge.cfg.edge_id, policy=edge.policies.current.name, **counts,
            actions=[edge_pb2.ActionStats(action=ACTIONS[a], requests=s.requests,
                                          delay_sum_s=s.delay_sum_s,
                                          satisfaction_count=s.satisfaction_count,
                                          satisfaction_sum=s.satisfaction_sum,
                                          reward_sum=s.reward_sum)
                     for a, s in edge.pipeline.counters.actions.items()],
            parts=[edge_pb2.PartStatus(name=name, up=p.ok, reason=p.reason)
                   for name, p in edge.grpc.parts.items()],
        )

    # -- the cache, for operators ----------------------------------------------------------
    def _operator(self, context: grpc.aio.ServicerContext) -> str:
        """Who is asking, for the audit log. With [auth] the interceptor already required the
        admin role; without, only this machine may change the cache."""
        principal = caller()
        if principal is not None:
            return f"{principal.role}:{principal.name}"
        peer = context.peer() or ""
        if not is_loopback(peer):
            raise EdgeError(ErrorKind.PERMISSION_DENIED,
                            "this edge has no [auth]: its cache admin methods answer only "
                            "callers on the edge box itself (set auth.tokens_file and use an "
                            "admin token)")
        return f"local:{peer}"

    async def ListEntries(self, request: edge_pb2.ListEntriesRequest,
                          context: grpc.aio.ServicerContext) -> edge_pb2.ListEntriesResponse:
        try:
            self._operator(context)
            views, total = await self.edge.admin.newest(request.tenant, request.limit,
                                                        request.offset)
        except EdgeError as exc:
            await _abort(context, exc)
        return edge_pb2.ListEntriesResponse(entries=[v.proto() for v in views],
                                            total=total)

    async def GetEntry(self, request: edge_pb2.GetEntryRequest,
                       context: grpc.aio.ServicerContext) -> edge_pb2.CacheEntry:
        try:
            self._operator(context)
            return (await self.edge.admin.get(request.id)).proto()
        except EdgeError as exc:
            await _abort(context, exc)

    async def DeleteEntries(self, request: edge_pb2.DeleteEntriesRequest,
                            context: grpc.aio.ServicerContext,
                            ) -> edge_pb2.DeleteEntriesResponse:
        try:
            who = self._operator(context)
            ids = await self.edge.admin.delete(Deletion(
                tuple(request.ids), request.tenant, request.question, request.min_similarity,
                request.older_than_s, request.dry_run), who)
        except EdgeError as exc:
            await _abort(context, exc)
        return edge_pb2.DeleteEntriesResponse(deleted=len(ids), ids=ids[:1000])

    async def ImportEntries(self, request: edge_pb2.ImportEntriesRequest,
                            context: grpc.aio.ServicerContext,
                            ) -> edge_pb2.ImportEntriesResponse:
        try:
            who = self._operator(context)
            ids, skipped = await self.edge.admin.import_pairs(
                request.tenant, [(p.question, p.answer) for p in request.pairs], who)
        except EdgeError as exc:
            await _abort(context, exc)
        return edge_pb2.ImportEntriesResponse(imported=len(ids), skipped=skipped, ids=ids)

    async def ExportEntries(self, request: edge_pb2.ExportEntriesRequest,
                            context: grpc.aio.ServicerContext) -> None:
        try:
            self._operator(context)
            async for view in self.edge.admin.export(request.tenant):
                await context.write(view.proto())
        except EdgeError as exc:
            await _abort(context, exc)
