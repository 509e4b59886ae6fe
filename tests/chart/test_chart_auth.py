"""API keys, the engine credential and the rate-limit store, as the chart renders them.

The keys file the chart writes is loaded with the gateway's own loader; the gateway mounts each Secret as
a directory and is given the file in it; the engines check the credential exactly when one is set; the
chart's Redis is hardened and reachable only by the gateway. Processes run in test_chart_contract.py.
"""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import pytest
import yaml

from gateway_app.auth import parse_keys_file
from tests.chart.conftest import EXAMPLES, NAMESPACE, VALUE_SETS, Helm, Rendered
from tests.chart.test_chart_render import GATEWAY, rendered_notes

REDIS = f"{GATEWAY}-redis"
API_KEY_ARGS = ["--api-key", "$(ENGINE_API_KEY)"]
ALL_FEATURES_KEYS = {"team-a": "sk-all-features-team-a", "team-b": "sk-all-features-team-b"}


def values_of(value_set: str) -> dict[str, Any]:
    return yaml.safe_load(VALUE_SETS[value_set].read_text())


def container(rendered: Rendered, deployment: str) -> dict[str, Any]:
    return rendered.get("Deployment", deployment)["spec"]["template"]["spec"]["containers"][0]


def env_of(container_spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container_spec.get("env", [])}


def arg_after(args: list[str], flag: str) -> str:
    assert args.count(flag) == 1, f"{flag} in {args}"
    return args[args.index(flag) + 1]


def secret_data(rendered: Rendered, name: str) -> dict[str, str]:
    return {key: base64.b64decode(value).decode() for key, value in rendered.get("Secret", name)["data"].items()}


def mounted_secret(rendered: Rendered, path: str) -> tuple[str, str]:
    """(Secret name, item) behind a file path the gateway is given; checks the mount is a whole directory."""
    pod = rendered.get("Deployment", GATEWAY)["spec"]["template"]["spec"]
    directory, _, filename = path.rpartition("/")
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == directory]
    assert "subPath" not in mount and mount["readOnly"] is True  # subPath mounts never see a Secret change
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    secret = volume["secret"]
    assert secret["defaultMode"] == 0o440  # the gateway's fsGroup may read it, no one else
    (item,) = secret["items"]
    assert item["path"] == filename
    return secret["secretName"], item["key"]


def secret_ref(env_item: dict[str, Any]) -> tuple[str, str]:
    ref = env_item["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


def deployed_engines(rendered: Rendered) -> dict[str, dict[str, Any]]:
    return {
        d["metadata"]["name"]: d
        for d in rendered.of_kind("Deployment")
        if "llm-gateway/engine-kind" in d["metadata"]["labels"]
    }


# --- API keys -------------------------------------------------------------------------------------


def test_inline_keys_load_with_the_gateways_loader(renders: dict[str, Rendered]) -> None:
    """One loader for both: the Secret the chart writes is what gateway_app.auth accepts and means."""
    rendered = renders["all-features"]
    text = secret_data(rendered, f"{GATEWAY}-api-keys")["keys.yaml"]
    store = parse_keys_file(text, "rendered keys.yaml")
    assert len(store) == 2
    for name, key in ALL_FEATURES_KEYS.items():
        client = store.authenticate([(b"authorization", f"Bearer {key}".encode())])
        assert client.name == name
    team_b = store.authenticate([(b"x-api-key", ALL_FEATURES_KEYS["team-b"].encode())])
    assert team_b.allowed_models == {"llama", "/models/Phi-tiny-MoE-instruct"}
    assert (team_b.requests_per_minute, team_b.tokens_per_minute) == (None, 100000)
    # verbatim: the values' entries are the file's entries
    assert yaml.safe_load(text) == {"keys": values_of("all-features")["auth"]["keys"]}


def test_no_keys_refuses_everything_rather_than_opening(helm: Helm) -> None:
    rendered = helm.template(values={"auth": {"enabled": True}})
    store = parse_keys_file(secret_data(rendered, f"{GATEWAY}-api-keys")["keys.yaml"], "keys.yaml")
    assert len(store) == 0
    assert "--keys-file" in container(rendered, GATEWAY)["args"]


@pytest.mark.parametrize(
    ("value_set", "secret", "item"),
    [("all-features", f"{GATEWAY}-api-keys", "keys.yaml"), ("secured", "llm-gateway-keys", "clients.yaml")],
)
def test_gateway_reads_the_keys_from_a_mounted_secret(
    renders: dict[str, Rendered], value_set: str, secret: str, item: str
) -> None:
    args = container(renders[value_set], GATEWAY)["args"]
    assert mounted_secret(renders[value_set], arg_after(args, "--keys-file")) == (secret, item)


# --- The engine credential ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value_set", "secret", "item"),
    [("all-features", f"{GATEWAY}-engine-api-key", "api-key"), ("secured", "llm-engine-key", "token")],
)
def test_gateway_and_every_engine_share_the_engine_key(
    renders: dict[str, Rendered], value_set: str, secret: str, item: str
) -> None:
    rendered = renders[value_set]
    args = container(rendered, GATEWAY)["args"]
    assert mounted_secret(rendered, arg_after(args, "--engine-api-key-file")) == (secret, item)
    engines = deployed_engines(rendered)
    assert {d["metadata"]["labels"]["llm-gateway/engine-kind"] for d in engines.values()} == {
        "vllm",
        "sglang",
        "simulator",
    }
    for name in engines:
        engine = container(rendered, name)
        where = f"{value_set}/{name}"
        at = engine["args"].index("--api-key")
        assert engine["args"][at : at + 2] == API_KEY_ARGS, where  # Kubernetes expands $(ENGINE_API_KEY)
        assert secret_ref(env_of(engine)["ENGINE_API_KEY"]) == (secret, item), where
    if value_set == "all-features":
        assert secret_data(rendered, secret) == {"api-key": "engine-key-for-tests"}


def without_engine_key(pod_template: dict[str, Any]) -> dict[str, Any]:
    """The pod template with the two --api-key arguments and ENGINE_API_KEY taken out."""
    template = copy.deepcopy(pod_template)
    engine = template["spec"]["containers"][0]
    at = engine["args"].index("--api-key")
    assert engine["args"][at : at + 2] == API_KEY_ARGS
    del engine["args"][at : at + 2]
    engine["env"] = [item for item in engine["env"] if item["name"] != "ENGINE_API_KEY"]
    if not engine["env"]:
        del engine["env"]
    return template


@pytest.mark.parametrize("value_set", EXAMPLES)
def test_the_engine_key_is_the_only_change_to_engine_pods(
    helm: Helm, renders: dict[str, Rendered], value_set: str
) -> None:
    """Off (the default), engine pods are exactly as before; on, they differ by the argument and the variable."""
    plain = renders[value_set]
    keyed = helm.template(VALUE_SETS[value_set], values={"engineApiKey": {"existingSecret": "k", "key": "key"}})
    engines = deployed_engines(plain)
    assert engines
    for name, deployment in engines.items():
        before = deployment["spec"]["template"]
        after = keyed.get("Deployment", name)["spec"]["template"]
        assert "--api-key" not in before["spec"]["containers"][0]["args"]
        assert "ENGINE_API_KEY" not in env_of(before["spec"]["containers"][0])
        assert json.dumps(without_engine_key(after), sort_keys=True) == json.dumps(before, sort_keys=True), name


def test_user_env_replaces_the_charts_engine_key(helm: Helm) -> None:
    rendered = helm.template(
        values={
            "engineApiKey": {"value": "k"},
            "engines": [
                {"name": "a", "engine": "vllm", "model": "m", "env": [{"name": "ENGINE_API_KEY", "value": "own"}]}
            ],
        }
    )
    assert [e for e in container(rendered, "a")["env"] if e["name"] == "ENGINE_API_KEY"] == [
        {"name": "ENGINE_API_KEY", "value": "own"}
    ]


def test_engine_key_value_is_trimmed(helm: Helm) -> None:
    """The gateway strips the file it reads; the engines must get that same key."""
    rendered = helm.template(values={"engineApiKey": {"value": " k-1\n"}})
    assert secret_data(rendered, f"{GATEWAY}-engine-api-key") == {"api-key": "k-1"}


# --- Off by default -------------------------------------------------------------------------------


@pytest.mark.parametrize("value_set", ["defaults", *EXAMPLES])
def test_auth_and_limits_are_off_by_default(renders: dict[str, Rendered], value_set: str) -> None:
    rendered = renders[value_set]
    gateway = container(rendered, GATEWAY)
    assert gateway["args"] == ["serve", "--config", "/etc/llm-gateway/routes.yaml", "--host", "0.0.0.0", "--port",
                               "8000", "--metrics-port", "9090", "--log-level", "info", "--log-format", "json",
                               "--shutdown-grace-seconds", "110"]  # fmt: skip
    assert not [name for name in env_of(gateway) if name.startswith("LLM_GATEWAY_")]
    assert {v["name"] for v in rendered.get("Deployment", GATEWAY)["spec"]["template"]["spec"]["volumes"]} == {
        "routes",
        "tmp",
    }
    for name in deployed_engines(rendered):
        assert "--api-key" not in container(rendered, name)["args"], name
    assert not [d for d in rendered.of_kind("Deployment") if d["metadata"]["name"] == REDIS]
    assert rendered.load_routing().settings.limits.requests_per_minute is None


# --- Rate limits and Redis ------------------------------------------------------------------------


def test_settings_limits_reach_the_gateway(renders: dict[str, Rendered]) -> None:
    limits = renders["secured"].load_routing().settings.limits
    assert (limits.requests_per_minute, limits.tokens_per_minute) == (600, 200000)
    assert (limits.completion_tokens_estimate, limits.fail_open) == (128, False)


def test_chart_redis_serves_the_gateway(renders: dict[str, Rendered]) -> None:
    rendered = renders["all-features"]
    gateway = container(rendered, GATEWAY)
    service = rendered.get("Service", REDIS)
    (port,) = service["spec"]["ports"]
    assert (
        arg_after(gateway["args"], "--redis-url") == f"redis://{REDIS}.{NAMESPACE}.svc.cluster.local:{port['port']}/0"
    )
    pod = rendered.get("Deployment", REDIS)["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    redis = pod["spec"]["containers"][0]
    assert port["targetPort"] in {p["name"] for p in redis["ports"]}
    # the password: one Secret, given to Redis as --requirepass and to the gateway as its variable
    password_ref = (REDIS, "password")
    assert secret_data(rendered, REDIS) == {"password": "redis-password-for-tests"}
    assert secret_ref(env_of(gateway)["LLM_GATEWAY_REDIS_PASSWORD"]) == password_ref
    assert secret_ref(env_of(redis)["REDIS_PASSWORD"]) == password_ref
    assert arg_after(redis["args"], "--requirepass") == "$(REDIS_PASSWORD)"


def test_chart_redis_is_small_and_hardened(renders: dict[str, Rendered]) -> None:
    deployment = renders["all-features"].get("Deployment", REDIS)
    assert deployment["spec"]["replicas"] == 1
    pod = deployment["spec"]["template"]["spec"]
    (redis,) = pod["containers"]
    assert redis["image"] == "redis:7.4.2-alpine"
    assert redis["command"] == ["redis-server"]
    assert (
        arg_after(redis["args"], "--save") == "" and arg_after(redis["args"], "--appendonly") == "no"
    )  # no persistence
    assert pod["securityContext"]["runAsUser"] == 999 and pod["securityContext"]["runAsNonRoot"] is True
    assert redis["securityContext"]["readOnlyRootFilesystem"] is True
    (data,) = [m for m in redis["volumeMounts"] if m["mountPath"] == "/data"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == data["name"]]
    assert "emptyDir" in volume
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert redis[probe]["tcpSocket"] == {"port": "redis"}, probe
    assert {"cpu", "memory"} <= set(redis["resources"]["requests"])


def test_redis_without_password(helm: Helm) -> None:
    rendered = helm.template(values={"redis": {"deploy": True}})
    assert "--requirepass" not in container(rendered, REDIS)["args"]
    assert "env" not in container(rendered, REDIS)
    assert "LLM_GATEWAY_REDIS_PASSWORD" not in env_of(container(rendered, GATEWAY))
    assert not rendered.of_kind("Secret")


def test_external_redis(renders: dict[str, Rendered]) -> None:
    rendered = renders["secured"]
    gateway = container(rendered, GATEWAY)
    assert arg_after(gateway["args"], "--redis-url") == "redis://redis-master.cache.svc.cluster.local:6379/2"
    assert secret_ref(env_of(gateway)["LLM_GATEWAY_REDIS_PASSWORD"]) == ("redis-auth", "redis-password")
    assert not [d for d in rendered.docs if d["metadata"]["name"] == REDIS]


def test_user_env_replaces_the_charts_redis_password(helm: Helm) -> None:
    own = {"name": "LLM_GATEWAY_REDIS_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "mine", "key": "pw"}}}
    rendered = helm.template(values={"redis": {"deploy": True, "password": "p"}, "gateway": {"env": [own]}})
    assert container(rendered, GATEWAY)["env"] == [own]


# --- NetworkPolicies ------------------------------------------------------------------------------


def pods_selected(rendered: Rendered, selector: dict[str, str]) -> set[str]:
    """Owners (Deployments, the test Pod) whose pods carry every label of the selector."""
    return {owner for owner in rendered.pod_specs() if selector.items() <= pod_labels(rendered, owner).items()}


def pod_labels(rendered: Rendered, owner: str) -> dict[str, str]:
    for doc in rendered.docs:
        if doc["metadata"]["name"] == owner and doc["kind"] == "Deployment":
            return doc["spec"]["template"]["metadata"]["labels"]
        if doc["metadata"]["name"] == owner and doc["kind"] == "Pod":
            return doc["metadata"]["labels"]
    raise KeyError(owner)


def test_only_the_gateway_reaches_the_charts_redis(renders: dict[str, Rendered]) -> None:
    rendered = renders["all-features"]
    policy = rendered.get("NetworkPolicy", REDIS)
    assert pods_selected(rendered, policy["spec"]["podSelector"]["matchLabels"]) == {REDIS}
    (rule,) = policy["spec"]["ingress"]
    (peer,) = rule["from"]
    assert pods_selected(rendered, peer["podSelector"]["matchLabels"]) == {GATEWAY}
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]
    assert not [p for p in renders["secured"].of_kind("NetworkPolicy") if p["metadata"]["name"] == REDIS]


def gateway_ports(rendered: Rendered) -> dict[str, int]:
    """The gateway container's named ports: {"http": 8000, "metrics": gateway.metricsPort}."""
    return {port["name"]: port["containerPort"] for port in container(rendered, GATEWAY)["ports"]}


@pytest.mark.parametrize("value_set", ["all-features", "secured"])
def test_gateway_policy_admits_the_listed_peers_and_the_test(renders: dict[str, Rendered], value_set: str) -> None:
    """The API port admits gatewayIngressFrom and the test pod; the metrics port admits metricsFrom, nothing else."""
    rendered = renders[value_set]
    policy = rendered.get("NetworkPolicy", f"{GATEWAY}-gateway")
    assert pods_selected(rendered, policy["spec"]["podSelector"]["matchLabels"]) == {GATEWAY}
    api_rule, metrics_rule = policy["spec"]["ingress"]
    listed = values_of(value_set)["networkPolicy"]["gatewayIngressFrom"]
    assert api_rule["from"][: len(listed)] == listed
    (test_peer,) = api_rule["from"][len(listed) :]
    assert pods_selected(rendered, test_peer["podSelector"]["matchLabels"]) == {f"{GATEWAY}-test-models"}
    ports = gateway_ports(rendered)
    assert api_rule["ports"] == [{"protocol": "TCP", "port": ports["http"]}] == [{"protocol": "TCP", "port": 8000}]
    assert metrics_rule == {
        "from": values_of(value_set)["networkPolicy"]["metricsFrom"],
        "ports": [{"protocol": "TCP", "port": ports["metrics"]}],
    }
    assert ports["metrics"] != ports["http"]


def test_metrics_port_admits_prometheus_by_default(helm: Helm) -> None:
    """Without metricsFrom in the values, the metrics port admits the Prometheus pods of any namespace, by the
    label the Prometheus Operator (kube-prometheus-stack) and the prometheus chart give them."""
    ingress_nginx = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}
    rendered = helm.template(values={"networkPolicy": {"enabled": True, "gatewayIngressFrom": [ingress_nginx]}})
    api_rule, metrics_rule = rendered.get("NetworkPolicy", f"{GATEWAY}-gateway")["spec"]["ingress"]
    assert api_rule["from"][0] == ingress_nginx and api_rule["ports"] == [{"protocol": "TCP", "port": 8000}]
    assert metrics_rule == {
        "from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}],
        "ports": [{"protocol": "TCP", "port": 9090}],
    }


def test_metrics_port_closed_with_no_metrics_peers(helm: Helm) -> None:
    """metricsFrom: [] renders no rule for the port (a rule with an empty `from` would admit every pod)."""
    rendered = helm.template(
        values={
            "networkPolicy": {"enabled": True, "gatewayIngressFrom": [{"namespaceSelector": {}}], "metricsFrom": []}
        }
    )
    (api_rule,) = rendered.get("NetworkPolicy", f"{GATEWAY}-gateway")["spec"]["ingress"]
    assert api_rule["ports"] == [{"protocol": "TCP", "port": 8000}]


def test_no_gateway_policy_unless_peers_are_listed(helm: Helm) -> None:
    rendered = helm.template(values={"networkPolicy": {"enabled": True}})
    assert [p["metadata"]["name"] for p in rendered.of_kind("NetworkPolicy")] == [f"{GATEWAY}-engines"]


def test_secured_ingress_routes_only_the_api(renders: dict[str, Rendered]) -> None:
    (path,) = renders["secured"].get("Ingress", GATEWAY)["spec"]["rules"][0]["http"]["paths"]
    assert (path["path"], path["pathType"]) == ("/v1", "Prefix")


# --- helm test and NOTES.txt ----------------------------------------------------------------------


def test_helm_test_uses_the_key_it_is_given(renders: dict[str, Rendered]) -> None:
    (pod,) = renders["secured"].of_kind("Pod")
    assert secret_ref(env_of(pod["spec"]["containers"][0])["API_KEY"]) == ("llm-gateway-test-key", "key")
    (without,) = renders["all-features"].of_kind("Pod")
    assert "API_KEY" not in env_of(without["spec"]["containers"][0])
    assert "urllib.error" in without["spec"]["containers"][0]["command"][-1]  # the 401 check


def test_notes_tell_how_to_call_with_a_key(helm: Helm) -> None:
    notes = rendered_notes(helm, "-f", str(VALUE_SETS["secured"]))
    assert "API keys are on" in notes and "llm-gateway hash-key --generate" in notes
    assert 'curl -s $LLM_GATEWAY/v1/models -H "Authorization: Bearer $LLM_GATEWAY_KEY"' in notes
    assert 'item "clients.yaml" of Secret llm-gateway-keys' in notes
    assert "/metrics" not in notes  # never public through the Ingress: nothing to warn about
    assert "no Redis" not in notes  # redis.url is set
    assert "API keys are on" not in rendered_notes(helm)


def test_notes_warn_about_public_metrics_and_per_pod_limits(helm: Helm) -> None:
    args = ["-f", str(VALUE_SETS["cpu"]), "--set", "auth.enabled=true", "--set", "gateway.replicas=3",
            "--set", "gateway.settings.limits.requests_per_minute=60"]  # fmt: skip
    notes = rendered_notes(helm, *args)
    assert "WARNING: auth.keys is empty, so every request is refused with 401." in notes
    # ingress.path "/": the Ingress routes the API port only, and /metrics is on the metrics port
    assert "/metrics" not in notes
    assert "each gateway pod counts on its own" in notes and "a key gets up to 3 times its limit" in notes
    shared = rendered_notes(helm, *args, "--set", "redis.deploy=true")
    assert "each gateway pod counts on its own" not in shared
