"""The Grafana dashboard ConfigMap and the PrometheusRule: rendered only when asked, the dashboard byte for
byte, the alert rules checked and unit-tested with promtool.

rules/llm-gateway.rules.yaml is templates/_alerts.tpl rendered with the default values; after changing
either, regenerate it with `LLM_GATEWAY_UPDATE_RULES=1 .venv/bin/python -m pytest tests/chart/test_chart_monitoring.py`.
The live side (every dashboard query and every rule against a real Prometheus scraping a real gateway) is
tests/test_dashboards.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.conftest import ALL_FEATURES, CHART_DIR, EXAMPLES, NAMESPACE, Helm, Rendered

GATEWAY = "my-llm-llm-gateway"
DASHBOARD_FILE = CHART_DIR / "dashboards" / "llm-gateway.json"
RULES_FILE = CHART_DIR / "rules" / "llm-gateway.rules.yaml"
RULES_TEST = Path(__file__).resolve().parent / "llm-gateway-alerts.test.yaml"
ALERTS = {
    "LLMGatewayHighErrorRatio",
    "LLMGatewayNoReadyEngine",
    "LLMGatewaySlowTimeToFirstByte",
    "LLMGatewayRestarted",
    "LLMGatewayConfigReloadFailed",
}
RULES_HEADER = """\
# The llm-gateway alert rules with the chart's default thresholds, for a Prometheus without the Prometheus
# Operator (list this file under rule_files). With the Operator, set prometheusRule.enabled instead.
# Generated from templates/_alerts.tpl, do not edit: after changing it or the defaults in values.yaml, run
#   LLM_GATEWAY_UPDATE_RULES=1 .venv/bin/python -m pytest tests/chart/test_chart_monitoring.py
# Unit tests: promtool test rules tests/chart/llm-gateway-alerts.test.yaml
"""


def promtool(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is not installed: run ci/install-system-deps.sh (ci/test.sh does)")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60, check=False)


def rule_file_text(helm: Helm, values: dict[str, Any]) -> str:
    """The PrometheusRule's spec as helm renders it (comments kept), as a plain rule file."""
    args = helm.template_args(values=values)
    rendered = helm.run(*args, "--show-only", "templates/prometheusrule.yaml")
    _, spec = rendered.split("\nspec:\n", 1)
    return RULES_HEADER + textwrap.dedent(spec).rstrip("\n") + "\n"


def alert_names(rendered: Rendered) -> set[str]:
    (rule,) = rendered.of_kind("PrometheusRule")
    return {r["alert"] for group in rule["spec"]["groups"] for r in group["rules"]}


def dashboards(rendered: Rendered) -> list[dict[str, Any]]:
    return [c for c in rendered.of_kind("ConfigMap") if "llm-gateway.json" in c.get("data", {})]


# --- Off by default, on when asked ------------------------------------------------------------------


@pytest.mark.parametrize("value_set", ["defaults", *EXAMPLES])
def test_dashboard_and_rules_are_off_by_default(renders: dict[str, Rendered], value_set: str) -> None:
    assert not dashboards(renders[value_set])
    assert not renders[value_set].of_kind("PrometheusRule")


def test_dashboard_configmap_is_the_file_for_the_sidecar(helm: Helm) -> None:
    (configmap,) = dashboards(helm.template(values={"grafanaDashboard": {"enabled": True}}))
    assert configmap["metadata"]["name"] == f"{GATEWAY}-dashboard"
    assert configmap["metadata"]["namespace"] == NAMESPACE
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"  # kube-prometheus-stack's sidecar
    assert "annotations" not in configmap["metadata"]
    text = configmap["data"]["llm-gateway.json"]
    assert text == DASHBOARD_FILE.read_text()  # byte for byte, not just the same JSON
    assert json.loads(text)["uid"] == "llm-gateway"


def test_dashboard_is_well_formed() -> None:
    """What Grafana needs to show every panel on any Prometheus: ids, layout, the data-source variable."""
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    assert DASHBOARD_FILE.read_text().endswith("}\n")
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert set(variables) == {"datasource", "model", "engine"}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("model", "engine"):
        assert variables[name]["includeAll"] and variables[name]["multi"] and variables[name]["allValue"] == ".*"
    items = dashboard["panels"]
    assert len({item["id"] for item in items}) == len(items)
    uses_variable = {"type": "prometheus", "uid": "${datasource}"}  # never a data source of one Grafana
    for item in items:
        position = item["gridPos"]
        assert position["x"] + position["w"] <= 24, item["title"]
        if item["type"] == "row":
            continue
        assert item["datasource"] == uses_variable and item["description"], item["title"]
        refs = [target["refId"] for target in item["targets"]]
        assert len(set(refs)) == len(refs) and refs, item["title"]
        for target in item["targets"]:
            assert target["datasource"] == uses_variable and target["legendFormat"], item["title"]


def test_dashboard_label_namespace_and_folder_are_values(renders: dict[str, Rendered]) -> None:
    (configmap,) = dashboards(renders["all-features"])
    metadata = configmap["metadata"]
    assert metadata["labels"]["example.com/grafana-dashboard"] == "llm"
    assert "grafana_dashboard" not in metadata["labels"]
    assert metadata["namespace"] == "monitoring"  # Grafana's, for a sidecar that reads only its own
    assert metadata["annotations"] == {"grafana_folder": "LLM"}
    assert configmap["data"]["llm-gateway.json"] == DASHBOARD_FILE.read_text()


def test_rule_renders_every_alert_with_the_defaults(helm: Helm) -> None:
    rendered = helm.template(values={"prometheusRule": {"enabled": True}})
    (rule,) = rendered.of_kind("PrometheusRule")
    assert rule["metadata"]["name"] == GATEWAY and rule["metadata"]["namespace"] == NAMESPACE
    assert alert_names(rendered) == ALERTS


def test_rule_thresholds_and_labels_are_values(renders: dict[str, Rendered]) -> None:
    rendered = renders["all-features"]
    (rule,) = rendered.of_kind("PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert alert_names(rendered) == ALERTS - {"LLMGatewayRestarted"}  # gatewayRestarts.enabled: false
    rules = {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}
    for alert in rules.values():
        assert alert["labels"]["team"] == "ml-platform"
    errors = rules["LLMGatewayHighErrorRatio"]
    assert errors["expr"].endswith("> 0.02") and "[10m]" in errors["expr"] and "[5m]" not in errors["expr"]
    assert errors["for"] == "15m" and errors["labels"]["severity"] == "page"
    assert "over the last 10m" in errors["annotations"]["description"]
    assert rules["LLMGatewayNoReadyEngine"]["for"] == "5m"
    ttfb = rules["LLMGatewaySlowTimeToFirstByte"]
    assert ttfb["expr"].endswith("> 2.5") and "[10m]" in ttfb["expr"]
    assert "(threshold 2.5 s)" in ttfb["annotations"]["description"]


@pytest.mark.parametrize(
    "values, where",
    [
        ({"prometheusRule": {"errorRatio": {"threshold": 5}}}, "threshold"),  # a share, not a percentage
        ({"prometheusRule": {"timeToFirstByte": {"window": "5 minutes"}}}, "window"),
        ({"prometheusRule": {"noReadyEngine": {"for": 120}}}, "for"),
        ({"prometheusRule": {"gatewayRestarts": {"threshold": 0}}}, "threshold"),
        ({"prometheusRule": {"errorRatio": {"treshold": 0.1}}}, "treshold"),
        ({"grafanaDashboard": {"labelValue": 1}}, "labelValue"),  # label values are strings: "1"
        ({"grafanaDashboard": {"label": "not a label"}}, "label"),
    ],
)
def test_schema_refuses_nonsense(helm: Helm, values: dict[str, Any], where: str) -> None:
    assert where in helm.template_error(values=values)


# --- The plain rule file and promtool ------------------------------------------------------------------


def test_plain_rule_file_is_the_default_render(helm: Helm) -> None:
    expected = rule_file_text(helm, {"prometheusRule": {"enabled": True}})
    if os.environ.get("LLM_GATEWAY_UPDATE_RULES"):
        RULES_FILE.parent.mkdir(exist_ok=True)
        RULES_FILE.write_text(expected)
    assert RULES_FILE.read_text() == expected, (
        f"{RULES_FILE} is stale: regenerate it with LLM_GATEWAY_UPDATE_RULES=1 (see this module's docstring)"
    )


@pytest.mark.parametrize("value_set", ["defaults", "all-features"])
def test_promtool_checks_the_rendered_rules(helm: Helm, tmp_path: Path, value_set: str) -> None:
    values = {"prometheusRule": {"enabled": True}} if value_set == "defaults" else None
    args = helm.template_args(None if values else ALL_FEATURES, values=values)
    rendered = helm.run(*args, "--show-only", "templates/prometheusrule.yaml")
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(yaml.safe_load(rendered)["spec"]))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_promtool_unit_tests_prove_each_alert() -> None:
    result = promtool("test", "rules", str(RULES_TEST))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_unit_tests_cover_every_alert_firing_and_silent() -> None:
    """Each alert has a case where it fires and one where it must not (healthy series or not yet `for`)."""
    tests = yaml.safe_load(RULES_TEST.read_text())
    assert tests["rule_files"] == [os.path.relpath(RULES_FILE, RULES_TEST.parent)]
    fires, silent = set(), set()
    for group in tests["tests"]:
        for case in group.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else silent).add(case["alertname"])
    assert fires == ALERTS and silent == ALERTS
