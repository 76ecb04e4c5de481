"""Where the commands find their data: the shared development data beside the checkout when it
is there, else the copies bundled in data/."""

from __future__ import annotations

from pathlib import Path

from velo.core.models import ROOT

SHARED = ROOT.parent / "shared" / "data"
DEFAULT_DATA = SHARED / "oasst1_dev.jsonl"
BUNDLED_DATA = ROOT / "data" / "oasst1_dev.jsonl"


def _shared_or_bundled(name: str) -> Path:
    path = SHARED / name
    return path if path.exists() else ROOT / "data" / name


def qa_data(given: Path | None) -> Path:
    """The QA file asked for, else oasst1's dev split."""
    return given or (DEFAULT_DATA if DEFAULT_DATA.exists() else BUNDLED_DATA)


def latencies() -> Path:
    """The llmperf latencies the simulator draws cloud delays from."""
    return _shared_or_bundled("llm_latency_llmperf.jsonl")


def trace() -> Path:
    """The Azure LLM conversation trace whose arrivals load the simulated cloud."""
    return _shared_or_bundled("azure_llm_trace_conv_2023.csv")
