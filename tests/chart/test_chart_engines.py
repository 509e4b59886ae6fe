"""Engines as rendered from engineDefaults, presets and the engine's own keys: merged, scaled with gpus, kept
off GPU nodes when simulated, refused with a message naming the value when they would fail silently; and the
production knobs (storage, disruption budgets, KEDA, exposure) rendered valid for Kubernetes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

import pytest
import yaml

from tests.chart.conftest import CHART_DIR, NAMESPACE, Helm, Rendered
from tests.chart.kubernetes_definitions import PREFIX, derive
from tests.chart.test_chart_render import KUBE_VERSIONS, validate_object

SCHEMA_ERROR = "values don't meet the specifications of the schema"
GATEWAY = "my-llm-llm-gateway"
GPU_NODES = {
    "nodeSelector": {"nvidia.com/gpu.present": "true"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["a100"]}]}]}}},
}  # fmt: skip


def engine(name: str = "a", **fields: Any) -> dict[str, Any]:
    return {"name": name, "engine": "vllm", "model": "m", **fields}


def pod(rendered: Rendered, name: str) -> dict[str, Any]:
    return rendered.get("Deployment", name)["spec"]["template"]["spec"]


def container(rendered: Rendered, name: str) -> dict[str, Any]:
    return pod(rendered, name)["containers"][0]


def env_of(rendered: Rendered, name: str) -> dict[str, Any]:
    return {item["name"]: item for item in container(rendered, name).get("env", [])}


def assert_valid(rendered: Rendered) -> None:
    for doc in rendered.docs:
        for version in KUBE_VERSIONS:
            validate_object(doc, version)


# --- engineDefaults merge with the engine's keys -------------------------------------------------------


def test_engine_token_key_keeps_the_default_secret(helm: Helm) -> None:
    rendered = helm.template(
        values={
            "engineDefaults": {"hfToken": {"existingSecret": "hf-token-secret", "key": "token"}},
            "engines": [engine("a", hfToken={"key": "hf_token"}), engine("b", engine="sglang", hfToken={"value": "v"})],
        }
    )
    assert env_of(rendered, "a")["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "hf-token-secret",
        "key": "hf_token",
    }
    # a value of its own replaces the default's Secret (one token, two ways to give it)
    assert env_of(rendered, "b")["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "b-hf-token", "key": "token"}


def test_engine_mount_path_keeps_the_default_storage(helm: Helm) -> None:
    rendered = helm.template(
        values={
            "engineDefaults": {"modelStorage": {"type": "pvc", "claimName": "x"}},
            "engines": [engine("a", modelStorage={"mountPath": "/cache"})],
        }
    )
    volumes = {v["name"]: v for v in pod(rendered, "a")["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"] == {"claimName": "x", "readOnly": False}
    assert {"name": "models", "mountPath": "/cache", "readOnly": False} in container(rendered, "a")["volumeMounts"]
    assert env_of(rendered, "a")["HF_HOME"]["value"] == "/cache/huggingface"


def test_engine_resources_merge_over_the_preset(helm: Helm) -> None:
    rendered = helm.template(
        values={"engines": [engine("a", resources={"requests": {"memory": "6Gi"}, "limits": {"memory": None}})]}
    )
    resources = container(rendered, "a")["resources"]
    assert resources["requests"]["cpu"] == "2" and resources["requests"]["memory"] == "6Gi"
    assert "memory" not in resources["limits"]  # null drops the preset's value
    assert resources["limits"]["nvidia.com/gpu"] == 1


@pytest.mark.parametrize("example", ["example1", "example2"])
def test_tutorial_engines_keep_the_presets_cpu_request(renders: dict[str, Rendered], example: str) -> None:
    for deployment in renders[example].of_kind("Deployment"):
        if deployment["metadata"]["name"] != GATEWAY:
            assert deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"] == "2"


def test_simulators_stay_off_gpu_nodes(helm: Helm) -> None:
    rendered = helm.template(
        values={
            "engineDefaults": GPU_NODES,
            "engines": [engine("a"), engine("s", engine="simulator", model="n"),
                        engine("t", engine="simulator", model="o", nodeSelector={"pool": "cpu"})],
        }
    )  # fmt: skip
    assert all(pod(rendered, "a")[key] == value for key, value in GPU_NODES.items())
    assert not set(GPU_NODES) & set(pod(rendered, "s"))
    assert pod(rendered, "t")["nodeSelector"] == {"pool": "cpu"}  # its own keys still apply


# --- extraArgs may not repeat the chart's flags --------------------------------------------------------

OWNED_FLAGS = {
    "--served-model-name": "set servedModelName instead",
    "--served_model_name": "set servedModelName instead",
    "--port": "remove it: the chart makes the engine listen on 0.0.0.0:8000",
    "--host": "remove it: the chart makes the engine listen on 0.0.0.0:8000",
    "--tensor-parallel-size": "set gpus instead",
    "-tp": "set gpus instead",
    "--tp": "set gpus instead",
    "--api-key": "set engineApiKey instead",
    "--model": "set model instead",
    "--model-path": "set model instead",
}


@pytest.mark.parametrize("form", ["separate", "equals"])
@pytest.mark.parametrize("flag", OWNED_FLAGS)
def test_extra_args_may_not_repeat_the_charts_flags(helm: Helm, flag: str, form: str) -> None:
    args = [f"{flag}=4"] if form == "equals" else [flag, "4"]
    message = helm.template_error(
        values={"engines": [engine("a", extraArgs=["--gpu-memory-utilization", "0.9", *args])]}
    )
    shown = flag.replace("_", "-")
    assert f'engines[0] "a": extraArgs: {shown} is set by the chart; {OWNED_FLAGS[flag]}' in message, message


def test_extra_args_near_misses_are_accepted(helm: Helm) -> None:
    args = ["--max-model-len", "4096", "--port-range=1", "--tokenizer", "x", "--engine", "y"]
    rendered = helm.template(values={"engines": [engine("a", extraArgs=args)]})
    assert container(rendered, "a")["args"][-len(args) :] == args


# --- a simulator takes only `llm-gateway simulate`'s flags ------------------------------------------------

CHART_SETS = {"--help", "--engine", "--model", "--host", "--port", "--api-key"}


def simulate_flags() -> list[str]:
    """The long options of `llm-gateway simulate`, read from its own --help, less those the chart sets."""
    command = [sys.executable, "-m", "gateway_app", "simulate", "--help"]
    text = subprocess.run(command, capture_output=True, text=True, check=True, timeout=60).stdout
    return sorted(set(re.findall(r"(?m)^\s+(--[a-z][a-z-]*)", text)) - CHART_SETS)


@pytest.mark.parametrize("flag", ["--gpu-memory-utilization", "--trust-remote-code", "--mem-fraction-static"])
def test_an_engines_flag_on_a_simulator_is_refused_listing_the_simulators(helm: Helm, flag: str) -> None:
    """`llm-gateway simulate` exits on a flag it does not know: the pod would crash-loop. The chart's list is
    the command's own."""
    sim = engine("s", engine="simulator", extraArgs=["--itl-ms", "5", f"{flag}=0.9"])
    message = helm.template_error(values={"engines": [sim]})
    assert f'engines[0] "s": extraArgs: {flag} is not a flag of llm-gateway simulate' in message, message
    listed = re.search(r"\(the simulator takes ([^)]*)\)", message)
    assert listed is not None and sorted(listed.group(1).split(", ")) == simulate_flags()


def test_a_simulator_takes_each_of_its_own_flags(helm: Helm) -> None:
    args = [arg for flag in simulate_flags() for arg in (f"{flag}=1", flag)]
    rendered = helm.template(values={"engines": [engine("s", engine="simulator", extraArgs=args)]})
    assert container(rendered, "s")["args"][-len(args) :] == args


# --- Kubernetes types in values are Kubernetes' own definitions -----------------------------------------

REFUSED_KUBERNETES_VALUES = {
    "env value that is a number": ({"engines": [engine(env=[{"name": "X", "value": 1}])]}, "engines/0/env/0/value"),
    "misspelt nodeAffinity": ({"engineDefaults": {"affinity": {"nodeAfinity": {}}}}, "engineDefaults/affinity"),
    "misspelt toleration effect": (
        {"engines": [engine(tolerations=[{"key": "k", "operator": "Exists", "efect": "NoSchedule"}])]},
        "engines/0/tolerations/0",
    ),
    "misspelt gateway toleration": ({"gateway": {"tolerations": [{"keys": "k"}]}}, "gateway/tolerations/0"),
    "misspelt volume source": ({"engines": [engine(extraVolumes=[{"name": "v", "configmap": {}}])]}, "engines/0/extraVolumes/0"),
    "init container without name": ({"engineDefaults": {"initContainers": [{"image": "busybox:1"}]}}, "engineDefaults/initContainers/0"),
    "unknown probe": ({"engines": [engine(probes={"ready": {}})]}, "engines/0/probes"),
    "pod security context typo": ({"engines": [engine(podSecurityContext={"runAsNonroot": True})]}, "engines/0/podSecurityContext"),
    "PDB minAvailable that is no number": ({"gateway": {"podDisruptionBudget": {"minAvailable": "fifty"}}}, "gateway/podDisruptionBudget/minAvailable"),
}  # fmt: skip


@pytest.mark.parametrize("case", REFUSED_KUBERNETES_VALUES)
def test_schema_refuses_what_kubernetes_would(helm: Helm, case: str) -> None:
    values, path = REFUSED_KUBERNETES_VALUES[case]
    message = helm.template_error(values=values)
    assert SCHEMA_ERROR in message and f"/{path}'" in message, message


def test_schema_embeds_the_kubernetes_definitions() -> None:
    """values.schema.json holds exactly the definitions derived from Kubernetes' OpenAPI schemas, closed
    objects closed (rewrite them with `python -m tests.chart.kubernetes_definitions`)."""
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    embedded = {name: body for name, body in schema["definitions"].items() if name.startswith(PREFIX)}
    assert embedded == derive()
    assert embedded["io.k8s.api.core.v1.Toleration"]["additionalProperties"] is False
    assert embedded["io.k8s.api.core.v1.EnvVar"]["properties"]["value"]["type"] == ["string", "null"]


# --- gpus scale what is sized for one GPU; the model cache is bounded -----------------------------------


def test_more_gpus_scale_the_presets_memory_and_shm(helm: Helm) -> None:
    rendered = helm.template(
        values={"engines": [engine("a", gpus=4), engine("b", engine="sglang", gpus=4, shmSize="1Gi", resources={"limits": {"memory": "20Gi"}})]}
    )  # fmt: skip
    assert container(rendered, "a")["resources"] == {
        "requests": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": 4, "ephemeral-storage": "40Gi"},
        "limits": {"memory": "64Gi", "nvidia.com/gpu": 4},
    }
    volumes = {v["name"]: v for v in pod(rendered, "a")["volumes"]}
    assert volumes["dshm"]["emptyDir"]["sizeLimit"] == "8Gi"
    # what the engine sets itself is taken as it is
    assert container(rendered, "b")["resources"]["limits"]["memory"] == "20Gi"
    assert {v["name"]: v for v in pod(rendered, "b")["volumes"]}["dshm"]["emptyDir"]["sizeLimit"] == "1Gi"
    assert container(rendered, "b")["args"][-2:] == ["--tp", "4"]


def test_default_model_cache_is_bounded_and_requested(renders: dict[str, Rendered]) -> None:
    rendered = renders["example1"]
    volumes = {v["name"]: v for v in pod(rendered, "vllm-llama-32-1b")["volumes"]}
    assert volumes["models"]["emptyDir"] == {"sizeLimit": "40Gi"}
    assert container(rendered, "vllm-llama-32-1b")["resources"]["requests"]["ephemeral-storage"] == "40Gi"
    # hostPath weights take no ephemeral storage
    assert "ephemeral-storage" not in container(rendered, "vllm-phi-tiny-moe")["resources"]["requests"]


# --- Disruption budgets never block a drain ------------------------------------------------------------

REFUSED_BUDGETS = {
    "gateway minAvailable at the autoscaler's minimum": (
        {"gateway": {"autoscaling": {"enabled": True, "minReplicas": 2}, "podDisruptionBudget": {"enabled": True, "minAvailable": 2}}},
        "gateway.podDisruptionBudget.minAvailable (2) is at least gateway.autoscaling.minReplicas (2): a node drain could never evict a pod",
    ),
    "gateway minAvailable above its replicas": (
        {"gateway": {"replicas": 2, "podDisruptionBudget": {"enabled": True, "minAvailable": 3}}},
        "gateway.podDisruptionBudget.minAvailable (3) is at least gateway.replicas (2)",
    ),
    "gateway minAvailable 100%": (
        {"gateway": {"podDisruptionBudget": {"enabled": True, "minAvailable": "100%"}}},
        'gateway.podDisruptionBudget.minAvailable "100%" keeps every pod',
    ),
    "gateway maxUnavailable 0": (
        {"gateway": {"podDisruptionBudget": {"enabled": True, "maxUnavailable": 0}}},
        "gateway.podDisruptionBudget.maxUnavailable 0 lets no pod go",
    ),
    "engine minAvailable at its replicas": (
        {"engines": [engine("a", replicas=2, podDisruptionBudget={"minAvailable": 2})]},
        'engines[0] "a": podDisruptionBudget.minAvailable (2) is at least replicas (2)',
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", REFUSED_BUDGETS)
def test_budgets_that_block_every_drain_are_refused(helm: Helm, case: str) -> None:
    values, fragment = REFUSED_BUDGETS[case]
    assert fragment in helm.template_error(values=values)


def test_engine_budget_and_rollout_for_several_replicas(helm: Helm) -> None:
    rendered = helm.template(values={"engines": [engine("a", replicas=3), engine("b", engine="sglang", model="n")]})
    (budget,) = [b for b in rendered.of_kind("PodDisruptionBudget")]
    assert budget["metadata"]["name"] == "a" and budget["spec"]["maxUnavailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"]["llm-gateway/engine"] == "a"
    one_at_a_time = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    assert rendered.get("Deployment", "a")["spec"]["strategy"] == one_at_a_time  # never a spare GPU
    assert rendered.get("Deployment", "b")["spec"]["strategy"]["type"] == "Recreate"
    assert_valid(rendered)


# --- Cross-entry errors name the values, not the test hook ---------------------------------------------


@pytest.mark.parametrize(
    "values",
    [
        {"engines": [engine("a"), engine("a", engine="sglang")]},
        {"engines": [engine("a", default=True), engine("b", engine="sglang", default=True)]},
        {"auth": {"enabled": True, "keys": [{"name": "a", "sha256": "0" * 64}, {"name": "a", "sha256": "1" * 64}]}},
    ],
)
def test_cross_entry_errors_are_reported_against_the_values(helm: Helm, values: dict[str, Any]) -> None:
    message = helm.template_error(values=values)
    assert "llm-gateway/templates/values/checks.yaml" in message, message
    assert "tests/test-models.yaml" not in message, message


# --- Knobs -------------------------------------------------------------------------------------------


def test_probe_overrides_merge_and_replace_the_handler(helm: Helm) -> None:
    probes = {"startup": {"failureThreshold": 360}, "liveness": {"exec": {"command": ["true"]}}}
    rendered = helm.template(values={"engines": [engine("a", probes=probes)]})
    engine_container = container(rendered, "a")
    assert engine_container["startupProbe"]["failureThreshold"] == 360
    assert engine_container["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert engine_container["livenessProbe"] == {"exec": {"command": ["true"]}, "periodSeconds": 20, "timeoutSeconds": 10,
                                                 "failureThreshold": 6}  # fmt: skip
    assert_valid(rendered)


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        (
            {"extraVolumes": [{"name": "dshm", "emptyDir": {}}]},
            'extraVolumes: the name "dshm" is the chart\'s own volume',
        ),
        (
            {"extraVolumeMounts": [{"name": "x", "mountPath": "/models/"}]},
            "extraVolumeMounts: /models/ is where the chart mounts",
        ),
    ],
)
def test_extra_volumes_keep_off_the_charts(helm: Helm, fields: dict[str, Any], fragment: str) -> None:
    assert f'engines[0] "a": {fragment}' in helm.template_error(values={"engines": [engine("a", **fields)]})


def test_named_lists_merge_by_name_and_env_from_adds(helm: Helm) -> None:
    rendered = helm.template(
        values={
            "engineDefaults": {
                "extraVolumes": [{"name": "t", "configMap": {"name": "default"}}, {"name": "u", "emptyDir": {}}],
                "envFrom": [{"secretRef": {"name": "s3"}}],
            },
            "engines": [engine("a", extraVolumes=[{"name": "t", "configMap": {"name": "own"}}],
                               envFrom=[{"configMapRef": {"name": "c"}}])],
        }
    )  # fmt: skip
    volumes = {v["name"]: v for v in pod(rendered, "a")["volumes"]}
    assert volumes["t"]["configMap"] == {"name": "own"} and "u" in volumes
    assert container(rendered, "a")["envFrom"] == [{"secretRef": {"name": "s3"}}, {"configMapRef": {"name": "c"}}]


def test_chart_claim_is_shared_and_kept(renders: dict[str, Rendered]) -> None:
    rendered = renders["all-features"]
    (claim,) = rendered.of_kind("PersistentVolumeClaim")
    assert claim["metadata"]["name"] == f"{GATEWAY}-models"
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert claim["spec"] == {"accessModes": ["ReadWriteMany"], "storageClassName": "fast-rwx",
                             "resources": {"requests": {"storage": "200Gi"}}}  # fmt: skip
    volumes = {v["name"]: v for v in pod(rendered, "vllm-llama-32-1b")["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == f"{GATEWAY}-models"


def test_keda_owns_the_engines_replicas(helm: Helm, renders: dict[str, Rendered]) -> None:
    autoscaling = {"enabled": True, "serverAddress": "http://prometheus:9090", "maxReplicas": 4}
    rendered = helm.template(
        values={
            "engineDefaults": {"autoscaling": autoscaling},
            "engines": [engine("a"), engine("b", engine="sglang"), engine("s", engine="simulator", simulate="sglang", model="n"),
                        engine("c", model="o", autoscaling={"enabled": False})],
        }
    )  # fmt: skip
    queries = {
        s["metadata"]["name"]: s["spec"]["triggers"][0]["metadata"]["query"] for s in rendered.of_kind("ScaledObject")
    }
    assert queries == {
        "a": 'sum(vllm:num_requests_waiting{namespace="llm", service="a"}) or vector(0)',
        "b": 'sum(sglang:num_queue_reqs{namespace="llm", service="b"}) or vector(0)',
        "s": 'sum(sglang:num_queue_reqs{namespace="llm", service="s"}) or vector(0)',
    }
    for name in ("a", "b", "s"):
        assert "replicas" not in rendered.get("Deployment", name)["spec"], name
    assert rendered.get("Deployment", "c")["spec"]["replicas"] == 1
    scaled = rendered.get("ScaledObject", "a")["spec"]
    assert (scaled["minReplicaCount"], scaled["maxReplicaCount"], scaled["scaleTargetRef"]["name"]) == (1, 4, "a")
    assert {b["metadata"]["name"] for b in rendered.of_kind("PodDisruptionBudget")} == {"a", "b", "s"}
    assert_valid(rendered)
    assert "replicas" not in renders["all-features"].get("Deployment", "sglang-llama-32-1b")["spec"]


def test_keda_needs_a_prometheus(helm: Helm) -> None:
    message = helm.template_error(values={"engines": [engine("a", autoscaling={"enabled": True})]})
    assert 'engines[0] "a": autoscaling.enabled needs autoscaling.serverAddress' in message


def test_ingress_with_several_hosts_and_a_host_less_rule(helm: Helm) -> None:
    hosts = [{"host": "a.example.com", "paths": [{"path": "/v1"}, {"path": "/healthz", "pathType": "Exact"}]},
             {"host": "b.example.com"}, {"paths": [{"path": "/v1"}]}]  # fmt: skip
    rendered = helm.template(values={"ingress": {"enabled": True, "hosts": hosts, "tls": {"enabled": True}}})
    ingress = rendered.get("Ingress", GATEWAY)
    rules = ingress["spec"]["rules"]
    assert [r.get("host") for r in rules] == ["a.example.com", "b.example.com", None]
    assert [(p["path"], p["pathType"]) for p in rules[0]["http"]["paths"]] == [("/v1", "Prefix"), ("/healthz", "Exact")]
    assert rules[1]["http"]["paths"][0]["path"] == "/"
    assert ingress["spec"]["tls"] == [{"hosts": ["a.example.com", "b.example.com"], "secretName": f"{GATEWAY}-tls"}]
    assert_valid(rendered)


def test_http_route_to_the_api_port(renders: dict[str, Rendered], helm: Helm) -> None:
    route = renders["all-features"].get("HTTPRoute", GATEWAY)
    assert route["spec"]["parentRefs"] == [{"name": "public", "namespace": "gateway-system", "sectionName": "https"}]
    assert route["spec"]["hostnames"] == ["llm.example.com"]
    (rule,) = route["spec"]["rules"]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/v1"}}]
    assert rule["backendRefs"] == [{"name": GATEWAY, "port": 80}]  # the Service's API port, never metrics
    assert "httpRoute.enabled: set httpRoute.parentRefs" in helm.template_error(values={"httpRoute": {"enabled": True}})


# --- Engines running elsewhere: replicas, OpenAI-compatible base URLs, health paths, own keys --------

KEYS_DIR = "/var/run/secrets/llm-gateway/engine-keys"


def external(name: str = "x", **fields: Any) -> dict[str, Any]:
    return {"name": name, "ownedBy": "remote", "model": f"model-{name}", **fields}


ELSEWHERE = {
    "engines": [
        engine("a", engine="simulator", healthPath="/ready"),
        external("pool", urls=["http://10.0.0.1:8000", "https://10.0.0.2:8443/"]),
        external("groq", baseUrl="https://api.groq.com/openai/v1", healthPath=None, apiKeySecret={"name": "groq-key"}),
        external("pplx", baseUrl="https://api.perplexity.ai", apiKeySecret={"name": "pplx", "key": "token"}),
        external("root", url="http://10.0.0.3:8000", healthPath="/v1/models"),
    ]
}


def test_engines_elsewhere_in_the_routing_map(helm: Helm) -> None:
    rendered = helm.template(values=ELSEWHERE)
    routes = {route["name"]: route for route in rendered.routing["engines"]}
    common = {"url", "urls", "base_url", "health_path", "api_key_file"}
    assert {name: {k: v for k, v in route.items() if k in common} for name, route in routes.items()} == {
        "a": {"url": f"http://a.{NAMESPACE}.svc.cluster.local:8000", "health_path": "/ready"},
        "pool": {"urls": ["http://10.0.0.1:8000", "https://10.0.0.2:8443/"]},
        "groq": {"base_url": "https://api.groq.com/openai/v1", "health_path": None,
                 "api_key_file": f"{KEYS_DIR}/groq/api-key"},
        "pplx": {"base_url": "https://api.perplexity.ai", "api_key_file": f"{KEYS_DIR}/pplx/api-key"},
        "root": {"url": "http://10.0.0.3:8000", "health_path": "/v1/models"},
    }  # fmt: skip
    # null is written as null (checks off), unset not at all (the gateway's default)
    text = rendered.routing_text
    assert text.count("health_path: null") == 1 and text.count("health_path:") == 3, text
    # the gateway's loader takes every field, and keeps the default for what the chart left out
    loaded = {spec.name: spec for spec in rendered.load_routing().engines}
    assert [loaded[name].checked_health_path for name in ("a", "pool", "groq", "pplx", "root")] == [
        "/ready", "/health", None, None, "/v1/models"
    ]  # fmt: skip
    assert loaded["pool"].endpoints == ("http://10.0.0.1:8000", "https://10.0.0.2:8443")


def test_engine_keys_are_mounted_from_their_secrets(helm: Helm) -> None:
    rendered = helm.template(values=ELSEWHERE)
    gateway = pod(rendered, GATEWAY)
    (volume,) = [v for v in gateway["volumes"] if v["name"] == "engine-keys"]
    assert volume["projected"] == {
        "sources": [
            {"secret": {"name": "groq-key", "items": [{"key": "api-key", "path": "groq/api-key"}]}},
            {"secret": {"name": "pplx", "items": [{"key": "token", "path": "pplx/api-key"}]}},
        ],
        "defaultMode": 0o440,
    }
    mounts = [m for m in gateway["containers"][0]["volumeMounts"] if m["name"] == "engine-keys"]
    assert mounts == [{"name": "engine-keys", "mountPath": KEYS_DIR, "readOnly": True}]
    # each api_key_file is the file that volume puts under that mount
    for route in rendered.routing["engines"]:
        if "api_key_file" in route:
            assert route["api_key_file"] == f"{KEYS_DIR}/{route['name']}/api-key"
    assert_valid(rendered)
    # no engine of its own key: no volume, and the gateway's pod is the one it was
    plain = pod(helm.template(), GATEWAY)
    assert "engine-keys" not in {v["name"] for v in plain["volumes"]}


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        (external(url="http://h:8000", baseUrl="https://h/v1"), "set baseUrl (an OpenAI-compatible base URL"),
        (external(urls=["http://h:8000"], baseUrl="https://h/v1"), "or url/urls (an engine's root"),
        (external(url="http://h:8000", urls=["http://g:8000"]), "set url (one replica) or urls (several), not both"),
        (engine(urls=["http://h:8000"]), "set either engine (the chart deploys it) or url, urls or baseUrl"),
        (engine(baseUrl="https://h/v1"), "set either engine (the chart deploys it) or url, urls or baseUrl"),
        (engine(apiKeySecret={"name": "k"}), "apiKeySecret is only for url, urls and baseUrl entries; a deployed engine checks the shared engineApiKey"),
        (external(baseUrl="https://h/v1", headers={"Authorization": "Bearer sk"}), "headers: Authorization would be written in plain text"),
        (external(url="http://h:8000", headers={"x-api-key": "sk"}), "give the key with apiKeySecret (a Secret) instead"),
        ({"name": "x", "model": "m"}, "set engine (vllm, sglang or simulator) to deploy one, or url, urls or baseUrl"),
    ],
)  # fmt: skip
def test_engines_elsewhere_refused_with_a_message(helm: Helm, entry: dict[str, Any], fragment: str) -> None:
    message = helm.template_error(values={"engines": [engine("a"), entry]})
    assert f'engines[1] "{entry["name"]}": ' in message and fragment in message, message


@pytest.mark.parametrize(
    ("entry", "path"),
    [
        (external(urls=[]), "engines/0/urls"),
        (external(urls=["http://h:8000", "http://h:8000"]), "engines/0/urls"),
        (external(urls=["http://h:8000/v1"]), "engines/0/urls/0"),
        (external(urls=["h:8000"]), "engines/0/urls/0"),
        (external(baseUrl="api.groq.com/openai/v1"), "engines/0/baseUrl"),
        (external(baseUrl="https://api.example.com/v1?x=1"), "engines/0/baseUrl"),
        (external(url="http://h:8000", healthPath="health"), "engines/0/healthPath"),
        (external(url="http://h:8000", apiKeySecret={"key": "api-key"}), "engines/0/apiKeySecret"),
        (external(url="http://h:8000", apiKeySecret={"name": "Bad_Name"}), "engines/0/apiKeySecret/name"),
        (external(url="http://h:8000", apiKeySecret={"name": "k", "item": "x"}), "engines/0/apiKeySecret"),
    ],
)
def test_schema_refuses_bad_engines_elsewhere(helm: Helm, entry: dict[str, Any], path: str) -> None:
    message = helm.template_error(values={"engines": [entry]})
    assert SCHEMA_ERROR in message and f"/{path}'" in message, message


def test_readme_provider_example_renders(helm: Helm) -> None:
    readme = (CHART_DIR / "README.md").read_text()
    (block,) = [b for b in readme.split("```yaml\n")[1:] if "apiKeySecret" in b.split("```")[0]]
    values = yaml.safe_load(block.split("```")[0])
    routes = {route["name"]: route for route in helm.template(values=values).routing["engines"]}
    assert routes["groq-llama"]["base_url"] == "https://api.groq.com/openai/v1"
    assert routes["groq-llama"]["health_path"] is None
    assert routes["groq-llama"]["api_key_file"] == f"{KEYS_DIR}/groq-llama/api-key"
