"""The Triton embedder against a real tritonserver 2.51 (PyPI nvidia-pytriton) serving the
shipped model repository: the same vectors as the in-process path, and a clear error when the
server is down. Builds var/triton-venv on first use (about 30 s); skipped, with the reason,
where that or the server cannot work on this machine."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import grpc
import numpy as np
import pytest

from tests.conftest import SHARED_DATA, ask, edge_client, load_tool, running
from velo.core.models import ROOT
from velo.edge.embedder import Embedder, EmbedderUnavailable, load_embedder
from velo.v1 import edge_pb2

pytest.importorskip("tritonclient.grpc", reason="tritonclient is in the edge extra")
from velo.edge.triton_embedder import TritonEmbedder

MIN_COSINE = 0.999


@pytest.fixture(scope="module")
def tool() -> ModuleType:
    """tools/triton_server.py with its venv built (skips where that cannot work here)."""
    module = load_tool("triton_server")
    try:
        module.build(log=lambda _: None)
    except module.TritonUnavailable as exc:
        pytest.skip(f"Triton cannot be built here: {exc}")
    return module


def _start(tool: ModuleType, tmp_path: Path):
    try:
        return tool.TritonServer(log_path=tmp_path / "tritonserver.log").start()
    except tool.TritonUnavailable as exc:
        if f"failed to load '{tool.MODEL}'" in str(exc):  # the shipped model's fault, not the box's
            pytest.fail(f"the shipped model does not load: {exc}")
        pytest.skip(f"tritonserver cannot start here: {exc}")


@pytest.fixture(scope="module")
def server(tool: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    started = _start(tool, tmp_path_factory.mktemp("triton"))
    yield started
    started.stop()


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """20 texts: questions with their translations (non-ASCII bytes on the wire) and long
    answers (truncated at 256 tokens, as in-process)."""
    xquad, oasst = SHARED_DATA / "xquad_dev.jsonl", ROOT / "data" / "oasst1_dev.jsonl"
    out: list[str] = []
    if xquad.exists():  # else (no shared data) more of the repository's own oasst1 sample
        for line in xquad.read_text().splitlines()[:5]:
            record = json.loads(line)
            out += [record["question"], *record["paraphrases"][:2]]
    records = [json.loads(line) for line in oasst.read_text().splitlines()]
    longest = sorted((r["answer"] for r in records), key=len, reverse=True)[:3]
    out = longest + out + [r["question"] for r in records][: 20 - len(out) - 3]
    assert len(out) == 20 and len(longest[-1]) > 3000  # far over 256 tokens
    return out


@pytest.fixture(scope="module")
def in_process(exported_embedder: Path) -> Embedder:
    return Embedder(exported_embedder, threads=1)  # model.onnx, as config.pbtxt serves


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_batch_vectors_are_the_in_process_ones(server, texts, in_process) -> None:
    triton = TritonEmbedder(server.url)
    assert triton.dim == in_process.dim == 384
    # 80 rows: more than the model's max_batch_size (64), so the client splits the call.
    many = texts * 4
    got, want = triton.embed(many), in_process.embed(many)
    assert got.shape == want.shape == (80, 384) and got.dtype == np.float32
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)
    assert _cosines(got, want).min() >= MIN_COSINE
    # Rows are not shuffled: each text is far from the other texts' vectors.
    assert (_cosines(got[:20], want[1:21]) < MIN_COSINE).all()
    assert triton.embed([]).shape == (0, 384)
    with pytest.raises(TypeError):
        triton.embed("one string")  # type: ignore[arg-type]


def test_single_vectors_are_the_in_process_ones(server, texts, in_process) -> None:
    triton = load_embedder("triton", triton_url=server.url, triton_model="minilm")
    assert isinstance(triton, TritonEmbedder)
    for text in texts:
        got, want = triton.embed_one(text), in_process.embed_one(text)
        assert got.shape == (384,)
        assert _cosines(got[None], want[None])[0] >= MIN_COSINE, text[:60]


def test_server_down_is_a_clear_error(tool, tmp_path) -> None:
    from velo.ops.ports import free_port

    nowhere = f"127.0.0.1:{free_port()}"
    with pytest.raises(EmbedderUnavailable, match=r"tools/triton_server\.py") as err:
        TritonEmbedder(nowhere, timeout_s=2.0)
    assert nowhere in str(err.value)

    started = _start(tool, tmp_path)
    try:
        triton = TritonEmbedder(started.url, timeout_s=2.0)
        assert triton.check() is None and triton.embed_one("hello").shape == (384,)
    finally:
        started.stop()
    with pytest.raises(EmbedderUnavailable, match="is tritonserver running"):
        triton.embed(["hello"])
    assert triton.check() is not None


async def test_edge_serves_through_triton_and_is_unavailable_without_it(
        tool, tmp_path, edge_config, cloud) -> None:
    """A whole edge (real Milvus, real cloudd) with embedder = "triton": an answer cached
    under a Triton vector is reused for a paraphrase; once the server stops, a request fails
    UNAVAILABLE saying how to start it, and the edge is NOT_SERVING until it is back."""
    from edged.server import Edged

    started = _start(tool, tmp_path)
    try:
        cfg = edge_config(cloud=cloud, embedder="triton", triton_url=started.url)
        async with running(Edged(cfg)) as edge, edge_client(edge.grpc.address) as stub:
            assert isinstance(edge.embedder, TritonEmbedder)
            first = await stub.Ask(ask("How do I reset my router to factory settings?"))
            assert first.action == edge_pb2.ACTION_FORWARD
            second = await stub.Ask(ask("How can I reset my router to its factory settings?"))
            assert second.action == edge_pb2.ACTION_REUSE and second.similarity > 0.9
            started.stop()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Ask(ask("What is the capital of Peru?"))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "Triton embedder" in err.value.details()
            assert "tools/triton_server.py" in err.value.details()
            deadline = time.monotonic() + 10  # and its health says so, with the reason
            while edge.grpc.serving:
                assert time.monotonic() < deadline, "edge still SERVING with Triton down"
                await asyncio.sleep(0.2)
            assert "Triton" in edge.grpc.parts["embedder"].reason
    finally:
        started.stop()
