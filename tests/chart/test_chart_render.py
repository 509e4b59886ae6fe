"""What the chart renders: lint, Kubernetes schemas, the routing map, the tutorial's topology, hardening."""

from __future__ import annotations

import json
import re
import tomllib
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

import gateway_app
from gateway_app.cli import _build_parser as gateway_cli
from gateway_app.config import ClientLimits, EngineSpec, RoutingMap
from tests.chart.conftest import (
    APP_VERSION,
    CHART_DIR,
    EXAMPLES,
    GATEWAY_IMAGE,
    NAMESPACE,
    RELEASE,
    REPO_ROOT,
    VALUE_SETS,
    Helm,
    HelmError,
    Rendered,
)

KUBE_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
GATEWAY = f"{RELEASE}-llm-gateway"
LLAMA = "meta-llama/Llama-3.2-1B-Instruct"
PHI = "/models/Phi-tiny-MoE-instruct"


# --- helm lint and the Kubernetes schemas ----------------------------------------------------------


def test_every_example_and_named_values_file_is_a_value_set() -> None:
    """Each values file in examples/, and each the READMEs and values.yaml name, is in VALUE_SETS: linted,
    validated for Kubernetes and loaded by the gateway below like the others."""
    covered = {path.name for path in VALUE_SETS.values() if path is not None}
    on_disk = {path.name for path in (CHART_DIR / "examples").iterdir()}
    docs = "".join(
        path.read_text()
        for path in (CHART_DIR.parents[1] / "README.md", CHART_DIR / "README.md", CHART_DIR / "values.yaml")
    )
    named = set(re.findall(r"\b(values-[\w-]+\.yaml)\b", docs))
    assert on_disk <= covered, f"examples not in VALUE_SETS: {on_disk - covered}"
    assert named <= covered, f"values files the docs name that no test renders: {named - covered}"


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_helm_lint_strict(helm: Helm, value_set: str) -> None:
    args = ["lint", "--strict", str(CHART_DIR), "--namespace", NAMESPACE]
    if VALUE_SETS[value_set] is not None:
        args += ["-f", str(VALUE_SETS[value_set])]
    assert "0 chart(s) failed" in helm.run(*args)


# Custom resources have no schema in kubernetes-validate: each is checked here against a hand-written
# subset of its CRD (fields we render, nothing else allowed), never passed silently.
_DURATION = {"type": "string", "pattern": r"^[0-9]+(ms|s|m|h)$"}
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name", "namespace"],
            "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}, "labels": _LABELS},
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchNames": {"type": "array", "items": {"type": "string"}}},
                },
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": _LABELS},
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["port"],
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "interval": _DURATION,
                            "scrapeTimeout": _DURATION,
                        },
                    },
                },
            },
        },
    },
}
PROMETHEUS_RULE_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": SERVICE_MONITOR_SCHEMA["properties"]["metadata"],
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["groups"],
            "properties": {
                "groups": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name", "rules"],
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": _DURATION,
                            "rules": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["alert", "expr"],
                                    "properties": {
                                        "alert": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
                                        "expr": {"type": "string", "minLength": 1},
                                        "for": {"type": "string", "pattern": r"^[0-9]+(ms|s|m|h|d|w|y)$"},
                                        "labels": _LABELS,
                                        "annotations": _LABELS,
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}
_METADATA_WITH_ANNOTATIONS = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "namespace"],
    "properties": {
        "name": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": _LABELS,
        "annotations": _LABELS,
    },
}
# KEDA's ScaledObject (keda.sh/v1alpha1): the fields the chart renders, with the CRD's types (trigger metadata
# values are strings).
SCALED_OBJECT_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": _METADATA_WITH_ANNOTATIONS,
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "name": {"type": "string"},
                    },
                },
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["type", "metadata"],
                        "properties": {
                            "type": {"const": "prometheus"},
                            "metadata": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["serverAddress", "query", "threshold"],
                                "properties": {
                                    "serverAddress": {"type": "string", "pattern": "^https?://"},
                                    "query": {"type": "string", "minLength": 1},
                                    "threshold": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"},
                                    "activationThreshold": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"},
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}
# Gateway API's HTTPRoute (gateway.networking.k8s.io/v1, standard channel): the fields the chart renders.
_GATEWAY_API_DURATION = {"type": "string", "pattern": r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"}
_GATEWAY_API_NAME = {"type": "string", "minLength": 1, "maxLength": 253}
HTTP_ROUTE_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "gateway.networking.k8s.io/v1"},
        "kind": {"const": "HTTPRoute"},
        "metadata": _METADATA_WITH_ANNOTATIONS,
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "parentRefs": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 32,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name"],
                        "properties": {
                            "group": {"type": "string"},
                            "kind": {"type": "string"},
                            "namespace": _GATEWAY_API_NAME,
                            "name": _GATEWAY_API_NAME,
                            "sectionName": _GATEWAY_API_NAME,
                            "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                        },
                    },
                },
                "hostnames": {"type": "array", "maxItems": 16, "items": {"type": "string"}},
                "rules": {
                    "type": "array",
                    "maxItems": 16,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "matches": {
                                "type": "array",
                                "maxItems": 64,
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": {
                                        "path": {
                                            "type": "object",
                                            "additionalProperties": False,
                                            "properties": {
                                                "type": {"enum": ["Exact", "PathPrefix", "RegularExpression"]},
                                                "value": {"type": "string", "pattern": "^/", "maxLength": 1024},
                                            },
                                        },
                                    },
                                },
                            },
                            "backendRefs": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["name", "port"],
                                    "properties": {
                                        "name": _GATEWAY_API_NAME,
                                        "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                                    },
                                },
                            },
                            "timeouts": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {
                                    "request": _GATEWAY_API_DURATION,
                                    "backendRequest": _GATEWAY_API_DURATION,
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR_SCHEMA,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE_SCHEMA,
    ("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT_SCHEMA,
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): HTTP_ROUTE_SCHEMA,
}


def validate_object(doc: dict[str, Any], version: str) -> str:
    """Validate strictly; returns "core" or "crd" so callers can see which path checked it."""
    crd_schema = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
    if crd_schema is not None:
        jsonschema.validate(doc, crd_schema)
        return "crd"
    kubernetes_validate.validate(doc, version, strict=True)
    return "core"


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_object_validates_strictly(renders: dict[str, Rendered], value_set: str, version: str) -> None:
    checked: dict[str, int] = {"core": 0, "crd": 0}
    for doc in renders[value_set].docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            checked[validate_object(doc, version)] += 1
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(f"{where}: no schema for {doc['apiVersion']} {doc['kind']}; add it to CRD_SCHEMAS")
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as error:
            pytest.fail(f"{where} is invalid for Kubernetes {version}: {error.message}")
    assert checked["core"] > 0
    expected_crds = sum(len(renders[value_set].of_kind(kind)) for _, kind in CRD_SCHEMAS)
    assert checked["crd"] == expected_crds


def test_crd_check_is_not_a_rubber_stamp() -> None:
    monitor = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": "x", "namespace": "y"},
        "spec": {"selector": {}, "endpoints": [{"port": "http", "intervall": "30s"}]},
    }
    with pytest.raises(jsonschema.ValidationError):
        validate_object(monitor, KUBE_VERSIONS[0])
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "x", "namespace": "y"},
        "spec": {"groups": [{"name": "g", "rules": [{"alert": "A", "expr": "up == 0", "for": 5}]}]},
    }
    with pytest.raises(jsonschema.ValidationError):
        validate_object(rule, KUBE_VERSIONS[0])


def test_all_features_renders_every_template(renders: dict[str, Rendered]) -> None:
    kinds = {doc["kind"] for doc in renders["all-features"].docs}
    assert kinds == {
        "ConfigMap", "Deployment", "Service", "ServiceAccount", "Secret", "Ingress", "HorizontalPodAutoscaler",
        "PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor", "PrometheusRule", "Pod", "Role", "RoleBinding",
        "PersistentVolumeClaim", "ScaledObject", "HTTPRoute", "Lease",
    }  # fmt: skip


# --- The routing map: the gateway's own loader must accept it ---------------------------------------


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_routing_map_loads_in_the_gateway(renders: dict[str, Rendered], value_set: str) -> None:
    rendered = renders[value_set]
    routing = rendered.load_routing()
    deployments = {d["metadata"]["name"]: d for d in rendered.of_kind("Deployment")}
    services = {s["metadata"]["name"]: s for s in rendered.of_kind("Service")}
    for engine in routing.engines:
        if engine.name not in deployments:  # an external url/urls/baseUrl entry: the chart deploys nothing for it
            assert engine.name not in services
            continue
        assert engine.url is not None, engine.name
        url = urlsplit(engine.url)
        assert url.scheme == "http" and url.port == 8000 and not url.path
        assert url.hostname == f"{engine.name}.{NAMESPACE}.svc.cluster.local"
        service = services[engine.name]
        assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(8000, "http")]
        pod = deployments[engine.name]["spec"]["template"]
        assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in pod["spec"]["containers"][0]["ports"]
        # discovery (on by default): this Service's EndpointSlices, which list the pods' port that its
        # targetPort names
        assert engine.discovery is not None, engine.name
        assert (engine.discovery.service, engine.discovery.namespace, engine.discovery.port) == (
            service["metadata"]["name"],
            NAMESPACE,
            8000,
        )


def test_routing_map_renders_only_known_keys(renders: dict[str, Rendered]) -> None:
    routing = renders["all-features"].routing
    assert set(routing) == set(RoutingMap.model_fields) == {"settings", "engines"}
    rendered_keys = set()
    deployments = {d["metadata"]["name"] for d in renders["all-features"].of_kind("Deployment")}
    for engine in routing["engines"]:
        assert set(engine) <= set(EngineSpec.model_fields), engine["name"]
        if engine["name"] in deployments:  # one url: the Service; the key is the shared engineApiKey
            assert not {"urls", "base_url", "api_key_file"} & set(engine), engine["name"]
        rendered_keys |= set(engine)
    # all-features exercises every key the chart can render
    assert rendered_keys == {"name", "model", "owned_by", "url", "urls", "base_url", "health_path", "api_key_file",
                             "discovery", "default", "aliases", "headers", "timeouts", "fallback",
                             "concurrency", "balancing", "wake", "api"}  # fmt: skip


def test_routing_map_owned_by_and_served_names(renders: dict[str, Rendered]) -> None:
    routes = {e["name"]: e for e in renders["all-features"].routing["engines"]}
    assert (routes["vllm-llama-32-1b"]["model"], routes["vllm-llama-32-1b"]["owned_by"]) == ("llama-1b", "vllm")
    assert (routes["sglang-llama-32-1b"]["model"], routes["sglang-llama-32-1b"]["owned_by"]) == ("llama-1b", "sglang")
    assert routes["sim-phi"]["owned_by"] == "sglang"  # a simulator is owned_by the engine it imitates
    assert routes["remote-mistral"] == {
        "name": "remote-mistral",
        "model": "mistralai/Mistral-7B-Instruct-v0.3",
        "owned_by": "vllm",
        "url": "https://mistral.internal.example.com:8443",
        "headers": {"X-Tenant": "team-a"},
        "timeouts": {"connect": 2, "idle": 30},
    }
    assert renders["all-features"].routing["settings"]["timeouts"]["first_byte"] == 300


# --- The tutorial's two examples, as it deploys them (only better) -----------------------------------

VLLM_COMMAND = ["python3", "-m", "vllm.entrypoints.openai.api_server"]
SGLANG_COMMAND = ["python3", "-m", "sglang.launch_server"]


def vllm_args(model: str) -> list[str]:
    return ["--model", model, "--host", "0.0.0.0", "--port", "8000", "--tensor-parallel-size", "1",
            "--gpu-memory-utilization", "0.9"]  # fmt: skip


# engine name -> what the tutorial's manifest for it says
TUTORIAL = {
    "example1": {
        "vllm-llama-32-1b": {
            "image": "vllm/vllm-openai:v0.12.0", "command": VLLM_COMMAND, "args": vllm_args(LLAMA),
            "memory": ("6Gi", "8Gi"), "hf_token": True, "host_models": False,
        },
        "vllm-phi-tiny-moe": {
            "image": "vllm/vllm-openai:v0.12.0", "command": VLLM_COMMAND, "args": vllm_args(PHI),
            "memory": ("16Gi", "32Gi"), "hf_token": False, "host_models": True,
        },
    },
    "example2": {
        "vllm-llama-32-1b": {
            "image": "vllm/vllm-openai:v0.12.0", "command": VLLM_COMMAND, "args": vllm_args(LLAMA),
            "memory": ("6Gi", "8Gi"), "hf_token": True, "host_models": False,
        },
        "sglang-llama-32-1b": {
            "image": "lmsysorg/sglang:v0.5.6.post2-runtime", "command": SGLANG_COMMAND,
            # the tutorial's arguments, plus --enable-metrics before the user's extras
            "args": ["--model-path", LLAMA, "--host", "0.0.0.0", "--port", "8000", "--enable-metrics",
                     "--trust-remote-code"],
            "memory": ("6Gi", "8Gi"), "hf_token": True, "host_models": False,
        },
    },
}  # fmt: skip


@pytest.mark.parametrize(("example", "engine"), [(x, e) for x, engines in TUTORIAL.items() for e in engines])
def test_examples_deploy_what_the_tutorial_deploys(renders: dict[str, Rendered], example: str, engine: str) -> None:
    want = TUTORIAL[example][engine]
    rendered = renders[example]
    assert {d["metadata"]["name"] for d in rendered.of_kind("Deployment")} == set(TUTORIAL[example]) | {GATEWAY}
    pod = rendered.get("Deployment", engine)["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == want["image"]
    assert container["command"] == want["command"]
    assert container["args"] == want["args"]
    # the tutorial's k3d cluster runs GPU pods with the nvidia RuntimeClass; the examples ask for it
    example_values = yaml.safe_load(VALUE_SETS[example].read_text())
    assert example_values["engineDefaults"]["runtimeClassName"] == "nvidia"
    assert pod["runtimeClassName"] == "nvidia"
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1 and resources["requests"]["nvidia.com/gpu"] == 1
    assert (resources["requests"]["memory"], resources["limits"]["memory"]) == want["memory"]
    env = {item["name"]: item for item in container.get("env", [])}
    if want["hf_token"]:
        assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf-token-secret", "key": "token"}}
    else:
        assert "HF_TOKEN" not in env
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    if want["host_models"]:
        assert volumes["models"]["hostPath"]["path"] == "/models" and mounts["models"]["mountPath"] == "/models"
    # "only better": shared memory, probes for slow model loading, a grace period for running generations
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory" and mounts["dshm"]["mountPath"] == "/dev/shm"
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/health"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 15 * 60
    assert container["readinessProbe"]["httpGet"]["path"] == container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert pod["terminationGracePeriodSeconds"] >= 120
    assert pod["enableServiceLinks"] is False  # vLLM reads VLLM_* variables; service links would inject some
    service = rendered.get("Service", engine)
    assert service["spec"]["type"] == "ClusterIP" and service["spec"]["ports"][0]["port"] == 8000


def test_example2_vllm_is_the_default(renders: dict[str, Rendered]) -> None:
    routes = renders["example2"].routing["engines"]
    assert [(r["model"], r["owned_by"], r.get("default", False)) for r in routes] == [
        (LLAMA, "vllm", True),
        (LLAMA, "sglang", False),
    ]


def test_cpu_example_is_example2_on_simulators(renders: dict[str, Rendered]) -> None:
    strip = [{k: v for k, v in r.items() if k != "url"} for r in renders["cpu"].routing["engines"]]
    assert strip == [{k: v for k, v in r.items() if k != "url"} for r in renders["example2"].routing["engines"]]
    for engine, kind in (("vllm-llama-32-1b", "vllm"), ("sglang-llama-32-1b", "sglang")):
        container = renders["cpu"].get("Deployment", engine)["spec"]["template"]["spec"]["containers"][0]
        assert container["image"] == GATEWAY_IMAGE
        assert container["command"] == ["llm-gateway"]
        assert container["args"][:4] == ["simulate", "--engine", kind, "--model"]
        assert "nvidia.com/gpu" not in json.dumps(container["resources"])


def engine_values(name: str = "a", **fields: Any) -> dict[str, Any]:
    return {"name": name, "engine": "vllm", "model": "m", **fields}


def test_runtime_class_is_unset_by_default(helm: Helm) -> None:
    """A RuntimeClass the cluster lacks makes the API server reject the pod: name one only on request."""
    rendered = helm.template(values={"engines": [engine_values("a"), engine_values("b", engine="sglang")]})
    for name in ("a", "b"):
        assert "runtimeClassName" not in rendered.get("Deployment", name)["spec"]["template"]["spec"], name
    asked = helm.template(values={"engines": [engine_values(runtimeClassName="nvidia")]})
    assert asked.get("Deployment", "a")["spec"]["template"]["spec"]["runtimeClassName"] == "nvidia"


# --- Rollouts: engine strategy, gateway drain -------------------------------------------------------


def strategies(rendered: Rendered) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d["spec"].get("strategy") for d in rendered.of_kind("Deployment")}


# Recreate carries rollingUpdate: null, so that a Deployment switched from RollingUpdate drops the
# rollingUpdate block Kubernetes filled in (the API server refuses both together).
RECREATE = {"type": "Recreate", "rollingUpdate": None}


def test_gpu_engines_recreate_and_simulators_roll(renders: dict[str, Rendered]) -> None:
    """A surge pod of a GPU engine waits for a GPU that a one-GPU-per-engine cluster does not have."""
    for example in ("example1", "example2"):
        for name, strategy in strategies(renders[example]).items():
            if name != GATEWAY:
                assert strategy == RECREATE, f"{example}/{name}"
    cpu = strategies(renders["cpu"])
    assert cpu["vllm-llama-32-1b"] == cpu["sglang-llama-32-1b"] == {"type": "RollingUpdate"}
    assert renders["defaults"].get("Deployment", "sim-llama-32-1b")["spec"]["strategy"] == {"type": "RollingUpdate"}


def test_engine_strategy_overrides(helm: Helm) -> None:
    """The engine's strategy wins over engineDefaults', which wins over the kind's preset."""
    one_at_a_time = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    rendered = helm.template(
        values={
            "engineDefaults": {"strategy": one_at_a_time},
            "engines": [
                engine_values("a", replicas=2),
                engine_values("b", engine="sglang", strategy={"type": "Recreate"}),
                engine_values("c", engine="simulator", model="n", strategy={"type": "Recreate"}),
            ],
        }
    )
    engines = {name: strategy for name, strategy in strategies(rendered).items() if name != GATEWAY}
    assert engines == {"a": one_at_a_time, "b": RECREATE, "c": RECREATE}


def test_gateway_waits_before_sigterm(helm: Helm, renders: dict[str, Rendered]) -> None:
    """Endpoints, kube-proxy and the Ingress controller stop routing to a stopping pod only after a while."""
    pod = gateway_pod(renders["defaults"])["spec"]
    (container,) = pod["containers"]
    assert container["lifecycle"] == {"preStop": {"exec": {"command": ["sleep", "5"]}}}
    assert pod["terminationGracePeriodSeconds"] == 120  # includes the wait, then time for open streams

    tuned_values = {"gateway": {"preStopSleepSeconds": 15, "terminationGracePeriodSeconds": 60}}
    tuned = gateway_pod(helm.template(values=tuned_values))
    assert tuned["spec"]["containers"][0]["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "15"]
    assert tuned["spec"]["terminationGracePeriodSeconds"] == 60
    no_hook = gateway_pod(helm.template(values={"gateway": {"preStopSleepSeconds": 0}}))
    assert "lifecycle" not in no_hook["spec"]["containers"][0]


def shutdown_budget(pod: dict[str, Any]) -> tuple[int, int, float]:
    """(terminationGracePeriodSeconds, preStop sleep, --shutdown-grace-seconds) of a gateway pod spec."""
    (container,) = pod["containers"]
    hook = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", ["sleep", "0"])
    assert hook[0] == "sleep"
    grace = gateway_cli().parse_args(container["args"]).shutdown_grace_seconds
    return pod["terminationGracePeriodSeconds"], int(hook[1]), grace


# (preStopSleepSeconds, terminationGracePeriodSeconds): the defaults, no hook, a long wait, tight budgets
SHUTDOWN_BUDGETS = [(5, 120), (0, 30), (15, 60), (60, 3600), (10, 16), (10, 15), (29, 30), (0, 1)]


@pytest.mark.parametrize(("pre_stop", "grace_period"), SHUTDOWN_BUDGETS)
def test_gateway_exits_before_the_kubelet_kills_it(helm: Helm, pre_stop: int, grace_period: int) -> None:
    """The kubelet runs the preStop hook, sends SIGTERM, and sends SIGKILL terminationGracePeriodSeconds
    after the start: the gateway's drain must end 5 s before that, so it exits on its own."""
    values = {"gateway": {"preStopSleepSeconds": pre_stop, "terminationGracePeriodSeconds": grace_period}}
    total, sleep, drain = shutdown_budget(gateway_pod(helm.template(values=values))["spec"])
    assert (total, sleep) == (grace_period, pre_stop)
    assert drain >= 1
    if grace_period - pre_stop - 5 >= 1:
        assert sleep + drain + 5 == total  # all the time there is goes to open streams, but 5 s
    else:
        assert drain == 1  # a budget too tight for the margin: the shortest drain


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_gateway_keeps_the_shutdown_margin(renders: dict[str, Rendered], value_set: str) -> None:
    total, sleep, drain = shutdown_budget(gateway_pod(renders[value_set])["spec"])
    assert sleep + drain + 5 <= total


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_gateway_log_flags(renders: dict[str, Rendered], value_set: str) -> None:
    """gateway.log reaches the gateway's own flags; the rendered command line parses with its CLI."""
    path = VALUE_SETS[value_set]
    log = {"level": "info", "format": "json", "accessLog": True}
    log.update(((yaml.safe_load(path.read_text()) if path else {}).get("gateway") or {}).get("log") or {})
    args = gateway_cli().parse_args(gateway_pod(renders[value_set])["spec"]["containers"][0]["args"])
    assert (args.log_level, args.log_format, args.access_log) == (log["level"], log["format"], log["accessLog"])


def test_access_log_off_and_on(helm: Helm, renders: dict[str, Rendered]) -> None:
    assert "--no-access-log" not in gateway_pod(renders["defaults"])["spec"]["containers"][0]["args"]
    quiet = helm.template(values={"gateway": {"log": {"accessLog": False, "level": "warning"}}})
    args = gateway_pod(quiet)["spec"]["containers"][0]["args"]
    assert "--no-access-log" in args
    assert args[args.index("--log-format") + 1] == "json"  # the keys not given keep their defaults


# --- Hardening -------------------------------------------------------------------------------------

IMAGE_REF = re.compile(r"^[^:@\s]+(:(?P<tag>[\w][\w.-]{0,127}))?(@sha256:[a-f0-9]{64})?$")


def containers_of(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return spec.get("initContainers", []) + spec["containers"]


def effective(pod: dict[str, Any], container: dict[str, Any], key: str) -> Any:
    """A securityContext field as Kubernetes applies it: the container's value, else the pod's."""
    own = container.get("securityContext", {})
    return own[key] if key in own else pod.get("securityContext", {}).get(key)


def is_gpu_engine(rendered: Rendered, owner: str) -> bool:
    deployments = {d["metadata"]["name"]: d for d in rendered.of_kind("Deployment")}
    if owner not in deployments:
        return False
    return deployments[owner]["metadata"]["labels"].get("llm-gateway/engine-kind") in ("vllm", "sglang")


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_pods_are_hardened(renders: dict[str, Rendered], value_set: str) -> None:
    rendered = renders[value_set]
    for owner, pod in rendered.pod_specs().items():
        # only the gateway may call the API, and only for discovery (test_chart_discovery.py)
        assert pod["automountServiceAccountToken"] is (owner == GATEWAY and bool(rendered.of_kind("Role"))), owner
        for container in containers_of(pod):
            where = f"{owner}/{container['name']}"
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"]["drop"] == ["ALL"] and "add" not in context["capabilities"], where
            assert context.get("privileged", False) is False, where
            assert effective(pod, container, "seccompProfile") == {"type": "RuntimeDefault"}, where
            requests = container["resources"]["requests"]
            assert "memory" in requests and ("cpu" in requests or is_gpu_engine(rendered, owner)), where
            if is_gpu_engine(rendered, owner):
                continue  # vLLM/SGLang images run as root and write caches: see values.yaml and README
            assert effective(pod, container, "runAsNonRoot") is True, where
            assert context["readOnlyRootFilesystem"] is True, where
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            # the only writable places on a read-only root filesystem: /tmp, and Redis' working directory
            assert mounts & {"/tmp", "/data"}, where


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_no_latest_or_untagged_images(renders: dict[str, Rendered], value_set: str) -> None:
    for owner, pod in renders[value_set].pod_specs().items():
        for container in containers_of(pod):
            match = IMAGE_REF.match(container["image"])
            assert match, f"{owner}: unexpected image reference {container['image']!r}"
            assert match["tag"] or "@sha256:" in container["image"], f"{owner}: untagged image {container['image']}"
            assert match["tag"] != "latest", f"{owner}: {container['image']}"


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_pod_templates_carry_no_chart_version(renders: dict[str, Rendered], value_set: str) -> None:
    """A chart upgrade alone must not restart engines (and label churn would)."""
    for deployment in renders[value_set].of_kind("Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert "helm.sh/chart" not in labels and "app.kubernetes.io/version" not in labels


# --- The gateway Deployment ------------------------------------------------------------------------


def gateway_pod(rendered: Rendered) -> dict[str, Any]:
    return rendered.get("Deployment", GATEWAY)["spec"]["template"]


def test_the_charts_app_version_is_the_gateways_version() -> None:
    """appVersion is the default tag of the gateway image (and of the simulators'), which is built from this
    repository: the chart's appVersion, gateway_app.__version__ (`llm-gateway --version`, /version) and the
    package version in pyproject.toml are one version, bumped together."""
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert APP_VERSION == gateway_app.__version__ == pyproject["project"]["version"]


def test_gateway_runs_the_cli_contract(renders: dict[str, Rendered]) -> None:
    pod = gateway_pod(renders["defaults"])
    container = pod["spec"]["containers"][0]
    assert container["image"] == GATEWAY_IMAGE
    assert container["command"] == ["llm-gateway"]
    assert container["args"][:7] == ["serve", "--config", "/etc/llm-gateway/routes.yaml", "--host", "0.0.0.0",
                                     "--port", "8000"]  # fmt: skip
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert pod["spec"]["securityContext"]["runAsUser"] == 10001


def arg_after(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


@pytest.mark.parametrize(("value_set", "port"), [("defaults", 9090), ("all-features", 9464)])
def test_gateway_serves_metrics_on_a_port_of_its_own(renders: dict[str, Rendered], value_set: str, port: int) -> None:
    """--metrics-port, the container port "metrics" and the Service port "metrics" are one port, apart from the
    API's; the gateway's own parser takes the flag as rendered."""
    rendered = renders[value_set]
    container = gateway_pod(rendered)["spec"]["containers"][0]
    assert arg_after(container["args"], "--metrics-port") == str(port)
    ports = {p["name"]: p for p in container["ports"]}
    assert ports["metrics"] == {"name": "metrics", "containerPort": port, "protocol": "TCP"}
    assert ports["http"]["containerPort"] == int(arg_after(container["args"], "--port")) == 8000
    service_ports = {p["name"]: p for p in rendered.get("Service", GATEWAY)["spec"]["ports"]}
    assert service_ports["metrics"] == {"name": "metrics", "port": port, "targetPort": "metrics", "protocol": "TCP"}
    assert service_ports["http"]["targetPort"] == "http"  # the API port as before
    # probes stay on the API port: readiness is about the port clients call
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == "http", probe
    parsed = gateway_cli().parse_args(container["args"])
    assert (parsed.port, parsed.metrics_port) == (8000, port)


def test_metrics_port_must_differ_from_the_api_port(helm: Helm) -> None:
    message = helm.template_error(values={"gateway": {"metricsPort": 8000}})
    assert "gateway.metricsPort (8000) must differ from the gateway's API port 8000" in message
    # `helm upgrade --reuse-values` from a chart version without the key: refused by name, not rendered as 0
    assert "gateway.metricsPort is not set" in helm.template_error(values={"gateway": {"metricsPort": None}})
    for port in (80, 1023, 65536):  # non-root without capabilities: no port below 1024
        assert "gateway/metricsPort" in helm.template_error(values={"gateway": {"metricsPort": port}}).replace(".", "/")


def test_routing_map_is_mounted_as_a_directory(renders: dict[str, Rendered]) -> None:
    """subPath mounts never see ConfigMap updates; hot reload needs the directory mount."""
    pod = gateway_pod(renders["defaults"])["spec"]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/etc/llm-gateway"]
    assert "subPath" not in mount and mount["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == f"{GATEWAY}-routes"


def test_hot_reload_by_default_checksum_on_request(renders: dict[str, Rendered], helm: Helm) -> None:
    assert "checksum/config" not in gateway_pod(renders["defaults"])["metadata"].get("annotations", {})
    annotations = gateway_pod(renders["all-features"])["metadata"]["annotations"]
    assert re.fullmatch(r"[0-9a-f]{64}", annotations["checksum/config"])
    assert annotations["example.com/scrape"] == "false"


def test_autoscaling_owns_the_replica_count(renders: dict[str, Rendered]) -> None:
    assert renders["defaults"].get("Deployment", GATEWAY)["spec"]["replicas"] == 2
    assert "replicas" not in renders["all-features"].get("Deployment", GATEWAY)["spec"]
    hpa = renders["all-features"].get("HorizontalPodAutoscaler", GATEWAY)
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": GATEWAY}


@pytest.mark.parametrize("value_set", ["defaults", *EXAMPLES])
def test_optional_objects_are_off_by_default(renders: dict[str, Rendered], value_set: str) -> None:
    kinds = {doc["kind"] for doc in renders[value_set].docs}
    assert not kinds & {
        "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor", "PrometheusRule", "Secret",
    }  # fmt: skip
    # the only ConfigMap is the routing map: no dashboard
    assert [c["metadata"]["name"] for c in renders[value_set].of_kind("ConfigMap")] == [f"{GATEWAY}-routes"]


def test_secrets_only_where_asked(renders: dict[str, Rendered]) -> None:
    secrets = {s["metadata"]["name"] for s in renders["all-features"].of_kind("Secret")}
    # the engine's token, and what values.yaml gave as values (see test_chart_auth.py)
    assert secrets == {
        "sglang-llama-32-1b-hf-token",
        f"{GATEWAY}-api-keys",
        f"{GATEWAY}-engine-api-key",
        f"{GATEWAY}-redis",
    }
    assert not renders["secured"].of_kind("Secret")  # every secret there is an existingSecret
    container = renders["all-features"].get("Deployment", "sglang-llama-32-1b")["spec"]["template"]["spec"][
        "containers"
    ][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "sglang-llama-32-1b-hf-token", "key": "token"}
    assert "HF_HOME" not in env  # read-only model storage: nothing to download into


def test_user_env_replaces_the_charts(renders: dict[str, Rendered]) -> None:
    container = renders["all-features"].get("Deployment", "vllm-llama-32-1b")["spec"]["template"]["spec"]["containers"][
        0
    ]
    names = [e["name"] for e in container["env"]]
    assert names.count("HF_HOME") == 1
    assert {"name": "HF_HOME", "value": "/cache/hf"} in container["env"]


# --- NetworkPolicy: only the gateway reaches the engines --------------------------------------------


def test_network_policy_admits_only_the_gateway(renders: dict[str, Rendered]) -> None:
    rendered = renders["all-features"]
    policy = rendered.get("NetworkPolicy", f"{GATEWAY}-engines")
    selector = policy["spec"]["podSelector"]["matchLabels"]
    for deployment in rendered.of_kind("Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        is_engine = deployment["metadata"]["labels"]["app.kubernetes.io/component"] == "engine"
        assert (selector.items() <= labels.items()) == is_engine, deployment["metadata"]["name"]
    (rule,) = policy["spec"]["ingress"]
    gateway_labels = gateway_pod(rendered)["metadata"]["labels"]
    assert rule["from"][0]["podSelector"]["matchLabels"].items() <= gateway_labels.items()
    assert rule["from"][1] == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    assert rule["ports"] == [{"protocol": "TCP", "port": 8000}]


def test_service_monitors_select_their_services(renders: dict[str, Rendered]) -> None:
    rendered = renders["all-features"]
    services = rendered.of_kind("Service")
    selected, scraped = {}, {}
    for monitor in rendered.of_kind("ServiceMonitor"):
        match = monitor["spec"]["selector"]["matchLabels"]
        names = {s["metadata"]["name"] for s in services if match.items() <= s["metadata"]["labels"].items()}
        name = monitor["metadata"]["name"]
        selected[name] = names
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        (endpoint,) = monitor["spec"]["endpoints"]
        scraped[name] = endpoint["port"]
        for service in services:
            if service["metadata"]["name"] in names:
                assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert selected == {GATEWAY: {GATEWAY}, f"{GATEWAY}-engines": {"vllm-llama-32-1b", "sglang-llama-32-1b", "sim-phi"}}
    # the gateway on its metrics port (its API port answers /metrics with a 404); the engines on their only port
    assert scraped == {GATEWAY: "metrics", f"{GATEWAY}-engines": "http"}


def test_service_monitor_reaches_the_port_the_gateway_serves_metrics_on(renders: dict[str, Rendered]) -> None:
    """ServiceMonitor port name -> Service port -> targetPort -> container port -> --metrics-port: one chain."""
    rendered = renders["all-features"]
    (endpoint,) = rendered.get("ServiceMonitor", GATEWAY)["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    (service_port,) = [p for p in rendered.get("Service", GATEWAY)["spec"]["ports"] if p["name"] == endpoint["port"]]
    container = gateway_pod(rendered)["spec"]["containers"][0]
    (container_port,) = [p for p in container["ports"] if p["name"] == service_port["targetPort"]]
    assert str(container_port["containerPort"]) == arg_after(container["args"], "--metrics-port")


def test_ingress_never_routes_the_metrics_port(renders: dict[str, Rendered]) -> None:
    for value_set in (*EXAMPLES, "all-features", "secured"):
        for ingress in renders[value_set].of_kind("Ingress"):
            for rule in ingress["spec"]["rules"]:
                for path in rule["http"]["paths"]:
                    assert path["backend"]["service"]["port"] == {"name": "http"}, value_set


# --- Ingress, NOTES.txt, helm test -----------------------------------------------------------------

STREAMING_ANNOTATIONS = {
    "nginx.ingress.kubernetes.io/proxy-buffering": "off",
    "nginx.ingress.kubernetes.io/proxy-read-timeout": "3600",
    "nginx.ingress.kubernetes.io/proxy-send-timeout": "3600",
}
BODY_SIZE = "nginx.ingress.kubernetes.io/proxy-body-size"


def nginx_size(size_bytes: int) -> str:
    """A byte count as the chart writes nginx's client_max_body_size: whole MiB, whole KiB, else bytes."""
    for unit, factor in (("m", 1024 * 1024), ("k", 1024)):
        if size_bytes % factor == 0:
            return f"{size_bytes // factor}{unit}"
    return str(size_bytes)


def gateway_body_limit(rendered: Rendered) -> int:
    """The request body limit the gateway applies when it loads this render's routing map."""
    return rendered.load_routing().settings.max_body_bytes


@pytest.mark.parametrize("value_set", [*EXAMPLES, "all-features"])
def test_ingress_keeps_streaming_working(renders: dict[str, Rendered], value_set: str) -> None:
    (ingress,) = renders[value_set].of_kind("Ingress")
    assert STREAMING_ANNOTATIONS.items() <= ingress["metadata"]["annotations"].items()
    assert ingress["metadata"]["annotations"][BODY_SIZE] == nginx_size(gateway_body_limit(renders[value_set]))
    (rule,) = ingress["spec"]["rules"]
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": GATEWAY, "port": {"name": "http"}}


def test_ingress_user_annotations_merge_with_defaults(renders: dict[str, Rendered]) -> None:
    ingress = renders["all-features"].get("Ingress", GATEWAY)
    assert ingress["metadata"]["annotations"]["cert-manager.io/cluster-issuer"] == "letsencrypt"
    assert ingress["spec"]["tls"] == [{"hosts": ["llm.example.com"], "secretName": f"{GATEWAY}-tls"}]
    assert ingress["spec"]["ingressClassName"] == "nginx"


@pytest.mark.parametrize(
    ("max_body_bytes", "annotation"),
    [(None, "16m"), (33554432, "32m"), (5 * 1024, "5k"), (5000, "5000"), (1024 * 1024 * 1024, "1024m")],
)
def test_ingress_body_size_follows_the_gateway_limit(helm: Helm, max_body_bytes: int | None, annotation: str) -> None:
    """nginx must not refuse a body the gateway accepts: one value, max_body_bytes, sets both limits."""
    values: dict[str, Any] = {"ingress": {"enabled": True}}
    if max_body_bytes is not None:
        # the gateway's body budget must hold one body of the largest size (test_chart_schema.py)
        budget = max(max_body_bytes, ClientLimits().max_body_memory)
        settings = {"max_body_bytes": max_body_bytes, "client_limits": {"max_body_memory": budget}}
        values["gateway"] = {"settings": settings}
    rendered = helm.template(values=values)
    assert rendered.get("Ingress", GATEWAY)["metadata"]["annotations"][BODY_SIZE] == annotation
    assert nginx_size(gateway_body_limit(rendered)) == annotation  # None: the gateway's own default


def test_ingress_body_size_set_by_the_user_wins(helm: Helm) -> None:
    rendered = helm.template(
        values={
            "gateway": {"settings": {"max_body_bytes": 33554432}},
            "ingress": {"enabled": True, "annotations": {BODY_SIZE: "64m"}},
        }
    )
    assert rendered.get("Ingress", GATEWAY)["metadata"]["annotations"][BODY_SIZE] == "64m"


def test_ingress_annotation_can_be_dropped(helm: Helm) -> None:
    rendered = helm.template(
        values={"ingress": {"enabled": True, "annotations": {"nginx.ingress.kubernetes.io/proxy-body-size": None}}}
    )
    annotations = rendered.get("Ingress", GATEWAY)["metadata"]["annotations"]
    assert "nginx.ingress.kubernetes.io/proxy-body-size" not in annotations
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"


def rendered_notes(helm: Helm, *args: str) -> str:
    """NOTES.txt as `helm install` prints it, without a cluster (helm 4; helm 3 wants a cluster here)."""
    try:
        output = helm.run("install", RELEASE, str(CHART_DIR), "--namespace", NAMESPACE, "--dry-run=client",
                          "-o", "json", *args)  # fmt: skip
    except HelmError as error:
        if "cluster unreachable" in str(error):
            pytest.skip("this helm contacts a cluster even for install --dry-run=client (helm 3)")
        raise
    return json.loads(output)["info"]["notes"]


@pytest.mark.parametrize("example", EXAMPLES)
def test_notes_print_the_next_commands(helm: Helm, example: str) -> None:
    notes = rendered_notes(helm, "-f", str(VALUE_SETS[example]))
    ingress = yaml.safe_load(VALUE_SETS[example].read_text())["ingress"]
    port = f":{ingress['clientPort']}" if ingress.get("clientPort") else ""
    assert f"export LLM_GATEWAY=http://{ingress['host']}{port}\n" in notes
    assert "curl -s $LLM_GATEWAY/v1/models" in notes and "/v1/chat/completions" in notes
    assert f"helm test {RELEASE} -n {NAMESPACE}" in notes
    for route in helm.template(VALUE_SETS[example]).routing["engines"]:
        assert f"{route['model']}  owned_by={route['owned_by']}  -> {route['name']}" in notes


def test_notes_print_the_url_of_the_k3d_recipe(helm: Helm) -> None:
    """The README's k3d recipe maps host port 8080 to the load balancer's 80; values-cpu.yaml says so, and
    NOTES.txt prints the URL that works there, the one the README curls."""
    readme = (CHART_DIR / "README.md").read_text()
    assert 'k3d cluster create llm -p "8080:80@loadbalancer"' in readme
    assert "curl -s http://llm.localhost:8080/v1/models" in readme
    notes = rendered_notes(helm, "-f", str(VALUE_SETS["cpu"]))
    assert "export LLM_GATEWAY=http://llm.localhost:8080\n" in notes


@pytest.mark.parametrize(
    ("ingress", "url"),
    [
        ({}, "http://llm.example.com"),
        ({"clientPort": 80}, "http://llm.example.com"),
        ({"clientPort": 443}, "http://llm.example.com:443"),
        ({"clientPort": 443, "tls": {"enabled": True}}, "https://llm.example.com"),
        ({"clientPort": 8443, "tls": {"enabled": True}}, "https://llm.example.com:8443"),
    ],
)
def test_notes_print_the_client_port_unless_it_is_the_schemes(helm: Helm, ingress: dict[str, Any], url: str) -> None:
    values = helm.values_file({"ingress": {"enabled": True, **ingress}})
    assert f"export LLM_GATEWAY={url}\n" in rendered_notes(helm, "-f", str(values))


def test_notes_without_ingress_port_forward(helm: Helm) -> None:
    assert f"kubectl -n {NAMESPACE} port-forward svc/{GATEWAY} 8000:8000" in rendered_notes(helm)


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_helm_test_hook_lists_every_route(renders: dict[str, Rendered], value_set: str) -> None:
    rendered = renders[value_set]
    (pod,) = rendered.of_kind("Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    port = rendered.get("Service", GATEWAY)["spec"]["ports"][0]["port"]
    assert env["MODELS_URL"] == f"http://{GATEWAY}:{port}/v1/models"
    expected = sorted(map(tuple, json.loads(env["EXPECTED"])))
    # an engine that scales to zero lists no model while it sleeps, and the test must not wake it
    awake = [r for r in rendered.routing["engines"] if "wake" not in r]
    assert expected == sorted((r["model"], r["owned_by"]) for r in awake)
