"""The fault suite's fast subset (tools/chaos.py --quick) against a real stack: the LLM server
killed mid-stream, trainerd SIGKILLed, an edge SIGKILLed under load, 64 clients, a full spool
disk, broken and corrupted policies, 2000 mutated gRPC and 2000 mutated HTTP requests, 2000
cross-tenant probes (gRPC and HTTP, with and without history) and 300 half-open connections. It
must end with nothing lost, nothing duplicated, nothing served across tenants, no crash, no 5xx
but deliberate 503s and no cache row without its texts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from velo.core.models import ROOT

pytestmark = [pytest.mark.llm, pytest.mark.slow]


def test_quick_fault_suite_loses_nothing(milvus, exported_embedder, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "chaos.py"), "--quick", "--out", str(tmp_path),
         "--milvus-uri", milvus.uri],
        env={**os.environ, "VELO_MILVUS_TOKEN": milvus.token}, capture_output=True, text=True,
        timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {r["fault"]: r for r in json.loads((tmp_path / "chaos.json").read_text())}
    assert set(rows) >= {"baseline", "llm-crash-midstream", "trainerd-sigkill", "edged-sigkill",
                         "load-64-clients", "spool-disk-full", "bad-policy",
                         "fuzz (mutated requests)", "fuzz (mutated HTTP requests)",
                         "isolation (cross-tenant probes)", "slow clients (half-open HTTP)"}
    for row in rows.values():
        assert (row["lost"], row["duplicated"], row["crashes"], row["server_errors"],
                row["orphan_rows"]) == (0, 0, 0, 0, 0), row
    # The faults really happened and the workload really ran through them.
    assert rows["edged-sigkill"]["acknowledged"] > 20
    assert rows["trainerd-sigkill"]["received"] == rows["trainerd-sigkill"]["acknowledged"] > 10
    assert rows["fuzz (mutated requests)"]["requests"] == 2000
    assert rows["fuzz (mutated HTTP requests)"]["requests"] == 2000
    # Probes went over gRPC and HTTP, with and without earlier turns.
    assert all(kind in rows["isolation (cross-tenant probes)"]["note"]
               for kind in ("grpc ", "grpc+history", "http ", "http+history"))
    assert rows["isolation (cross-tenant probes)"]["acknowledged"] >= 1000
    assert "kept v1" in rows["bad-policy"]["note"] and "refused 3/3" in rows["bad-policy"]["note"]
    assert "| fault | requests |" in (tmp_path / "chaos.md").read_text()
