"""Discovery: the gateway reaches each deployed engine pod by pod, through its Service's EndpointSlices.

The routing map names each deployed engine's Service; a Role lets the gateway's ServiceAccount get, list
and watch EndpointSlices in the release namespace and nothing else; only the gateway pods mount a token;
the NetworkPolicies restrict ingress only, so the gateway still reaches the API server and the engine pods.
The last test runs the rendered pods and the real gateway against a stand-in for the API server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from tests.chart.conftest import NAMESPACE, VALUE_SETS, Helm, Rendered
from tests.chart.test_chart_contract import command_line
from tests.chart.test_chart_render import GATEWAY, gateway_pod
from tests.fake_kube_api import FakeKubeAPI
from tests.support import free_port, start_cli, start_gateway, start_simulator
from tests.web import get, metric_value, post, wait_for

ROLE = f"{GATEWAY}-discovery"
RULES = [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]}]
OFF = {"gateway": {"discovery": {"enabled": False}}}
EXTERNAL_ONLY = {"engines": [{"name": "remote", "url": "http://h:8000", "ownedBy": "vllm", "model": "m"}]}


def routes(rendered: Rendered) -> dict[str, dict[str, Any]]:
    return {engine["name"]: engine for engine in rendered.routing["engines"]}


def deployed(rendered: Rendered) -> set[str]:
    deployments = rendered.of_kind("Deployment")
    return {d["metadata"]["name"] for d in deployments if "llm-gateway/engine-kind" in d["metadata"]["labels"]}


def token_mounts(rendered: Rendered) -> dict[str, bool]:
    return {owner: pod["automountServiceAccountToken"] for owner, pod in rendered.pod_specs().items()}


# --- The routing map ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_deployed_engine_names_its_service(renders: dict[str, Rendered], value_set: str) -> None:
    rendered = renders[value_set]
    engines = deployed(rendered)
    for name, route in routes(rendered).items():
        if name in engines:
            service = rendered.get("Service", name)
            assert route["discovery"] == {"service": service["metadata"]["name"], "namespace": NAMESPACE, "port": 8000}
            # the Service's URL stays: the gateway uses it until the API answers and while no pod is ready
            assert route["url"] == f"http://{name}.{NAMESPACE}.svc.cluster.local:8000"
        else:
            assert "discovery" not in route, f"{name}: a url entry has no Service of ours to watch"


def test_discovery_off_sends_to_the_services(helm: Helm) -> None:
    rendered = helm.template(VALUE_SETS["example2"], values=OFF)
    assert not [route for route in rendered.routing["engines"] if "discovery" in route]
    assert not rendered.of_kind("Role") and not rendered.of_kind("RoleBinding")
    assert set(token_mounts(rendered).values()) == {False}
    rendered.load_routing()


def test_no_rbac_without_deployed_engines(helm: Helm) -> None:
    """Only url entries: nothing to discover, so no Role and no token."""
    rendered = helm.template(values=EXTERNAL_ONLY)
    assert not rendered.of_kind("Role") and not rendered.of_kind("RoleBinding")
    assert set(token_mounts(rendered).values()) == {False}


# --- RBAC: least privilege ----------------------------------------------------------------------------


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_rbac_is_least_privilege(renders: dict[str, Rendered], value_set: str) -> None:
    """get, list and watch on EndpointSlices, in the release namespace, for the gateway's account only."""
    rendered = renders[value_set]
    kinds = {doc["kind"] for doc in rendered.docs}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}
    # a second Role only for engines that scale to zero (test_chart_scale_to_zero.py)
    extra = {f"{GATEWAY}-scale-to-zero"} if any("wake" in e for e in rendered.routing["engines"]) else set()
    roles = {doc["metadata"]["name"]: doc for doc in rendered.of_kind("Role")}
    bindings = {doc["metadata"]["name"]: doc for doc in rendered.of_kind("RoleBinding")}
    assert set(roles) == set(bindings) == {ROLE} | extra
    role, binding = roles[ROLE], bindings[ROLE]
    assert role["metadata"] == {**role["metadata"], "name": ROLE, "namespace": NAMESPACE}
    assert role["rules"] == RULES
    account = gateway_pod(rendered)["spec"]["serviceAccountName"]
    assert binding["metadata"]["namespace"] == NAMESPACE
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": ROLE}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
    # the account holds the token back by default; only the gateway pods ask for it
    assert rendered.get("ServiceAccount", account)["automountServiceAccountToken"] is False
    assert {owner for owner, mounted in token_mounts(rendered).items() if mounted} == {GATEWAY}


def test_an_existing_service_account_is_bound(helm: Helm) -> None:
    rendered = helm.template(values={"gateway": {"serviceAccount": {"create": False, "name": "llm-gateway-reader"}}})
    assert not rendered.of_kind("ServiceAccount")
    assert gateway_pod(rendered)["spec"]["serviceAccountName"] == "llm-gateway-reader"
    (binding,) = rendered.of_kind("RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "llm-gateway-reader", "namespace": NAMESPACE}]


def test_the_default_account_is_fine_without_discovery(helm: Helm) -> None:
    rendered = helm.template(values={**OFF, "gateway": {**OFF["gateway"], "serviceAccount": {"create": False}}})
    assert gateway_pod(rendered)["spec"]["serviceAccountName"] == "default"
    assert token_mounts(rendered)[GATEWAY] is False


# --- NetworkPolicy: ingress only --------------------------------------------------------------------


@pytest.mark.parametrize("value_set", ["all-features", "secured"])
def test_network_policies_leave_discovery_working(renders: dict[str, Rendered], value_set: str) -> None:
    """The policies restrict ingress only: the gateway's egress to the API server and to pod IPs is open,
    and the engines admit the gateway on the port discovery sends to."""
    rendered = renders[value_set]
    policies = rendered.of_kind("NetworkPolicy")
    assert policies
    for policy in policies:
        assert policy["spec"]["policyTypes"] == ["Ingress"], policy["metadata"]["name"]
        assert "egress" not in policy["spec"]
    (engine_rule,) = rendered.get("NetworkPolicy", f"{GATEWAY}-engines")["spec"]["ingress"]
    ports = {route["discovery"]["port"] for route in rendered.routing["engines"] if "discovery" in route}
    assert ports == {8000} and engine_rule["ports"] == [{"protocol": "TCP", "port": 8000}]


# --- The real gateway on the rendered map, against a stand-in for the API server ----------------------

PODS = ("127.0.0.2", "127.0.0.3")  # loopback addresses standing for pod IPs: one port, several hosts


def endpoint_slice(service: dict[str, Any], container_port: int, addresses: tuple[str, ...]) -> dict[str, Any]:
    """What the EndpointSlice controller writes for `service`: its name label, the port its targetPort
    names on the pods, and one ready endpoint per pod."""
    name = service["metadata"]["name"]
    (port,) = service["spec"]["ports"]
    return {
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {"name": f"{name}-x7k2p", "namespace": NAMESPACE, "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "ports": [{"name": port["targetPort"], "port": container_port, "protocol": "TCP"}],
        "endpoints": [{"addresses": [address], "conditions": {"ready": True}} for address in addresses],
    }


def served(simulator_url: str) -> float:
    return metric_value(get(simulator_url + "/metrics").body.decode(), "vllm:e2e_request_latency_seconds_count")


def test_gateway_reaches_the_pods_the_rendered_map_names(helm: Helm, tmp_path: Path) -> None:
    values = yaml.safe_load(VALUE_SETS["cpu"].read_text())
    values["engines"][0]["replicas"] = 2
    rendered = helm.template(values=values)
    two_pods, one_pod = (engine["name"] for engine in values["engines"])
    deployment = rendered.get("Deployment", two_pods)
    assert deployment["spec"]["replicas"] == 2
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    service = rendered.get("Service", two_pods)
    target_port = service["spec"]["ports"][0]["targetPort"]
    (target,) = [p["containerPort"] for p in container["ports"] if p["name"] == target_port]
    routing = rendered.routing
    route = {engine["name"]: engine for engine in routing["engines"]}
    assert route[two_pods]["discovery"]["port"] == target

    # Loopback stands in for the pod network: the pods listen on one free port instead of 8000, and the
    # map and the slice say so. Everything else is as rendered.
    port = free_port()
    api = FakeKubeAPI().start()
    api.slices[two_pods] = endpoint_slice(service, port, PODS)
    route[two_pods]["discovery"]["port"] = port
    route[two_pods]["url"] = f"http://127.0.0.1:{free_port()}"  # the Service: nothing answers there
    started = []
    try:
        for address in PODS:  # the engine's two pods, from its pod template
            args = command_line(container, {}, {"--host": address, "--port": str(port)})
            started.append(start_cli(args, port, "/health", tmp_path, f"pod-{address}", host=address))
        # no ready pod behind the other engine's Service (no slice): the gateway keeps using its url
        other = start_simulator(route[one_pod]["owned_by"], route[one_pod]["model"], tmp_path)
        started.append(other)
        route[one_pod]["url"] = other.url
        config = tmp_path / "routes.yaml"
        config.write_text(yaml.safe_dump(routing, sort_keys=False))
        gateway = start_gateway(config, tmp_path, env={"LLM_GATEWAY_KUBE_API": api.url})
        started.append(gateway)

        def available(address: str) -> float:
            text = get(gateway.url + "/metrics").body.decode()
            return metric_value(text, "llm_gateway_endpoint_available", endpoint=f"http://{address}:{port}")

        wait_for(lambda: all(available(a) == 1 for a in PODS), timeout=10, message="both pods discovered")
        before = [served(pod.url) for pod in started[:2]]
        body = {"model": route[two_pods]["model"], "owned_by": route[two_pods]["owned_by"], "max_tokens": 2,
                "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
        for _ in range(20):
            answer = post(gateway.url + "/v1/chat/completions", body)
            assert answer.status == 200 and answer.headers["x-gateway-engine"] == two_pods, answer.body
        spread = [served(pod.url) - b for pod, b in zip(started[:2], before, strict=False)]
        assert sum(spread) == 20 and min(spread) > 0, f"both pods serve: {spread}"
        answer = post(gateway.url + "/v1/chat/completions", {**body, "owned_by": route[one_pod]["owned_by"]})
        assert answer.status == 200 and answer.headers["x-gateway-engine"] == one_pod, answer.body

        # Every call the gateway made is one the Role allows: its group, resource and namespace, its verbs.
        (rule,) = rendered.get("Role", ROLE)["rules"]
        watched = set()
        for call in api.requests:
            url = urlsplit(call)
            assert url.path == f"/apis/{rule['apiGroups'][0]}/v1/namespaces/{NAMESPACE}/{rule['resources'][0]}", call
            query = parse_qs(url.query)
            assert ("watch" if query.get("watch") == ["1"] else "list") in rule["verbs"], call
            watched.add(query["labelSelector"][0])
        assert watched == {f"kubernetes.io/service-name={name}" for name in (two_pods, one_pod)}
    finally:
        for process in started:
            process.stop()
        api.stop()
