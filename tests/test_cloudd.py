"""cloudd against real servers: a tiny OpenAI-compatible HTTP server written here (fast), and
the real SmolLM2 served by llama.cpp (tests marked `llm`)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloudd.__main__ import main
from cloudd.config import CloudConfig, LLMConfig, LocalLLMConfig, load
from cloudd.llm_server import LLMServerError, LocalLLMServer
from cloudd.server import Cloudd
from tests.fake_llm import FAKE_MODEL, FakeLLM
from velo.core.models import ROOT
from velo.runtime.config import ConfigError
from velo.v1 import cloud_pb2, cloud_pb2_grpc


@pytest.fixture(scope="module")
def fake_server() -> Any:
    server = FakeLLM().start()
    yield server
    server.stop()


@pytest.fixture
def fake(fake_server: FakeLLM) -> Any:
    fake_server.reset()
    yield fake_server
    fake_server.gate.set()  # never leave a handler thread hanging


@contextlib.asynccontextmanager
async def running_cloudd(
    base_url: str, **llm: Any
) -> AsyncIterator[tuple[Cloudd, cloud_pb2_grpc.CloudServiceStub]]:
    """A real cloudd on a free port, and a gRPC stub connected to it."""
    llm = {"model": FAKE_MODEL, "retry_backoff_s": 0.01, **llm}
    cfg = CloudConfig(listen="127.0.0.1:0", shutdown_grace_s=1.0,
                      llm=LLMConfig(base_url=base_url, **llm))
    daemon = Cloudd(cfg)
    await daemon.startup()
    try:
        async with grpc.aio.insecure_channel(daemon.grpc.address) as channel:
            yield daemon, cloud_pb2_grpc.CloudServiceStub(channel)
    finally:
        await daemon.shutdown()


def ask(prompt: str, max_tokens: int = 8, context: tuple[tuple[str, str], ...] = ()
        ) -> cloud_pb2.GenerateRequest:
    return cloud_pb2.GenerateRequest(
        prompt=prompt,
        max_tokens=max_tokens,
        context=[cloud_pb2.ContextQA(question=q, answer=a) for q, a in context],
    )


async def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def closed_port() -> int:
    """A port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- against the fake LLM server ------------------------------------------------------------


async def test_generate_returns_text(fake: FakeLLM) -> None:
    async with running_cloudd(fake.url) as (_, stub):
        reply = await stub.Generate(ask("What is the capital of France?", max_tokens=5))
    assert reply.text == "ok 1 2 3 4"
    assert reply.model == FAKE_MODEL
    assert reply.completion_tokens == 5 and reply.prompt_tokens > 0
    assert reply.llm_s > 0
    # No context: the user message is the prompt itself, after the system prompt.
    messages = fake.requests[-1]["messages"]
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[1]["content"] == "What is the capital of France?"


async def test_zero_max_tokens_uses_the_default(fake: FakeLLM) -> None:
    async with running_cloudd(fake.url, default_max_tokens=7) as (_, stub):
        reply = await stub.Generate(ask("hi", max_tokens=0))
    assert fake.requests[-1]["max_tokens"] == 7
    assert reply.completion_tokens == 7


async def test_stream_chunks_add_up_to_the_final_text(fake: FakeLLM) -> None:
    async with running_cloudd(fake.url) as (_, stub):
        chunks = [c async for c in stub.GenerateStream(ask("count", max_tokens=6))]
    texts, last = [c.text for c in chunks[:-1]], chunks[-1]
    assert len(texts) == 6 and last.HasField("done")
    assert "".join(texts) == last.done.text == "ok 1 2 3 4 5"
    assert last.done.completion_tokens == 6


async def test_retries_after_server_errors(fake: FakeLLM) -> None:
    fake.fail_next = 2
    async with running_cloudd(fake.url, max_retries=2) as (_, stub):
        reply = await stub.Generate(ask("hello", max_tokens=3))
    assert reply.text == "ok 1 2"
    assert len(fake.requests) == 3


async def test_server_errors_beyond_retries_are_unavailable(fake: FakeLLM) -> None:
    fake.fail_next = 5
    async with running_cloudd(fake.url, max_retries=1) as (_, stub):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Generate(ask("hello"))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "HTTP 500: fake overload" in err.value.details()
    assert len(fake.requests) == 2


async def test_llm_down_is_unavailable_and_names_the_url() -> None:
    url = f"http://127.0.0.1:{closed_port()}/v1"
    async with running_cloudd(url, max_retries=1) as (_, stub):
        for call in (stub.Generate(ask("hello")), _drain(stub.GenerateStream(ask("hello")))):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            details = err.value.details()
            assert f"LLM server at {url} is unreachable" in details
            assert "Connection refused" in details and "2 attempts" in details


async def _drain(call: Any) -> list[Any]:
    return [chunk async for chunk in call]


async def test_llm_refusal_is_not_retried(fake: FakeLLM) -> None:
    async with running_cloudd(fake.url, model="no-such-model") as (_, stub):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Generate(ask("hello"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "HTTP 404: model 'no-such-model' not found" in err.value.details()
    assert len(fake.requests) == 1


async def test_llm_too_slow_is_deadline_exceeded(fake: FakeLLM) -> None:
    fake.gate.clear()
    async with running_cloudd(fake.url, timeout_s=0.2, max_retries=0) as (_, stub):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Generate(ask("hello"))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "did not answer within 0.2 s" in err.value.details()


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "expected"),
    [
        ("", 8, "prompt is empty"),
        ("  \n", 8, "prompt is empty"),
        ("hello", 5000, "between 0 and 1024"),
        ("hello", -1, "between 0 and 1024"),
    ],
)
async def test_invalid_requests(fake: FakeLLM, prompt: str, max_tokens: int, expected: str) -> None:
    async with running_cloudd(fake.url) as (_, stub):
        for call in (stub.Generate(ask(prompt, max_tokens)),
                     _drain(stub.GenerateStream(ask(prompt, max_tokens)))):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert expected in err.value.details()
    assert fake.requests == []


async def test_over_capacity_is_resource_exhausted(fake: FakeLLM) -> None:
    fake.gate.clear()  # the LLM holds every request until we let go
    async with running_cloudd(fake.url, max_concurrency=1, max_queue=1) as (daemon, stub):
        servicer = daemon.servicer
        assert servicer is not None
        first = asyncio.ensure_future(stub.Generate(ask("one", 2)))
        await wait_until(lambda: servicer.in_flight == 1)
        second = asyncio.ensure_future(stub.Generate(ask("two", 2)))
        await wait_until(lambda: servicer.queued == 1)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Generate(ask("three", 2))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "at capacity (1 in flight, 1 queued); retry later" in err.value.details()
        fake.gate.set()
        assert (await first).text == (await second).text == "ok 1"
        assert servicer.in_flight == servicer.queued == 0


async def test_cloudd_reports_its_queue_and_the_wait_it_means(fake: FakeLLM) -> None:
    """Every answer and the stats carry the load (velo.core.load): with both slots held by slow
    requests and two more queued, the wait of a new request is (2 + 1) x the mean service
    time / 2 slots, the service time cloudd measured on the earlier answers."""
    fake.delay_s = 0.3
    async with running_cloudd(fake.url, max_concurrency=2, max_queue=8) as (daemon, stub):
        servicer = daemon.servicer
        idle = await stub.Generate(ask("warm-up", 2))
        assert idle.HasField("load") and idle.load.slots == 2 and idle.queue_s < 0.2
        assert idle.load.estimated_wait_s == 0.0  # a slot was free when it left
        service = idle.load.mean_service_s
        assert service >= 0.3
        fake.delay_s = 0.0
        fake.gate.clear()  # the LLM holds every request until we let go
        calls = [asyncio.ensure_future(stub.Generate(ask(f"q{i}", 2))) for i in range(4)]
        await wait_until(lambda: servicer.in_flight == 2 and servicer.queued == 2)
        stats = await stub.GetCloudStats(cloud_pb2.CloudStatsRequest())
        assert (stats.load.in_flight, stats.load.queued) == (2, 2)
        assert stats.load.estimated_wait_s == pytest.approx(3 * service / 2)
        fake.gate.set()
        answers = await asyncio.gather(*calls)
        assert max(a.queue_s for a in answers) > 0.0  # two of them waited for a slot


async def test_an_edge_counts_its_own_forwards_until_the_cloud_reports_them(
        fake: FakeLLM) -> None:
    """The first forwards of a burst are sent before any answer brings a report of the queue
    they make: the edge's view (edged.cloud_client) adds them to the last report, so the
    later ones see the wait cloudd itself would estimate, and it goes back to the reports
    once the answers (or failures) are in."""
    from edged.cloud_client import CloudClient, CloudError

    fake.delay_s = 0.3
    async with running_cloudd(fake.url, max_concurrency=1, max_queue=8) as (daemon, stub):
        client = CloudClient(daemon.grpc.address, timeout_s=10.0)
        await client.generate("warm-up", [], 2, "warm-up")
        service = client.load.last.mean_service_s
        assert service >= 0.3 and client.load.cloud_wait_s == 0.0  # idle when it answered
        fake.delay_s = 0.0
        fake.gate.clear()
        calls = [asyncio.ensure_future(client.generate(f"q{i}", [], 2, f"q{i}"))
                 for i in range(3)]
        await wait_until(lambda: daemon.servicer.in_flight == 1 and daemon.servicer.queued == 2)
        stats = await stub.GetCloudStats(cloud_pb2.CloudStatsRequest())
        # No answer came back, yet the edge sees the queue its three forwards made.
        assert client.load.unreported == 3
        assert client.load.cloud_wait_s == pytest.approx(stats.load.estimated_wait_s)
        assert client.load.cloud_wait_s == pytest.approx(3 * service)
        fake.gate.set()
        await asyncio.gather(*calls)
        assert client.load.unreported == 0
        assert client.load.cloud_wait_s == 0.0  # the last answer left an idle cloud
        # A forward that fails brings no report: it stops counting when it ends.
        fake.fail_next = 100
        with pytest.raises(CloudError):
            await client.generate("fails", [], 2, "fails")
        fake.fail_next = 0
        assert client.load.unreported == 0
        await client.channel.close()


async def test_client_cancelling_a_stream_closes_the_llm_stream(fake: FakeLLM) -> None:
    fake.chunk_delay_s = 0.02
    async with running_cloudd(fake.url) as (daemon, stub):
        call = stub.GenerateStream(ask("tell me a long story", max_tokens=500))
        seen = 0
        async for chunk in call:
            seen += bool(chunk.text)
            if seen == 3:
                break
        call.cancel()
        # The upstream HTTP stream is closed (the LLM server stops writing), the slot is free.
        await wait_until(lambda: fake.disconnects == 1)
        assert daemon.servicer is not None
        await wait_until(lambda: daemon.servicer.in_flight == 0)
        fake.chunk_delay_s = 0.0
        reply = await stub.Generate(ask("still there?", max_tokens=2))
    assert reply.text == "ok 1"


async def test_action_c_context_reaches_the_llm(fake: FakeLLM) -> None:
    context = (("What is the capital of France?", "Paris is the capital of France."),
               ("Where is the Eiffel Tower?", "In Paris {on the Champ de Mars}."))
    async with running_cloudd(fake.url) as (daemon, stub):
        await stub.Generate(ask("Which city is France's capital?", context=context))
    messages = fake.requests[-1]["messages"]
    assert messages[0] == {"role": "system", "content": daemon.cfg.llm.system_prompt}
    user = messages[-1]
    assert user["role"] == "user"
    assert "Here is a related question that was answered before" in user["content"]
    assert ("Q: What is the capital of France?\nA: Paris is the capital of France.\n\n"
            "Q: Where is the Eiffel Tower?\nA: In Paris {on the Champ de Mars}.") in user["content"]
    assert user["content"].endswith("\nWhich city is France's capital?")


async def test_background_work_never_queues_and_never_crowds_out_users(fake: FakeLLM) -> None:
    fake.gate.clear()  # the one LLM slot stays busy until we let go
    async with running_cloudd(fake.url, max_concurrency=1, max_queue=4) as (daemon, stub):
        servicer = daemon.servicer
        user = asyncio.ensure_future(stub.Generate(ask("user", 2)))
        await wait_until(lambda: servicer.in_flight == 1)
        background = cloud_pb2.GenerateRequest(prompt="shadow check", max_tokens=2,
                                               background=True)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Generate(background)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "background" in err.value.details()
        assert servicer.queued == 0  # it did not wait in the users' queue
        fake.gate.set()
        assert (await user).text == "ok 1"
        assert (await stub.Generate(background)).text == "ok 1"  # a free slot: served
        stats = await stub.GetCloudStats(cloud_pb2.CloudStatsRequest())
        assert stats.background_refused == 1 and stats.requests == 3


@pytest.mark.parametrize(("request_fields", "expected"), [
    ({"prompt": "x" * 1_000_000}, "prompt is 1000000 characters; cloudd accepts at most 32000"),
    ({"context": [cloud_pb2.ContextQA(question="q", answer="a")] * 500},
     "500 context items; cloudd accepts at most 8"),
    ({"context": [cloud_pb2.ContextQA(question="q" * 20_000, answer="a" * 20_000)]},
     "context is 40000 characters"),
    ({"request_id": "r" * 10_000}, "(10000 characters) must be at most 128"),
])
async def test_cloudd_enforces_its_own_limits(fake: FakeLLM, request_fields: dict,
                                              expected: str) -> None:
    async with running_cloudd(fake.url) as (_, stub):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Generate(cloud_pb2.GenerateRequest(**{"prompt": "hi", **request_fields}))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in err.value.details() and len(err.value.details()) < 400
    assert fake.requests == []  # nothing reached the LLM


async def test_health_is_not_serving_while_the_llm_is_down_and_says_why() -> None:
    port = closed_port()
    async with running_cloudd(f"http://127.0.0.1:{port}/v1") as (daemon, stub), \
            grpc.aio.insecure_channel(daemon.grpc.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        check = health_pb2.HealthCheckRequest()
        assert (await health.Check(check)).status == NOT_SERVING
        stats = await stub.GetCloudStats(cloud_pb2.CloudStatsRequest())
        assert not stats.llm_up and "Connection refused" in stats.llm_down_reason
        server = FakeLLM(port).start()  # the LLM comes (back) up on its address
        try:
            await wait_until(lambda: daemon.grpc.serving, timeout_s=5)
            assert (await health.Check(check)).status == SERVING
            assert (await stub.Generate(ask("back?", 2))).text == "ok 1"
        finally:
            server.stop()
        # Requests that find it gone again take the health down at once.
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Generate(ask("gone?", 2))
        assert (await health.Check(check)).status == NOT_SERVING


def test_llm_server_that_dies_in_its_first_decode_is_never_called_ready(tmp_path: Any) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    server = LocalLLMServer(model=model, log_path=tmp_path / "llm.log", startup_timeout_s=30,
                            launcher=(sys.executable, str(ROOT / "tests" / "crashing_llm.py")))
    with pytest.raises(LLMServerError, match=r"was killed by SIGSEGV \(exit code -11\)") as err:
        server.start()
    assert "decode: about to crash" in str(err.value)  # the tail of its own log
    assert not server.running


# --- configuration and command line ---------------------------------------------------------


def test_config_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VELO_CLOUDD__LLM__BASE_URL", "http://gpu-1:8000/v1")
    monkeypatch.setenv("VELO_CLOUDD__LLM__MAX_CONCURRENCY", "16")
    cfg = load(None)
    assert cfg.llm.base_url == "http://gpu-1:8000/v1" and cfg.llm.max_concurrency == 16
    monkeypatch.setenv("VELO_CLOUDD__LLM__MAX_QUEUE", "-1")
    with pytest.raises(ConfigError, match=r"llm\.max_queue"):
        load(None)


def test_bad_config_exits_2_naming_the_key(tmp_path: Any, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "cloudd.toml"
    path.write_text("[llm]\ncontext_template = \"Context: {context}\"\n")
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("velo-cloudd: config key 'llm.context_template'")
    assert "{prompt}" in err


# --- against the real local LLM (SmolLM2 via llama.cpp) -------------------------------------


@pytest.fixture(scope="module")
def llm_server() -> Any:
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed: pip install 'velo[embedded]'")
    with LocalLLMServer(n_threads=2) as server:
        yield server


@pytest.mark.llm
async def test_real_llm_generate(llm_server: LocalLLMServer) -> None:
    async with running_cloudd(llm_server.base_url, model="smollm2") as (_, stub):
        reply = await stub.Generate(ask("What is the capital of France?", max_tokens=16))
    assert reply.text.strip()
    assert reply.model == "smollm2"
    assert 1 <= reply.completion_tokens <= 16 and reply.prompt_tokens > 5
    assert reply.llm_s > 0


@pytest.mark.llm
async def test_real_llm_stream(llm_server: LocalLLMServer) -> None:
    async with running_cloudd(llm_server.base_url, model="smollm2") as (_, stub):
        chunks = [c async for c in stub.GenerateStream(ask("Name three colours.", 16))]
    texts, last = [c.text for c in chunks[:-1]], chunks[-1]
    assert len(texts) >= 2 and last.HasField("done")
    assert "".join(texts) == last.done.text and last.done.text.strip()
    assert 2 <= last.done.completion_tokens <= 16


@pytest.mark.llm
def test_llm_server_that_cannot_start_says_why(tmp_path: Any) -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed")
    with pytest.raises(LLMServerError, match=r"missing\.gguf does not exist"):
        LocalLLMServer(model=tmp_path / "missing.gguf").start()
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"this is not a GGUF file")
    server = LocalLLMServer(model=broken, log_path=tmp_path / "llm.log")
    with pytest.raises(LLMServerError, match="exited with code") as err:
        server.start()
    assert "broken.gguf" in str(err.value)  # quoted from the tail of the server's own log
    assert not server.running


@pytest.mark.llm
async def test_cloudd_restarts_its_local_llm_and_says_how_it_died(tmp_path: Any) -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed")
    cfg = CloudConfig(listen="127.0.0.1:0", shutdown_grace_s=1.0,
                      llm=LLMConfig(model="smollm2", default_max_tokens=4),
                      local_llm=LocalLLMConfig(enabled=True, log_file=str(tmp_path / "llm.log")))
    daemon = Cloudd(cfg)
    await daemon.startup()
    try:
        async with grpc.aio.insecure_channel(daemon.grpc.address) as channel:
            stub = cloud_pb2_grpc.CloudServiceStub(channel)
            await wait_until(lambda: daemon.grpc.serving, timeout_s=120)
            assert (await stub.Generate(ask("Say hi.", 4))).text.strip()
            os.kill(daemon.supervisor.server.pid, signal.SIGSEGV)  # a crash mid-life
            await wait_until(lambda: not daemon.grpc.serving, timeout_s=10)
            stats = await stub.GetCloudStats(cloud_pb2.CloudStatsRequest())
            assert not stats.llm_up and stats.llm_restarts == 1
            assert "was killed by SIGSEGV (exit code -11)" in stats.llm_down_reason
            assert "last lines of" in stats.llm_down_reason  # its log, quoted
            await wait_until(lambda: daemon.grpc.serving, timeout_s=120)  # restarted
            assert (await stub.Generate(ask("Say hi again.", 4))).text.strip()
    finally:
        await daemon.shutdown()
    assert not daemon.supervisor.server.running


async def test_a_pool_left_with_a_stuck_connection_is_replaced(fake) -> None:
    """A connection the pool counts as busy though no request uses it (a request cancelled at
    the wrong moment: seen after cloudd was frozen and thawed) left a one-connection pool
    full, and every later request waited on it forever. The wait is now bounded by
    timeout_s, and the pool is replaced."""
    from cloudd.backend import OpenAIBackend

    backend = OpenAIBackend(LLMConfig(base_url=fake.url, model=FAKE_MODEL, max_concurrency=1,
                                      timeout_s=1.0, retry_backoff_s=0.05))
    try:
        # Holds the pool's only connection and is never closed: the leak, as the pool sees it.
        await backend._client.send(backend._client.build_request("GET", "models"), stream=True)
        completion = await asyncio.wait_for(backend.generate("Still there?", max_tokens=4),
                                            timeout=15)
        assert completion.text
        assert backend.pools_replaced == 1
    finally:
        await backend.aclose()


async def test_an_llm_that_hangs_is_found_though_every_client_gives_up_first(fake) -> None:
    """Clients with deadlines shorter than llm.timeout_s used to cancel the LLM call each
    time, so a hung LLM never ran into llm.timeout_s and health said it was up. The call now
    runs to its end, and its timeout marks the LLM down until it answers again."""
    fake.delay_s = 30.0  # answers nothing in time
    try:
        async with running_cloudd(fake.url, timeout_s=1.0, max_retries=0,
                                  health_every_s=0.2) as (cloud, stub):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Generate(ask("Anyone?", max_tokens=4), timeout=0.3)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            deadline = time.monotonic() + 10
            while cloud.grpc.parts["llm"].ok and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert not cloud.grpc.parts["llm"].ok
            assert "did not answer within 1 s" in cloud.grpc.parts["llm"].reason
            await asyncio.sleep(1.0)  # probes of /models (which answers) do not undo it
            assert not cloud.grpc.parts["llm"].ok
            stats = await stub.GetCloudStats(cloud_pb2.CloudStatsRequest(), timeout=5)
            assert stats.llm_timeouts == 1 and not stats.llm_up
    finally:
        fake.delay_s = 0.0
