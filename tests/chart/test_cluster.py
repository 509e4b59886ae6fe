"""On a real cluster: install the CPU example, wait for its pods, call the gateway through its Service.

Runs only when KUBECONFIG points at a reachable cluster (see conftest.py); reported as skipped
otherwise. The cluster must be able to pull the gateway image, or be given it first, e.g.
`k3d image import ghcr.io/llm-gateway/llm-gateway:<appVersion of Chart.yaml>`. Another image: set
LLM_GATEWAY_IMAGE_REPOSITORY / LLM_GATEWAY_IMAGE_TAG.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pykube
import pytest
from pytest_helm_charts.clusters import Cluster
from pytest_helm_charts.k8s.deployment import wait_for_deployments_to_run

from tests.chart.conftest import CHART_DIR, VALUE_SETS, Helm

# helm install --wait alone may take minutes: far beyond the suite-wide pytest-timeout.
pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]

RELEASE = "llm-gw-e2e"
GATEWAY = f"{RELEASE}-llm-gateway"  # the release name does not contain "llm-gateway"
ENGINES = ["vllm-llama-32-1b", "sglang-llama-32-1b"]
LLAMA = "meta-llama/Llama-3.2-1B-Instruct"


@pytest.fixture(scope="module")
def installed(helm: Helm, kube_cluster: Cluster, random_namespace: pykube.Namespace) -> Iterator[str]:
    """values-cpu.yaml installed into a fresh namespace (removed afterwards); yields the namespace."""
    namespace = random_namespace.name
    args = ["install", RELEASE, str(CHART_DIR), "--namespace", namespace, "-f", str(VALUE_SETS["cpu"])]
    args += ["--set", "ingress.enabled=false", "--wait", "--timeout", "5m"]
    if os.environ.get("LLM_GATEWAY_IMAGE_REPOSITORY"):
        args += ["--set", f"gateway.image.repository={os.environ['LLM_GATEWAY_IMAGE_REPOSITORY']}"]
    if os.environ.get("LLM_GATEWAY_IMAGE_TAG"):
        args += ["--set", f"gateway.image.tag={os.environ['LLM_GATEWAY_IMAGE_TAG']}"]
    helm.run(*args, timeout=400)
    try:
        yield namespace
    finally:
        helm.run("uninstall", RELEASE, "--namespace", namespace, "--wait", timeout=200)


def test_pods_become_ready(kube_cluster: Cluster, installed: str) -> None:
    deployments = wait_for_deployments_to_run(kube_cluster.kube_client, [*ENGINES, GATEWAY], installed, 300)
    assert {d.name for d in deployments} == {*ENGINES, GATEWAY}


def test_models_through_the_gateway_service(kube_cluster: Cluster, installed: str) -> None:
    # The API server's service proxy: no port-forward process to manage.
    response = kube_cluster.kube_client.get(url=f"services/{GATEWAY}:http/proxy/v1/models", namespace=installed)
    response.raise_for_status()
    listing = response.json()
    assert listing["object"] == "list"
    assert {(LLAMA, "vllm"), (LLAMA, "sglang")} <= {(c["id"], c["owned_by"]) for c in listing["data"]}


def test_metrics_only_on_the_metrics_port(kube_cluster: Cluster, installed: str) -> None:
    """/metrics answers on the Service's port "metrics" (what the ServiceMonitor scrapes), not on the API port."""
    client = kube_cluster.kube_client
    response = client.get(url=f"services/{GATEWAY}:metrics/proxy/metrics", namespace=installed)
    response.raise_for_status()
    assert "llm_gateway_config_engines" in response.text
    assert client.get(url=f"services/{GATEWAY}:http/proxy/metrics", namespace=installed).status_code == 404


def test_chat_routes_by_owned_by(kube_cluster: Cluster, installed: str) -> None:
    for owned_by, engine in (("vllm", "vllm-llama-32-1b"), ("sglang", "sglang-llama-32-1b")):
        body = {"model": LLAMA, "owned_by": owned_by, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        response = kube_cluster.kube_client.post(
            url=f"services/{GATEWAY}:http/proxy/v1/chat/completions",
            namespace=installed,
            data=json.dumps(body),
            headers={"Content-Type": "application/json"},
        )
        response.raise_for_status()
        assert response.headers.get("x-gateway-engine") == engine


def test_helm_test_hook_passes(helm: Helm, installed: str) -> None:
    helm.run("test", RELEASE, "--namespace", installed, "--timeout", "3m", timeout=240)
