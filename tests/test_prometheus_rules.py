"""Prometheus rules, their unit tests, the scrape config and every PromQL query we ship.

deploy/prometheus/rules.yml is the one source of truth; k8s/base/prometheusrule.yaml must
carry the same groups (deploy/prometheus/sync_k8s_rules.py writes it). PromQL in the
Grafana dashboard, the KEDA trigger and the prometheus-adapter config is syntax-checked by
promtool too, so a typo fails here and not on a dashboard at 3 a.m.

Needs promtool: `apt-get install prometheus` (Debian/Ubuntu; the binary is /usr/bin/promtool)
or a release tarball from https://github.com/prometheus/prometheus/releases.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS / "rules.yml"
RULES_TEST = PROMETHEUS / "rules_test.yml"
K8S_RULE = ROOT / "k8s" / "base" / "prometheusrule.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboard.json"
SCALED_OBJECT = ROOT / "k8s" / "base" / "worker-scaledobject.yaml"
ADAPTER_VALUES = ROOT / "k8s" / "alternatives" / "hpa" / "prometheus-adapter-values.yaml"

REQUIRED_ALERTS = {
    "CaptionerBacklogGrowing",
    "CaptionerOldestJobTooOld",
    "CaptionerFailureRatioHigh",
    "CaptionerWorkerDown",
    "CaptionerNoWorkerWhileWorkWaits",
    "CaptionerDeadLetters",
    "CaptionerBrokerCanLoseJobs",
}
# The metrics contract (worker :9808, exporter :9809); anything else a query names must be a
# recording rule of ours, a Prometheus built-in, or kube-state-metrics.
CONTRACT_METRICS = {
    "captioner_images_total", "captioner_image_errors_total", "captioner_jobs_total",
    "captioner_batch_size_images", "captioner_stage_seconds", "captioner_end_to_end_seconds",
    "captioner_model_loaded", "captioner_model_warmed", "captioner_gpu_memory_bytes",
    "captioner_build_info",
    "captioner_queue_messages", "captioner_queue_images", "captioner_queue_oldest_age_seconds",
    "captioner_inflight_messages", "captioner_inflight_images", "captioner_dead_letter_messages",
    "captioner_broker_evicts", "captioner_broker_persists",
}
OTHER_METRICS = {"up", "kube_horizontalpodautoscaler_status_desired_replicas",
                 "kube_deployment_status_replicas"}
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$namespace": ".*",
                     "$keda_finished_threshold": "8", "$keda_threshold": "960"}


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool not found. Install it: `apt-get install prometheus` on "
                    "Debian/Ubuntu (or a Prometheus release tarball), then re-run.")
    return subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, check=False)


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"{result.args}\n{result.stdout}\n{result.stderr}"


def rule_groups() -> list[dict]:
    return yaml.safe_load(RULES.read_text())["groups"]


def all_rules() -> list[dict]:
    return [rule for group in rule_groups() for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    return [target["expr"] for panel in panels for target in panel["targets"]]


def grafana_to_promql(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (identifiers that are not functions, keywords,
    label names or strings)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)          # strings
    expr = re.sub(r"\{[^}]*\}", "{}", expr)                  # label matchers
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)                   # ranges
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr))
    functions = set(re.findall(r"([a-zA-Z_]+)\s*\(", expr))
    keywords = {"sum", "max", "min", "avg", "count", "and", "or", "unless", "offset", "bool",
                "vector", "humanizeDuration"}
    names = words - functions - keywords
    return {re.sub(r"_(bucket|sum|count)$", "", n) if n.startswith("captioner_") else n
            for n in names}


# --- promtool --------------------------------------------------------------------------------


def test_promtool_check_rules() -> None:
    assert_ok(promtool("check", "rules", str(RULES)))


def test_promtool_rule_unit_tests_pass() -> None:
    assert_ok(promtool("test", "rules", str(RULES_TEST)))


def test_promtool_check_scrape_config() -> None:
    # Run from its folder: rule_files are relative to it, as in the compose container.
    assert_ok(promtool("check", "config", "prometheus.yml", cwd=PROMETHEUS))


def test_every_query_we_ship_parses(tmp_path: Path) -> None:
    """Dashboard panels, the KEDA trigger and the adapter's query, checked as rules."""
    exprs = [grafana_to_promql(e) for e in dashboard_exprs()]
    scaled_object = yaml.safe_load(SCALED_OBJECT.read_text())
    exprs += [trigger["metadata"]["query"] for trigger in scaled_object["spec"]["triggers"]]
    for adapter in yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["external"]:
        exprs.append(adapter["seriesQuery"])
        series = adapter["seriesQuery"].split("{")[0]
        exprs.append(adapter["metricsQuery"].replace("<<.Series>>", series)
                     .replace("<<.LabelMatchers>>", 'namespace="captioner"'))
    rules = [{"record": f"check:query_{i}", "expr": e} for i, e in enumerate(exprs)]
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "queries", "rules": rules}]}))
    assert_ok(promtool("check", "rules", str(path)))


# --- one source of truth ----------------------------------------------------------------------


def test_k8s_prometheusrule_carries_the_same_groups() -> None:
    resource = yaml.safe_load(K8S_RULE.read_text())
    assert resource["kind"] == "PrometheusRule"
    assert resource["spec"]["groups"] == rule_groups(), (
        "k8s/base/prometheusrule.yaml differs from deploy/prometheus/rules.yml: run "
        "python deploy/prometheus/sync_k8s_rules.py")
    result = subprocess.run(
        [sys.executable, str(PROMETHEUS / "sync_k8s_rules.py"), "--check"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- the rules themselves ---------------------------------------------------------------------


def test_required_alerts_exist_and_are_labelled() -> None:
    alerts = {rule["alert"]: rule for rule in all_rules() if "alert" in rule}
    assert set(alerts) >= REQUIRED_ALERTS
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        assert "for" in rule, f"{name} would fire on a single bad sample"


def test_every_alert_is_tested_firing_and_silent() -> None:
    tests = yaml.safe_load(RULES_TEST.read_text())["tests"]
    firing, silent = set(), set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    alerts = {rule["alert"] for rule in all_rules() if "alert" in rule}
    assert alerts <= firing, f"never shown firing: {sorted(alerts - firing)}"
    assert alerts <= silent, f"never shown silent: {sorted(alerts - silent)}"


def test_every_recording_rule_value_is_tested() -> None:
    tests = yaml.safe_load(RULES_TEST.read_text())["tests"]
    checked = " ".join(check["expr"] for case in tests
                       for check in case.get("promql_expr_test", []))
    records = {rule["record"] for rule in all_rules() if "record" in rule}
    untested = {r for r in records if r not in checked} - {"captioner:end_to_end_seconds:p99_5m"}
    assert not untested, f"recording rules without a value test: {sorted(untested)}"


def test_backlog_signal_counts_waiting_and_inflight_images_of_work_queues() -> None:
    (rule,) = [r for r in all_rules() if r.get("record") == "captioner:images_backlog"]
    assert metric_names(rule["expr"]) == {"captioner_queue_images", "captioner_inflight_images"}
    assert "captions[.](realtime|bulk|kind[.].+)" in rule["expr"]


def test_rules_and_dashboard_use_only_known_metrics() -> None:
    records = {rule["record"] for rule in all_rules() if "record" in rule}
    known = CONTRACT_METRICS | OTHER_METRICS | records
    for expr in [rule["expr"] for rule in all_rules()] + dashboard_exprs():
        unknown = metric_names(grafana_to_promql(expr)) - known
        assert not unknown, f"unknown metrics {unknown} in {expr}"


# --- the dashboard ----------------------------------------------------------------------------


def test_dashboard_shows_what_an_operator_needs() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    text = " ".join(dashboard_exprs())
    for metric in ("captioner_images_total",            # throughput
                   "captioner_end_to_end_seconds_bucket",  # latency percentiles
                   "captioner_queue_images",              # queue depth
                   'up{job="captioner-worker"',           # replicas
                   "captioner_image_errors_total",        # failures
                   "captioner_gpu_memory_bytes"):         # GPU memory
        assert metric in text, metric
    assert "histogram_quantile(0.99" in text
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_thresholds_match_the_scaledobject() -> None:
    variables = {v["name"]: v for v in json.loads(DASHBOARD.read_text())["templating"]["list"]}
    scaled_object = yaml.safe_load(SCALED_OBJECT.read_text())
    thresholds = {t["name"]: t["metadata"]["threshold"] for t in scaled_object["spec"]["triggers"]}
    for variable, trigger in (("keda_threshold", "images-backlog"),
                              ("keda_finished_threshold", "images-finished")):
        assert float(variables[variable]["query"]) == float(thresholds[trigger])
        assert GRAFANA_VARIABLES[f"${variable}"] == variables[variable]["query"]
