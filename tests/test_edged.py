"""edged against real parts: Milvus standalone, the ONNX embedder, gRPC on loopback."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from edged.server import Edged
from tests.conftest import ask, edge_client, running
from velo.v1 import edge_pb2

QUESTION = "How do I reset my router to factory settings?"
ANSWER = "Hold the reset button on the back for ten seconds until the lights blink."


async def seed(edge: Edged, tenant: str, question: str = QUESTION, answer: str = ANSWER) -> None:
    q_vec, a_vec = edge.embedder.embed([question, answer])
    await asyncio.to_thread(edge.cache.insert_pair, tenant, question, answer, q_vec, a_vec, -1.0)


async def test_reuse_is_served_without_cloud(edge_config) -> None:
    async with running(Edged(edge_config())) as edge, edge_client(edge.grpc.address) as stub:
        await seed(edge, "t1")
        reply = await stub.Ask(ask(QUESTION, reference_answer=ANSWER))
        assert reply.action == edge_pb2.ACTION_REUSE
        assert reply.answer == ANSWER
        assert reply.cached_question == QUESTION
        assert reply.similarity == pytest.approx(1.0, abs=1e-3)
        assert reply.has_satisfaction and reply.satisfaction == pytest.approx(0.0, abs=1e-3)
        assert 0 < reply.delay_s == reply.edge_s < 5
        assert reply.cloud_s == 0


async def test_cloud_down_forward_is_unavailable_but_edge_lives(edge_config) -> None:
    cfg = edge_config(cloud="127.0.0.1:1")  # nothing listens there
    async with running(Edged(cfg)) as edge, edge_client(edge.grpc.address) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Ask(ask("What is the capital of Peru?"))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "cloud" in err.value.details() and "cached answers are still served" in \
            err.value.details()
        await seed(edge, "t1")
        reply = await stub.Ask(ask(QUESTION))
        assert reply.action == edge_pb2.ACTION_REUSE
