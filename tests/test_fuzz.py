"""Fuzzing the daemons with what a careless or hostile client, or operator, sends:

- every field of every request message of the three services, drawn by Hypothesis and sent to
  live daemons (an edge in front of cloudd and a fake LLM, cloudd, trainerd), and raw bytes
  to every method: the status is never UNKNOWN or INTERNAL, its message stays short, and the
  daemon keeps answering;
- every config key of the three daemons, of the right type and of wrong ones, in a TOML file
  and in VELO_<DAEMON>__... overrides: `load` returns a config or raises ConfigError naming a
  key, nothing else;
- tools/fuzz.py against a live edge: 10^4 mutated requests, and tenant isolation probes.

Hypothesis drives async tests here directly: pytest-asyncio runs each example of an async
`@given` test on the session loop, where the daemons started by the (per-test) fixtures run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import math
import os
import sys
import tempfile
import tomllib
import typing
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import cloudd.config
import edged.config
import trainerd.config
from cloudd.config import CloudConfig, LLMConfig
from cloudd.server import Cloudd
from edged.server import Edged
from tests.conftest import running
from tests.fake_llm import FAKE_MODEL, FakeLLM
from trainerd.config import TrainerConfig
from trainerd.server import Trainerd
from velo.core.models import ROOT
from velo.core.names import valid_name
from velo.edge.cache import VectorCache
from velo.edge.embedder import Embedder
from velo.runtime.config import ConfigError
from velo.v1 import (
    chat_pb2,
    cloud_pb2,
    cloud_pb2_grpc,
    edge_pb2,
    edge_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)

sys.path.insert(0, str(ROOT / "tools"))
import fuzz

# Measured on the 2-core machine: 10^4 mutated requests take ~11 s; 10^3 isolation probes
# ~8 s (10^4: 77-89 s).
FUZZ_REQUESTS = 10_000
ISOLATION_PROBES = 1_000
BUGS = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL})
# A status message travels as trailing metadata: gRPC clients refuse more than 16 KiB of it
# (and, randomly, more than 8 KiB), turning any status into RESOURCE_EXHAUSTED. Daemons quote
# at most velo.runtime.serving.QUOTE_CHARS of a caller's input, so their messages stay well below.
MAX_DETAILS_CHARS = 4096
RPC_TIMEOUT_S = 10.0
# No example database: it would be written into the checkout (.hypothesis/). More examples
# for a longer hunt: VELO_FUZZ_EXAMPLES=1000.
EXAMPLES = settings(max_examples=int(os.environ.get("VELO_FUZZ_EXAMPLES", "60")), deadline=None,
                    database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


# -- live daemons ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fake_llm() -> typing.Iterator[FakeLLM]:
    server = FakeLLM().start()
    yield server
    server.stop()


@pytest.fixture
async def cloud(fake_llm: FakeLLM) -> AsyncIterator[Cloudd]:
    fake_llm.reset()
    cfg = CloudConfig(listen="127.0.0.1:0", shutdown_grace_s=1.0,
                      llm=LLMConfig(base_url=fake_llm.url, model=FAKE_MODEL, default_max_tokens=8,
                                    retry_backoff_s=0.01))
    async with running(Cloudd(cfg)) as daemon:
        yield daemon


@pytest.fixture
async def edge(edge_config: Callable[..., edged.config.EdgeConfig],
               cloud: Cloudd) -> AsyncIterator[Edged]:
    async with running(Edged(edge_config(cloud=cloud.grpc.address))) as daemon:
        yield daemon


@pytest.fixture
async def trainer(tmp_path: Path) -> AsyncIterator[Trainerd]:
    cfg = TrainerConfig(listen="127.0.0.1:0", data_dir=str(tmp_path / "trainerd"),
                        shutdown_grace_s=1.0)
    async with running(Trainerd(cfg)) as daemon:
        yield daemon


async def outcome(call: Any) -> tuple[grpc.StatusCode, str]:
    """The status of a finished call (a unary one is awaited, a stream read to its end)."""
    try:
        if hasattr(call, "__aiter__"):
            async for _ in call:
                pass
        else:
            await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def check(code: grpc.StatusCode, details: str) -> None:
    event(code.name)  # the status mix: pytest --hypothesis-show-statistics
    assert code not in BUGS, f"{code.name}: {details}"
    assert len(details) <= MAX_DETAILS_CHARS, f"{code.name} with {len(details)} characters: " \
        f"{details[:200]}..."


async def still_serving(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                               timeout=RPC_TIMEOUT_S)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


# -- field strategies -----------------------------------------------------------------------
INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
UINT64 = st.integers(0, 2**64 - 1)
DOUBLES = st.floats()  # NaN and infinities included
FLOATS = st.floats(width=32)
TEXT = st.one_of(
    st.text(max_size=80),
    st.sampled_from(["", " ", "\n", "\x00", "acme\n", "a b", "\x1b[31m", "\u2028", "é" * 65,
                     "x" * 129, "y" * 8001, "z" * 40_000]),
)
NAMES = st.one_of(st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True), TEXT)
REQUEST_IDS = st.one_of(st.from_regex(r"[!-~]{0,128}", fullmatch=True), TEXT)
PROMPTS = st.one_of(st.sampled_from(fuzz.PROMPTS), TEXT)


def lists(items: st.SearchStrategy, max_size: int = 10) -> st.SearchStrategy[list]:
    return st.lists(items, max_size=max_size)


def messages(cls: type, fields: dict[str, st.SearchStrategy], **base: Any,
             ) -> st.SearchStrategy:
    """`cls(**base)` with any subset of its fields replaced by a drawn value."""
    return st.fixed_dictionaries({}, optional=fields).map(lambda drawn: cls(**{**base, **drawn}))


JSON_TEXT = st.one_of(TEXT, st.sampled_from([
    "[]", "{}", "null", "[{}]", '"required"', '"auto"', '{"type": "json_object"}',
    '{"type": "json_schema"}', '[{"type": "function", "function": {"name": "f"}}]',
    '[{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]',
    "[" * 5000]))
CHAT_FIELDS = {"role": st.one_of(st.sampled_from(["system", "user", "assistant", "tool"]), TEXT),
               "content": TEXT, "tool_calls_json": JSON_TEXT, "tool_call_id": TEXT,
               "name": TEXT}
HISTORY = lists(messages(chat_pb2.ChatMessage, CHAT_FIELDS, role="user", content="Hi"))
SHAPE_FIELDS = {"stop": lists(TEXT, 6), "response_format_json": JSON_TEXT,
                "tools_json": JSON_TEXT, "tool_choice_json": JSON_TEXT,
                "logprobs": st.booleans(), "top_logprobs": st.one_of(st.integers(-1, 25), INT32)}
SHAPE = messages(chat_pb2.AnswerShape, SHAPE_FIELDS)
CACHE_FIELDS = {"no_cache": st.booleans(), "no_store": st.booleans(),
                "max_age_s": st.one_of(st.sampled_from([0.0, 1.0, 3.2e8]), DOUBLES),
                "min_similarity": st.one_of(st.floats(0, 1), DOUBLES)}
ASK_FIELDS = {"prompt": PROMPTS, "tenant": NAMES, "request_id": REQUEST_IDS,
              "reference_answer": TEXT, "max_tokens": st.one_of(st.integers(0, 1100), INT32),
              "history": HISTORY, "cache": messages(edge_pb2.CacheControl, CACHE_FIELDS),
              "shape": SHAPE}
CONTEXT_QA_FIELDS = {"question": PROMPTS, "answer": TEXT}
GENERATE_FIELDS = {
    "prompt": PROMPTS,
    "context": lists(messages(cloud_pb2.ContextQA, CONTEXT_QA_FIELDS, question="Q", answer="A")),
    "max_tokens": st.one_of(st.integers(0, 1100), INT32), "request_id": REQUEST_IDS,
    "background": st.booleans(), "history": HISTORY, "shape": SHAPE,
}
ENTRY_IDS = st.one_of(st.integers(-3, 3), INT64)
PAIR_FIELDS = {"question": PROMPTS, "answer": TEXT}
ADMIN_FIELDS: dict[type, dict[str, st.SearchStrategy]] = {
    edge_pb2.ListEntriesRequest: {"tenant": NAMES, "limit": st.one_of(st.integers(-1, 1001),
                                                                      INT32),
                                  "offset": st.one_of(st.integers(-1, 5), INT32)},
    edge_pb2.GetEntryRequest: {"id": ENTRY_IDS},
    edge_pb2.DeleteEntriesRequest: {
        "ids": lists(ENTRY_IDS, 3), "tenant": NAMES, "question": PROMPTS,
        "min_similarity": st.one_of(st.floats(0, 1), DOUBLES),
        "older_than_s": st.one_of(st.sampled_from([0.0, 60.0]), DOUBLES),
        "dry_run": st.booleans()},
    edge_pb2.ImportedPair: PAIR_FIELDS,
    edge_pb2.ImportEntriesRequest: {
        "tenant": NAMES, "pairs": lists(messages(edge_pb2.ImportedPair, PAIR_FIELDS), 3)},
    edge_pb2.ExportEntriesRequest: {"tenant": NAMES},
}
EXPERIENCE_FIELDS = {
    "edge_id": NAMES, "seq": st.one_of(st.integers(0, 10), UINT64), "unix_time": DOUBLES,
    "correlation": st.one_of(lists(FLOATS, 20), st.integers(0, 200).map(lambda n: [0.5] * n)),
    "top_p": st.one_of(st.integers(-1, 70), INT32),
    "embedding": st.one_of(lists(FLOATS), st.sampled_from([8192, 8193]).map(lambda n: [0.1] * n)),
    "action_mask": lists(st.booleans(), 5), "action": st.one_of(st.integers(-1, 3), INT32),
    "action_probs": lists(FLOATS, 4), "policy_version": INT64, "delay_s": DOUBLES,
    "has_satisfaction": st.booleans(), "satisfaction": DOUBLES, "shadow_verified": st.booleans(),
    "request_id": REQUEST_IDS, "load": lists(FLOATS, 4),
}
VALID_EXPERIENCE = dict(edge_id="edge-fuzz", seq=1, unix_time=1.7e9, correlation=[0.5] * 15,
                        top_p=5, embedding=[0.1] * 8, action_mask=[True, True, True], action=1,
                        action_probs=[0.2, 0.5, 0.3], delay_s=0.5)


@functools.cache
def valid_policy() -> bytes:
    from trainerd.export import export_mlp_policy

    return export_mlp_policy(None, top_p=5, embed_dim=384, seed=0)


def flipped(flips: list[tuple[int, int]]) -> bytes:
    """The valid policy with some bits flipped (positions taken modulo its size)."""
    policy = bytearray(valid_policy())
    for position, bit in flips:
        policy[position % len(policy)] ^= 1 << bit
    return bytes(policy)


ONNX = st.one_of(
    st.binary(max_size=2048),
    st.just(None).map(lambda _: valid_policy()),
    lists(st.tuples(st.integers(0, 2**20), st.integers(0, 7)), 4).map(flipped),
)
PUBLISH_FIELDS = {
    "name": st.one_of(st.from_regex(r"[A-Za-z0-9_.:+-]{1,128}", fullmatch=True), TEXT),
    "onnx": ONNX,
}
# Every field of every request message, by message: test_every_request_field_has_a_strategy
# fails when a proto gains a field that is not fuzzed.
FIELD_STRATEGIES: dict[type, dict[str, st.SearchStrategy]] = {
    edge_pb2.AskRequest: ASK_FIELDS,
    edge_pb2.GetStatsRequest: {},
    edge_pb2.CacheControl: CACHE_FIELDS,
    chat_pb2.AnswerShape: SHAPE_FIELDS,
    **ADMIN_FIELDS,
    cloud_pb2.GenerateRequest: GENERATE_FIELDS,
    cloud_pb2.ContextQA: CONTEXT_QA_FIELDS,
    chat_pb2.ChatMessage: CHAT_FIELDS,
    cloud_pb2.CloudStatsRequest: {},
    trainer_pb2.Experience: EXPERIENCE_FIELDS,
    trainer_pb2.GetPolicyRequest: {"version": st.one_of(st.integers(-1, 3), INT64)},
    trainer_pb2.WatchPoliciesRequest: {"after_version": st.one_of(st.integers(-1, 3), INT64)},
    trainer_pb2.PublishPolicyRequest: PUBLISH_FIELDS,
}


def test_every_request_field_has_a_strategy() -> None:
    requests = {m.input_type.full_name
                for module in (edge_pb2, cloud_pb2, trainer_pb2)
                for service in module.DESCRIPTOR.services_by_name.values()
                for m in service.methods}
    fuzzed = {cls.DESCRIPTOR.full_name for cls in FIELD_STRATEGIES}
    assert requests <= fuzzed
    for cls, fields in FIELD_STRATEGIES.items():
        assert set(fields) == set(cls.DESCRIPTOR.fields_by_name), cls.DESCRIPTOR.full_name


# -- requests to live daemons ---------------------------------------------------------------
@EXAMPLES
@given(request=messages(edge_pb2.AskRequest, ASK_FIELDS, prompt="What is a vector database?",
                        tenant="fuzz"),
       method=st.sampled_from(["Ask", "AskStream", "GetStats"]))
async def test_edge_answers_every_request_with_a_status_a_client_can_act_on(
        edge: Edged, request: edge_pb2.AskRequest, method: str) -> None:
    async with grpc.aio.insecure_channel(edge.grpc.address) as channel:
        stub = edge_pb2_grpc.EdgeServiceStub(channel)
        if method == "GetStats":
            call = stub.GetStats(edge_pb2.GetStatsRequest(), timeout=RPC_TIMEOUT_S)
        else:
            call = getattr(stub, method)(request, timeout=RPC_TIMEOUT_S)
        check(*await outcome(call))
    await still_serving(edge.grpc.address)


ADMIN_METHODS = {"ListEntries": edge_pb2.ListEntriesRequest, "GetEntry": edge_pb2.GetEntryRequest,
                 "DeleteEntries": edge_pb2.DeleteEntriesRequest,
                 "ImportEntries": edge_pb2.ImportEntriesRequest,
                 "ExportEntries": edge_pb2.ExportEntriesRequest}


@EXAMPLES
@given(method=st.sampled_from(sorted(ADMIN_METHODS)), data=st.data())
async def test_edge_admin_answers_every_request_with_a_status_a_client_can_act_on(
        edge: Edged, method: str, data: st.DataObject) -> None:
    cls = ADMIN_METHODS[method]
    request = data.draw(messages(cls, ADMIN_FIELDS[cls]))
    if method == "DeleteEntries":
        request.dry_run = True  # the fuzz edge's seeded entries serve the other tests
    if method == "ImportEntries" and valid_name(request.tenant):
        request.tenant = "fuzz-imports"  # ... and are not to be crowded by imports either
    async with grpc.aio.insecure_channel(edge.grpc.address) as channel:
        stub = edge_pb2_grpc.EdgeServiceStub(channel)
        call = getattr(stub, method)(request, timeout=RPC_TIMEOUT_S)
        check(*await outcome(call))
    await still_serving(edge.grpc.address)


@EXAMPLES
@given(request=messages(cloud_pb2.GenerateRequest, GENERATE_FIELDS, prompt="Hi"),
       method=st.sampled_from(["Generate", "GenerateStream", "GetCloudStats"]))
async def test_cloudd_answers_every_request_with_a_status_a_client_can_act_on(
        cloud: Cloudd, request: cloud_pb2.GenerateRequest, method: str) -> None:
    async with grpc.aio.insecure_channel(cloud.grpc.address) as channel:
        stub = cloud_pb2_grpc.CloudServiceStub(channel)
        if method == "GetCloudStats":
            call = stub.GetCloudStats(cloud_pb2.CloudStatsRequest(), timeout=RPC_TIMEOUT_S)
        else:
            call = getattr(stub, method)(request, timeout=RPC_TIMEOUT_S)
        check(*await outcome(call))
    await still_serving(cloud.grpc.address)


@EXAMPLES
@given(records=st.lists(messages(trainer_pb2.Experience, EXPERIENCE_FIELDS, **VALID_EXPERIENCE),
                        max_size=3))
async def test_trainerd_answers_every_experience_stream(
        trainer: Trainerd, records: list[trainer_pb2.Experience]) -> None:
    async with grpc.aio.insecure_channel(trainer.grpc.address) as channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        check(*await outcome(stub.ReportExperience(iter(records), timeout=RPC_TIMEOUT_S)))
    await still_serving(trainer.grpc.address)


@EXAMPLES
@given(get=messages(trainer_pb2.GetPolicyRequest,
                    FIELD_STRATEGIES[trainer_pb2.GetPolicyRequest]),
       watch=messages(trainer_pb2.WatchPoliciesRequest,
                      FIELD_STRATEGIES[trainer_pb2.WatchPoliciesRequest]),
       publish=messages(trainer_pb2.PublishPolicyRequest, PUBLISH_FIELDS, name="fuzz"))
async def test_trainerd_answers_every_policy_request(
        trainer: Trainerd, get: trainer_pb2.GetPolicyRequest,
        watch: trainer_pb2.WatchPoliciesRequest,
        publish: trainer_pb2.PublishPolicyRequest) -> None:
    async with grpc.aio.insecure_channel(trainer.grpc.address) as channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        check(*await outcome(stub.PublishPolicy(publish, timeout=RPC_TIMEOUT_S)))
        check(*await outcome(stub.GetPolicy(get, timeout=RPC_TIMEOUT_S)))
        # A watch never ends by itself: its deadline ends it (after the latest version, if any).
        check(*await outcome(stub.WatchPolicies(watch, timeout=0.1)))
    await still_serving(trainer.grpc.address)


async def test_a_long_policy_name_is_refused_in_a_short_message(trainer: Trainerd) -> None:
    """Found by test_trainerd_answers_every_policy_request: kept as a fixed case."""
    async with grpc.aio.insecure_channel(trainer.grpc.address) as channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        publish = trainer_pb2.PublishPolicyRequest(name="n" * 20_000, onnx=b"not onnx")
        code, details = await outcome(stub.PublishPolicy(publish, timeout=RPC_TIMEOUT_S))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert len(details) <= MAX_DETAILS_CHARS


EDGE_METHODS = ("Ask", "AskStream", "GetStats", *ADMIN_METHODS)
CLOUD_METHODS = ("Generate", "GenerateStream", "GetCloudStats")
TRAINER_METHODS = ("ReportExperience", "GetPolicy", "WatchPolicies", "PublishPolicy")
STREAMING_RESPONSES = {"AskStream", "GenerateStream", "WatchPolicies", "ExportEntries"}


@EXAMPLES
@given(target=st.sampled_from([("EdgeService", m) for m in EDGE_METHODS]
                              + [("CloudService", m) for m in CLOUD_METHODS]
                              + [("TrainerService", m) for m in TRAINER_METHODS]),
       payloads=st.lists(st.binary(max_size=512), min_size=1, max_size=3))
async def test_every_method_answers_raw_bytes_with_a_status_a_client_can_act_on(
        edge: Edged, cloud: Cloudd, trainer: Trainerd, target: tuple[str, str],
        payloads: list[bytes]) -> None:
    service, method = target
    daemon = {"EdgeService": edge, "CloudService": cloud, "TrainerService": trainer}[service]
    path = f"/velo.v1.{service}/{method}"
    timeout = 0.1 if method == "WatchPolicies" else RPC_TIMEOUT_S
    async with grpc.aio.insecure_channel(daemon.grpc.address) as channel:
        if method == "ReportExperience":
            call = channel.stream_unary(path)(iter(payloads), timeout=timeout)
        elif method in STREAMING_RESPONSES:
            call = channel.unary_stream(path)(payloads[0], timeout=timeout)
        else:
            call = channel.unary_unary(path)(payloads[0], timeout=timeout)
        check(*await outcome(call))
    await still_serving(daemon.grpc.address)


# -- configuration --------------------------------------------------------------------------
DAEMON_CONFIGS = {
    "edged": (edged.config.EdgeConfig, edged.config.load, edged.config.ENV_PREFIX),
    "cloudd": (cloudd.config.CloudConfig, cloudd.config.load, cloudd.config.ENV_PREFIX),
    "trainerd": (trainerd.config.TrainerConfig, trainerd.config.load,
                 trainerd.config.ENV_PREFIX),
}
PLACEHOLDERS = ["{question}", "{answer}", "{context}", "{prompt}", "{question.x}", "{answer[0]}",
                "{context[x]}", "{prompt!r}", "{prompt:>9}", "{0}", "{}", "{", "{{", "}}",
                "text "]
STRINGS = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "info", "debug", "cache-0.5", "greedy-llm", "random", "IVF_FLAT",
                     "http://127.0.0.1:8080/v1", "127.0.0.1:0", str(ROOT / "README.md"),
                     "/dev/null", "/", "model.onnx"]),
    st.lists(st.sampled_from(PLACEHOLDERS), max_size=5).map("".join),  # templates
    st.integers(200, 5000).map(lambda n: "p" * n),  # paths longer than a file name may be
)
INTS = st.one_of(st.integers(-3, 300), st.integers(), st.sampled_from([2**63, 10**30]))
FLOATS_OR_INTS = st.one_of(st.floats(), st.integers(-(10**6), 10**6),
                           st.sampled_from([10**30, 10**400]))
WRONG = st.one_of(st.integers(), st.floats(), st.booleans(), st.text(max_size=10),
                  st.lists(st.integers(), max_size=3),
                  st.dictionaries(st.sampled_from(["a", "b"]), st.integers(), max_size=2))


def right_value(tp: Any) -> st.SearchStrategy:
    """Values of the field's own type (in range or not)."""
    if tp is bool:
        return st.booleans()
    if tp is int:
        return INTS
    if tp is float:
        return FLOATS_OR_INTS
    if tp is str:
        return STRINGS
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list:
        return st.lists(right_value(args[0]), max_size=3)
    if args and type(None) in args:  # X | None
        return st.one_of(st.none(), right_value(next(a for a in args if a is not type(None))))
    raise AssertionError(f"no strategy for config type {tp!r}")


def fields_of(cls: type) -> list[tuple[str, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(cls)]


def leaves(cls: type, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """Every key of `cls` as (path, type), sections included (type dict), and an unknown key
    in each section."""
    found: list[tuple[tuple[str, ...], Any]] = [((*path, "bogus_key"), str)]
    for name, tp in fields_of(cls):
        if dataclasses.is_dataclass(tp):
            found += [((*path, name), dict), *leaves(tp, (*path, name))]
        else:
            found.append(((*path, name), tp))
    return found


@st.composite
def tables(draw: st.DrawFn, cls: type) -> dict:
    """A TOML document for `cls` that sets a few keys (the others keep their defaults, so that
    every check can be reached): values of the right type, in range or not, or of a wrong
    type; a section may be given a scalar."""
    table: dict = {}
    for path, tp in draw(st.lists(st.sampled_from(leaves(cls)), max_size=5, unique=True)):
        right = st.just({}) if tp is dict else right_value(tp)
        value = draw(st.one_of(right, right, WRONG))
        target = table
        for key in path[:-1]:
            target = target.setdefault(key, {})
            if not isinstance(target, dict):
                break  # its section was set to a scalar
        else:
            target.setdefault(path[-1], value)
    return table


ENV_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",),
                                          blacklist_characters="\x00"), max_size=30)


def env_string(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "off"
    if isinstance(value, list):
        return ",".join(map(env_string, value))
    return "" if value is None else str(value)


def env_value(tp: Any) -> st.SearchStrategy[str]:
    right = ENV_TEXT if tp is dict else right_value(tp).map(env_string).filter(
        lambda s: "\x00" not in s)
    return st.one_of(right, right, ENV_TEXT)


def overrides(cls: type, prefix: str) -> st.SearchStrategy[dict[str, str]]:
    """VELO_<DAEMON>__SECTION__KEY=value overrides of any keys, values as text."""
    one = st.sampled_from(leaves(cls)).flatmap(lambda leaf: st.tuples(
        st.just("__".join([prefix, *leaf[0]]).upper()), env_value(leaf[1])))
    return st.lists(one, max_size=4).map(dict)


def toml(data: dict, table: str = "") -> str:
    """`data` as a TOML document: scalars first, then one [section] per nested dict."""
    lines = [f"[{table}]"] if table else []
    nested = {k: v for k, v in data.items() if isinstance(v, dict) and table_like(v)}
    lines += [f"{key} = {toml_value(value)}" for key, value in data.items()
              if key not in nested and value is not None]  # TOML has no null: left out
    text = "\n".join(lines) + "\n"
    for key, value in nested.items():
        text += toml(value, f"{table}.{key}" if table else key)
    return text


def table_like(value: dict) -> bool:
    return not value or any(isinstance(v, dict) for v in value.values()) or \
        not set(value) <= {"a", "b"}


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        # JSON's escapes are TOML's; TOML also wants DEL escaped.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"


def key_names(data: dict, env: dict[str, str]) -> set[str]:
    names = set(env) | {part.lower() for var in env for part in var.split("__")[1:]}
    stack = [data]
    while stack:
        table = stack.pop()
        names |= set(table)
        stack += [v for v in table.values() if isinstance(v, dict)]
    return names


def load_outcome(load: Callable[[str], Any], data: dict, env: dict[str, str],
                 prefix: str) -> ConfigError | object:
    """What `load` makes of `data` written as a TOML file with `env` set (and nothing else of
    the daemon's prefix): a config, or the ConfigError it raised."""
    text = toml(data)
    tomllib.loads(text)  # the writer above must write what it means
    with tempfile.TemporaryDirectory() as folder, pytest.MonkeyPatch.context() as patch:
        for name in [n for n in os.environ if n.startswith(prefix)]:
            patch.delenv(name)
        for name, value in env.items():
            patch.setenv(name, value)
        path = Path(folder) / "config.toml"
        path.write_text(text)
        try:
            return load(str(path))
        except ConfigError as exc:
            return exc


@pytest.mark.parametrize("daemon", sorted(DAEMON_CONFIGS))
@settings(max_examples=150, deadline=None, database=None)
@given(data=st.data())
def test_config_loads_or_names_the_bad_key(daemon: str, data: st.DataObject) -> None:
    cls, load, prefix = DAEMON_CONFIGS[daemon]
    table = data.draw(tables(cls), label="toml")
    env = data.draw(overrides(cls, prefix), label="env")
    result = load_outcome(load, table, env, prefix)
    if isinstance(result, ConfigError):
        assert any(name and name in str(result) for name in key_names(table, env)), result
    else:
        assert_usable(result, cls)


def assert_usable(config: object, cls: type) -> None:
    """A config that loads must also start: `velo-<daemon>` configures logging with it before
    anything else, and only a ConfigError exits cleanly (2, naming the key)."""
    assert isinstance(config, cls)
    assert config.log_level.upper() in logging.getLevelNamesMapping(), config.log_level


# Found by the test above; kept as fixed cases so that they are checked on every run:
# (daemon, TOML file, environment, the key a ConfigError must name, or its words).
FOUND = [
    ("cloudd", '[llm]\ncontext_item_template = "{question.x} {answer}"\n', {},
     "context_item_template"),
    ("cloudd", '[llm]\ncontext_template = "{context[x]} {prompt}"\n', {}, "context_template"),
    ("cloudd", f"shutdown_grace_s = {10**400}\n", {}, "shutdown_grace_s"),
    ("trainerd", f"[learner]\nphi1 = {10**400}\n", {}, "phi1"),
    # Too big for Python to parse at all: the error names the file, as for any TOML error.
    ("edged", "[cache]\ntop_p = 1" + "0" * 5000 + "\n", {}, "not valid TOML"),
    ("edged", f'[tls]\ncert_file = "{"p" * 300}"\nkey_file = "k"\n', {}, "cert_file"),
    ("edged", "", {"VELO_EDGED__AUTH__TOKEN_FILE": "p" * 5000}, "token_file"),
    ("edged", 'log_level = "nonsense"\n', {}, "log_level"),
]


@pytest.mark.parametrize(("daemon", "text", "env", "key"), FOUND,
                         ids=[f"{daemon}-{key}" for daemon, _, _, key in FOUND])
def test_config_cases_found_by_fuzzing(daemon: str, text: str, env: dict[str, str], key: str,
                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cls, load, prefix = DAEMON_CONFIGS[daemon]
    for name in [n for n in os.environ if n.startswith(prefix)]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "config.toml"
    path.write_text(text)
    try:
        config = load(str(path))
    except ConfigError as exc:
        assert key in str(exc)
    else:
        assert_usable(config, cls)


# -- tools/fuzz.py against a live edge ------------------------------------------------------
def test_fuzz_payloads_are_the_same_for_a_seed_and_small() -> None:
    def payloads(seed: int) -> list[tuple[str, bytes]]:
        return list(fuzz.payloads(seed, 500, oversized=0))

    first = payloads(0)
    assert first == payloads(0) and first != payloads(1)
    assert all(len(payload) <= fuzz.MAX_PAYLOAD for _, payload in first)
    assert {method for method, _ in first} == {fuzz.ASK, fuzz.ASK_STREAM, fuzz.GET_STATS}


async def test_fuzzed_edge_never_answers_unknown_or_internal_and_stays_up(
        edge_config: Callable[..., edged.config.EdgeConfig]) -> None:
    async with running(Edged(edge_config())) as daemon:
        report = await fuzz.fuzz_edge(daemon.grpc.address, FUZZ_REQUESTS, seed=0)
    print(f"fuzz_edge: {report.requests} requests in {report.seconds:.1f} s, codes {report.codes}")
    assert report.requests == FUZZ_REQUESTS
    assert report.unknown == report.internal == 0, report.surprises
    assert report.alive and report.serving
    assert set(report.codes) <= fuzz.EXPECTED, report.surprises


async def test_no_tenant_is_ever_served_another_tenants_answer(
        edge_config: Callable[..., edged.config.EdgeConfig], exported_embedder: Path) -> None:
    cfg = edge_config()
    # The probes seed rows through a Milvus client of their own: the edge's in-process index
    # takes them at its next sync with Milvus.
    cfg.vector_db.index_sync_s = 1.0
    async with running(Edged(cfg)) as daemon:
        # A client of its own, as a chaos tool would have: the edge must see its writes.
        embedder = Embedder(exported_embedder)
        cache = VectorCache(cfg.vector_db, cfg.collection, embedder.dim,
                            texts_path=cfg.texts_path)
        await asyncio.to_thread(cache.open)
        try:
            report = await fuzz.isolation_probes(daemon.grpc.address, cache, embedder,
                                                 probes=ISOLATION_PROBES)
        finally:
            await asyncio.to_thread(cache.close)
    print(f"isolation_probes: {report.probes} probes in {report.seconds:.1f} s "
          f"(visible after {report.visible_after_s:.1f} s), codes {report.codes}, "
          f"actions {report.actions}")
    assert report.probes == ISOLATION_PROBES
    assert report.across_tenants == 0, report.leaks
    assert report.unexplained == 0
    # Exact questions (70 % of probes) are at distance 0: reused unless the edge lost them.
    assert report.served >= ISOLATION_PROBES // 2
    # Without a cloud a paraphrase that is not close enough to reuse cannot be answered.
    assert set(report.codes) <= {"OK", "UNAVAILABLE"}
