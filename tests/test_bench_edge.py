"""tools/bench_edge.py runs end to end on a small cache: real Milvus, a real velo-edged process,
GPTCache beside it (as shipped and patched), and the floor. Its numbers are not asserted (this
machine is shared and noisy); what it reports is: every stage measured, hit traffic that really
hits, both systems asked the same labelled pairs at the same threshold."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from velo.core.models import ROOT
from velo.ops.ports import free_port

pytestmark = pytest.mark.slow  # a minute or more: `make test-slow` (CI runs it)


def test_bench_edge_reports_every_measurement(milvus, exported_embedder, tmp_path: Path) -> None:
    out = tmp_path / "edge.json"
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_edge.py"), "--milvus-uri", milvus.uri,
         "--rows", "1000", "--requests", "40", "--clients", "1,4", "--pairs", "120",
         "--port", str(free_port()), "--workdir", str(tmp_path / "work"), "--out", str(out),
         "--no-profile"],
        env={**os.environ, "VELO_MILVUS_TOKEN": milvus.token}, check=True, timeout=600)
    report = json.loads(out.read_text())
    size = report["sizes"]["1000"]
    assert set(size["velo"]) == {"model 2x2", "model-int8 2x2"}
    for side in size["velo"].values():
        stages = side["decision"]["single_stream"]
        assert set(stages) == {"embed", "search", "state", "policy", "total"}
        assert stages["total"]["p50_ms"] >= stages["embed"]["p50_ms"] > 0
        assert side["decision"]["hit_share"] == 1.0  # the queries are hits: all reuse
        assert side["decision"]["lrs_policy"]["n"] == 40
        assert side["decision"]["verifier"]["n"] == 40  # the reuse guard's cost per decision
        ask = side["grpc_ask"]
        assert ask["actions"] == {"A": sum(ask["actions"].values())}  # no miss, no error
        assert set(ask["throughput"]) == {"1", "4"} and ask["edged_rss_mb"] > 50
    for name, floor in size["floor"].items():  # one embedding + one in-process probe
        assert floor["total"]["p50_ms"] >= floor["embed"]["p50_ms"] > 0
        assert floor["probe"]["n"] == 40 and name in size["velo"]
    assert size["text_store_mb"] > 0  # the texts are where the benchmarked edged reads them
    assert len(size["gptcache"]) == 2  # as shipped, and with the index it lacks
    for gpt_side in size["gptcache"].values():
        assert gpt_side["hit_share"] == 1.0 and gpt_side["memory_mb"]["faiss_index"] > 0
        assert all("errors" in t for t in gpt_side["throughput"].values())

    wrong = report["wrong_hits"]
    velo, gpt = wrong["velo cache-0.5, model 2x2"], wrong["gptcache T=0.9375"]
    assert velo["queries"] == gpt["queries"] == 120
    # Same embedder, same rule (L2 <= 0.5 is GPTCache's T = 0.9375): the same answers served,
    # up to the approximate index; the held-out half makes some hits wrong.
    assert abs(velo["hits"] - gpt["hits"]) <= 6 and velo["wrong"] > 0
    assert wrong["gptcache T=0.8 (its default)"]["wrong"] > gpt["wrong"]
    # per embedder: the floor, the decision and the Ask (the first: also with repeated prompts
    # not embedded again); and both GPTCache variants
    assert out.with_suffix(".md").read_text().count("| 1,000 |") == 9
