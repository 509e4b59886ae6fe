"""Scale to zero: a request for an engine asleep wakes it and waits; an idle engine is put to sleep.

The engine's pod is a simulator on loopback; the Kubernetes API is the stand-in of fake_kube_api.py, whose
EndpointSlices a test changes as the kubelet would when the scaled Deployment's pod turns ready.
"""

from __future__ import annotations

import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from gateway_app.auth import hash_key
from gateway_app.config import ConfigError, parse_routing_map
from gateway_app.wake import micro_time, parse_micro_time
from tests.fake_kube_api import FakeKubeAPI, endpoint_slice
from tests.raw_http import json_request
from tests.routes import write_routing_map
from tests.support import RunningProcess, free_port
from tests.web import Answer, get, metric_value, post, wait_for

CHAT = "/v1/chat/completions"
HI = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
NAMESPACE, DEPLOYMENT, SERVICE, LEASE = "llm", "engine-m", "engine-svc", "engine-m-activity"
SCALE_PATH = f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/{DEPLOYMENT}/scale"
LEASE_PATH = f"/apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases/{LEASE}"


@pytest.fixture
def pod(processes) -> RunningProcess:
    """The engine's one pod, once the Deployment is scaled up (the test says when it is ready)."""
    return processes.simulator("vllm", "m")


def pod_port(pod: RunningProcess) -> int:
    return int(pod.url.rsplit(":", 1)[1])


def set_pod_ready(api: FakeKubeAPI, pod: RunningProcess, ready: bool) -> None:
    api.push("MODIFIED", endpoint_slice("slice-1", SERVICE, pod_port(pod), [("127.0.0.1", ready)]))


def engine(pod: RunningProcess, **wake: object) -> dict:
    return {
        "name": "e",
        "model": "m",
        "owned_by": "vllm",
        "url": f"http://127.0.0.1:{free_port()}",  # the Service: unused with discovery
        "discovery": {"service": SERVICE, "namespace": NAMESPACE, "port": pod_port(pod)},
        "wake": {"deployment": DEPLOYMENT, **wake},
    }


def start(
    processes, tmp_path: Path, api: FakeKubeAPI, engines: list[dict], name: str = "routes.yaml", **settings: object
) -> RunningProcess:
    config = write_routing_map(tmp_path / name, engines, settings)
    return processes.gateway(config, env={"LLM_GATEWAY_KUBE_API": api.url, "HOSTNAME": f"gateway-{name}"})


def metric(gateway: RunningProcess, name: str, **labels: str) -> float:
    return metric_value(get(gateway.url + "/metrics").body.decode(), name, **labels)


def asleep_api(pod: RunningProcess | None = None) -> FakeKubeAPI:
    """The world with the engine at zero replicas: its Service has no ready endpoint."""
    api = FakeKubeAPI().start()
    api.add_deployment(NAMESPACE, DEPLOYMENT, 0, lease=LEASE)
    if pod is not None:
        api.slices["slice-1"] = endpoint_slice("slice-1", SERVICE, pod_port(pod), [])
    return api


def served(pod: RunningProcess) -> float:
    return metric_value(get(pod.url + "/metrics").body.decode(), "vllm:e2e_request_latency_seconds_count")


def assert_engine_waking(answer: Answer) -> dict:
    assert answer.status == 503, answer.body
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "engine_waking" and error["type"] == "upstream_error"
    assert int(answer.headers["retry-after"]) > 0
    return error


def test_requests_for_an_engine_asleep_wake_it_once_and_are_answered_when_a_pod_is_ready(pod, processes, tmp_path):
    api = processes.add(asleep_api(pod))
    gateway = start(processes, tmp_path, api, [engine(pod, replicas=2, idle_after=600)], ready_requires_engine=True)
    wait_for(lambda: metric(gateway, "llm_gateway_engines_asleep") == 1, message="engine seen asleep")
    # Asleep is not down: the gateway stays ready, or no request could ever come to wake the engine.
    ready = get(gateway.url + "/readyz")
    assert ready.status == 200 and ready.json()["engines_asleep"] == 1
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="none", max_retries=0, timeout=60)

    with ThreadPoolExecutor(8) as pool:
        held = [pool.submit(post, gateway.url + CHAT, HI, timeout=60) for _ in range(7)]
        held.append(pool.submit(client.chat.completions.create, **HI))
        wait_for(lambda: metric(gateway, "llm_gateway_wake_held_requests", engine="e") == 8, message="8 held")
        assert not any(future.done() for future in held)
        assert served(pod) == 0  # nothing was sent anywhere
        assert api.scale_patches(DEPLOYMENT) == [2]  # one scale-up for eight requests, to wake.replicas
        patch = next(call for call in api.calls if call[0] == "PATCH" and call[1] == SCALE_PATH)
        # A merge patch of the Scale, conditional on the version read: of two gateways, one scales it.
        assert patch[2:] == (
            {"spec": {"replicas": 2}, "metadata": {"resourceVersion": "1"}},
            "application/merge-patch+json",
        )
        assert [call[0] for call in api.calls if call[1] == SCALE_PATH][:2] == ["GET", "PATCH"]  # read, then from 0

        set_pod_ready(api, pod, True)
        answers = [future.result(timeout=30) for future in held[:-1]]
        completion = held[-1].result(timeout=30)
    assert [answer.status for answer in answers] == [200] * 7
    assert completion.choices[0].message.content
    assert served(pod) == 8
    assert api.scale_patches(DEPLOYMENT) == [2]
    assert metric(gateway, "llm_gateway_engine_wakeups_total", engine="e") == 1
    assert metric(gateway, "llm_gateway_engine_wake_duration_seconds_count", engine="e") == 1
    assert metric(gateway, "llm_gateway_wake_held_requests", engine="e") == 0
    assert metric(gateway, "llm_gateway_engines_asleep") == 0
    wait_for(lambda: "engine e awake" in gateway.log(), message="the wake logged")
    wait_for(lambda: gateway.log().count('"wake_wait_ms":') == 8, message="8 request log lines")
    held_for = [json.loads(line)["wake_wait_ms"] for line in gateway.log().splitlines() if '"wake_wait_ms":' in line]
    assert all(ms > 0 for ms in held_for)
    assert "engine e waking: deployment llm/engine-m scaled 0 -> 2" in gateway.log()
    assert gateway.log().count("engine e waking:") == 1  # one wake, one line, one read of the Scale
    assert [call[0] for call in api.calls if call[1] == SCALE_PATH] == ["GET", "PATCH"]
    # The wake was recorded as activity in the Lease, for the other gateway replicas.
    assert api.leases[(NAMESPACE, LEASE)]["spec"]["holderIdentity"] == "gateway-routes.yaml"


def test_a_deployment_already_scaling_up_is_not_scaled_again(pod, processes, tmp_path):
    api = processes.add(asleep_api(pod))
    api.deployments[(NAMESPACE, DEPLOYMENT)] = 1  # someone scaled it; its pod is not ready yet
    gateway = start(processes, tmp_path, api, [engine(pod)])
    wait_for(lambda: metric(gateway, "llm_gateway_engines_asleep") == 1, message="engine seen asleep")
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(post, gateway.url + CHAT, HI, timeout=60)
        wait_for(lambda: any(call[:2] == ("GET", SCALE_PATH) for call in api.calls), message="scale read")
        set_pod_ready(api, pod, True)
        assert answer.result(timeout=30).status == 200
    assert api.scale_patches(DEPLOYMENT) == []


def test_a_gateway_beaten_to_the_wake_by_another_does_not_scale_again(pod, processes, tmp_path):
    api = processes.add(asleep_api(pod))
    api.beaten_to_it = True  # between this gateway's read of the Scale and its patch, another one woke it
    gateway = start(processes, tmp_path, api, [engine(pod)])
    wait_for(lambda: metric(gateway, "llm_gateway_engines_asleep") == 1, message="engine seen asleep")
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(post, gateway.url + CHAT, HI, timeout=60)
        wait_for(lambda: "deployment llm/engine-m already at 1 replica(s)" in gateway.log(), message="told")
        set_pod_ready(api, pod, True)
        assert answer.result(timeout=30).status == 200
    assert api.deployments[(NAMESPACE, DEPLOYMENT)] == 1
    assert metric(gateway, "llm_gateway_engine_wakeups_total", engine="e") == 0


def test_a_deployment_that_changed_while_still_at_zero_is_woken_all_the_same(pod, processes, tmp_path):
    """A conflict on the scale-up can be the Deployment's status moving, not another gateway's wake."""
    api = processes.add(asleep_api(pod))
    api.status_moved = True
    gateway = start(processes, tmp_path, api, [engine(pod)])
    wait_for(lambda: metric(gateway, "llm_gateway_engines_asleep") == 1, message="engine seen asleep")
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(post, gateway.url + CHAT, HI, timeout=60)
        wait_for(lambda: api.deployments[(NAMESPACE, DEPLOYMENT)] == 1, message="woken after reading it again")
        set_pod_ready(api, pod, True)
        assert answer.result(timeout=30).status == 200
    assert metric(gateway, "llm_gateway_engine_wakeups_total", engine="e") == 1


def test_past_the_queue_and_past_the_timeout_a_held_request_gets_503_engine_waking(pod, processes, tmp_path):
    api = processes.add(asleep_api(pod))
    gateway = start(processes, tmp_path, api, [engine(pod, queue=1, timeout=3)])
    wait_for(lambda: metric(gateway, "llm_gateway_engines_asleep") == 1, message="engine seen asleep")
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(post, gateway.url + CHAT, HI, timeout=60)
        wait_for(lambda: metric(gateway, "llm_gateway_wake_held_requests", engine="e") == 1, message="held")
        error = assert_engine_waking(post(gateway.url + CHAT, HI))  # the queue (1) is full
        assert "1 requests are already waiting" in error["message"]
        error = assert_engine_waking(first.result(timeout=30))
    assert error["message"] == "The engine `e` is waking up and was not ready within 3 s; retry later."
    assert metric(gateway, "llm_gateway_rejected_requests_total", reason="engine_waking") == 2
    assert api.scale_patches(DEPLOYMENT) == [1]


def test_a_wake_the_api_server_refuses_answers_held_requests_at_once(pod, processes, tmp_path):
    api = processes.add(asleep_api(pod))
    api.refuse["scale"] = 403  # a Role without deployments/scale
    gateway = start(processes, tmp_path, api, [engine(pod)])  # timeout 900 s: only the refusal ends the wait
    wait_for(lambda: metric(gateway, "llm_gateway_engines_asleep") == 1, message="engine seen asleep")
    error = assert_engine_waking(post(gateway.url + CHAT, HI, timeout=30))
    assert error["message"].startswith("The engine `e` is asleep (scaled to zero) and could not be woken: 403")
    assert "forbidden" in error["message"]


def test_a_wake_the_api_server_could_not_take_is_tried_again(pod, processes, tmp_path):
    api = processes.add(asleep_api(pod))
    api.refuse["scale"] = 503  # the API server is restarting
    gateway = start(processes, tmp_path, api, [engine(pod)])
    wait_for(lambda: metric(gateway, "llm_gateway_engines_asleep") == 1, message="engine seen asleep")
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(post, gateway.url + CHAT, HI, timeout=60)
        wait_for(lambda: any(call[1] == SCALE_PATH for call in api.calls), message="a first try")
        del api.refuse["scale"]
        wait_for(lambda: api.scale_patches(DEPLOYMENT) == [1], message="tried again")
        set_pod_ready(api, pod, True)
        assert answer.result(timeout=30).status == 200


def test_a_client_that_leaves_while_held_leaves_the_queue_at_once(pod, processes, tmp_path):
    api = processes.add(asleep_api(pod))
    gateway = start(processes, tmp_path, api, [engine(pod)])
    wait_for(lambda: metric(gateway, "llm_gateway_engines_asleep") == 1, message="engine seen asleep")
    host, port = gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as client:
        client.sendall(json_request(HI))
        wait_for(lambda: metric(gateway, "llm_gateway_wake_held_requests", engine="e") == 1, message="held")
    wait_for(lambda: metric(gateway, "llm_gateway_wake_held_requests", engine="e") == 0, message="dropped")
    wait_for(
        lambda: metric(gateway, "llm_gateway_client_disconnects_total", engine="e") == 1, message="counted as gone"
    )
    set_pod_ready(api, pod, True)
    assert post(gateway.url + CHAT, HI).status == 200
    assert served(pod) == 1  # the request of the client that left never reached the engine


def test_an_idle_engine_is_scaled_to_zero_and_a_request_wakes_it_again(pod, processes, tmp_path):
    api = processes.add(FakeKubeAPI().start())
    api.add_deployment(NAMESPACE, DEPLOYMENT, 1, lease=LEASE)
    api.slices["slice-1"] = endpoint_slice("slice-1", SERVICE, pod_port(pod), [("127.0.0.1", True)])
    gateway = start(processes, tmp_path, api, [engine(pod, idle_after=3)])
    wait_for(lambda: f"127.0.0.1:{pod_port(pod)}" in get(gateway.url + "/metrics").body.decode(), message="pod seen")
    assert post(gateway.url + CHAT, HI).status == 200
    wait_for(lambda: api.scale_patches(DEPLOYMENT) == [0], timeout=20, message="scaled to zero")
    # The request went into the Lease before the engine was put to sleep: idleness counts from it.
    writes = [(method, path) for method, path, _, _ in api.calls if method == "PATCH"]
    assert writes[:2] == [("PATCH", LEASE_PATH), ("PATCH", SCALE_PATH)]
    renewed = api.leases[(NAMESPACE, LEASE)]["spec"]
    assert renewed["holderIdentity"] == "gateway-routes.yaml"
    # The Lease holds the request's time (RFC 3339, microseconds), not the time of the write.
    assert renewed["renewTime"].endswith("Z") and len(renewed["renewTime"]) == len("2026-12-02T04:05:06.123456Z")
    assert metric(gateway, "llm_gateway_engine_scale_downs_total", engine="e") == 1
    assert "engine e asleep: deployment llm/engine-m scaled 1 -> 0 after" in gateway.log()

    # Its pod has not stopped yet, but a request that comes now is held and wakes it rather than being
    # sent to a pod on its way out.
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(post, gateway.url + CHAT, HI, timeout=60)
        wait_for(lambda: api.scale_patches(DEPLOYMENT) == [0, 1], message="woken again")
        assert served(pod) == 1
        set_pod_ready(api, pod, False)  # the old pod goes
        wait_for(lambda: metric(gateway, "llm_gateway_engines_asleep") == 1, message="seen asleep")
        models = {card["id"]: card for card in get(gateway.url + "/v1/models").json()["data"]}
        assert models["m"]["state"] == "waking" and models["m"]["owned_by"] == "vllm"
        set_pod_ready(api, pod, True)  # the new one is ready
        assert answer.result(timeout=30).status == 200
    assert served(pod) == 2


def test_traffic_through_one_gateway_keeps_another_from_scaling_the_engine_down(pod, processes, tmp_path):
    api = processes.add(FakeKubeAPI().start())
    api.add_deployment(NAMESPACE, DEPLOYMENT, 1, lease=LEASE)
    api.slices["slice-1"] = endpoint_slice("slice-1", SERVICE, pod_port(pod), [("127.0.0.1", True)])
    idle = start(processes, tmp_path, api, [engine(pod, idle_after=3)], name="idle.yaml")
    busy = start(processes, tmp_path, api, [engine(pod, idle_after=3)], name="busy.yaml")
    for gateway in (busy, idle):
        wait_for(lambda g=gateway: f"127.0.0.1:{pod_port(pod)}" in get(g.url + "/metrics").body.decode())
    started = time.monotonic()
    while time.monotonic() - started < 9:  # three times idle_after, a request every 0.2 s through one gateway
        assert post(busy.url + CHAT, HI).status == 200
        time.sleep(0.2)
    assert api.scale_patches(DEPLOYMENT) == []
    lease_reads = [call for call in api.calls if call[:2] == ("GET", LEASE_PATH)]
    assert lease_reads  # the idle gateway looked, and the Lease kept it from scaling down
    assert "asleep" not in idle.log()
    wait_for(lambda: api.scale_patches(DEPLOYMENT)[:1] == [0], timeout=20, message="asleep once traffic stopped")


def test_with_fallback_while_waking_the_fallback_serves_and_the_engine_wakes(pod, processes, tmp_path):
    api = processes.add(asleep_api(pod))
    other = processes.simulator("sglang", "m")
    sleeper = engine(pod, fallback_while_waking=True) | {"fallback": "f"}
    fallback = {"name": "f", "model": "m", "owned_by": "sglang", "url": other.url}
    gateway = start(processes, tmp_path, api, [sleeper, fallback])
    wait_for(lambda: metric(gateway, "llm_gateway_engines_asleep") == 1, message="engine seen asleep")
    answer = post(gateway.url + CHAT, HI)
    assert answer.status == 200 and answer.headers["x-gateway-engine"] == "f"
    wait_for(lambda: api.scale_patches(DEPLOYMENT) == [1], message="woken meanwhile")
    set_pod_ready(api, pod, True)
    wait_for(lambda: metric(gateway, "llm_gateway_engines_asleep") == 0, message="awake")
    assert post(gateway.url + CHAT, HI).headers["x-gateway-engine"] == "e"


def test_a_request_that_cannot_be_held_goes_to_the_fallback(pod, processes, tmp_path):
    """Without fallback_while_waking the fallback still serves what the wake cannot: here a full queue."""
    api = processes.add(asleep_api(pod))
    other = processes.simulator("sglang", "m")
    sleeper = engine(pod, queue=0) | {"fallback": "f"}
    gateway = start(
        processes, tmp_path, api, [sleeper, {"name": "f", "model": "m", "owned_by": "sglang", "url": other.url}]
    )
    wait_for(lambda: metric(gateway, "llm_gateway_engines_asleep") == 1, message="engine seen asleep")
    answer = post(gateway.url + CHAT, HI)
    assert answer.status == 200 and answer.headers["x-gateway-engine"] == "f"
    wait_for(lambda: api.scale_patches(DEPLOYMENT) == [1], message="woken all the same")


def test_wake_needs_discovery_and_says_so():
    text = "engines:\n  - {name: e, model: m, owned_by: vllm, url: 'http://e:8000', wake: {deployment: e}}\n"
    with pytest.raises(ConfigError, match=r"engines\[0\]\.wake: needs `discovery`"):
        parse_routing_map(text)
    with pytest.raises(ConfigError, match=r"engines\[0\]\.wake\.queue"):
        parse_routing_map(text.replace("{deployment: e}", "{deployment: e, queue: -1}"))


def test_without_its_lease_an_idle_engine_is_left_awake_and_the_log_says_why(pod, processes, tmp_path):
    """Another gateway's traffic shows only in the Lease: without it, scaling down could cut that traffic."""
    api = processes.add(FakeKubeAPI().start())
    api.add_deployment(NAMESPACE, DEPLOYMENT, 1)  # and no Lease
    api.slices["slice-1"] = endpoint_slice("slice-1", SERVICE, pod_port(pod), [("127.0.0.1", True)])
    gateway = start(processes, tmp_path, api, [engine(pod, idle_after=0.5)])
    wait_for(lambda: f"127.0.0.1:{pod_port(pod)}" in get(gateway.url + "/metrics").body.decode(), message="pod seen")
    assert post(gateway.url + CHAT, HI).status == 200
    wait_for(lambda: "not scaled to zero: cannot read Lease llm/engine-m-activity (404" in gateway.log())
    assert "cannot record its activity in Lease llm/engine-m-activity" in gateway.log()
    assert api.scale_patches(DEPLOYMENT) == []


def test_an_adapter_of_an_engine_asleep_is_listed_and_wakes_it(processes, tmp_path):
    """LoRA adapters of a sleeping engine: listed from the map, routed (the request wakes the engine and
    reaches it under the adapter's name); loading one at run time has no replica to go to."""
    pod = processes.simulator("vllm", "m", extra_args=["--lora-modules", "sql-lora=/adapters/sql"])
    api = processes.add(asleep_api(pod))
    keys = tmp_path / "keys.yaml"
    keys.write_text(json.dumps({"keys": [{"name": "ops", "sha256": hash_key("sk-ops"), "admin": True}]}))
    config = write_routing_map(tmp_path / "routes.yaml", [engine(pod) | {"adapters": ["sql-lora"]}])
    gateway = processes.gateway(config, extra_args=["--keys-file", str(keys)], env={"LLM_GATEWAY_KUBE_API": api.url})
    auth = {"Authorization": "Bearer sk-ops"}
    wait_for(lambda: metric(gateway, "llm_gateway_engines_asleep") == 1, message="engine seen asleep")
    cards = {card["id"]: card for card in get(gateway.url + "/v1/models", headers=auth).json()["data"]}
    assert cards["sql-lora"]["parent"] == "m" and cards["sql-lora"]["state"] == "asleep"

    load = {"lora_name": "new-lora", "lora_path": "/adapters/new", "engine": "e"}
    refused = post(gateway.url + "/v1/load_lora_adapter", load, headers=auth)
    assert (refused.status, refused.json()["error"]["code"]) == (503, "engine_asleep")
    assert api.scale_patches(DEPLOYMENT) == []  # an administrator's load does not wake it

    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(post, gateway.url + CHAT, HI | {"model": "sql-lora"}, headers=auth, timeout=60)
        wait_for(lambda: api.scale_patches(DEPLOYMENT) == [1], message="woken for the adapter")
        set_pod_ready(api, pod, True)
        completed = answer.result(timeout=30)
    assert completed.status == 200 and completed.json()["model"] == "sql-lora"


def reload_map(gateway: RunningProcess, path: Path, engines: list[dict]) -> None:
    """Replace the routing map as an editor would, and wait until the gateway took it."""
    before = metric(gateway, "llm_gateway_config_reloads_total", file="routing_map", result="success")
    write_routing_map(path.with_suffix(".new"), engines)
    os.replace(path.with_suffix(".new"), path)
    wait_for(
        lambda: metric(gateway, "llm_gateway_config_reloads_total", file="routing_map", result="success") > before,
        message="reloaded",
    )


def test_wake_turned_on_by_a_reload_knows_the_engine_is_asleep(pod, processes, tmp_path):
    """Discovery tells only changes: a Waker added by a reload learns the pods it already knows."""
    api = processes.add(asleep_api(pod))
    sleeper = engine(pod)
    plain = {key: value for key, value in sleeper.items() if key != "wake"}  # the same Service, the same URL
    gateway = start(processes, tmp_path, api, [plain])
    wait_for(lambda: "llm/engine-svc: 0 ready endpoint(s)" in gateway.log(), message="no pod, seen")
    reload_map(gateway, tmp_path / "routes.yaml", [sleeper])
    wait_for(lambda: metric(gateway, "llm_gateway_engines_asleep") == 1, message="seen asleep after the reload")
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(post, gateway.url + CHAT, HI, timeout=60)
        wait_for(lambda: api.scale_patches(DEPLOYMENT) == [1], message="woken")
        set_pod_ready(api, pod, True)
        assert answer.result(timeout=30).status == 200


def test_a_reload_that_turns_wake_off_lets_held_requests_go_on(pod, processes, tmp_path):
    api = processes.add(asleep_api(pod))
    api.refuse["scale"] = 503  # no wake gets through: the request stays held
    sleeper = engine(pod)
    gateway = start(processes, tmp_path, api, [sleeper])
    wait_for(lambda: metric(gateway, "llm_gateway_engines_asleep") == 1, message="engine seen asleep")
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(post, gateway.url + CHAT, HI, timeout=60)
        wait_for(lambda: metric(gateway, "llm_gateway_wake_held_requests", engine="e") == 1, message="held")
        plain = {key: value for key, value in sleeper.items() if key != "wake"}  # the same Service and URL
        reload_map(gateway, tmp_path / "routes.yaml", [plain])
        # Without wake, no ready pod means the Service URL, where nothing answers here: an answer at once,
        # not a wait for the wake timeout (900 s).
        assert answer.result(timeout=30).status == 502


def test_a_request_before_discoverys_first_answer_waits_for_it(pod, processes, tmp_path):
    api = processes.add(asleep_api(pod))
    api.first_list_delay = 2.0  # the API server is slow to list the EndpointSlices at start-up
    gateway = start(processes, tmp_path, api, [engine(pod)])
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(post, gateway.url + CHAT, HI, timeout=60)  # not sent to the Service URL
        wait_for(lambda: api.scale_patches(DEPLOYMENT) == [1], message="woken once known to be asleep")
        set_pod_ready(api, pod, True)
        assert answer.result(timeout=30).status == 200


def test_lease_times_are_kubernetes_micro_times():
    assert micro_time(0) == "1970-01-01T00:00:00.000000Z"
    assert parse_micro_time("2026-12-02T04:05:06.123456Z") == pytest.approx(1796184306.123456)
    for written in ("2026-12-02T04:05:06Z", "2026-12-02T04:05:06.5+00:00", "2026-12-02T05:05:06.000000+01:00"):
        assert parse_micro_time(written) == pytest.approx(1796184306.0, abs=0.6)
    assert parse_micro_time("yesterday") is None and parse_micro_time(None) is None
