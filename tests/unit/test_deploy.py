"""The monitoring shipped in deploy/: the alert rules pass promtool and their own unit tests, the Grafana dashboard is
importable, and both use only metrics that app/metrics.py declares.

promtool comes from Debian's prometheus package, which `make test` installs; without it these tests fail rather than
skip, so rules nobody checked never pass as tested.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

import app.metrics  # noqa: F401  (declares every metric in the default registry)

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "imagegate.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
METRIC = re.compile(r"\bimagegate_[a-z0-9_]+")
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
    "info": ("_info",),
    "stateset": ("",),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "unknown": ("",),
}
"""The series names a metric family of each type exposes (the family name plus each suffix)."""


# -- helpers the e2e test shares -----------------------------------------------------------------------------------


def series_names(family: str, kind: str) -> set[str]:
    """The series names a family exposes; ``family`` may be a text exposition's counter name (ending in _total)."""
    if kind == "counter" and family.endswith("_total"):
        family = family.removesuffix("_total")
    return {family + suffix for suffix in SUFFIXES[kind]}


def declared_names() -> set[str]:
    """Every imagegate series name that app/metrics.py's metrics can expose."""
    names: set[str] = set()
    for family in REGISTRY.collect():
        if family.name.startswith("imagegate_"):
            names |= series_names(family.name, family.type)
    return names


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def panels(board: dict) -> Iterator[dict]:
    """Every panel, those inside collapsed rows included."""
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_expressions(board: dict | None = None) -> list[str]:
    """The PromQL of the dashboard: its panels' targets and its template variables' queries."""
    board = board or dashboard()
    exprs = [t["expr"] for p in panels(board) for t in p.get("targets", [])]
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def alert_expressions() -> list[str]:
    return [rule["expr"] for rule in alert_rules()]


def metric_names(exprs: Iterable[str]) -> set[str]:
    return {name for expr in exprs for name in METRIC.findall(expr)}


def used_names() -> dict[str, set[str]]:
    """Metric names per user: the dashboard and the alert rules."""
    return {"dashboard": metric_names(dashboard_expressions()), "alerts": metric_names(alert_expressions())}


# -- promtool ------------------------------------------------------------------------------------------------------


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool") or "/usr/bin/promtool"
    if not Path(tool).exists():
        pytest.fail("promtool is missing: `make test` installs it (apt-get install prometheus)")
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_promtool_checks_the_alert_rules():
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_alert_rules_pass_their_unit_tests():
    result = promtool("test", "rules", str(ALERTS_TEST))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_severity_a_summary_and_a_description():
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    assert [g["name"] for g in groups] == ["imagegate"]
    rules = alert_rules()
    assert rules
    for rule in rules:
        assert rule["alert"].startswith("Imagegate"), rule
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_every_alert_is_unit_tested():
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    tested = {case["alertname"] for test in tests for case in test["alert_rule_test"]}
    firing = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case.get("exp_alerts")}
    alerts = {rule["alert"] for rule in alert_rules()}
    assert alerts == tested, "alerts without a promtool test, or tests of no alert"
    assert alerts == firing, f"alerts never seen firing in alerts_test.yml: {alerts - firing}"


def test_the_alerts_cover_the_issue():
    exprs = {rule["alert"]: rule["expr"] for rule in alert_rules()}
    joined = "\n".join(exprs.values())
    for wanted in (
        "imagegate_workers_up",
        'imagegate_http_requests_total{status_code=~"5.."}',
        "imagegate_queue_depth",
        "increase(imagegate_worker_restarts_total[15m]) > 3",
        "histogram_quantile(0.99",
        "imagegate_webhook_deliveries_total{outcome=~",
    ):
        assert wanted in joined, wanted


# -- the dashboard -------------------------------------------------------------------------------------------------


def test_the_dashboard_is_importable():
    board = dashboard()
    assert board["uid"] == "imagegate" and board["title"]
    assert 36 <= board["schemaVersion"] <= 41
    assert board.get("id") is None, "an exported id would overwrite another dashboard on import"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    for name in ("model", "backend"):
        var = variables[name]
        assert var["type"] == "query" and var["datasource"]["uid"] == "${datasource}"
        assert "label_values(" in var["query"]["query"] and var["query"]["query"].endswith(f", {name})")


def test_every_panel_has_a_datasource_targets_an_id_and_a_place():
    board = dashboard()
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    taken: set[tuple[int, int]] = set()
    for panel in panels(board):
        pos = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= pos.keys(), panel["title"]
        assert pos["w"] > 0 and pos["h"] > 0 and pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {(pos["x"] + dx, pos["y"] + dy) for dx in range(pos["w"]) for dy in range(pos["h"])}
        assert not cells & taken, f"panel {panel['title']!r} overlaps another"
        taken |= cells
        if panel["type"] == "row":
            continue
        assert panel["type"] in {"timeseries", "stat"}, panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and METRIC.search(target["expr"]), panel["title"]
            assert target["datasource"] == panel["datasource"], panel["title"]


def test_the_dashboard_groups_its_panels_in_rows():
    board = dashboard()
    assert board["panels"][0]["type"] == "row"
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert len(rows) >= 5


def test_every_expression_is_balanced_and_filters_by_the_variables():
    for expr in dashboard_expressions():
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
        assert expr.count("[") == expr.count("]"), expr
    model_metrics = {"imagegate_images_total", "imagegate_queue_depth", "imagegate_workers_up"}
    for panel in panels(dashboard()):
        for target in panel.get("targets", []):
            if metric_names([target["expr"]]) & model_metrics:
                assert 'model=~"$model"' in target["expr"], target["expr"]


def test_the_dashboard_shows_every_declared_metric():
    used = used_names()["dashboard"]
    families = {name.removesuffix("_total") for name in used}
    families |= {re.sub(r"_(bucket|sum|count)$", "", name) for name in used}
    missing = {f.name for f in REGISTRY.collect() if f.name.startswith("imagegate_")} - families
    assert not missing, f"metrics of app/metrics.py no dashboard panel shows: {sorted(missing)}"


# -- both against app/metrics.py -----------------------------------------------------------------------------------


@pytest.mark.parametrize("user", ["dashboard", "alerts"])
def test_every_metric_used_is_declared(user):
    used = used_names()[user]
    assert used
    unknown = used - declared_names()
    assert not unknown, f"the {user} use metrics app/metrics.py does not declare: {sorted(unknown)}"


def test_the_name_check_would_catch_a_wrong_suffix():
    declared = declared_names()
    assert "imagegate_http_requests_total" in declared and "imagegate_http_requests" not in declared
    assert "imagegate_queue_depth" in declared and "imagegate_queue_depth_total" not in declared
    assert "imagegate_batch_size_bucket" in declared and "imagegate_batch_size" not in declared
