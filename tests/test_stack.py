"""The whole stack as a newcomer runs it: real processes (Milvus, SmolLM2 via llama.cpp,
trainerd, cloudd, edges), a workload replayed over gRPC, the `velo` CLI, a clean stop."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from velo.models import ROOT
from velo.replay import replay, summary_table
from velo.stack import Stack, StackConfig
from velo.workload import load_qa, zipf_workload

pytestmark = pytest.mark.llm


@pytest.fixture(scope="module")
def stack(tmp_path_factory, exported_embedder, milvus):
    # One embedded Milvus per machine (fixed internal ports): share the session's server.
    stack = Stack(StackConfig(data_dir=tmp_path_factory.mktemp("stack"), edges=2,
                              edge_policies=("cache-0.5", "greedy-0.5"),
                              milvus_uri=milvus.uri)).start()
    yield stack
    procs = list(stack.procs)
    stack.stop()
    # Every daemon drained and exited by itself on SIGTERM.
    assert [(name, p.returncode) for name, p in procs] == [(name, 0) for name, _ in procs]


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
        [sys.executable, "-m", "velo.cli", "ask", "Name one colour of the sky.",
         "--edge", stack.edge_addresses[0], "--max-tokens", "12", "--stream"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "[action B by cache-0.5 on edge-1" in result.stderr
