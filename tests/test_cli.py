"""The `velo` command line: every option of every command says what it does, and the ports
`velo up` gives the daemons."""

from __future__ import annotations

import argparse

import pytest

from velo_cli.main import build_parser


def test_every_option_of_every_command_has_help() -> None:
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    missing = [f"velo {name} {'/'.join(action.option_strings) or action.dest}"
               for name, sub in commands.choices.items() for action in sub._actions
               if not isinstance(action, argparse._HelpAction) and not action.help]
    assert missing == []
    # One word, one meaning: --edges is a list of addresses, --edges-count a number.
    edges = {name: next(a for a in sub._actions if "--edges" in a.option_strings)
             for name, sub in commands.choices.items()
             if any("--edges" in a.option_strings for a in sub._actions)}
    assert set(edges) == {"replay"} and edges["replay"].type is None



def test_velo_up_with_a_base_port_serves_metrics_100_above_each_grpc_port(tmp_path) -> None:
    """What `velo up --base-port 50050` configures each daemon with (nothing is started: the
    daemons answering on their metrics ports is tests/test_stack.py's)."""
    from velo.ops.stack import Stack, StackConfig

    stack = Stack(StackConfig(data_dir=tmp_path, edges=3, base_port=50050,
                              milvus_uri="http://127.0.0.1:19530"))
    stack.configure()
    ports = {name: (int(d.address.rpartition(":")[2]), d.metrics_port)
             for name, d in stack.daemons.items()}
    assert ports == {"trainerd": (50050, 50150), "cloudd": (50051, 50151),
                     "edge-1": (50052, 50152), "edge-2": (50053, 50153),
                     "edge-3": (50054, 50154)}
    for daemon in stack.daemons.values():  # what each daemon's config reads
        assert daemon.env[f"VELO_{daemon.module.upper()}__METRICS_LISTEN"] == \
            f"127.0.0.1:{daemon.metrics_port}"
    assert stack.metrics_urls["edge-2"] == "http://127.0.0.1:50153/metrics"
    with pytest.raises(ValueError, match="at most 98 edges with a base port"):
        StackConfig(base_port=50050, edges=99)


@pytest.mark.slow
def test_velo_says_its_version_and_installs_from_a_wheel_under_our_own_name(tmp_path) -> None:
    """`velo` on PyPI is another project: the wheel is velo-edge-cache, carries the licence,
    and installs into a fresh venv (no dependencies: only the name and metadata are checked)."""
    import subprocess
    import sys
    import zipfile
    from importlib.metadata import version

    from velo.core.models import ROOT

    said = subprocess.run([sys.executable, "-m", "velo_cli", "--version"], capture_output=True,
                          text=True, timeout=60)
    assert said.returncode == 0, said.stderr
    assert said.stdout.strip() == f"velo-edge-cache {version('velo-edge-cache')}"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w",
                            str(tmp_path), str(ROOT)], capture_output=True, text=True,
                           timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("velo_edge_cache-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = z.read(metadata).decode()
        (scripts,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert "velo = velo_cli" in z.read(scripts).decode()
    assert "Name: velo-edge-cache" in meta and "License-Expression: Apache-2.0" in meta
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "velo/core/antonyms.txt" in names and "velo/core/synonyms.txt" in names  # the verifier's
    assert "velo/ops/policies/lrs-load.onnx" in names  # the demo's load-aware policy
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    installed = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "--no-deps",
                                str(wheel)], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-2000:]
    shown = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import importlib.metadata as m; print(m.version('velo-edge-cache'))"],
                           capture_output=True, text=True, timeout=60)
    assert shown.stdout.strip() == version("velo-edge-cache")
    assert (venv / "bin" / "velo").exists()
