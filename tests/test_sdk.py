"""The Python SDK (velo_client) against real edged daemons on loopback (real Milvus, the ONNX
embedder, a real cloudd in front of the fake LLM server): ask and stream, sync and async,
retries only where they help, deadlines, nearest-edge failover, hedged fan-out, keys and TLS."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from structlog.testing import capture_logs

from edged.config import EdgeAuthConfig
from edged.server import Edged
from tests.certs import CA
from tests.fake_llm import fake_tokens
from velo.ops.ports import free_port
from velo.runtime.security import TLSConfig, new_token, token_sha256
from velo_client import (
    TLS,
    Answer,
    AsyncVeloClient,
    CacheControl,
    Retry,
    VeloClient,
    VeloError,
)

QUESTION = "How do I reset my router to factory settings?"
PARAPHRASE = "How can I reset my router to its factory settings?"
ANSWER = "Hold the reset button on the back for ten seconds until the lights blink."
LLM_ANSWER = "".join(fake_tokens(8))  # what the cloud fixture's fake LLM says by default


async def seed(edge: Edged, tenant: str = "t1") -> None:
    q_vec, a_vec = edge.embedder.embed([QUESTION, ANSWER])
    await asyncio.to_thread(edge.cache.insert_pair, tenant, QUESTION, ANSWER, q_vec, a_vec, -1.0)


class Fleet(list[Edged]):
    """Edges started in this event loop; `stop` takes one away mid-test."""

    def __init__(self) -> None:
        super().__init__()
        self.stopped: list[Edged] = []

    async def stop(self, edge: Edged) -> None:
        self.stopped.append(edge)
        await edge.shutdown()


@asynccontextmanager
async def edges(make: Callable[[], Edged], count: int) -> AsyncIterator[Fleet]:
    """`count` edges; each one still running is shut down at the end."""
    fleet = Fleet()
    try:
        for _ in range(count):
            edge = make()
            await edge.startup()
            fleet.append(edge)
        yield fleet
    finally:
        for edge in fleet:
            if edge not in fleet.stopped:
                await edge.shutdown()


def dead_address() -> str:
    return f"127.0.0.1:{free_port()}"  # nothing listens there: connection refused


async def until(check: Callable[[], bool], timeout_s: float = 10) -> None:
    end = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < end, "condition not reached in time"
        await asyncio.sleep(0.05)


# -- ask and stream ---------------------------------------------------------------------------
async def test_async_and_sync_clients_ask_stream_and_read_stats(edge_config, cloud) -> None:
    async with edges(lambda: Edged(edge_config(cloud=cloud, shutdown_grace_s=1.0)), 1) as [edge]:
        address = edge.grpc.address
        async with AsyncVeloClient([address], tenant="t1") as velo:
            first = await velo.ask(QUESTION, request_id="sdk-first",
                                   history=[{"role": "system", "content": "Be brief."}])
            assert isinstance(first, Answer)
            assert (first.text, first.action, first.action_name) == (LLM_ANSWER, "B", "forward")
            assert first.request_id == "sdk-first" and first.edge == address
            assert first.edge_id == edge.cfg.edge_id and first.attempts == 1
            assert first.cloud_s > 0 and first.satisfaction is None
            # Streamed: text pieces first, then the summary, whose text is their sum.
            pieces = [p async for p in velo.stream("Tell me about routers.", max_tokens=5)]
            *texts, done = pieces
            assert isinstance(done, Answer) and all(isinstance(t, str) for t in texts)
            assert len(texts) >= 2 and "".join(texts) == done.text == "".join(fake_tokens(5))

        def blocking() -> tuple[Answer, list[str | Answer], int]:
            brief = [("system", "Be brief.")]  # the same conversation as the first ask
            with VeloClient([address], tenant="t1") as velo:
                again = velo.ask(PARAPHRASE, history=brief)
                streamed = list(velo.stream(PARAPHRASE, history=brief))
                return again, streamed, velo.stats().requests

        # The edge runs in this event loop; the blocking client must wait elsewhere.
        again, streamed, requests = await asyncio.to_thread(blocking)
        assert again.action == "A" and again.text == LLM_ANSWER
        assert again.cached_question == QUESTION and again.similarity > 0.9
        assert again.cached_entry_id != 0 and again.cached_age_s >= 0 and not again.stored
        assert isinstance(streamed[-1], Answer) and streamed[-1].action == "A"
        assert "".join(p for p in streamed[:-1] if isinstance(p, str)) == LLM_ANSWER
        assert requests == 4

        async with AsyncVeloClient([address], tenant="t1") as velo:  # cache control travels
            fresh = await velo.ask(PARAPHRASE, history=[("system", "Be brief.")],
                                   cache=CacheControl(no_cache=True))
            assert fresh.action == "B"


# -- retries and deadlines --------------------------------------------------------------------
async def test_unavailable_is_retried_with_one_request_id_invalid_argument_is_not(
        edge_config, cloud, fake_llm) -> None:
    async with edges(lambda: Edged(edge_config(cloud=cloud, shutdown_grace_s=1.0)), 1) as [edge]:
        async with AsyncVeloClient([edge.grpc.address], tenant="t1",
                                   retry=Retry(attempts=3, backoff_s=0.01)) as velo:
            # The LLM fails every try cloudd makes (1 + 2 retries): the edge answers
            # UNAVAILABLE, and the client's second try gets through.
            fake_llm.fail_next = 3
            with capture_logs() as logs:
                answer = await velo.ask("What is the capital of Peru?")
            assert answer.attempts == 2 and answer.text == LLM_ANSWER
            assert len(fake_llm.requests) == 4
            # Both tries reached cloudd under the one request id.
            ids = [e["request_id"] for e in logs if "request_id" in e]
            assert len(ids) >= 2 and set(ids) == {answer.request_id}
            assert edge.pipeline.counters.errors == 1

            with pytest.raises(VeloError) as err:
                await velo.ask("   ")
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.attempts == 1 and "prompt is empty" in err.value.details
            assert edge.pipeline.counters.errors == 2  # the edge saw it once

        # Every edge down: exactly `attempts` tries, then UNAVAILABLE.
        async with AsyncVeloClient([dead_address(), dead_address()], tenant="t1",
                                   retry=Retry(attempts=4, backoff_s=0.01)) as velo:
            with pytest.raises(VeloError) as err:
                await velo.ask(QUESTION)
            assert err.value.code == grpc.StatusCode.UNAVAILABLE and err.value.attempts == 4


async def test_the_deadline_covers_the_whole_call(edge_config, cloud, fake_llm) -> None:
    async with edges(lambda: Edged(edge_config(cloud=cloud, shutdown_grace_s=1.0)), 1) as [edge]:
        fake_llm.gate.clear()  # the LLM hangs
        try:
            for retry in (Retry(), Retry(deadline_exceeded=True)):
                async with AsyncVeloClient([edge.grpc.address], tenant="t1", retry=retry,
                                           timeout_s=60) as velo:
                    start = time.monotonic()
                    with pytest.raises(VeloError) as err:
                        await velo.ask("Why is the sky blue?", timeout_s=0.6)
                    took = time.monotonic() - start
                    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
                    assert 0.5 < took < 1.5, took
            # The edge gave up on the abandoned requests too.
            await until(lambda: edge.pipeline.inflight == 0)
        finally:
            fake_llm.gate.set()


def test_backoff_is_exponential_with_full_jitter() -> None:
    retry = Retry(backoff_s=0.1, max_backoff_s=1.0)
    rng = random.Random(7)
    for n, cap in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (9, 1.0)]:
        waits = [retry.delay_s(n, rng) for _ in range(300)]
        assert all(0 <= w <= cap for w in waits)
        assert max(waits) > 0.8 * cap and min(waits) < 0.2 * cap  # spread over [0, cap]
    assert not Retry().retryable(grpc.StatusCode.DEADLINE_EXCEEDED)
    assert Retry(deadline_exceeded=True).retryable(grpc.StatusCode.DEADLINE_EXCEEDED)
    for code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED,
                 grpc.StatusCode.UNAUTHENTICATED):
        assert not Retry(deadline_exceeded=True).retryable(code)


# -- edge selection ---------------------------------------------------------------------------
async def test_nearest_prefers_a_live_edge_and_fails_over_when_it_stops(edge_config) -> None:
    async with edges(lambda: Edged(edge_config(shutdown_grace_s=0.5)), 2) as pair:
        for edge in pair:
            await seed(edge)
        live = {e.grpc.address: e for e in pair}
        dead = dead_address()
        async with AsyncVeloClient([dead, *live], tenant="t1") as velo:
            rtts = await velo.probe()
            assert rtts[dead] is None and all(0 < rtts[a] < 0.5 for a in live)
            first = await velo.ask(PARAPHRASE)
            assert first.edge in live and first.attempts == 1 and first.action == "A"
            # The edge that answered goes away: the next call fails over to the other.
            await pair.stop(live.pop(first.edge))
            [other] = live
            second = await velo.ask(PARAPHRASE)
            assert second.edge == other and second.attempts == 2
            third = await velo.ask(PARAPHRASE)  # the stopped edge is now tried last
            assert third.edge == other and third.attempts == 1


async def test_hedged_returns_the_first_answer_and_cancels_the_rest(
        edge_config, cloud, fake_llm) -> None:
    def make() -> Edged:
        return Edged(edge_config(cloud=cloud, shutdown_grace_s=1.0))

    async with edges(make, 2) as (slow, fast):
        await seed(fast)  # fast reuses; slow has nothing cached and asks the hanging LLM
        fake_llm.gate.clear()
        try:
            addresses = [dead_address(), slow.grpc.address, fast.grpc.address]
            async with AsyncVeloClient(addresses, tenant="t1", mode="hedged",
                                       timeout_s=20) as velo:
                start = time.monotonic()
                answer = await velo.ask(PARAPHRASE)
                assert time.monotonic() - start < 3
                assert answer.edge == fast.grpc.address and answer.action == "A"
                assert answer.attempts == 1
                await until(lambda: slow.pipeline.inflight == 0)  # its call was cancelled
                pieces = [p async for p in velo.stream(PARAPHRASE)]
                assert isinstance(pieces[-1], Answer) and pieces[-1].edge == fast.grpc.address
                assert "".join(p for p in pieces[:-1] if isinstance(p, str)) == ANSWER
            await until(lambda: slow.pipeline.inflight == 0)
        finally:
            fake_llm.gate.set()


# -- keys and TLS -----------------------------------------------------------------------------
async def test_api_key_and_tls(edge_config, tmp_path: Path) -> None:
    ca = CA(tmp_path / "ca")
    cert = ca.issue("edge")
    key, admin = new_token(), new_token()
    users = tmp_path / "users.toml"
    users.write_text(f'[[token]]\nsha256 = "{token_sha256(key)}"\nrole = "tenant"\n'
                     f'name = "acme"\n\n[[token]]\nsha256 = "{token_sha256(admin)}"\n'
                     'role = "admin"\nname = "ops"\n')
    cfg = edge_config(shutdown_grace_s=0.5, auth=EdgeAuthConfig(tokens_file=str(users)),
                      tls=TLSConfig(cert_file=str(cert.cert), key_file=str(cert.key)))
    async with edges(lambda: Edged(cfg), 1) as [edge]:
        await seed(edge, "acme")
        tls = TLS(root_cert=ca.path)
        address = f"localhost:{edge.grpc.port}"
        async with AsyncVeloClient([address], api_key=key, tls=tls) as velo:
            answer = await velo.ask(PARAPHRASE)  # no tenant: the key names it
            assert answer.action == "A" and answer.text == ANSWER
            with pytest.raises(VeloError) as err:
                await velo.stats()  # a tenant key is not an admin key
            assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
            assert err.value.attempts == 1
        async with AsyncVeloClient([address], api_key=admin, tls=tls) as velo:
            assert (await velo.stats(address)).requests == 1
        async with AsyncVeloClient([address], api_key="velo_wrong", tls=tls) as velo:
            with pytest.raises(VeloError) as err:
                await velo.ask(PARAPHRASE)
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert err.value.attempts == 1
        async with AsyncVeloClient([address], api_key=key) as velo:  # plaintext to a TLS port
            with pytest.raises(VeloError) as err:
                await velo.ask(PARAPHRASE, timeout_s=2)
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
