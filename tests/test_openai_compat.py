"""OpenAI's semantics on the edge's HTTP front, as the real clients use them: the `openai`
client (sync, async, streams), LangChain (`langchain-openai`) and LiteLLM, against a real edge
(Milvus, the ONNX embedder) and a real cloudd in front of the OpenAI-compatible test LLM (it
answers in 8 tokens, cuts at max_tokens, writes JSON for response_format and calls tools).

What is checked: finish_reason and usage are the LLM's (a reuse: the cached answer's, and what
it saved); a cut answer is never served to a request allowing more; tools and logprobs pass
through and come back as OpenAI's tool_calls / logprobs; JSON mode and stop sequences key the
cache; a tool-call turn in the history is accepted."""

from __future__ import annotations

import asyncio
import json
import os

import openai
import pytest

from edged.config import HttpConfig, PolicyConfig
from edged.server import Edged
from tests.conftest import running
from tests.fake_llm import ANSWER_TOKENS, fake_tokens

QUESTION = "When did the Roman Empire begin?"
ANSWER = "".join(fake_tokens(ANSWER_TOKENS))
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
# LiteLLM fetches a price list from GitHub at import unless told to use its own copy.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def front(edge_config, cloud: str) -> Edged:
    return Edged(edge_config(cloud=cloud, http=HttpConfig(listen="127.0.0.1:0"),
                             policy=PolicyConfig(shadow_rate=0)))


# -- the openai client ------------------------------------------------------------------------
async def test_finish_reason_and_usage_are_true_and_a_cut_answer_is_not_reused(
        edge_config, cloud) -> None:
    async with running(front(edge_config, cloud)) as edge:
        client = openai.OpenAI(base_url=f"{edge.http.url}/v1", api_key="unused")

        def create(max_tokens: int | None) -> object:
            return client.chat.completions.with_raw_response.create(
                model="velo", messages=[user(QUESTION)], max_tokens=max_tokens)

        raw = await asyncio.to_thread(create, 4)
        cut = raw.parse()
        assert cut.choices[0].finish_reason == "length"
        assert cut.choices[0].message.content == "".join(fake_tokens(4))
        assert cut.usage.completion_tokens == 4 and cut.usage.prompt_tokens > 0
        assert cut.usage.total_tokens == cut.usage.prompt_tokens + 4

        raw = await asyncio.to_thread(create, 200)  # would be the 4 tokens without the fit rule
        full = raw.parse()
        assert raw.headers["x-velo-action"] == "forward"
        assert raw.headers["x-velo-bypass"] == "max_tokens"
        assert full.choices[0].message.content == ANSWER
        assert full.choices[0].finish_reason == "stop"

        raw = await asyncio.to_thread(create, None)  # the edge's default allows 256
        reused = raw.parse()
        assert raw.headers["x-velo-action"] == "reuse"
        assert reused.choices[0].message.content == ANSWER
        assert reused.choices[0].finish_reason == "stop"
        assert reused.usage.completion_tokens == ANSWER_TOKENS
        assert reused.usage.prompt_tokens_details.cached_tokens == reused.usage.prompt_tokens
        velo = reused.model_extra["velo"]
        assert velo["saved_completion_tokens"] == ANSWER_TOKENS
        assert velo["saved_prompt_tokens"] == full.usage.prompt_tokens
        client.close()


async def test_streams_send_the_usage_chunk_and_the_real_finish_reason(edge_config,
                                                                        cloud) -> None:
    async with running(front(edge_config, cloud)) as edge:
        client = openai.AsyncOpenAI(base_url=f"{edge.http.url}/v1", api_key="unused")

        async def stream(**kw: object) -> list:
            chunks = await client.chat.completions.create(
                model="velo", messages=[user(QUESTION)], stream=True, **kw)
            return [c async for c in chunks]

        for action in ("forward", "reuse"):
            chunks = await stream(stream_options={"include_usage": True})
            *body, last = chunks
            assert last.choices == [] and last.usage.completion_tokens == ANSWER_TOKENS
            assert all(c.usage is None for c in body)
            assert body[-1].choices[0].finish_reason == "stop"
            assert body[-1].model_extra["velo"]["action"] == action
            assert "".join(c.choices[0].delta.content or "" for c in body) == ANSWER
        cut = await stream(max_tokens=3)
        assert cut[-1].choices[0].finish_reason == "length" and cut[-1].usage is None
        await client.close()


async def test_tools_pass_through_and_come_back_as_tool_calls(edge_config, cloud) -> None:
    async with running(front(edge_config, cloud)) as edge:
        client = openai.OpenAI(base_url=f"{edge.http.url}/v1", api_key="unused")
        weather = [user("What is the weather in Paris?")]

        def call(**kw: object) -> object:
            return client.chat.completions.with_raw_response.create(
                model="velo", messages=weather, tools=TOOLS, tool_choice="required", **kw)

        for _ in range(2):  # never a reuse: tool requests are not cached
            raw = await asyncio.to_thread(call)
            completion = raw.parse()
            assert raw.headers["x-velo-action"] == "forward"
            assert raw.headers["x-velo-bypass"] == "tools"
            assert raw.headers["x-velo-policy"] == "pass-through"
            choice = completion.choices[0]
            assert choice.finish_reason == "tool_calls" and choice.message.content is None
            (tool_call,) = choice.message.tool_calls
            assert tool_call.function.name == "get_weather"
            assert json.loads(tool_call.function.arguments) == {"city": "ok"}
            assert completion.usage.completion_tokens > 0

        chunks = await asyncio.to_thread(
            lambda: list(client.chat.completions.create(
                model="velo", messages=weather, tools=TOOLS, tool_choice="required",
                stream=True)))
        calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
        assert calls[0].function.name == "get_weather" and calls[0].id == tool_call.id
        assert chunks[-1].choices[0].finish_reason == "tool_calls"

        # The tool's result goes back as a tool turn; the LLM answers it in text.
        followed = [
            *weather,
            {"role": "assistant", "content": None,
             "tool_calls": [tool_call.model_dump(exclude_none=True)]},
            {"role": "tool", "tool_call_id": tool_call.id, "content": "18 C and sunny"}]
        raw = await asyncio.to_thread(
            lambda: client.chat.completions.with_raw_response.create(
                model="velo", messages=followed, tools=TOOLS))
        assert raw.parse().choices[0].message.content == ANSWER
        assert raw.headers["x-velo-bypass"] == "tools,tool_messages"
        client.close()


async def test_json_mode_stop_and_logprobs(edge_config, cloud) -> None:
    async with running(front(edge_config, cloud)) as edge:
        client = openai.AsyncOpenAI(base_url=f"{edge.http.url}/v1", api_key="unused")

        async def create(**kw: object) -> tuple[object, dict]:
            raw = await client.chat.completions.with_raw_response.create(
                model="velo", messages=[user(QUESTION)], **kw)
            return raw.parse(), raw.headers

        _, headers = await create()
        assert headers["x-velo-action"] == "forward"
        as_json = {"type": "json_object"}
        first, headers = await create(response_format=as_json)
        assert headers["x-velo-action"] == "forward"  # the plain answer is not JSON
        assert headers["x-velo-keyed-on"] == "response_format"
        assert json.loads(first.choices[0].message.content) == {"answer": ANSWER}
        again, headers = await create(response_format=as_json)
        assert headers["x-velo-action"] == "reuse"
        assert json.loads(again.choices[0].message.content) == {"answer": ANSWER}
        plain_again, headers = await create()
        assert headers["x-velo-action"] == "reuse"
        assert plain_again.choices[0].message.content == ANSWER  # never the JSON one

        stopped, headers = await create(stop=[" 4"])
        assert headers["x-velo-action"] == "forward" and headers["x-velo-keyed-on"] == "stop"
        assert stopped.choices[0].message.content == "ok 1 2 3"

        scored, headers = await create(logprobs=True, top_logprobs=2)
        assert headers["x-velo-bypass"] == "logprobs"
        tokens = scored.choices[0].logprobs.content
        assert "".join(t.token for t in tokens) == ANSWER and tokens[0].logprob < 0
        await client.close()


async def test_unsupported_fields_are_refused_by_name(edge_config, cloud) -> None:
    async with running(front(edge_config, cloud)) as edge:
        client = openai.AsyncOpenAI(base_url=f"{edge.http.url}/v1", api_key="unused",
                                    max_retries=0)
        for kw, says in [({"n": 2}, "n = 1"),
                         ({"functions": [TOOLS[0]["function"]]}, "send tools instead"),
                         ({"response_format": {"type": "yaml"}}, "response_format"),
                         ({"stop": ["a", "b", "c", "d", "e"]}, "at most 4"),
                         ({"tool_choice": "required"}, "tool_choice needs tools"),
                         # Lenient parsing let these through: 1.0 and true equal 1 in Python,
                         # and a no_cache of "yes" was read as false (the answer was reused).
                         ({"n": 1.0}, "n = 1"), ({"n": True}, "n = 1"),
                         ({"extra_body": {"velo": {"cache": {"no_cache": "yes"}}}},
                          "no_cache must be true or false"),
                         ({"extra_body": {"velo": {"cache": {"max_age_s": "60"}}}},
                          "max_age_s must be a number")]:
            with pytest.raises(openai.BadRequestError, match=says):
                await client.chat.completions.create(model="velo", messages=[user("hi")], **kw)
        with pytest.raises(openai.BadRequestError, match=r"role must be one of"):
            await client.chat.completions.create(
                model="velo", messages=[{"role": ["user"], "content": "hi"}])
        await client.close()


# -- LangChain and LiteLLM --------------------------------------------------------------------
async def test_langchain_sees_usage_structured_output_and_tool_calls(edge_config,
                                                                      cloud) -> None:
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel

    class Weather(BaseModel):
        city: str
        degrees: int

    async with running(front(edge_config, cloud)) as edge:
        llm = ChatOpenAI(model="velo", base_url=f"{edge.http.url}/v1", api_key="unused",
                         max_retries=0, stream_usage=True)
        first = await llm.ainvoke(QUESTION)
        assert first.content == ANSWER
        assert first.usage_metadata["output_tokens"] == ANSWER_TOKENS
        assert first.usage_metadata["input_tokens"] > 0
        assert first.response_metadata["finish_reason"] == "stop"

        streamed = None
        async for piece in llm.astream(QUESTION):  # a reuse, replayed
            streamed = piece if streamed is None else streamed + piece
        assert streamed.content == ANSWER
        assert streamed.usage_metadata["output_tokens"] == ANSWER_TOKENS

        structured = await llm.with_structured_output(Weather).ainvoke("Weather in Rome?")
        assert structured == Weather(city="ok", degrees=1)
        by_tool = await llm.with_structured_output(Weather, method="function_calling").ainvoke(
            "Weather in Rome?")
        assert by_tool == Weather(city="ok", degrees=1)

        called = await llm.bind_tools(TOOLS, tool_choice="required").ainvoke("Paris weather?")
        assert called.tool_calls[0]["name"] == "get_weather"
        assert called.tool_calls[0]["args"] == {"city": "ok"}


async def test_litellm_counts_tokens_and_gets_tool_calls(edge_config, cloud) -> None:
    import litellm

    async with running(front(edge_config, cloud)) as edge:
        target = {"model": "openai/velo", "api_base": f"{edge.http.url}/v1",
                  "api_key": "unused"}
        answered = await litellm.acompletion(messages=[user(QUESTION)], **target)
        assert answered.choices[0].message.content == ANSWER
        assert answered.choices[0].finish_reason == "stop"
        assert answered.usage.completion_tokens == ANSWER_TOKENS
        assert answered.usage.total_tokens > ANSWER_TOKENS

        chunks = [c async for c in await litellm.acompletion(
            messages=[user(QUESTION)], stream=True,
            stream_options={"include_usage": True}, **target)]
        assert litellm.stream_chunk_builder(chunks).usage.completion_tokens == ANSWER_TOKENS

        called = await litellm.acompletion(messages=[user("Paris weather?")], tools=TOOLS,
                                           tool_choice="required", **target)
        assert called.choices[0].finish_reason == "tool_calls"
        assert called.choices[0].message.tool_calls[0].function.name == "get_weather"
