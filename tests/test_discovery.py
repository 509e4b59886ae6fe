"""Engine pods found through EndpointSlices: list, then watch; readiness changes followed within seconds."""

from __future__ import annotations

import pytest

from tests.fake_kube_api import FakeKubeAPI, endpoint_slice
from tests.routes import write_routing_map
from tests.support import free_port
from tests.web import get, metric_value, post, wait_for

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]
PODS = ("127.0.0.2", "127.0.0.3")  # loopback addresses standing for pod IPs: one port, several hosts


@pytest.fixture
def pods(processes):
    port = free_port()
    started = {
        address: processes.cli(
            ["simulate", "--engine", "vllm", "--model", "m", "--host", address, "--port", str(port)],
            port,
            "/health",
            f"pod-{address}",
            host=address,
        )
        for address in PODS
    }
    return port, started


def served(sim) -> float:
    return metric_value(get(sim.url + "/metrics").body.decode(), "vllm:e2e_request_latency_seconds_count")


def test_gateway_follows_the_ready_pods_of_a_service(pods, processes, tmp_path):
    port, sims = pods
    api = processes.add(FakeKubeAPI().start())
    api.slices["svc-a"] = endpoint_slice("svc-a", "engine-svc", port, [(PODS[0], True), (PODS[1], False)])
    config = write_routing_map(
        tmp_path / "routes.yaml",
        [
            {
                "name": "e",
                "model": "m",
                "owned_by": "vllm",
                "url": f"http://127.0.0.1:{free_port()}",  # the Service: unused
                "discovery": {"service": "engine-svc", "namespace": "llm", "port": port},
            }
        ],
    )
    gateway = processes.gateway(config, env={"LLM_GATEWAY_KUBE_API": api.url})

    def available(address: str) -> float:
        text = get(gateway.url + "/metrics").body.decode()
        return metric_value(text, "llm_gateway_endpoint_available", endpoint=f"http://{address}:{port}")

    def send(count: int) -> list[float]:
        before = [served(sims[a]) for a in PODS]
        for _ in range(count):
            assert post(gateway.url + CHAT, {"model": "m", "messages": HI}).status == 200
        return [served(sims[a]) - b for a, b in zip(PODS, before, strict=False)]

    wait_for(lambda: available(PODS[0]) == 1, message="first pod discovered")
    assert send(6) == [6, 0]  # the unready pod gets nothing
    assert "labelSelector=kubernetes.io/service-name%3Dengine-svc" in api.requests[0]

    api.push("MODIFIED", endpoint_slice("svc-a", "engine-svc", port, [(PODS[0], True), (PODS[1], True)]))
    wait_for(lambda: available(PODS[1]) == 1, timeout=5, message="second pod ready")
    spread = send(20)
    # The new pod takes requests. (Which of two equal pods serves a sequential client is up to the
    # latency-weighted choice, so the split itself is not asserted.)
    assert spread[1] > 0 and sum(spread) == 20

    api.push("MODIFIED", endpoint_slice("svc-a", "engine-svc", port, [(PODS[0], False), (PODS[1], True)]))
    wait_for(lambda: available(PODS[0]) == 0 and available(PODS[1]) == 1, timeout=5, message="first pod gone")
    assert send(6) == [0, 6]

    api.push("DELETED", endpoint_slice("svc-a", "engine-svc", port, []))  # the Service has no pod left
    wait_for(lambda: available(PODS[1]) == 0, timeout=5, message="pods gone")
    answer = post(gateway.url + CHAT, {"model": "m", "messages": HI})
    assert answer.status == 502  # back on the configured URL (the Service), where nothing answers here


def test_discovered_pods_are_checked_at_the_engines_health_path(pods, processes, tmp_path):
    """`health_path` applies to every pod discovery finds, not only to the configured Service URL."""
    port, _ = pods
    api = processes.add(FakeKubeAPI().start())
    api.slices["svc-a"] = endpoint_slice("svc-a", "engine-svc", port, [(PODS[0], True)])
    config = write_routing_map(
        tmp_path / "routes.yaml",
        [
            {
                "name": "e",
                "model": "m",
                "owned_by": "vllm",
                "url": f"http://127.0.0.1:{free_port()}",
                "discovery": {"service": "engine-svc", "namespace": "llm", "port": port},
                "health_path": "/no-such-health-path",  # the simulator answers it 404: unhealthy
            }
        ],
        settings={"health": {"interval": 0.2}},
    )
    gateway = processes.gateway(config, env={"LLM_GATEWAY_KUBE_API": api.url})

    def available() -> float:
        text = get(gateway.url + "/metrics").body.decode()
        return metric_value(text, "llm_gateway_endpoint_available", endpoint=f"http://{PODS[0]}:{port}")

    wait_for(lambda: f"http://{PODS[0]}:{port}" in get(gateway.url + "/metrics").body.decode(), message="discovered")
    wait_for(lambda: available() == 0, timeout=5, message="the pod judged at the engine's health path")
