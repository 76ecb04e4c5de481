"""trainerd over real gRPC: experience in, versioned policies out (pull, push and publish)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from trainerd.__main__ import main
from trainerd.config import TrainerConfig, load
from trainerd.export import export_mlp_policy
from trainerd.server import Trainerd
from trainerd.store import ExperienceStore
from velo.runtime.config import ConfigError
from velo.v1 import trainer_pb2, trainer_pb2_grpc

TOP_P, EMBED_DIM = 5, 384


@pytest.fixture(scope="module")
def policy_bytes() -> bytes:
    return export_mlp_policy(None, top_p=TOP_P, embed_dim=EMBED_DIM, seed=0)


@contextlib.asynccontextmanager
async def running(
    data_dir: Path, **overrides: object
) -> AsyncIterator[tuple[Trainerd, trainer_pb2_grpc.TrainerServiceStub]]:
    """A trainerd on an ephemeral port over `data_dir`, and a stub connected to it."""
    config = TrainerConfig(listen="127.0.0.1:0", data_dir=str(data_dir),
                           shutdown_grace_s=1.0, **overrides)  # type: ignore[arg-type]
    daemon = Trainerd(config)
    await daemon.startup()
    try:
        async with grpc.aio.insecure_channel(daemon.grpc.address) as channel:
            yield daemon, trainer_pb2_grpc.TrainerServiceStub(channel)
    finally:
        await daemon.shutdown()


@pytest.fixture
async def trainer(tmp_path: Path):
    async with running(tmp_path) as pair:
        yield pair


def experience(seq: int, /, edge_id: str = "edge-1", **fields: object) -> trainer_pb2.Experience:
    """A valid record; `fields` overrides (any field, seq included)."""
    record = trainer_pb2.Experience(
        edge_id=edge_id,
        seq=seq,
        unix_time=1_700_000_000.0 + seq,
        correlation=[0.5] * (3 * TOP_P),
        top_p=TOP_P,
        embedding=[0.1] * 8,
        action_mask=[True, True, True],
        action=seq % 3,
        action_probs=[0.2, 0.5, 0.3],
        delay_s=0.01,
    )
    for name, value in fields.items():
        if isinstance(value, list):
            field = getattr(record, name)
            del field[:]
            field.extend(value)
        else:
            setattr(record, name, value)
    return record


# -- experience ------------------------------------------------------------------------------


async def test_experience_is_stored_once_and_survives_restart(tmp_path: Path) -> None:
    async with running(tmp_path) as (daemon, stub):
        ack = await stub.ReportExperience(iter([experience(s) for s in (1, 2, 3)]))
        assert (ack.stored, ack.duplicates) == (3, 0)
        # A resend after a lost ack overlaps what is stored; a record repeated in one stream
        # counts as a duplicate too.
        ack = await stub.ReportExperience(iter([experience(s) for s in (2, 3, 4, 4)]))
        assert (ack.stored, ack.duplicates) == (1, 3)
        ack = await stub.ReportExperience(iter([experience(1, edge_id="edge-2")]))
        assert (ack.stored, ack.duplicates) == (1, 0)
        assert daemon.store is not None and daemon.store.count() == 5

    async with running(tmp_path) as (daemon, stub):
        store = daemon.store
        assert store is not None
        assert store.count() == 5
        assert store.count("edge-1") == 4 and store.latest_seq("edge-1") == 4
        assert store.edges() == {"edge-1": 4, "edge-2": 1}
        assert [r.seq for r in store.read("edge-1", after_seq=1)] == [2, 3, 4]
        assert store.read("edge-1", limit=1)[0] == experience(1)
        ack = await stub.ReportExperience(iter([experience(4)]))
        assert (ack.stored, ack.duplicates) == (0, 1)


async def test_experience_is_committed_in_batches(tmp_path: Path) -> None:
    async with running(tmp_path, max_batch_records=3) as (_, stub):
        ack = await stub.ReportExperience(iter([experience(s) for s in range(1, 11)]))
        assert (ack.stored, ack.duplicates) == (10, 0)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"correlation": [0.5] * (3 * TOP_P - 1)}, "correlation"),
        ({"action": 3}, "action"),
        ({"edge_id": ""}, "edge_id"),
        ({"edge_id": "e" * 129}, "edge_id"),
        ({"seq": 0}, "seq"),
        ({"action_mask": [True, False]}, "action_mask"),
        ({"load": [1.0, 2.0, 3.0]}, "load"),
        ({"load": [float("nan"), 1.0]}, "load"),
    ],
)
async def test_bad_record_is_invalid_argument_naming_the_field(
    trainer, fields: dict[str, object], named: str
) -> None:
    daemon, stub = trainer
    records = [experience(1), experience(2), experience(3, **fields), experience(4)]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ReportExperience(iter(records))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    where, problem = err.value.details().split("): ", 1)
    assert where.startswith("record #3 ")
    assert problem.startswith(named)
    # The valid records before the bad one are kept (resending them is harmless).
    assert daemon.store.count() == 2


def test_store_add_counts_duplicates_and_keeps_conflicts_aside(tmp_path: Path) -> None:
    store = ExperienceStore(tmp_path / "experience.db")
    try:
        assert store.add([experience(1), experience(1), experience(2)]) == (2, 1, 0)
        assert store.add([]) == (0, 0, 0)
        assert store.latest_seq("nobody") == 0
        # Same key, other content (a forger claiming edge-1's numbers, then the real edge):
        # the first stays stored, the other is kept aside, not dropped as a duplicate.
        assert store.add([experience(2, delay_s=7.0)]) == (0, 0, 1)
        assert store.read("edge-1")[1].delay_s == pytest.approx(0.01)
        assert store.conflicts("edge-1") == 1 and store.count() == 2
    finally:
        store.close()


# -- policies --------------------------------------------------------------------------------


async def test_publish_then_get_returns_the_same_bytes(tmp_path: Path, policy_bytes: bytes) -> None:
    async with running(tmp_path) as (_, stub):
        info = await stub.PublishPolicy(
            trainer_pb2.PublishPolicyRequest(name="mlp-test", onnx=policy_bytes)
        )
        assert info.version == 1
        assert info.sha256 == hashlib.sha256(policy_bytes).hexdigest()
        assert info.size_bytes == len(policy_bytes) and info.name == "mlp-test"
        latest = await stub.GetPolicy(trainer_pb2.GetPolicyRequest(version=0))
        assert latest.info == info and latest.onnx == policy_bytes
        assert hashlib.sha256(latest.onnx).hexdigest() == latest.info.sha256
        info2 = await stub.PublishPolicy(
            trainer_pb2.PublishPolicyRequest(name="mlp-test", onnx=policy_bytes)
        )
        assert info2.version == 2

    async with running(tmp_path) as (_, stub):
        latest = await stub.GetPolicy(trainer_pb2.GetPolicyRequest())
        assert latest.info.version == 2 and latest.onnx == policy_bytes
        first = await stub.GetPolicy(trainer_pb2.GetPolicyRequest(version=1))
        assert first.info == info
        info3 = await stub.PublishPolicy(
            trainer_pb2.PublishPolicyRequest(name="mlp-test", onnx=policy_bytes)
        )
        assert info3.version == 3
    assert sorted(p.name for p in (tmp_path / "policies").glob("*.onnx")) == [
        "v000001.onnx", "v000002.onnx", "v000003.onnx"
    ]


async def test_get_policy_not_found(trainer, policy_bytes: bytes) -> None:
    _, stub = trainer
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetPolicy(trainer_pb2.GetPolicyRequest(version=0))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no policy has been published" in err.value.details()
    await stub.PublishPolicy(trainer_pb2.PublishPolicyRequest(name="p", onnx=policy_bytes))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetPolicy(trainer_pb2.GetPolicyRequest(version=7))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "version 7" in err.value.details()


def _model_with_inputs(**inputs: list[object]) -> bytes:
    """A valid ONNX model (probs = Softmax(action_mask)) with the given inputs."""
    values = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, s)
              for n, s in inputs.items()]
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Softmax", [next(iter(inputs))], ["probs"], axis=-1)],
        "policy",
        values,
        [onnx.helper.make_tensor_value_info("probs", onnx.TensorProto.FLOAT, ["batch", 3])],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    return model.SerializeToString()


def _with_external_weights(policy: bytes, location: str) -> bytes:
    """`policy` with its weights moved out of the file ("external data" at `location`)."""
    model = onnx.load_from_string(policy)
    onnx.external_data_helper.convert_model_to_external_data(
        model, all_tensors_to_one_file=True, location=location, size_threshold=0)
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if onnx.external_data_helper.uses_external_data(tensor):
            tensor.ClearField("raw_data")  # as onnx.save would: the bytes live in `location`
    return model.SerializeToString()


def _runs_nowhere() -> bytes:
    """Passes the contract and the ONNX checker, but onnxruntime has no such operator: an
    edge would refuse it, so trainerd must too."""
    values = {"correlation": ["batch", 3, 5], "embedding": ["batch", 384],
              "action_mask": ["batch", 3]}
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Mystery", ["action_mask"], ["probs"], domain="com.example")],
        "policy", [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, v)
                   for n, v in values.items()],
        [onnx.helper.make_tensor_value_info("probs", onnx.TensorProto.FLOAT, ["batch", 3])])
    model = onnx.helper.make_model(graph, opset_imports=[
        onnx.helper.make_opsetid("", 17), onnx.helper.make_opsetid("com.example", 1)])
    return model.SerializeToString()


def _wrong_output() -> bytes:
    """Right inputs and output name, but 'probs' is not a probability distribution."""
    values = {"correlation": ["batch", 3, 5], "embedding": ["batch", 384],
              "action_mask": ["batch", 3]}
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["action_mask"], ["probs"])],
        "policy", [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, v)
                   for n, v in values.items()],
        [onnx.helper.make_tensor_value_info("probs", onnx.TensorProto.FLOAT, ["batch", 3])])
    return onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", 17)]).SerializeToString()


@pytest.mark.parametrize(
    ("onnx_bytes", "named"),
    [
        (b"definitely not an onnx model", "not a valid ONNX model"),
        (_with_external_weights(export_mlp_policy(None, top_p=TOP_P, embed_dim=EMBED_DIM),
                                "policy-weights.bin"), "external data"),
        (_runs_nowhere(), "an edge would refuse this policy"),
        (_wrong_output(), "not a masked probability distribution"),
        (b"", "empty"),
        (_model_with_inputs(action_mask=["batch", 3]), "correlation"),
        (_model_with_inputs(action_mask=["batch", 3], correlation=["batch", 3, 5],
                            emb=["batch", 384]), "emb"),
        (_model_with_inputs(action_mask=["batch", 3], correlation=["batch", 15],
                            embedding=["batch", 384]), "'correlation' has rank 2"),
        (_model_with_inputs(action_mask=["batch", 4], correlation=["batch", 3, 5],
                            embedding=["batch", 384]), "'action_mask' has size 4"),
    ],
)
async def test_publish_rejects_contract_violations(trainer, onnx_bytes: bytes, named: str) -> None:
    _, stub = trainer
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.PublishPolicy(trainer_pb2.PublishPolicyRequest(name="bad", onnx=onnx_bytes))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in err.value.details()


async def test_publish_too_big_is_resource_exhausted(tmp_path: Path, policy_bytes: bytes) -> None:
    async with running(tmp_path, max_policy_bytes=4096) as (_, stub):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.PublishPolicy(trainer_pb2.PublishPolicyRequest(name="big",
                                                                      onnx=policy_bytes))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limit is 4096" in err.value.details()


async def test_watch_receives_versions_published_after_it_started(
    trainer, policy_bytes: bytes
) -> None:
    _, stub = trainer
    await stub.PublishPolicy(trainer_pb2.PublishPolicyRequest(name="p", onnx=policy_bytes))
    call = stub.WatchPolicies(trainer_pb2.WatchPoliciesRequest(after_version=0))
    first = await asyncio.wait_for(call.read(), 5)
    assert first.version == 1  # the latest, at once
    await stub.PublishPolicy(trainer_pb2.PublishPolicyRequest(name="p", onnx=policy_bytes))
    pushed = await asyncio.wait_for(call.read(), 5)
    assert pushed.version == 2 and pushed.sha256 == hashlib.sha256(policy_bytes).hexdigest()
    call.cancel()
    # A watcher already at the latest version hears nothing until a newer one.
    quiet = stub.WatchPolicies(trainer_pb2.WatchPoliciesRequest(after_version=2))
    read = asyncio.ensure_future(quiet.read())
    done, _ = await asyncio.wait([read], timeout=0.3)
    assert not done
    await stub.PublishPolicy(trainer_pb2.PublishPolicyRequest(name="p", onnx=policy_bytes))
    assert (await asyncio.wait_for(read, 5)).version == 3
    quiet.cancel()


async def test_watch_ends_cleanly_and_quickly_on_shutdown(tmp_path: Path) -> None:
    daemon = Trainerd(TrainerConfig(listen="127.0.0.1:0", data_dir=str(tmp_path),
                                    shutdown_grace_s=5.0))
    await daemon.startup()
    async with grpc.aio.insecure_channel(daemon.grpc.address) as channel:
        call = trainer_pb2_grpc.TrainerServiceStub(channel).WatchPolicies(
            trainer_pb2.WatchPoliciesRequest()
        )
        await asyncio.sleep(0.2)  # let the watch reach the server
        started = time.monotonic()
        await daemon.shutdown()
        assert time.monotonic() - started < 2.0  # not the 5 s grace
        assert await asyncio.wait_for(call.read(), 5) is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK


async def test_unexpected_error_is_internal_not_unknown(trainer, monkeypatch) -> None:
    """An exception no handler expected (velo.runtime.serving's guard, shared by every daemon): the
    caller gets INTERNAL with an id and not the exception's text; the log has the traceback
    under that id. A unary method and a streaming one alike."""
    from structlog.testing import capture_logs

    daemon, stub = trainer

    def broken(*args: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(daemon.registry, "get", broken)
    monkeypatch.setattr(daemon.registry, "latest", broken)
    with capture_logs() as logs:
        with pytest.raises(grpc.aio.AioRpcError) as unary:
            await stub.GetPolicy(trainer_pb2.GetPolicyRequest())
        with pytest.raises(grpc.aio.AioRpcError) as stream:
            async for _ in stub.WatchPolicies(trainer_pb2.WatchPoliciesRequest()):
                pass
    for err, method in ((unary, "GetPolicy"), (stream, "WatchPolicies")):
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "disk on fire" not in err.value.details() and method in err.value.details()
        error_id = re.search(r"id ([0-9a-f]{12})", err.value.details()).group(1)
        logged = [e for e in logs if e.get("error_id") == error_id]
        assert logged and logged[0]["event"] == "rpc failed" and logged[0]["exc_info"]


def test_exported_policy_masks_actions_in_the_graph(policy_bytes: bytes) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(policy_bytes, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    batch = 4
    feeds = {
        "correlation": rng.random((batch, 3, TOP_P), dtype=np.float32),
        "embedding": rng.standard_normal((batch, EMBED_DIM)).astype(np.float32),
        "action_mask": np.array([[1, 1, 1], [1, 1, 0], [0, 1, 0], [0, 1, 1]], np.float32),
    }
    (probs,) = session.run(["probs"], feeds)
    assert probs.shape == (batch, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert np.all(probs[feeds["action_mask"] == 0] == 0.0)
    assert np.all(probs[feeds["action_mask"] == 1] > 0.0)

    # A bias on the logits forces the preferred action, unless it is masked out.
    biased = export_mlp_policy(None, top_p=TOP_P, embed_dim=EMBED_DIM, bias=(0.0, 0.0, 50.0))
    (probs,) = ort.InferenceSession(biased, providers=["CPUExecutionProvider"]).run(
        ["probs"], feeds
    )
    assert probs[0].argmax() == 2 and probs[3].argmax() == 2
    assert probs[1, 2] == 0.0 and probs[2, 1] == 1.0


# -- daemon ----------------------------------------------------------------------------------


async def test_health_is_serving(trainer) -> None:
    daemon, _ = trainer
    async with grpc.aio.insecure_channel(daemon.grpc.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "velo.v1.TrainerService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_bad_config_key_is_named(tmp_path: Path, monkeypatch, capsys) -> None:
    path = tmp_path / "trainerd.toml"
    path.write_text('listne = "127.0.0.1:1"\n')
    with pytest.raises(ConfigError, match="listne"):
        load(path)
    path.write_text("max_batch_records = 0\n")
    with pytest.raises(ConfigError, match="max_batch_records"):
        load(path)
    path.write_text("")
    monkeypatch.setenv("VELO_TRAINERD__MAX_POLICY_BYTES", "lots")
    with pytest.raises(ConfigError, match="max_policy_bytes"):
        load(path)
    # The command line turns it into one line on stderr and exit status 2.
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(path)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("velo-trainerd: ")


def test_config_defaults_and_env_override(monkeypatch) -> None:
    monkeypatch.setenv("VELO_TRAINERD__MAX_BATCH_RECORDS", "500")
    config = load(None)
    assert config.max_batch_records == 500
    assert config.listen == "127.0.0.1:50070"
    # trainerd accepted 64 MiB policies that every default edge (8 MiB) refused to pull.
    from edged.config import PolicyConfig

    assert config.max_policy_bytes <= PolicyConfig().max_bytes


def test_process_serves_until_sigterm(tmp_path: Path) -> None:
    """`python -m trainerd` as a real process: serving (health), then SIGTERM exits 0."""
    with socket.socket() as sock:  # a free port; tiny race with other processes, acceptable
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "VELO_TRAINERD__LISTEN": f"127.0.0.1:{port}",
           "VELO_TRAINERD__DATA_DIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "trainerd"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=20)
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="velo.v1.TrainerService"), timeout=5
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
        assert proc.returncode == 0, stderr.decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
