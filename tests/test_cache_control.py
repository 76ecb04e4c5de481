"""Per-request cache control (AskRequest.cache) and per-entry TTL, against a real edge: Milvus,
the ONNX embedder, a real cloudd in front of the fake LLM server."""

from __future__ import annotations

import asyncio
import math

import grpc
import pytest

from edged.config import CacheConfig, PolicyConfig
from edged.pipeline import replay_pieces
from edged.server import Edged
from tests.conftest import ask, edge_client, running
from velo.v1 import edge_pb2

QUESTION = "How do I reset my router to factory settings?"
PARAPHRASE = "How can I reset my router to its factory settings?"
FORWARD, REUSE = edge_pb2.ACTION_FORWARD, edge_pb2.ACTION_REUSE


def control(**fields: object) -> edge_pb2.CacheControl:
    return edge_pb2.CacheControl(**fields)


def quiet(**cache: object) -> dict:
    """Edge settings for these tests: no shadow verification (it would add LLM calls)."""
    return dict(policy=PolicyConfig(shadow_rate=0), cache=CacheConfig(**cache))


async def test_no_cache_forwards_and_no_store_keeps_the_answer_out(edge_config, cloud) -> None:
    async with running(Edged(edge_config(cloud=cloud, **quiet()))) as edge, \
            edge_client(edge.grpc.address) as stub:
        first = await stub.Ask(ask(QUESTION))
        assert first.action == FORWARD and first.stored
        fresh = await stub.Ask(ask(PARAPHRASE, cache=control(no_cache=True)))
        assert fresh.action == FORWARD and fresh.cached_entry_id == 0
        assert fresh.stored  # no-cache alone still caches the new answer
        reused = await stub.Ask(ask(PARAPHRASE))
        assert reused.action == REUSE and reused.cached_entry_id != 0
        assert reused.policy_version == 0 and reused.policy == "cache-0.5"

        secret = "What is the door code of building seven?"
        kept_out = await stub.Ask(ask(secret, cache=control(no_store=True)))
        assert kept_out.action == FORWARD and not kept_out.stored
        again = await stub.Ask(ask(secret))
        assert again.action == FORWARD  # nothing was cached the first time
        rows = edge.cache.search(edge.embedder.embed_one(secret), "t1", 5)
        assert [r.question for r in rows].count(secret) == 2  # only the second answer's rows


async def test_max_age_and_a_raised_floor_narrow_what_is_reused(edge_config, cloud) -> None:
    async with running(Edged(edge_config(cloud=cloud, **quiet()))) as edge, \
            edge_client(edge.grpc.address) as stub:
        await stub.Ask(ask(QUESTION))
        await asyncio.sleep(1.2)
        too_old = await stub.Ask(ask(PARAPHRASE, cache=control(max_age_s=1.0, no_store=True)))
        assert too_old.action == FORWARD
        young_enough = await stub.Ask(ask(PARAPHRASE, cache=control(max_age_s=60)))
        assert young_enough.action == REUSE and 1.2 <= young_enough.cached_age_s < 60
        similarity = young_enough.similarity
        assert 0.75 < similarity < 0.999
        above = await stub.Ask(ask(PARAPHRASE, cache=control(min_similarity=similarity + 0.005,
                                                             no_store=True)))
        assert above.action == FORWARD
        below = await stub.Ask(ask(PARAPHRASE, cache=control(min_similarity=similarity - 0.005)))
        assert below.action == REUSE and below.similarity == pytest.approx(similarity)


async def test_a_request_cannot_lower_the_edge_floor(edge_config, cloud) -> None:
    cfg = edge_config(cloud=cloud, **quiet(min_similarity=0.999))
    async with running(Edged(cfg)) as edge, edge_client(edge.grpc.address) as stub:
        await stub.Ask(ask(QUESTION))
        for floor in (0.0, 0.1):
            reply = await stub.Ask(ask(PARAPHRASE, cache=control(min_similarity=floor,
                                                                 no_store=True)))
            assert reply.action == FORWARD  # the paraphrase is below the edge's 0.999
        exact = await stub.Ask(ask(QUESTION))
        assert exact.action == REUSE and exact.similarity >= 0.999


async def test_ttl_is_per_entry_and_a_hit_does_not_refresh_it(edge_config, cloud) -> None:
    async with running(Edged(edge_config(cloud=cloud, **quiet(ttl_s=2.0)))) as edge, \
            edge_client(edge.grpc.address) as stub:
        assert (await stub.Ask(ask(QUESTION))).action == FORWARD
        await asyncio.sleep(1.0)
        assert (await stub.Ask(ask(PARAPHRASE))).action == REUSE  # a hit at 1 s
        await asyncio.sleep(1.3)
        # 2.3 s after it was cached: expired, although it was used 1.3 s ago.
        assert (await stub.Ask(ask(PARAPHRASE, cache=control(no_store=True)))).action == FORWARD


async def test_a_streamed_reuse_is_replayed_in_pieces(edge_config, cloud) -> None:
    async with running(Edged(edge_config(cloud=cloud, **quiet()))) as edge, \
            edge_client(edge.grpc.address) as stub:
        await stub.Ask(ask(QUESTION))
        chunks = [c async for c in stub.AskStream(ask(PARAPHRASE))]
        done = chunks[-1].done
        assert done.action == REUSE and len(chunks) - 1 == len(replay_pieces(done.answer)) > 1
        assert "".join(c.text for c in chunks[:-1]) == done.answer


BAD_CONTROLS = [
    (control(max_age_s=-1), "cache.max_age_s"),
    (control(max_age_s=math.nan), "cache.max_age_s"),
    (control(max_age_s=math.inf), "cache.max_age_s"),
    (control(min_similarity=1.5), "cache.min_similarity"),
    (control(min_similarity=math.nan), "cache.min_similarity"),
]


async def test_bad_cache_control_is_invalid_argument(edge_config) -> None:
    async with running(Edged(edge_config())) as edge, edge_client(edge.grpc.address) as stub:
        for bad, says in BAD_CONTROLS:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Ask(ask(QUESTION, cache=bad))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert says in err.value.details()


def test_replay_pieces_join_back_to_the_answer() -> None:
    for answer in ["", "one", "  spaced  out  ", "a\n\nb c d e f g h i j", "x " * 40]:
        pieces = replay_pieces(answer)
        assert "".join(pieces) == answer
        assert all(len(p.split()) <= 4 for p in pieces)
