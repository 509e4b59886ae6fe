"""`helm upgrade` that adds an engine must not restart anything already running.

Kubernetes rolls a Deployment exactly when its pod template changes, so "not restarted" means the
rendered pod template is identical (compared parsed: helm's whitespace differs between versions).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.conftest import CHART_DIR, VALUE_SETS, Helm, Rendered

GATEWAY = "my-llm-llm-gateway"


def engine_documents(helm: Helm, values: dict[str, Any]) -> dict[str, str]:
    """Engine name -> the exact text helm renders for its Deployment (same helm, same chart: bytes compare)."""
    output = helm.run(*helm.template_args(values=values))
    documents = {}
    for text in output.split("\n---\n"):
        if "# Source: llm-gateway/templates/engine-deployment.yaml" in text:
            documents[yaml.safe_load(text)["metadata"]["name"]] = text
    return documents


def pod_templates(rendered: Rendered) -> dict[str, str]:
    """Deployment name -> its pod template, canonically serialized."""
    return {
        d["metadata"]["name"]: json.dumps(d["spec"]["template"], sort_keys=True) for d in rendered.of_kind("Deployment")
    }


@pytest.fixture(scope="module")
def example2_values() -> dict[str, Any]:
    return yaml.safe_load(VALUE_SETS["example2"].read_text())


def test_adding_an_engine_leaves_running_pods_alone(helm: Helm, example2_values: dict[str, Any]) -> None:
    before_values = copy.deepcopy(example2_values)
    before_values["engines"] = [e for e in before_values["engines"] if e["engine"] != "sglang"]
    before = helm.template(values=before_values)
    after = helm.template(values=example2_values)

    assert {r["name"] for r in before.routing["engines"]} == {"vllm-llama-32-1b"}
    assert {r["name"] for r in after.routing["engines"]} == {"vllm-llama-32-1b", "sglang-llama-32-1b"}
    old, new = pod_templates(before), pod_templates(after)
    assert set(new) - set(old) == {"sglang-llama-32-1b"}
    assert new["vllm-llama-32-1b"] == old["vllm-llama-32-1b"]
    # The gateway reloads the new routing map from its volume: it is not restarted either.
    assert new[GATEWAY] == old[GATEWAY]
    # ... and the existing engine's Service is untouched.
    assert before.get("Service", "vllm-llama-32-1b")["spec"] == after.get("Service", "vllm-llama-32-1b")["spec"]


def test_adding_an_engine_keeps_engine_deployments_byte_identical(helm: Helm, example2_values: dict[str, Any]) -> None:
    """With discovery on (the default) the new engine only adds a discovery line to the routing map: the
    existing engine's Deployment is the same text, byte for byte."""
    before_values = copy.deepcopy(example2_values)
    before_values["engines"] = before_values["engines"][:1]
    before, after = engine_documents(helm, before_values), engine_documents(helm, example2_values)
    assert set(after) == {"vllm-llama-32-1b", "sglang-llama-32-1b"}
    assert after["vllm-llama-32-1b"] == before["vllm-llama-32-1b"]


def test_discovery_changes_only_the_map_and_the_gateway(helm: Helm, example2_values: dict[str, Any]) -> None:
    """Turning discovery on or off touches the routing ConfigMap, the gateway's pods and the RBAC objects;
    never an engine's Deployment."""
    off_values = {**example2_values, "gateway": {"discovery": {"enabled": False}}}
    on, off = helm.template(values=example2_values), helm.template(values=off_values)
    assert engine_documents(helm, example2_values) == engine_documents(helm, off_values)
    assert pod_templates(on)[GATEWAY] != pod_templates(off)[GATEWAY]
    assert on.routing_text != off.routing_text
    changed = {
        (doc["kind"], doc["metadata"]["name"])
        for doc in on.docs + off.docs
        if doc not in on.docs or doc not in off.docs
    }
    assert changed == {
        ("ConfigMap", f"{GATEWAY}-routes"), ("Deployment", GATEWAY),
        ("Role", f"{GATEWAY}-discovery"), ("RoleBinding", f"{GATEWAY}-discovery"),
    }  # fmt: skip


def test_fallback_concurrency_and_logging_leave_engines_alone(helm: Helm, example2_values: dict[str, Any]) -> None:
    changed = copy.deepcopy(example2_values)
    changed["engines"][1]["fallback"] = changed["engines"][0]["name"]
    changed["engines"][0]["concurrency"] = {"limit": 4}
    changed["gateway"] = {"log": {"format": "text", "accessLog": False}, "terminationGracePeriodSeconds": 300,
                          "settings": {"balancing": "round_robin", "retries": {"max_attempts": 2}}}  # fmt: skip
    assert engine_documents(helm, changed) == engine_documents(helm, example2_values)


def test_metrics_port_and_client_limits_leave_engines_alone(helm: Helm, example2_values: dict[str, Any]) -> None:
    """The metrics port, who may reach it, and the gateway's client limits are the gateway's alone."""
    changed = {
        **example2_values,
        "gateway": {"metricsPort": 9464, "settings": {"client_limits": {"max_headers": 50, "max_body_memory": 2**28}}},
        "networkPolicy": {"enabled": True, "gatewayIngressFrom": [{"namespaceSelector": {}}], "metricsFrom": []},
    }
    assert engine_documents(helm, changed) == engine_documents(helm, example2_values)
    old, new = pod_templates(helm.template(values=example2_values)), pod_templates(helm.template(values=changed))
    assert new[GATEWAY] != old[GATEWAY]  # --metrics-port 9464


def test_rollOnConfigChange_rolls_only_the_gateway(helm: Helm, example2_values: dict[str, Any]) -> None:
    before_values = copy.deepcopy(example2_values)
    before_values["engines"] = before_values["engines"][:1]
    before_values["gateway"] = {"rollOnConfigChange": True}
    after_values = dict(example2_values, gateway={"rollOnConfigChange": True})
    old, new = pod_templates(helm.template(values=before_values)), pod_templates(helm.template(values=after_values))
    assert new["vllm-llama-32-1b"] == old["vllm-llama-32-1b"]
    assert new[GATEWAY] != old[GATEWAY]


def test_gateway_settings_change_leaves_engines_alone(helm: Helm, example2_values: dict[str, Any]) -> None:
    changed = dict(example2_values, gateway={"settings": {"timeouts": {"idle": 30}}, "replicas": 4})
    old, new = pod_templates(helm.template(values=example2_values)), pod_templates(helm.template(values=changed))
    for name in ("vllm-llama-32-1b", "sglang-llama-32-1b"):
        assert new[name] == old[name]


def test_new_chart_version_leaves_engines_alone(helm: Helm, tmp_path: Path) -> None:
    """A chart release that does not change the presets does not restart the engines."""
    bumped = tmp_path / "llm-gateway"
    shutil.copytree(CHART_DIR, bumped)
    chart = yaml.safe_load((bumped / "Chart.yaml").read_text())
    chart["version"] = "9.9.9"
    (bumped / "Chart.yaml").write_text(yaml.safe_dump(chart))
    args = ["template", "my-llm", "--namespace", "llm", "-f", str(VALUE_SETS["example2"])]
    old = helm.template(VALUE_SETS["example2"])
    new = Rendered([d for d in yaml.safe_load_all(helm.run(*args[:2], str(bumped), *args[2:])) if d])
    assert new.get("Deployment", "vllm-llama-32-1b")["metadata"]["labels"]["helm.sh/chart"] == "llm-gateway-9.9.9"
    for name in ("vllm-llama-32-1b", "sglang-llama-32-1b"):
        assert pod_templates(new)[name] == pod_templates(old)[name]


SECURITY = {
    "auth": {"enabled": True, "keys": [{"name": "team-a", "sha256": "a" * 64, "requests_per_minute": 60}]},
    "redis": {"deploy": True, "password": "p"},
    "networkPolicy": {"enabled": True, "gatewayIngressFrom": [{"namespaceSelector": {}}]},
}


def test_auth_and_redis_restart_only_the_gateway(helm: Helm, example2_values: dict[str, Any]) -> None:
    """API keys, Redis and the gateway's NetworkPolicy touch the gateway's pods, never the engines'."""
    old = pod_templates(helm.template(values=example2_values))
    new = pod_templates(helm.template(values={**example2_values, **SECURITY}))
    for name in ("vllm-llama-32-1b", "sglang-llama-32-1b"):
        assert new[name] == old[name]
    assert new[GATEWAY] != old[GATEWAY]
    assert set(new) - set(old) == {f"{GATEWAY}-redis"}


def test_keys_and_engine_key_change_in_place(helm: Helm, example2_values: dict[str, Any]) -> None:
    """A new, rotated or revoked key changes a Secret, not a pod: the gateway reloads the mounted file.

    The engine key's value too: the engines read it at start, so rotating it needs a restart of the
    engines (README), never an accidental one."""
    before = {**example2_values, **SECURITY, "engineApiKey": {"value": "old"}}
    after = copy.deepcopy(before)
    after["auth"]["keys"].append({"name": "team-b", "sha256": "b" * 64, "models": ["meta-llama/Llama-3.2-1B-Instruct"]})
    after["auth"]["keys"][0]["requests_per_minute"] = 120
    after["engineApiKey"]["value"] = "new"
    old_render, new_render = helm.template(values=before), helm.template(values=after)
    assert pod_templates(new_render) == pod_templates(old_render)
    assert new_render.get("Secret", f"{GATEWAY}-api-keys") != old_render.get("Secret", f"{GATEWAY}-api-keys")


REMOTE = {"name": "remote-mistral", "url": "http://mistral.inference:8000", "ownedBy": "vllm", "model": "mistral"}
ROUTES = ("ConfigMap", f"{GATEWAY}-routes")
TEST_POD = ("Pod", f"{GATEWAY}-test-models")  # a hook run by `helm test`, never a running pod
INGRESS = ("Ingress", GATEWAY)


def _engines(values: dict[str, Any], **changes: dict[str, Any]) -> dict[str, Any]:
    """values with engines[i] updated by changes["e<i>"]."""
    changed = copy.deepcopy(values)
    for at, fields in changes.items():
        changed["engines"][int(at[1:])].update(fields)
    return changed


# The changes users make every day to routing: (change on example2, objects allowed to change besides the map)
ROUTING_ONLY: dict[str, tuple[Any, set[tuple[str, str]]]] = {
    "alias": (lambda v: _engines(v, e0={"aliases": ["llama-1b"]}), set()),
    "default moved": (lambda v: _engines(v, e0={"default": False}, e1={"default": True}), set()),
    "headers": (lambda v: _engines(v, e1={"headers": {"X-Tenant": "a"}}), set()),
    "engine timeouts": (lambda v: _engines(v, e0={"timeouts": {"first_byte": 900, "idle": 30}}), set()),
    "engine balancing": (lambda v: _engines(v, e0={"balancing": "cache_aware"}), set()),
    "health path": (lambda v: _engines(v, e1={"healthPath": "/health_generate"}), set()),
    "concurrency": (lambda v: _engines(v, e0={"concurrency": {"limit": 8, "queue": 0}}), set()),
    "fallback": (lambda v: _engines(v, e1={"fallback": "vllm-llama-32-1b"}), set()),
    "engine elsewhere added": (lambda v: {**v, "engines": [*v["engines"], REMOTE]}, {TEST_POD}),
    "engine elsewhere with adapters": (
        lambda v: {**v, "engines": [*v["engines"], {**REMOTE, "lora": {"adapters": [{"name": "sql"}]}, "api": "vllm"}]},
        {TEST_POD},
    ),
    "settings": (
        lambda v: {
            **v,
            "gateway": {
                "settings": {
                    "list_aliases": False,
                    "models_cache_ttl": 10,
                    "timeouts": {"idle": 30, "first_byte": 120},
                    "retries": {"max_attempts": 2},
                    "health": {"interval": 2},
                    "affinity": {"header": "X-Session"},
                    "balancing": "round_robin",
                    "cache_aware": {"min_match": 0.5},
                    "engine_metrics": {"scrape": "all"},
                    "limits": {"requests_per_minute": 60},
                    "discover_adapters": True,
                    "ready_requires_engine": True,
                    "client_limits": {"max_headers": 50},
                }
            },
        },
        set(),
    ),  # fmt: skip
    # nginx's body limit follows the gateway's: the Ingress changes too, still no pod
    "body limit": (
        lambda v: {
            **v,
            "gateway": {"settings": {"max_body_bytes": 2**25, "client_limits": {"max_body_memory": 2**28}}},
        },
        {INGRESS},
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", ROUTING_ONLY)
def test_routing_changes_touch_only_the_routing_map(helm: Helm, example2_values: dict[str, Any], case: str) -> None:
    """What users change most (aliases, the default, headers, timeouts, balancing, health checks, limits,
    fallbacks, engines elsewhere, gateway.settings) reaches the gateways through the ConfigMap they reload:
    no pod template changes, the engines' and the gateway's alike (rollOnConfigChange is off)."""
    change, also = ROUTING_ONLY[case]
    before, after = helm.template(values=example2_values), helm.template(values=change(example2_values))
    changed = {
        (doc["kind"], doc["metadata"]["name"]) for doc in before.docs + after.docs if doc not in before.docs or doc not in after.docs
    }  # fmt: skip
    assert ROUTES in changed, "the change did not reach the routing map"
    assert changed - {ROUTES} <= also, f"{case}: more than the routing map changed: {sorted(changed - {ROUTES})}"
    assert pod_templates(after) == pod_templates(before)
