"""Shared fixtures: real servers on loopback (Milvus standalone, the daemons), no mocks."""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType

import grpc
import pytest

from velo.core.models import ROOT, embedder_dir
from velo.v1 import edge_pb2, edge_pb2_grpc

SHARED_DATA = ROOT.parent / "shared" / "data"


def load_tool(name: str) -> ModuleType:
    """tools/<name>.py as a module (tools/ is not a package: they run as scripts)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def exported_embedder() -> Path:
    """The ONNX embedder, exported once if this checkout has not done it yet."""
    path = embedder_dir()
    if not all((path / name).exists() for name in ("model.onnx", "model-int8.onnx")):
        subprocess.run([sys.executable, str(ROOT / "tools" / "export_embedder.py"),
                        "--out", str(path)], check=True)
    return path


@pytest.fixture(scope="session")
def milvus(tmp_path_factory: pytest.TempPathFactory):
    """One real Milvus standalone server for the whole session; tests use own collections."""
    from velo.ops.milvus_server import EmbeddedMilvus

    server = EmbeddedMilvus(tmp_path_factory.mktemp("milvus")).start()
    yield server
    server.stop()


@pytest.fixture
def edge_config(milvus, exported_embedder, tmp_path: Path) -> Callable[..., object]:
    """Build an EdgeConfig on the test Milvus with a fresh collection and data dir."""
    from edged.config import EdgeConfig
    from velo.edge.cache import VectorDBConfig

    def make(**overrides: object) -> EdgeConfig:
        suffix = uuid.uuid4().hex[:8]
        kwargs: dict = dict(edge_id=f"edge-{suffix}", listen="127.0.0.1:0", cloud="", trainer="",
                            data_dir=str(tmp_path / f"edge-{suffix}"),
                            embedder_dir=str(exported_embedder),
                            vector_db=VectorDBConfig(uri=milvus.uri, token=milvus.token))
        kwargs.update(overrides)
        return EdgeConfig(**kwargs)

    return make


@asynccontextmanager
async def running(daemon) -> AsyncIterator[object]:
    """Start a daemon in this event loop; always shut it down."""
    await daemon.startup()
    try:
        yield daemon
    finally:
        # Bounded as velo's daemons bound it (Daemon._bounded_shutdown), with room to spare:
        # a stuck shutdown fails here, named, instead of hanging until pytest's timeout.
        limit = daemon.shutdown_grace_s + 30
        try:
            async with asyncio.timeout(limit):
                await daemon.shutdown()
        except TimeoutError:
            pytest.fail(f"{daemon.name} did not shut down within {limit:.0f} s")


@asynccontextmanager
async def edge_client(address: str) -> AsyncIterator[edge_pb2_grpc.EdgeServiceStub]:
    async with grpc.aio.insecure_channel(address) as channel:
        yield edge_pb2_grpc.EdgeServiceStub(channel)


def ask(prompt: str, tenant: str = "t1", **kw: object) -> edge_pb2.AskRequest:
    return edge_pb2.AskRequest(prompt=prompt, tenant=tenant, **kw)


@pytest.fixture(scope="module")
def fake_llm():
    """An OpenAI-compatible HTTP server on loopback standing in for the LLM."""
    from tests.fake_llm import FakeLLM

    server = FakeLLM().start()
    yield server
    server.stop()


@pytest.fixture
async def cloud(fake_llm):
    """A real cloudd in front of `fake_llm`; yields its address."""
    from cloudd.config import CloudConfig, LLMConfig
    from cloudd.server import Cloudd
    from tests.fake_llm import FAKE_MODEL

    fake_llm.reset()
    cfg = CloudConfig(listen="127.0.0.1:0", shutdown_grace_s=1.0,
                      llm=LLMConfig(base_url=fake_llm.url, model=FAKE_MODEL, default_max_tokens=8,
                                    retry_backoff_s=0.01))
    async with running(Cloudd(cfg)) as daemon:
        yield daemon.grpc.address
    fake_llm.gate.set()
