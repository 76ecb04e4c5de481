"""The whole stack as a newcomer runs it: real processes (Milvus, SmolLM2 via llama.cpp under
cloudd, trainerd, edges), a workload replayed over gRPC, the `velo` CLI, supervision, and a
clean stop on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from velo.core.models import ROOT
from velo.core.records import load_qa
from velo.ops.replay import replay, summary_table
from velo.ops.stack import Stack, StackConfig
from velo.ops.workload import zipf_workload

pytestmark = pytest.mark.llm


@pytest.fixture(scope="module")
def stack(tmp_path_factory, exported_embedder, milvus):
    # One embedded Milvus per machine (fixed internal ports): share the session's server.
    stack = Stack(StackConfig(data_dir=tmp_path_factory.mktemp("stack"), edges=2,
                              edge_policies=("lrs", "greedy-0.5"),
                              milvus_uri=milvus.uri, milvus_token=milvus.token)).start()
    yield stack
    daemons = list(stack.daemons.values())
    stack.stop()
    # Every daemon drained and exited by itself on SIGTERM.
    assert [(d.name, d.proc.returncode) for d in daemons] == [(d.name, 0) for d in daemons]


def test_replay_through_two_edges_answers_everything(stack) -> None:
    items = load_qa(ROOT / "data" / "oasst1_dev.jsonl")[:5]
    arrivals = zipf_workload(items, 12, users=4, seed=1, max_chars=400)
    outcomes = asyncio.run(replay(arrivals, stack.edge_addresses, items, max_tokens=16,
                                  progress=False))
    assert [o.error for o in outcomes if o.action == "error"] == []
    assert {o.action for o in outcomes} >= {"B"}
    assert any(o.action in "AC" for o in outcomes)  # 12 draws from 5 questions repeat
    assert all(o.satisfaction is not None and -2 <= o.satisfaction <= 0 for o in outcomes)
    table = summary_table(outcomes)
    assert table.count("| all |") == 2


def test_velo_ask_cli_talks_to_an_edge(stack) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "velo_cli", "ask", "Name one colour of the sky.",
         "--edge", stack.edge_addresses[0], "--max-tokens", "12", "--stream"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    # edge-1 ("lrs") runs the shipped load-aware policy, published through trainerd at start.
    assert "by onnx:lrs-load:v1 on edge-1" in result.stderr


# A metric only each kind of daemon exports: a scrape that has it reached that daemon.
OWN_METRIC = {"trainerd": "velo_trainer_policy_version", "cloudd": "velo_cloud_queued",
              "edged": "velo_edge_requests_total"}


def scraped(url: str) -> dict[str, dict[frozenset, float]]:
    """A /metrics page: each sample's value by name, then by labels."""
    page = httpx.get(url, timeout=10)
    page.raise_for_status()
    samples: dict[str, dict[frozenset, float]] = {}
    for family in text_string_to_metric_families(page.text):
        for s in family.samples:
            samples.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return samples


def serves_its_metrics(module: str, url: str) -> bool:
    samples = scraped(url)
    return OWN_METRIC[module] in samples and \
        samples["velo_serving"] == {frozenset({"daemon": module}.items()): 1.0}


def test_every_daemon_of_the_stack_serves_its_metrics(stack) -> None:
    assert stack.metrics_urls.keys() == stack.daemons.keys()
    assert len(set(stack.metrics_urls.values())) == len(stack.daemons)  # one port each
    for name, url in stack.metrics_urls.items():
        assert serves_its_metrics(stack.daemons[name].module, url), name


def test_a_dead_daemon_is_restarted_and_the_rest_keep_serving(stack) -> None:
    edge = stack.daemons["edge-2"]
    edge.proc.kill()
    edge.proc.wait()
    assert stack.diagnose()["edge-2"] == "not running (was killed by SIGKILL (exit code -9))"
    assert stack.diagnose()["edge-1"] == "serving"  # one death does not take the stack down
    deadline = time.monotonic() + 10
    while "edge-2" not in stack.supervise():
        assert time.monotonic() < deadline, "edge-2 was not restarted"
        time.sleep(0.2)
    assert edge.restarts == 1
    stack.wait_healthy("edge-2")
    items = load_qa(ROOT / "data" / "oasst1_dev.jsonl")[:2]
    outcomes = asyncio.run(replay(zipf_workload(items, 2, seed=3, max_chars=400),
                                  [stack.daemons["edge-2"].address], items, max_tokens=8,
                                  progress=False))
    assert [o.error for o in outcomes if o.action == "error"] == []


def test_velo_up_prints_each_daemons_metrics_and_stops_every_child_on_sigterm(
        tmp_path, milvus) -> None:
    env = {**os.environ, "VELO_MILVUS_TOKEN": milvus.token, "PYTHONUNBUFFERED": "1"}
    up = subprocess.Popen(
        [sys.executable, "-m", "velo_cli", "up", "--edges-count", "1", "--base-port", "0",
         "--milvus-uri", milvus.uri, "--state-dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True)
    try:
        said = []  # what it printed, quoted when it does not start
        for line in up.stdout:
            if line.startswith("VELO is up"):
                break
            said.append(line)
        else:
            pytest.fail(f"velo up did not start (exit {up.wait()}):\n{''.join(said)[-4000:]}")
        printed = {}  # daemon name: its metrics URL, as `velo up` says them
        for line in up.stdout:
            if line.startswith("logs in"):
                break
            if shown := re.match(r"\s+(\S+)\s+\S+\s+metrics (http://\S+/metrics)$", line):
                printed[shown[1]] = shown[2]
        assert printed.keys() == {"trainerd", "cloudd", "edge-1"}
        for name, url in printed.items():
            assert serves_its_metrics("edged" if name.startswith("edge-") else name, url), name
        children = _children(up.pid)
        assert len(children) >= 4  # trainerd, cloudd, its LLM server, an edge
        started = time.monotonic()
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=30) == 0
        took = time.monotonic() - started
        alive = [pid for pid in children if _alive(pid)]
        assert alive == [], f"children left running: {alive}"
        assert took < 15, f"stopping took {took:.1f} s"
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    """Every descendant of `pid`."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True)
    parent = {int(p): int(pp) for p, pp in (line.split() for line in out.stdout.splitlines())}

    def descends(p: int) -> bool:
        while p in parent and p != 1:
            p = parent[p]
            if p == pid:
                return True
        return False

    return [p for p in parent if descends(p)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead, only not yet reaped by its parent.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ", 1)[1][0] != "Z"


def test_velo_demo_fails_loudly_when_the_llm_cannot_start(tmp_path, milvus) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"this is not a GGUF file")
    env = {**os.environ, "VELO_MILVUS_TOKEN": milvus.token,
           "VELO_CLOUDD__LOCAL_LLM__MODEL_FILE": str(broken)}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "velo_cli", "demo", "--requests", "3", "--edges-count", "1",
         "--milvus-uri", milvus.uri, "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, env=env, timeout=170)
    assert result.returncode != 0
    assert "the stack did not start: cloudd's LLM server failed to start" in result.stderr
    assert "broken.gguf" in result.stderr  # the LLM server's own words, quoted
    assert time.monotonic() - started < 120


def test_velo_replay_exits_1_and_says_what_is_down(tmp_path, edge_config) -> None:
    from edged.server import Edged
    from tests.conftest import running
    from velo.ops.ports import free_port

    async def scenario() -> subprocess.CompletedProcess:
        cfg = edge_config(cloud=f"127.0.0.1:{free_port()}")  # no cloudd there
        async with running(Edged(cfg)) as edge:
            return await asyncio.to_thread(subprocess.run, [
                sys.executable, "-m", "velo_cli", "replay", "--requests", "3",
                "--edges", edge.grpc.address], capture_output=True, text=True, timeout=120)

    result = asyncio.run(scenario())
    assert result.returncode == 1
    assert "3 of 3 requests failed" in result.stderr
    assert "cloud down: cloudd at 127.0.0.1:" in result.stderr
    assert "cached answers are still served" not in result.stderr + result.stdout
