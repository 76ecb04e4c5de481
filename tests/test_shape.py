"""A cached answer is served only to a request it fits (velo.core.shape): the rules alone, then
through a real edge (Milvus, the ONNX embedder, a real cloudd in front of the OpenAI-compatible
test LLM, which answers in 8 tokens, cuts at max_tokens and calls tools as an LLM would)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edged.config import PolicyConfig
from edged.server import Edged
from tests.conftest import ask, edge_client, running
from tests.fake_llm import ANSWER_TOKENS, fake_tokens
from velo.core.conversation import Turn
from velo.core.shape import AnswerFacts, Shape, bypass_reasons, fits, shape_key, shape_problem
from velo.edge.cache import eviction_mask
from velo.v1 import chat_pb2, edge_pb2

QUESTION = "Who founded the Roman Empire?"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]


# -- the rules ----------------------------------------------------------------------------------
def test_a_cut_answer_fits_only_its_own_limit_and_a_complete_one_every_larger_limit() -> None:
    cut = AnswerFacts("length", prompt_tokens=12, completion_tokens=4, max_tokens=4)
    assert fits(cut, 4) and not fits(cut, 200) and not fits(cut, 3)
    complete = AnswerFacts("stop", completion_tokens=8, max_tokens=200)
    assert fits(complete, 8) and fits(complete, 1024) and not fits(complete, 7)
    assert not fits(AnswerFacts("tool_calls", completion_tokens=3), 1024)


def test_stop_and_json_key_the_cache_tools_and_logprobs_bypass_it() -> None:
    plain, text = Shape(), Shape(response_format={"type": "text"})
    json_mode = Shape(response_format={"type": "json_object"})
    assert shape_key(plain) == shape_key(text) == ""
    assert "" != shape_key(json_mode) != shape_key(Shape(stop=("\n",))) != ""
    assert bypass_reasons(plain, []) == []
    assert bypass_reasons(Shape(tools=TOOLS, logprobs=True), []) == ["tools", "logprobs"]
    called = Turn("assistant", "", tool_calls='[{"id": "c1"}]')
    assert bypass_reasons(plain, [Turn("user", "hi"), called]) == ["tool_messages"]
    assert bypass_reasons(plain, [Turn("tool", "12 C", tool_call_id="c1")]) == ["tool_messages"]


@pytest.mark.parametrize(("shape", "says"), [
    (Shape(stop=("a", "b", "c", "d", "e")), "at most 4"),
    (Shape(response_format={"type": "yaml"}), "response_format must be"),
    (Shape(response_format={"type": "json_schema"}), "json_schema object with a name"),
    (Shape(tools=[{"type": "function"}]), "function.name"),
    (Shape(tool_choice="required"), "tool_choice needs tools"),
    (Shape(top_logprobs=3), "needs logprobs"),
])
def test_a_shape_the_llm_cannot_be_asked_is_refused_by_name(shape: Shape, says: str) -> None:
    assert says in shape_problem(shape)


def test_eviction_spares_young_rows_and_the_cap_takes_old_rows_first() -> None:
    now = 10_000.0
    values = np.array([-0.5, -0.6, -3.5, -3.6, -3.7])  # two reused rows, three new forwards
    created = np.array([now - 7200, now - 7200, now - 5, now - 4, now - 7000])
    literal = eviction_mask(values, created, below_mean=True, max_rows=10, ttl_s=0, now=now)
    assert literal.tolist() == [False, False, True, True, True]  # the paper: new rows go
    spared = eviction_mask(values, created, below_mean=True, max_rows=10, ttl_s=0, now=now,
                           grace_s=3600)
    assert spared.tolist() == [False, False, False, False, True]  # only the old unused one
    capped = eviction_mask(values, created, below_mean=False, max_rows=3, ttl_s=0, now=now,
                           grace_s=3600)
    assert capped.tolist() == [False, True, False, False, True]  # old rows first, by value
    hard = eviction_mask(values, created, below_mean=False, max_rows=1, ttl_s=0, now=now,
                         grace_s=3600)
    assert hard.tolist() == [True, True, False, True, True]  # all old rows first, then young


# -- through a real edge ------------------------------------------------------------------------
def shaped(prompt: str, **shape: object) -> edge_pb2.AskRequest:
    request = ask(prompt, max_tokens=shape.pop("max_tokens", 0))
    request.shape.CopyFrom(chat_pb2.AnswerShape(**shape))
    return request


async def test_a_truncated_answer_is_never_served_to_a_request_allowing_more(
        edge_config, cloud) -> None:
    cfg = edge_config(cloud=cloud, policy=PolicyConfig(shadow_rate=0))
    async with running(Edged(cfg)) as edge, edge_client(edge.grpc.address) as stub:
        cut = await stub.Ask(ask(QUESTION, max_tokens=4))
        assert cut.action == edge_pb2.ACTION_FORWARD and cut.finish_reason == "length"
        assert cut.answer == "".join(fake_tokens(4)) and cut.usage.completion_tokens == 4
        assert cut.stored and cut.stored_entry_id != 0

        longer = await stub.Ask(ask(QUESTION, max_tokens=200))
        assert longer.action == edge_pb2.ACTION_FORWARD and list(longer.bypass) == ["max_tokens"]
        assert longer.finish_reason == "stop"
        assert longer.usage.completion_tokens == ANSWER_TOKENS and longer.usage.prompt_tokens > 0

        same_cut = await stub.Ask(ask(QUESTION, max_tokens=4))  # the cut answer fits this one
        assert same_cut.action == edge_pb2.ACTION_REUSE and same_cut.finish_reason == "length"
        assert same_cut.cached_entry_id == cut.stored_entry_id and same_cut.answer == cut.answer

        complete = await stub.Ask(ask(QUESTION, max_tokens=100))
        assert complete.action == edge_pb2.ACTION_REUSE and complete.finish_reason == "stop"
        assert complete.cached_entry_id == longer.stored_entry_id
        assert complete.usage == complete.saved == longer.usage  # the cached answer's counts

        fewer = await stub.Ask(ask(QUESTION, max_tokens=6))  # neither fits: forwarded
        assert fewer.action == edge_pb2.ACTION_FORWARD and fewer.finish_reason == "length"


async def test_json_mode_and_stop_sequences_are_part_of_the_cache_key(edge_config,
                                                                      cloud) -> None:
    cfg = edge_config(cloud=cloud, policy=PolicyConfig(shadow_rate=0))
    async with running(Edged(cfg)) as edge, edge_client(edge.grpc.address) as stub:
        plain = await stub.Ask(ask(QUESTION))
        assert plain.action == edge_pb2.ACTION_FORWARD and not plain.keyed_on
        json_mode = '{"type": "json_object"}'
        first = await stub.Ask(shaped(QUESTION, response_format_json=json_mode))
        assert first.action == edge_pb2.ACTION_FORWARD  # the plain answer is not JSON
        assert list(first.keyed_on) == ["response_format"]
        assert json.loads(first.answer) == {"answer": plain.answer}
        again = await stub.Ask(shaped(QUESTION, response_format_json=json_mode))
        assert again.action == edge_pb2.ACTION_REUSE and again.answer == first.answer
        assert (await stub.Ask(ask(QUESTION))).answer == plain.answer  # and not the JSON

        stopped = await stub.Ask(shaped(QUESTION, stop=[" 3"]))
        assert stopped.action == edge_pb2.ACTION_FORWARD and stopped.answer == "ok 1 2"
        assert (await stub.Ask(shaped(QUESTION, stop=[" 3"]))).action == edge_pb2.ACTION_REUSE
        assert (await stub.Ask(shaped(QUESTION, stop=[" 5"]))).action == \
            edge_pb2.ACTION_FORWARD


async def test_tool_requests_pass_through_and_are_never_cached(edge_config, cloud,
                                                               fake_llm) -> None:
    cfg = edge_config(cloud=cloud, policy=PolicyConfig(shadow_rate=0))
    async with running(Edged(cfg)) as edge, edge_client(edge.grpc.address) as stub:
        weather = "What is the weather in Paris?"
        request = shaped(weather, tools_json=json.dumps(TOOLS), tool_choice_json='"required"')
        for _ in range(2):  # the second is not a reuse of the first: nothing was stored
            called = await stub.Ask(request)
            assert called.action == edge_pb2.ACTION_FORWARD and called.policy == "pass-through"
            assert list(called.bypass) == ["tools"] and not called.stored
            assert called.finish_reason == "tool_calls"
            (call,) = json.loads(called.tool_calls_json)
            assert call["function"]["name"] == "get_weather"
            assert json.loads(call["function"]["arguments"]) == {"city": "ok"}
        assert fake_llm.requests[-1]["tools"] == TOOLS
        assert fake_llm.requests[-1]["tool_choice"] == "required"

        streamed = [c async for c in stub.AskStream(request)]
        assert json.loads(streamed[-1].done.tool_calls_json)[0]["function"]["name"] == \
            "get_weather"  # joined from the LLM's streamed fragments

        answered = ask("", history=[
            chat_pb2.ChatMessage(role="user", content=weather),
            chat_pb2.ChatMessage(role="assistant", tool_calls_json=json.dumps([call])),
            chat_pb2.ChatMessage(role="tool", content="18 C, sunny",
                                 tool_call_id=call["id"])])
        answered.shape.tools_json = json.dumps(TOOLS)
        reply = await stub.Ask(answered)  # the tool result, answered in text
        assert reply.finish_reason == "stop" and reply.answer == "".join(fake_tokens(8))
        assert fake_llm.requests[-1]["messages"][-1] == {
            "role": "tool", "content": "18 C, sunny", "tool_call_id": call["id"]}

        stats = await stub.GetStats(edge_pb2.GetStatsRequest())
        assert stats.bypassed == 4 and stats.cached_rows == 0
        assert stats.experience_pending == 0  # no policy decided: nothing to learn from
