"""Prometheus metrics of the daemons, scraped over HTTP from real edged, cloudd and trainerd."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cloudd.config import CloudConfig, LLMConfig
from cloudd.server import Cloudd
from edged.config import PolicyConfig
from edged.server import Edged
from tests.conftest import ask, edge_client, running
from tests.fake_llm import ANSWER_TOKENS, FAKE_MODEL
from tests.test_edged import QUESTION as SEEDED_QUESTION
from tests.test_edged import seed
from trainerd.config import TrainerConfig
from trainerd.server import Trainerd
from velo.v1 import chat_pb2, edge_pb2

QUESTION = "How do I reset my router to factory settings?"
PARAPHRASE = "How can I reset my router to its factory settings?"


async def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """Every sample of a /metrics page, by (name, labels)."""
    async with httpx.AsyncClient() as http:
        page = await http.get(f"http://127.0.0.1:{port}/metrics")
    page.raise_for_status()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(page.text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def test_edge_and_cloud_metrics_follow_the_requests(edge_config, fake_llm) -> None:
    fake_llm.reset()
    cloud_cfg = CloudConfig(listen="127.0.0.1:0", shutdown_grace_s=1.0,
                            metrics_listen="127.0.0.1:0",
                            llm=LLMConfig(base_url=fake_llm.url, model=FAKE_MODEL,
                                          default_max_tokens=8, retry_backoff_s=0.01))
    async with running(Cloudd(cloud_cfg)) as cloud:
        cfg = edge_config(cloud=cloud.grpc.address, metrics_listen="127.0.0.1:0",
                          policy=PolicyConfig(shadow_rate=0))
        async with running(Edged(cfg)) as edge, edge_client(edge.grpc.address) as stub:
            await stub.Ask(ask(QUESTION))
            reused = await stub.Ask(ask(PARAPHRASE))
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Ask(ask(""))

            samples = await scrape(edge.metrics_port)
            requests = "velo_edge_requests_total"
            assert value(samples, requests, action="forward", status="ok") == 1
            assert value(samples, requests, action="reuse", status="ok") == 1
            assert value(samples, requests, action="none", status="INVALID_ARGUMENT") == 1
            assert value(samples, "velo_edge_stage_seconds_count", stage="embed") == 2
            assert value(samples, "velo_edge_prompt_vector_hits_total") == 0  # two new prompts
            assert value(samples, "velo_edge_stage_seconds_count", stage="cloud") == 1
            assert value(samples, "velo_edge_reuse_similarity_count") == 1
            assert value(samples, "velo_edge_reuse_similarity_sum") == \
                pytest.approx(reused.similarity)
            assert value(samples, "velo_edge_policy_version") == 0
            assert value(samples, "velo_edge_experience_spooled") == 2  # no trainer: kept
            assert value(samples, "velo_serving", daemon="edged") == 1
            assert value(samples, "velo_part_up", daemon="edged", part="vector_db") == 1
            deadline = time.monotonic() + 15  # the row count is a Bounded read: it may lag
            while value(samples, "velo_edge_cache_rows") != 2:
                assert time.monotonic() < deadline, "cache rows never reached 2"
                await asyncio.sleep(0.5)
                samples = await scrape(edge.metrics_port)

        cloud_samples = await scrape(cloud.metrics_port)
        assert value(cloud_samples, "velo_cloud_requests_total") == 1
        assert value(cloud_samples, "velo_cloud_llm_tokens_total", kind="completion") == \
            ANSWER_TOKENS  # as the LLM reported them
        assert value(cloud_samples, "velo_cloud_llm_seconds_count") == 1
        assert value(cloud_samples, "velo_cloud_llm_up") == 1


async def test_trainer_metrics_and_a_taken_port_fails_clearly(tmp_path: Path) -> None:
    cfg = TrainerConfig(listen="127.0.0.1:0", data_dir=str(tmp_path / "t"),
                        shutdown_grace_s=0.5, metrics_listen="127.0.0.1:0")
    async with running(Trainerd(cfg)) as trainer:
        samples = await scrape(trainer.metrics_port)
        assert value(samples, "velo_trainer_policy_version") == 0
        assert value(samples, "velo_trainer_experience_records") == 0
        assert value(samples, "velo_serving", daemon="trainerd") == 1
        taken = TrainerConfig(listen="127.0.0.1:0", data_dir=str(tmp_path / "u"),
                              metrics_listen=f"127.0.0.1:{trainer.metrics_port}")
        second = Trainerd(taken)
        with pytest.raises(RuntimeError, match="cannot serve metrics"):
            await second.startup()
        await second.shutdown()


async def test_request_latency_is_labelled_with_the_action_that_answered(edge_config,
                                                                         cloud) -> None:
    cfg = edge_config(cloud=cloud, metrics_listen="127.0.0.1:0",
                      policy=PolicyConfig(shadow_rate=0))
    async with running(Edged(cfg)) as edge, edge_client(edge.grpc.address) as stub:
        forwarded = await stub.Ask(ask(QUESTION))
        reused = await stub.Ask(ask(PARAPHRASE))
        # Logprobs cannot come from the cache: a pass-through, counted as a forward.
        passed = await stub.Ask(ask(QUESTION, shape=chat_pb2.AnswerShape(logprobs=True)))
        assert [r.action for r in (forwarded, reused, passed)] == \
            [edge_pb2.ACTION_FORWARD, edge_pb2.ACTION_REUSE, edge_pb2.ACTION_FORWARD]
        assert list(passed.bypass) == ["logprobs"]
        samples = await scrape(edge.metrics_port)
    latency = "velo_edge_request_seconds"
    assert value(samples, f"{latency}_count", action="forward") == 2
    assert value(samples, f"{latency}_count", action="reuse") == 1
    assert value(samples, f"{latency}_count", action="augment") == 0
    # What is observed is each request's own delay d (eq. 3), as the caller was told it.
    assert value(samples, f"{latency}_sum", action="reuse") == pytest.approx(reused.delay_s)
    assert value(samples, f"{latency}_sum", action="forward") == \
        pytest.approx(forwarded.delay_s + passed.delay_s)


async def test_an_edge_without_a_reuse_guard_exports_its_false_hit_estimate(edge_config,
                                                                             cloud) -> None:
    cfg = edge_config(cloud=cloud, metrics_listen="127.0.0.1:0",
                      policy=PolicyConfig(shadow_rate=1.0))
    assert not cfg.reuse.enabled  # no verifier, no threshold: no guard
    async with running(Edged(cfg)) as edge, edge_client(edge.grpc.address) as stub:
        samples = await scrape(edge.metrics_port)
        # Nothing verified yet: no estimate (NaN), and a sample count that says why.
        assert math.isnan(value(samples, "velo_edge_false_hit_estimate"))
        assert value(samples, "velo_edge_reuses_verified_total") == 0
        assert value(samples, "velo_edge_reuse_delta") == cfg.reuse.delta
        # A cached answer the LLM would not give: its shadow verification judges it wrong.
        await seed(edge, "t1")
        assert (await stub.Ask(ask(SEEDED_QUESTION))).action == edge_pb2.ACTION_REUSE
        deadline = time.monotonic() + 15
        while value(samples, "velo_edge_reuses_verified_total") == 0:
            assert time.monotonic() < deadline, "the reuse was never verified"
            await asyncio.sleep(0.2)
            samples = await scrape(edge.metrics_port)
        assert value(samples, "velo_edge_reuses_judged_wrong_total") == 1
        assert value(samples, "velo_edge_false_hit_estimate") == 1.0
        stats = await stub.GetStats(edge_pb2.GetStatsRequest())  # the same counters
        assert (stats.reuses_verified, stats.false_hit_estimate) == (1, 1.0)
