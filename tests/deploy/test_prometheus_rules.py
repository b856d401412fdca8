"""The alert rules file: its structure, that it names only metrics the workers export, and
promtool's own check and unit tests (tests/deploy/prometheus_rules_test.yaml); promtool
comes with the Debian package `prometheus`, which scripts/system-deps.sh installs."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

import streams.metrics  # noqa: F401  registers the workers' metrics

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "k8s" / "prometheus" / "llmflow-rules.yaml"
RULES_TEST = Path(__file__).with_name("prometheus_rules_test.yaml")
SEVERITIES = {"info", "warning", "critical"}
SUFFIXES = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    assert groups and all(g["name"] and g["rules"] for g in groups)
    return [rule for group in groups for rule in group["rules"]]


def exported_series() -> set[str]:
    """Every series name a worker can export, whether or not it has a sample yet."""
    return {
        family.name + suffix
        for family in REGISTRY.collect()
        for suffix in SUFFIXES.get(family.type, [""])
    }


def test_every_alert_has_an_expression_a_duration_a_severity_and_a_summary() -> None:
    for rule in rules():
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"])
        assert rule["labels"]["severity"] in SEVERITIES
        assert {"summary", "description"} <= set(rule["annotations"])


def test_alerts_name_only_metrics_the_workers_export() -> None:
    exported = exported_series()
    for rule in rules():
        for name in re.findall(r"\bllmflow_\w+", rule["expr"]):
            assert name in exported, f"{rule['alert']} reads {name}, which no worker exports"


@pytest.mark.parametrize(
    "command", [["check", "rules", str(RULES)], ["test", "rules", str(RULES_TEST)]]
)
def test_promtool_accepts_the_rules(command: list[str]) -> None:
    result = subprocess.run(["promtool", *command], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test_that_fires_it_and_one_where_it_stays_quiet() -> None:
    tests = yaml.safe_load(RULES_TEST.read_text())["tests"]
    checks = [check for test in tests for check in test["alert_rule_test"]]
    for rule in rules():
        mine = [check for check in checks if check["alertname"] == rule["alert"]]
        assert any(check.get("exp_alerts") for check in mine), f"{rule['alert']} never fires"
        assert any(not check.get("exp_alerts") for check in mine), f"{rule['alert']} never quiet"
