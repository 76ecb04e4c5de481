"""The shipped systemd units and example configs are valid: the configs load through the same
validation the daemons run at start, and each unit runs its daemon with its config."""

import configparser

import pytest

from cloudd.config import load as load_cloudd
from edged.config import load as load_edged
from trainerd.config import load as load_trainerd
from velo.config import ConfigError, load_config
from velo.models import ROOT

SYSTEMD = ROOT / "systemd"


@pytest.mark.parametrize("daemon, loader", [("edged", load_edged), ("cloudd", load_cloudd),
                                            ("trainerd", load_trainerd)])
def test_example_config_loads_and_unit_uses_it(daemon: str, loader) -> None:
    cfg = loader(SYSTEMD / f"{daemon}.toml")
    assert cfg.listen.startswith("0.0.0.0:")
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(SYSTEMD / f"velo-{daemon}.service")
    service = unit["Service"]
    assert service["Type"] == "notify"
    exec_start = f"/opt/velo/.venv/bin/velo-{daemon} --config /etc/velo/{daemon}.toml"
    assert service["ExecStart"] == exec_start
    assert service["Restart"] == "on-failure" and service["ProtectSystem"] == "strict"
    assert service["StateDirectory"] == f"velo/{daemon}"


def test_env_overrides_file_and_bad_keys_are_named(tmp_path, monkeypatch) -> None:
    from edged.config import EdgeConfig

    monkeypatch.setenv("VELO_EDGED__CACHE__TOP_P", "7")
    assert load_edged(SYSTEMD / "edged.toml").cache.top_p == 7
    monkeypatch.setenv("VELO_EDGED__CACHE__TOP_P", "seven")
    with pytest.raises(ConfigError, match=r"VELO_EDGED__CACHE__TOP_P .*'cache\.top_p'.* int"):
        load_edged(None)
    monkeypatch.delenv("VELO_EDGED__CACHE__TOP_P")
    bad = tmp_path / "edged.toml"
    bad.write_text('[cache]\ntopp = 5\n')
    with pytest.raises(ConfigError,
                       match=r"unknown config key 'cache\.topp'.*did you mean 'cache\.top_p'"):
        load_config(EdgeConfig, bad, "VELO_EDGED")
    bad.write_text('[policy]\nbaseline = "lru"\n')
    with pytest.raises(ConfigError, match=r"'policy\.baseline' unknown baseline 'lru'"):
        load_edged(bad)


def test_edged_with_a_bad_config_exits_2_naming_the_key(tmp_path, capsys) -> None:
    from edged.__main__ import main

    bad = tmp_path / "edged.toml"
    bad.write_text('edge_id = "edge-1"\n[vector_db]\nnprobe = 500\n')
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(bad)])
    assert exit_.value.code == 2
    assert "velo-edged: config key 'vector_db.nprobe'" in capsys.readouterr().err


def test_the_edge_daemon_never_imports_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, edged.server, edged.__main__; "
            "sys.exit(1 if 'torch' in sys.modules or 'transformers' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
