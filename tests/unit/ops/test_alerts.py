"""The Prometheus alert rules and the Grafana dashboard check out and name only real metrics.

``promtool check rules`` and ``promtool test rules`` (Debian's ``prometheus`` package, installed
by scripts/system-deps.sh) validate the rules and their behaviour; every metric an expression
names must be exported, under that exact sample name, by one of the three services' /metrics.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.dockerbuild import ROOT
from tools.docs import APP_FACTORIES

RULES = ROOT / "docs/prometheus/alerts.yml"
RULE_TESTS = ROOT / "docs/prometheus/alerts.test.yml"
DASHBOARD = ROOT / "docs/grafana/hostiso.json"
# Prometheus' own series, not the services'.
BUILTIN = {"up"}
SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gauge": ("",),
    "summary": ("_sum", "_count", ""),
}


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (Debian: prometheus; scripts/system-deps.sh)")
    return found


def test_promtool_accepts_the_rules() -> None:
    result = subprocess.run(
        [_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_of_the_alerts_pass() -> None:
    result = subprocess.run(
        [_promtool(), "test", "rules", str(RULE_TESTS)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {
        case["alertname"]
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    }
    assert len(tested) >= 2, tested


def _rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def test_the_alerts_cover_lag_dlq_failures_pending_outbox_and_readiness() -> None:
    rules = {rule["alert"]: rule for rule in _rules()}
    wanted = {
        "HostisoConsumerLagHigh": "hostiso_consumer_lag",
        "HostisoDeadLettersGrowing": "hostiso_dlq_records_total",
        "HostisoPoliciesFailed": 'hostiso_enforcer_status_reports_total{status="failed"}',
        "HostisoPoliciesPendingTooLong": 'state="pending"',
        "HostisoRelayOutboxBacklog": "hostiso_settings_outbox_depth",
        "HostisoNotReady": 'route="/ready",status="503"',
    }
    for alert, fragment in wanted.items():
        assert fragment in rules[alert]["expr"], alert
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"], name


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    exprs = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        exprs.extend(target["expr"] for target in panel["targets"])
    return exprs


async def _exported_sample_names() -> set[str]:
    names: set[str] = set()
    for service, factory in APP_FACTORIES.items():
        app = factory()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.get("/metrics")
        assert response.status_code == 200, service
        for family in text_string_to_metric_families(response.text):
            names |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ("",))}
    return names


async def test_every_metric_the_rules_and_the_dashboard_name_is_exported() -> None:
    exported = await _exported_sample_names()
    exprs = [rule["expr"] for rule in _rules()] + _dashboard_exprs()
    named = {m for expr in exprs for m in re.findall(r"\b(?:hostiso_[a-z0-9_]+|up)\b", expr)}
    assert len(named) > 15
    missing = sorted(named - exported - BUILTIN)
    assert not missing, (
        f"named in docs/prometheus or docs/grafana but exported by no service: {missing}"
    )


async def _label_names() -> dict[str, set[str]]:
    """Sample name -> the label names the services give it (read from their registries)."""
    labels: dict[str, set[str]] = {}
    for factory in APP_FACTORIES.values():
        app = factory()
        # The HTTP metrics are registered when the middleware stack is built (first request).
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await client.get("/health")).status_code == 200
        registry = app.state.runtime.registry
        for collector, names in registry._collector_to_names.items():
            own = getattr(collector, "_labelnames", None)
            if own is not None:  # a Counter, Gauge, Histogram of prometheus_client
                for name in names:
                    labels.setdefault(name, set()).update(own)
                continue
            for family in collector.collect():  # a custom collector's families
                found = set(getattr(family, "_labelnames", ()))
                found |= {k for sample in family.samples for k in sample.labels}
                for suffix in SUFFIXES.get(family.type, ("",)):
                    labels.setdefault(family.name + suffix, set()).update(found)
    return labels


async def test_every_label_the_rules_and_the_dashboard_use_is_one_the_metric_has() -> None:
    labels = await _label_names()
    scraped = {"job", "instance", "le"}  # added by Prometheus (le: histogram buckets)
    exprs = [rule["expr"] for rule in _rules()] + _dashboard_exprs()
    checked = 0
    for expr in exprs:
        metrics = set(re.findall(r"\bhostiso_[a-z0-9_]+", expr))
        allowed = scraped.union(*(labels.get(m, set()) for m in metrics))
        used = set(re.findall(r"([a-z_]+)\s*(?:=~|!=|!~|=)\s*\"", expr))
        for group in re.findall(r"\b(?:by|on)\s*\(([^)]*)\)", expr):
            used |= {label.strip() for label in group.split(",") if label.strip()}
        unknown = used - allowed
        assert not unknown, f"{expr!r}: labels {sorted(unknown)} are on none of {sorted(metrics)}"
        checked += bool(used - scraped)
    assert checked > 10
