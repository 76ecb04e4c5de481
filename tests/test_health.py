"""Health that goes down with the parts a daemon depends on, and comes back with them: an edge
whose cloudd is gone or whose Milvus is frozen says NOT_SERVING, and why; when cloudd is back
the edge reconnects within about a second (it once took 7.5-10 s)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloudd.config import CloudConfig, LLMConfig
from cloudd.server import Cloudd
from edged.server import Edged
from tests.conftest import ask, edge_client, running
from tests.fake_llm import FAKE_MODEL, FakeLLM
from velo.ops.ports import free_port
from velo.v1 import edge_pb2, edge_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def fake_llm():
    server = FakeLLM().start()
    yield server
    server.stop()


def cloud_config(llm_url: str, port: int) -> CloudConfig:
    return CloudConfig(listen=f"127.0.0.1:{port}", shutdown_grace_s=0.5,
                       llm=LLMConfig(base_url=llm_url, model=FAKE_MODEL, default_max_tokens=4))


async def status(address: str, service: str = "") -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=2)
    return reply.status


async def until(condition: Callable[[], object], timeout_s: float) -> float:
    """Wait for `condition` (sync or async); returns the seconds it took."""
    started = time.monotonic()
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout_s, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_edge_follows_its_cloud_down_and_back_and_reconnects_promptly(
        edge_config, fake_llm) -> None:
    port = free_port()
    cloud = Cloudd(cloud_config(fake_llm.url, port))
    await cloud.startup()
    async with running(Edged(edge_config(cloud=f"127.0.0.1:{port}"))) as edge, \
            edge_client(edge.grpc.address) as stub:
        address = edge.grpc.address
        assert await status(address) == SERVING
        assert (await stub.Ask(ask("What is the capital of Peru?"))).action == \
            edge_pb2.ACTION_FORWARD
        await cloud.shutdown()
        await until(lambda: not edge.grpc.serving, timeout_s=5)
        assert await status(address) == NOT_SERVING
        assert await status(address, "velo.part.cloud") == NOT_SERVING
        assert await status(address, "velo.part.vector_db") == SERVING
        stats = await stub.GetStats(edge_pb2.GetStatsRequest())
        (cloud_part,) = [p for p in stats.parts if p.name == "cloud"]
        assert f"cloudd at 127.0.0.1:{port} is unreachable" in cloud_part.reason

        cloud = Cloudd(cloud_config(fake_llm.url, port))  # back, on the same address
        await cloud.startup()
        try:
            async def forwarded() -> bool:
                try:
                    reply = await stub.Ask(ask(f"A new question at {time.monotonic()}?"))
                except grpc.aio.AioRpcError:
                    return False
                return reply.action == edge_pb2.ACTION_FORWARD

            took = await until(forwarded, timeout_s=10)
            assert took < 3.0, f"B/C failed for {took:.1f} s after cloudd was back"
            await until(lambda: edge.grpc.serving, timeout_s=3)
        finally:
            await cloud.shutdown()


async def test_edge_follows_its_cloud_when_cloudd_says_its_llm_is_down(edge_config) -> None:
    llm_port = free_port()
    port = free_port()
    cfg = cloud_config(f"http://127.0.0.1:{llm_port}/v1", port)  # no LLM there (yet)
    async with running(Cloudd(cfg)), \
            running(Edged(edge_config(cloud=f"127.0.0.1:{port}"))) as edge, \
            edge_client(edge.grpc.address) as stub:
        assert await status(edge.grpc.address) == NOT_SERVING
        stats = await stub.GetStats(edge_pb2.GetStatsRequest())
        (cloud_part,) = [p for p in stats.parts if p.name == "cloud"]
        assert "is not serving: its LLM is down" in cloud_part.reason
        assert "Connection refused" in cloud_part.reason
        llm = FakeLLM(llm_port).start()
        try:
            await until(lambda: edge.grpc.serving, timeout_s=10)
        finally:
            llm.stop()


async def test_edge_is_not_serving_while_milvus_is_frozen(edge_config, milvus) -> None:
    async with running(Edged(edge_config())) as edge:
        assert await status(edge.grpc.address) == SERVING
        os.kill(milvus.pid, signal.SIGSTOP)
        try:
            await until(lambda: not edge.grpc.serving, timeout_s=20)
            assert await status(edge.grpc.address) == NOT_SERVING  # the edge itself answers
            assert "did not answer" in edge.grpc.parts["vector_db"].reason or \
                "does not answer" in edge.grpc.parts["vector_db"].reason
        finally:
            os.kill(milvus.pid, signal.SIGCONT)
        await until(lambda: edge.grpc.serving, timeout_s=15)


async def test_a_frozen_milvus_bounds_an_ask_by_the_vector_db_timeout(edge_config, milvus,
                                                                       cloud) -> None:
    """`vector_db.timeout_s` reaches every Milvus call: an Ask arriving while Milvus is frozen
    (before the health watch has noticed) is UNAVAILABLE after about that long, not held until
    Milvus wakes (it hung for the whole freeze)."""
    from velo.edge.cache import VectorDBConfig

    cfg = edge_config(cloud=cloud, vector_db=VectorDBConfig(uri=milvus.uri, token=milvus.token,
                                                            timeout_s=2.0))
    async with running(Edged(cfg)) as edge, edge_client(edge.grpc.address) as stub:
        await stub.Ask(ask("warm the search path"), timeout=30)
        os.kill(milvus.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Ask(ask("What is asked while Milvus is frozen?"), timeout=12)
            took = time.monotonic() - started
        finally:
            os.kill(milvus.pid, signal.SIGCONT)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        assert took < 8, took
        await until(lambda: edge.grpc.serving, timeout_s=15)


async def test_requests_queued_behind_a_frozen_search_keep_their_own_deadline(
        edge_config, milvus, cloud) -> None:
    """Concurrent requests share one search: one arriving while a search hangs on a frozen
    Milvus waited for that search to time out and then for its own (2x the deadline). Each
    now ends within vector_db.timeout_s of its own arrival."""
    from velo.edge.cache import VectorDBConfig

    timeout_s = 3.0
    cfg = edge_config(cloud=cloud, vector_db=VectorDBConfig(uri=milvus.uri, token=milvus.token,
                                                            timeout_s=timeout_s))
    async with running(Edged(cfg)) as edge, edge_client(edge.grpc.address) as stub:
        await stub.Ask(ask("warm the search path"), timeout=30)

        async def timed(question: str, after_s: float) -> tuple[float, grpc.StatusCode]:
            await asyncio.sleep(after_s)
            started = time.monotonic()
            try:
                await stub.Ask(ask(question), timeout=20)
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
            return time.monotonic() - started, code

        os.kill(milvus.pid, signal.SIGSTOP)
        try:
            results = await asyncio.gather(timed("Which search hangs first?", 0.0),
                                           timed("Which search waits behind it?", 1.5))
        finally:
            os.kill(milvus.pid, signal.SIGCONT)
        for took, code in results:
            assert code == grpc.StatusCode.UNAVAILABLE
            assert took < timeout_s + 0.9, results
        await until(lambda: edge.grpc.serving, timeout_s=15)


@pytest.mark.slow
async def test_edges_ride_out_a_restart_of_their_separate_milvus_server(
        edge_config, milvus) -> None:
    """The Milvus standalone runs in its own processes, started apart from the edges (the
    session's server). Stopped and started again while two edges run: each says NOT_SERVING
    with the reason and refuses requests with UNAVAILABLE meanwhile, then serves again by
    itself, with the answers it cached before the restart."""
    question = "How do I reset my router to factory settings?"
    llm = FakeLLM().start()
    try:
        async with running(Cloudd(cloud_config(llm.url, 0))) as cloud, \
                running(Edged(edge_config(cloud=cloud.grpc.address))) as first, \
                running(Edged(edge_config(cloud=cloud.grpc.address))) as second:
            edges = (first, second)
            for edge in edges:
                async with edge_client(edge.grpc.address) as stub:
                    reply = await stub.Ask(ask(question))
                    assert reply.action == edge_pb2.ACTION_FORWARD and reply.stored

            await asyncio.to_thread(milvus.stop)
            try:
                for edge in edges:
                    await until(lambda edge=edge: not edge.grpc.serving, timeout_s=20)
                    assert "Milvus" in edge.grpc.parts["vector_db"].reason
                    async with edge_client(edge.grpc.address) as stub:
                        with pytest.raises(grpc.aio.AioRpcError) as err:
                            await stub.Ask(ask("What is the capital of Peru?"), timeout=30)
                    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                    assert "vector database unavailable" in err.value.details()
            finally:
                await asyncio.to_thread(milvus.start)

            for edge in edges:
                took = await until(lambda edge=edge: edge.grpc.serving, timeout_s=90)
                print(f"{edge.cfg.edge_id} serving again {took:.1f} s after Milvus was up")
                async with edge_client(edge.grpc.address) as stub:
                    assert await status(edge.grpc.address) == SERVING
                    again = await stub.Ask(ask(question))
                assert again.action == edge_pb2.ACTION_REUSE  # the cache survived the restart
    finally:
        llm.stop()


def _start(module: str, config: Path, log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", module, "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT)


def _wait_serving(port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=1)
            return
        except grpc.RpcError:
            time.sleep(0.3)
    raise AssertionError(f"port {port} did not answer within {timeout_s} s")


@pytest.mark.slow
async def test_a_frozen_cloud_is_unavailable_within_the_cloud_timeout(edge_config, fake_llm,
                                                                      tmp_path) -> None:
    """cloudd SIGSTOPped (its port still accepts, nothing answers): a forward is UNAVAILABLE
    after `cloud_timeout_s`, not held for the whole request limit (it waited for the client's
    own deadline), and health names the cloud part."""
    port = free_port()
    (tmp_path / "cloudd.toml").write_text(
        f'listen = "127.0.0.1:{port}"\n[llm]\nbase_url = "{fake_llm.url}"\n'
        f'model = "{FAKE_MODEL}"\n')
    cloud = _start("cloudd", tmp_path / "cloudd.toml", tmp_path / "cloudd.log")
    try:
        await asyncio.to_thread(_wait_serving, port, 60)
        cfg = edge_config(cloud=f"127.0.0.1:{port}", cloud_timeout_s=2.0)
        async with running(Edged(cfg)) as edge, edge_client(edge.grpc.address) as stub:
            await stub.Ask(ask("What warms the path to the cloud?"), timeout=30)
            cloud.send_signal(signal.SIGSTOP)
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Ask(ask("What is asked while the cloud is frozen?"), timeout=20)
            took = time.monotonic() - started
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
            assert "cloud_timeout_s" in err.value.details()
            assert took < 6, took
            await until(lambda: not edge.grpc.serving, timeout_s=30)
            assert "cloudd at" in edge.grpc.parts["cloud"].reason
            assert edge.grpc.parts["vector_db"].ok
            cloud.send_signal(signal.SIGCONT)
            await until(lambda: edge.grpc.serving, timeout_s=15)
    finally:
        cloud.send_signal(signal.SIGCONT)
        cloud.kill()
        cloud.wait()


async def test_a_start_that_fails_half_way_releases_what_it_had_opened(edge_config) -> None:
    """edged opens its vector DB, spool and gRPC port and starts its background work before
    its HTTP front, whose port is taken here: serve() raises the bind error, and on the way
    out the start's resources are released (Daemon.closing): the gRPC port accepts nothing,
    the spool is closed, the background tasks have ended."""
    import socket
    import sqlite3

    from edged.config import HttpConfig

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        edge = Edged(edge_config(http=HttpConfig(listen=f"127.0.0.1:{taken.getsockname()[1]}")))
        loop = asyncio.get_running_loop()
        try:
            with pytest.raises(RuntimeError, match="cannot listen for HTTP"):
                await edge.serve()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):  # serve() installed them
                loop.remove_signal_handler(sig)
    assert edge.grpc.started and edge.grpc.port  # it got that far
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", edge.grpc.port), timeout=2).close()
    with pytest.raises(sqlite3.ProgrammingError):
        edge.spool.count()
    assert edge.tasks == []


async def test_background_work_that_loses_a_cancel_still_stops() -> None:
    """A loop whose cancel is lost (as an awaited call completes, asyncio.wait_for on 3.11
    and grpc.aio's calls return instead of raising) is cancelled again: the shutdown goes
    on to close the stores. One that never ends is left after STOP_TASKS_S, not waited for."""
    from velo.runtime.serving import STOP_TASKS_S, Daemon

    async def loses_its_first_cancel() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(3600)
        await asyncio.sleep(3600)  # the loop's next turn: nothing cancels it any more

    released = False

    async def never_ends() -> None:
        while not released:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(3600)

    daemon = Daemon("127.0.0.1:0")
    lost = daemon.spawn(loses_its_first_cancel())
    stubborn = daemon.spawn(never_ends())
    await asyncio.sleep(0.05)
    started = time.monotonic()
    async with asyncio.timeout(STOP_TASKS_S + 5):  # without the second cancel: for ever
        await daemon.stop_tasks()
    assert lost.cancelled()
    assert not stubborn.done() and time.monotonic() - started < STOP_TASKS_S + 1
    released = True
    stubborn.cancel()
    await asyncio.wait([stubborn], timeout=1)


def test_an_edge_whose_peers_are_gone_stops_within_its_grace(milvus, tmp_path) -> None:
    """edged as its own process; cloudd and trainerd killed under it. SIGTERM ends it within
    its grace period (it ignored SIGTERM for minutes), and while a shutdown is stuck a second
    signal ends it at once."""
    llm = FakeLLM().start()
    ports = {name: free_port() for name in ("edge", "cloud", "trainer")}
    (tmp_path / "cloudd.toml").write_text(
        f'listen = "127.0.0.1:{ports["cloud"]}"\n[llm]\nbase_url = "{llm.url}"\n'
        f'model = "{FAKE_MODEL}"\n')
    (tmp_path / "trainerd.toml").write_text(
        f'listen = "127.0.0.1:{ports["trainer"]}"\ndata_dir = "{tmp_path / "trainerd"}"\n')
    (tmp_path / "edged.toml").write_text(
        f'edge_id = "edge-peers-gone"\nlisten = "127.0.0.1:{ports["edge"]}"\n'
        f'cloud = "127.0.0.1:{ports["cloud"]}"\ntrainer = "127.0.0.1:{ports["trainer"]}"\n'
        f'data_dir = "{tmp_path / "edged"}"\nshutdown_grace_s = 3.0\n'
        f'[vector_db]\nuri = "{milvus.uri}"\ntoken = "{milvus.token}"\n')
    peers = [_start("cloudd", tmp_path / "cloudd.toml", tmp_path / "cloudd.log"),
             _start("trainerd", tmp_path / "trainerd.toml", tmp_path / "trainerd.log")]
    edge = None
    try:
        _wait_serving(ports["cloud"], 60)
        _wait_serving(ports["trainer"], 60)
        edge = _start("edged", tmp_path / "edged.toml", tmp_path / "edged.log")
        _wait_serving(ports["edge"], 120)
        with grpc.insecure_channel(f"127.0.0.1:{ports['edge']}") as channel:
            stub = edge_pb2_grpc.EdgeServiceStub(channel)
            for n in range(3):  # experience to upload, texts to keep
                stub.Ask(ask(f"What keeps an edge from stopping? ({n})"), timeout=60)
        for peer in peers:
            peer.kill()
            peer.wait()
        with grpc.insecure_channel(f"127.0.0.1:{ports['edge']}") as channel:
            stub = edge_pb2_grpc.EdgeServiceStub(channel)
            for n in range(3):  # asked with the peers gone: refused, nothing hangs on
                with pytest.raises(grpc.RpcError):
                    stub.Ask(ask(f"Is anyone there? ({n})"), timeout=30)
        time.sleep(5)  # the edge notices, retries, reconnects in the background
        started = time.monotonic()
        edge.send_signal(signal.SIGTERM)
        try:
            code = edge.wait(timeout=3.0 + 12)  # the grace, and time to close Milvus and files
        except subprocess.TimeoutExpired:
            edge.send_signal(signal.SIGTERM)  # a second signal: at once
            code = edge.wait(timeout=5)
            raise AssertionError("the first SIGTERM did not stop the edge within its grace; "
                                 f"the second did (exit {code}):\n"
                                 + (tmp_path / "edged.log").read_text()[-3000:]) from None
        assert code == 0, (tmp_path / "edged.log").read_text()[-3000:]
        assert time.monotonic() - started < 15
    finally:
        llm.stop()
        for proc in [*peers, edge]:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


STUCK_DAEMON = """
import asyncio, sys, threading, time
from velo.runtime.serving import Daemon

class Stuck(Daemon):
    name = "stuck"

    async def startup(self):
        await super().startup()
        # A worker thread blocked in a call that never returns (a frozen peer).
        asyncio.get_running_loop().run_in_executor(None, time.sleep, 3600)
        print("up", flush=True)

    async def shutdown(self):
        await super().shutdown()
        await asyncio.sleep(3600)  # a shutdown step waiting on a peer that is gone

Stuck("127.0.0.1:0", shutdown_grace_s=float(sys.argv[1])).run()
"""


@pytest.mark.parametrize("second_signal", [False, True])
def test_a_stuck_shutdown_ends_by_its_limit_and_a_second_signal_at_once(
        tmp_path, second_signal: bool) -> None:
    """A daemon whose shutdown and worker thread hang on a gone peer: one SIGTERM ends it within
    its grace plus the closing time (SHUTDOWN_CLOSE_S); a second signal ends it at once."""
    from velo.runtime.serving import SHUTDOWN_CLOSE_S

    script = tmp_path / "stuck.py"
    script.write_text(STUCK_DAEMON)
    grace = 1.0 if not second_signal else 60.0
    proc = subprocess.Popen([sys.executable, str(script), str(grace)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, cwd=Path(__file__).parents[1])
    try:
        assert proc.stdout is not None
        while proc.stdout.readline().strip() != b"up":  # its log lines come first
            assert proc.poll() is None
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        if second_signal:
            time.sleep(1.0)
            assert proc.poll() is None  # still in its (long) graceful shutdown
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=5) == 1
            assert time.monotonic() - started < 5
        else:
            assert proc.wait(timeout=grace + SHUTDOWN_CLOSE_S + 10) == 0
            assert time.monotonic() - started < grace + SHUTDOWN_CLOSE_S + 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
