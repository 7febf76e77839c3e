"""Prometheus config and rules, and the Grafana provisioning and dashboard: valid, and every
metric they query is one the service exports (so a renamed metric breaks this test, not a dashboard)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.metrics import Metrics
from tests.deploy.conftest import DEPLOY

DASHBOARD = DEPLOY / "grafana" / "dashboards" / "oodflow.json"
PROVISIONING = DEPLOY / "grafana" / "provisioning"
PROMETHEUS = DEPLOY / "prometheus"
_PROMQL_WORDS = {
    "sum", "by", "rate", "histogram_quantile", "le", "without", "avg", "max", "min", "count", "on",
    "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset", "label_values",
    "humanizePercentage",
}  # fmt: skip


def _exported_series() -> set[str]:
    """Every series name the service's registry can expose (histogram/counter suffixes included)."""
    names: set[str] = set()
    for metric in Metrics().registry.collect():
        base = metric.name
        if metric.type == "histogram":
            names |= {f"{base}_bucket", f"{base}_sum", f"{base}_count"}
        elif metric.type == "counter":
            names |= {f"{base}_total", f"{base}_created"}
        else:
            names.add(base)
    return names


def _metric_names(expr: str) -> set[str]:
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r'"[^"]*"', "", expr)
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr))
    return {w for w in words if w.startswith("oodflow") and w not in _PROMQL_WORDS}


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _exprs() -> list[str]:
    return [t["expr"] for p in _dashboard()["panels"] for t in p.get("targets", [])]


def test_dashboard_structure() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] == "oodflow" and dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    datasource = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"][
        0
    ]
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids))
    # No two panels overlap on the 24-column grid.
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        g = panel["gridPos"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not (mine & cells), f"panel {panel['title']} overlaps another"
        cells |= mine
    titles = " | ".join(p["title"].lower() for p in panels)
    for needed in ("requests", "latency", "stage", "batch size", "queue depth", "ood rate", "bits/dim"):
        assert needed in titles, f"the dashboard has no {needed} panel"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for expr in _exprs():
        for used in re.findall(r"\$(\w+)", expr):
            assert used in variables or used.startswith("__"), f"{expr}: unknown variable ${used}"


def test_every_queried_metric_is_exported() -> None:
    exported = _exported_series()
    rules = yaml.safe_load((PROMETHEUS / "rules.yml").read_text())
    recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    exprs = _exprs() + [r["expr"] for g in rules["groups"] for r in g["rules"]]
    exprs += [v["query"]["query"] for v in _dashboard()["templating"]["list"]]
    for expr in exprs:
        for name in _metric_names(expr):
            assert name in exported or name in recorded, f"{name} (in {expr!r}) is not a service metric"


def test_provisioning_points_at_the_dashboard() -> None:
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "oodflow.yml").read_text())["providers"][0]
    assert provider["type"] == "file"
    compose = yaml.safe_load((DEPLOY.parent / "docker-compose.yml").read_text())
    mounts = {v.split(":")[1]: v.split(":")[0] for v in compose["services"]["grafana"]["volumes"]}
    host = Path(DEPLOY.parent / mounts[provider["options"]["path"]])
    assert (host / DASHBOARD.name).resolve() == DASHBOARD.resolve()


def test_prometheus_config_structure() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["oodflow"]["metrics_path"] == "/metrics"
    for rule_file in config["rule_files"]:
        assert (PROMETHEUS / rule_file).is_file()
    rules = yaml.safe_load((PROMETHEUS / "rules.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert ("record" in rule) != ("alert" in rule) and rule["expr"].strip()


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus)")
    return promtool


def test_promtool_checks_config_and_rules() -> None:
    promtool = _promtool()
    for args in (
        ["check", "config", str(PROMETHEUS / "prometheus.yml")],
        ["check", "rules", str(PROMETHEUS / "rules.yml")],
    ):
        result = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    """Each panel query, with Grafana's variables filled in, as a recording rule: promtool parses it."""
    promtool = _promtool()
    substitutions = {"$__rate_interval": "1m", "$__interval": "1m", "$model": ".*"}
    rules = []
    for i, expr in enumerate(_exprs()):
        for variable, value in substitutions.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
