"""The operator's view that ships in deploy/: the Grafana dashboard and the Prometheus alert rules
query only metrics real daemons export, the rules pass `promtool check rules` and their unit
tests (`promtool test rules`: each alert fires, and stays quiet, where it should), and every
dashboard query is valid PromQL."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cloudd.config import CloudConfig, LLMConfig
from cloudd.server import Cloudd
from edged.server import Edged
from tests.conftest import running
from tests.fake_llm import FAKE_MODEL
from tests.test_metrics import scrape
from trainerd.config import TrainerConfig
from trainerd.server import Trainerd
from velo.core.models import ROOT

DASHBOARD = ROOT / "deploy" / "grafana" / "velo.json"
RULES = ROOT / "deploy" / "prometheus" / "velo-rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "velo-rules.test.yml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian package `prometheus`; .ci/run "
    "installs it)")
# Series Prometheus makes itself rather than any daemon: `up` says whether a scrape answered.
PROMETHEUS_OWN = {"up"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
                "unless", "bool", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: what is left once strings, label matchers,
    ranges, label lists, function calls, numbers and keywords are taken out."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = re.findall(r"(?<![\w:.])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()", expr)
    return {name for name in names if name.lower() not in PROMQL_WORDS}


def dashboard_queries() -> list[str]:
    return [target["expr"] for panel in json.loads(DASHBOARD.read_text())["panels"]
            for target in panel["targets"]]


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"]
            for rule in group["rules"]]


def test_the_metric_name_extractor_finds_names_and_only_names() -> None:
    expr = ('histogram_quantile(0.95, sum by (le, action) (rate(velo_a_bucket{x="y",z=~"w"}'
            '[$__rate_interval]))) / on(instance) group_left velo_b > bool 1e-3 and '
            'up{job=~"velo-.*"} offset 5m or increase(velo_c_total[1h]) > 0')
    assert metric_names(expr) == {"velo_a_bucket", "velo_b", "up", "velo_c_total"}


async def test_every_metric_the_dashboard_and_the_rules_query_is_exported(
        edge_config, fake_llm, tmp_path: Path) -> None:
    """Scrapes a real trainerd, cloudd and edged (wired together as in production), and checks
    each metric name in the dashboard's and the rules' expressions against what they export."""
    trainer_cfg = TrainerConfig(listen="127.0.0.1:0", data_dir=str(tmp_path / "trainerd"),
                                shutdown_grace_s=0.5, metrics_listen="127.0.0.1:0")
    cloud_cfg = CloudConfig(listen="127.0.0.1:0", shutdown_grace_s=0.5,
                            metrics_listen="127.0.0.1:0",
                            llm=LLMConfig(base_url=fake_llm.url, model=FAKE_MODEL,
                                          default_max_tokens=8, retry_backoff_s=0.01))
    async with running(Trainerd(trainer_cfg)) as trainer, running(Cloudd(cloud_cfg)) as cloud:
        cfg = edge_config(cloud=cloud.grpc.address, trainer=trainer.grpc.address,
                          metrics_listen="127.0.0.1:0")
        async with running(Edged(cfg)) as edge:
            exported = {name for daemon in (trainer, cloud, edge)
                        for name, _ in await scrape(daemon.metrics_port)}
    queried = {
        "dashboard": set().union(*map(metric_names, dashboard_queries())),
        "rules": set().union(*(metric_names(rule["expr"]) for rule in alert_rules())),
    }
    assert len(queried["dashboard"]) >= 20 and len(queried["rules"]) >= 10  # parsed at all
    missing = {where: sorted(names - exported - PROMETHEUS_OWN)
               for where, names in queried.items()}
    assert missing == {"dashboard": [], "rules": []}


def test_the_dashboard_shows_each_view_an_operator_needs() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queried = set().union(*map(metric_names, dashboard_queries()))
    views = {
        "hit rate": "velo_edge_requests_total",
        "false-hit estimate": "velo_edge_false_hit_estimate",
        "its sample count": "velo_edge_reuses_verified_total",
        "latency by action": "velo_edge_request_seconds_bucket",
        "cloud queue": "velo_cloud_queued",
        "cloud wait": "velo_cloud_estimated_wait_seconds",
        "policy version": "velo_edge_policy_version",
        "experience lag (spool depth)": "velo_edge_experience_spooled",
        "evictions": "velo_edge_evicted_rows_total",
        "health per part": "velo_part_up",
    }
    assert {view: metric for view, metric in views.items() if metric not in queried} == {}
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    # Every query goes to the Prometheus picked at import (the `datasource` variable).
    assert {p["datasource"]["uid"] for p in panels} == {"${datasource}"}
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource"]


def test_each_alert_has_unit_tests_that_fire_it_and_keep_it_quiet() -> None:
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
             for case in test["alert_rule_test"]]
    for rule in alert_rules():
        fired = [c for c in cases if c["alertname"] == rule["alert"] and c["exp_alerts"]]
        quiet = [c for c in cases if c["alertname"] == rule["alert"] and not c["exp_alerts"]]
        assert fired and quiet, f"{rule['alert']}: fired in {len(fired)}, quiet in {len(quiet)}"


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


@needs_promtool
def test_promtool_checks_the_alert_rules() -> None:
    result = promtool("check", "rules", RULES.name, cwd=RULES.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


@needs_promtool
def test_promtool_runs_the_alert_rules_unit_tests() -> None:
    result = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    # promtool parses expressions only inside rule files: each query becomes a recording rule,
    # with Grafana's $__rate_interval as the range Prometheus would get.
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"velo:dashboard:{i}", "expr": expr.replace("$__rate_interval", "5m")}
        for i, expr in enumerate(dashboard_queries())]}]}
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", path.name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
