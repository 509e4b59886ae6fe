"""The chart's Grafana dashboard and alert rules against a real Prometheus scraping a real gateway and engines.

Two simulated engines (vLLM and SGLang, the tutorial's Example 2) and two gateway pods in front of them,
plus three engines that are down (one with a fallback, one that nobody asks for) and one scaled to zero
(its Kubernetes API a stand-in); a Prometheus scrapes the four processes every second and evaluates the
chart's rules. Two waves of traffic (streams and not, a 502, a retry with a fallback, a 401, a request that
wakes the sleeping engine, which then goes back to sleep), so that counters and histograms have moved
between scrapes. Then
every query of every panel, with its template variables matching everything, must return a number, and
every rule must evaluate.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fake_kube_api import FakeKubeAPI, endpoint_slice
from tests.prometheus_server import PrometheusServer
from tests.routes import LLAMA, write_routing_map
from tests.support import REPO_ROOT, Processes, RunningProcess, free_port
from tests.web import get, post, wait_for

CHART = REPO_ROOT / "charts" / "llm-gateway"
DASHBOARD = json.loads((CHART / "dashboards" / "llm-gateway.json").read_text())
RULES = CHART / "rules" / "llm-gateway.rules.yaml"
RATE_INTERVAL = "1m"  # what Grafana would give $__rate_interval (4 scrapes at least); the traffic is newer
MATCH_ALL = ".*"  # the dashboard's allValue
KEY = "sk-dashboard-test"
CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]
# The routing map: engine -> (model, owned_by). vllm-idle's model is never requested.
ROUTES = {
    "vllm-llama-32-1b": (LLAMA, "vllm"),
    "sglang-llama-32-1b": (LLAMA, "sglang"),
    "vllm-flaky": ("flaky-model", "vllm"),
    "vllm-down": ("down-model", "vllm"),
    "vllm-idle": ("idle-model", "vllm"),
    "vllm-sleepy": ("sleepy-model", "vllm"),
}
ENGINES = set(ROUTES)
GATEWAY_PODS = 2
# Gateway metric families the dashboard does not chart, and why.
NOT_CHARTED = {"llm_gateway_client_disconnects": "charted as status 499 in 'Answers other than 2xx'"}


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for item in items:
        if item["type"] == "row":
            yield from panels(item.get("panels", []))  # a collapsed row holds its panels
        else:
            yield item


def concrete(expr: str, **chosen: str) -> str:
    """The query Grafana would send with every variable at "All", but those `chosen`."""
    names = {v["name"] for v in DASHBOARD["templating"]["list"]}
    expr = expr.replace("$__rate_interval", RATE_INTERVAL)
    expr = re.sub(
        r"\$\{?(\w+)\}?", lambda m: chosen.get(m.group(1), MATCH_ALL) if m.group(1) in names else m.group(0), expr
    )
    assert "$" not in expr, f"unknown variable in {expr}"
    return expr


def targets_of(title: str) -> list[dict[str, Any]]:
    (panel,) = [p for p in panels(DASHBOARD["panels"]) if p["title"] == title]
    return panel["targets"]


def has_number(result: list[dict[str, Any]]) -> bool:
    return any(not math.isnan(float(series["value"][1])) for series in result)


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory, module_processes: Processes) -> PrometheusServer:
    work = tmp_path_factory.mktemp("dashboards")
    vllm = module_processes.simulator("vllm", LLAMA, ttft_ms=20, itl_ms=5, extra_args=["--lora-modules", "sql-lora=/a"])
    sglang = module_processes.simulator("sglang", LLAMA, ttft_ms=20, itl_ms=5)
    nothing_there = f"http://127.0.0.1:{free_port()}"
    sleepy = module_processes.simulator("vllm", "sleepy-model")  # the pod of the engine that sleeps
    kube = module_processes.add(FakeKubeAPI().start())
    kube.add_deployment("llm", "sleepy", 0, lease="sleepy-activity")
    kube.slices["sleepy"] = endpoint_slice("sleepy", "sleepy", sleepy_port(sleepy), [])
    engines = [
        {
            "name": "vllm-llama-32-1b",
            "model": LLAMA,
            "owned_by": "vllm",
            "url": vllm.url,
            "default": True,
            "adapters": ["sql-lora"],  # a LoRA adapter's requests, for the adapter panel
        },
        {
            "name": "sglang-llama-32-1b",
            "model": LLAMA,
            "owned_by": "sglang",
            "url": sglang.url,
            "concurrency": {"limit": 4},
            "balancing": "cache_aware",  # its replica choices by prompt prefix, for the balancing panel
        },
        {
            "name": "vllm-flaky",
            "model": "flaky-model",
            "owned_by": "vllm",
            "url": nothing_there,
            "fallback": "vllm-llama-32-1b",
        },
        {"name": "vllm-down", "model": "down-model", "owned_by": "vllm", "url": nothing_there},
        {"name": "vllm-idle", "model": "idle-model", "owned_by": "vllm", "url": f"http://127.0.0.1:{free_port()}"},
        {
            "name": "vllm-sleepy",  # scaled to zero: each wave of traffic wakes it, then it goes back to sleep
            "model": "sleepy-model",
            "owned_by": "vllm",
            "url": nothing_there,
            "discovery": {"service": "sleepy", "namespace": "llm", "port": sleepy_port(sleepy)},
            "wake": {"deployment": "sleepy", "idle_after": 1},
        },
    ]
    assert {e["name"]: (e["model"], e["owned_by"]) for e in engines} == ROUTES
    # The engines' own load read from their /metrics, for every engine (the engine-load panels).
    routes = write_routing_map(
        work / "routes.yaml", engines, settings={"engine_metrics": {"scrape": "all", "interval": 0.5}}
    )
    keys = work / "keys.yaml"
    keys.write_text(json.dumps({"keys": [{"name": "team-a", "sha256": hashlib.sha256(KEY.encode()).hexdigest()}]}))
    # Two gateway pods, as the chart runs them; the traffic goes to the first one. Queries that join the
    # series labelled by engine with llm_gateway_engine_info must keep the pods apart (no many-to-many).
    gateways = [
        module_processes.gateway(routes, extra_args=["--keys-file", str(keys)], env={"LLM_GATEWAY_KUBE_API": kube.url})
        for _ in range(GATEWAY_PODS)
    ]
    gateway = gateways[0]
    # Engines' jobs named as the chart's engine ServiceMonitor names them: after the engine's Service.
    server = module_processes.add(
        PrometheusServer(
            work,
            {"gateway": [g.url for g in gateways], "vllm-llama-32-1b": [vllm.url], "sglang-llama-32-1b": [sglang.url]},
            rule_files=[RULES],
        )
    ).start()
    wait_for(server.targets_up, timeout=10, interval=0.2, message="every target scraped")
    for _ in range(2):  # the second wave moves what the first one created
        send_traffic(gateway.url)
        wake_and_sleep(gateway.url, kube, sleepy)
        sent = time.time()
        wait_for(lambda sent=sent: scraped_after(server, sent), timeout=10, interval=0.2, message="a new scrape")
    return server


def send_traffic(gateway: str) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    for owned_by in ("vllm", "sglang"):
        answer = post(
            gateway + CHAT, {"model": LLAMA, "owned_by": owned_by, "messages": HI, "max_tokens": 5}, headers=auth
        )
        assert answer.status == 200, answer.body
        answer = post(
            gateway + CHAT,
            {
                "model": LLAMA,
                "owned_by": owned_by,
                "messages": HI,
                "max_tokens": 8,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
            headers=auth,
        )
        assert answer.status == 200 and b"[DONE]" in answer.body, answer.body
    answer = post(gateway + CHAT, {"model": "sql-lora", "messages": HI, "max_tokens": 3}, headers=auth)
    assert answer.status == 200, answer.body
    # one retry that ends on the fallback engine, one engine error, one request without a key
    answer = post(gateway + CHAT, {"model": "flaky-model", "messages": HI, "max_tokens": 3}, headers=auth)
    assert answer.status == 200 and answer.headers["x-gateway-engine"] == "vllm-llama-32-1b", answer.body
    assert post(gateway + CHAT, {"model": "down-model", "messages": HI}, headers=auth).status == 502
    assert post(gateway + CHAT, {"model": LLAMA, "messages": HI}).status == 401


def sleepy_port(sleepy: RunningProcess) -> int:
    return int(sleepy.url.rsplit(":", 1)[1])


def wake_and_sleep(gateway: str, kube: FakeKubeAPI, sleepy: RunningProcess) -> None:
    """A request wakes the sleepy engine (held until its pod is ready); idle, it is scaled to zero again."""
    auth = {"Authorization": f"Bearer {KEY}"}
    wakes = len(kube.scale_patches("sleepy"))
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(post, gateway + CHAT, {"model": "sleepy-model", "messages": HI}, headers=auth)
        wait_for(lambda: kube.scale_patches("sleepy")[wakes:] == [1], message="woken")
        kube.push("MODIFIED", endpoint_slice("sleepy", "sleepy", sleepy_port(sleepy), [("127.0.0.1", True)]))
        assert answer.result(timeout=30).status == 200
    wait_for(lambda: kube.scale_patches("sleepy")[wakes:] == [1, 0], message="asleep again")
    kube.push("MODIFIED", endpoint_slice("sleepy", "sleepy", sleepy_port(sleepy), []))


def scraped_after(server: PrometheusServer, moment: float) -> bool:
    """Every target's latest scrape started after `moment` (so it saw everything sent before)."""
    times = server.query("timestamp(up)")
    return len(times) == GATEWAY_PODS + 2 and all(float(t["value"][1]) > moment for t in times)


def test_every_panel_query_returns_data(prometheus: PrometheusServer) -> None:
    empty = []
    queries = 0
    for panel in panels(DASHBOARD["panels"]):
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            expr = concrete(target["expr"])
            result = prometheus.query(expr)
            queries += 1
            if not has_number(result):
                empty.append(f"{panel['title']!r} {target['refId']}: {expr}\n  -> {result}")
    assert not empty, "panel queries without data:\n" + "\n".join(empty)
    assert queries >= 30


def test_every_variable_lists_the_routing_maps_names(prometheus: PrometheusServer) -> None:
    values = {}
    for variable in DASHBOARD["templating"]["list"]:
        if variable["type"] != "query":
            continue
        # label_values(selector, label), Grafana's own function, is the PromQL `group by (label) (selector)`
        selector, label = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["query"]).groups()
        result = prometheus.query(f"group by ({label}) ({concrete(selector)})")
        values[variable["name"]] = {series["metric"][label] for series in result}
    # from the routing map in service: idle-model too, which nobody asked for
    assert values == {"model": {model for model, _ in ROUTES.values()}, "engine": ENGINES}


def test_engine_labelled_panels_follow_the_model_variable(prometheus: PrometheusServer) -> None:
    """Series labelled by engine only get their model from llm_gateway_engine_info: with one model chosen,
    only that model's engines show, each with its model."""
    joined = [
        t
        for panel in panels(DASHBOARD["panels"])
        for t in panel["targets"]
        if "group_left (model)" in t["expr"] and "llm_gateway_engine_info" in t["expr"]
    ]
    assert len(joined) >= 6
    shown = set()
    for model in {model for model, _ in ROUTES.values()}:
        for target in joined:
            for series in prometheus.query(concrete(target["expr"], model=model)):
                labels = series["metric"]
                assert labels["model"] == model and ROUTES[labels["engine"]][0] == model, (target["expr"], labels)
                shown.add(labels["engine"])
    assert shown == ENGINES  # every engine shows in one of them (its endpoint availability at least)


def test_engines_in_service_and_requests_by_api_key(prometheus: PrometheusServer) -> None:
    (engines,) = targets_of("Engines in service")
    rows = {
        (s["metric"]["engine"], s["metric"]["model"], s["metric"]["owned_by"]): s["value"][1]
        for s in prometheus.query(concrete(engines["expr"]))
    }
    assert rows == {(engine, model, owned_by): str(GATEWAY_PODS) for engine, (model, owned_by) in ROUTES.items()}
    (keys,) = targets_of("Requests by API key")
    seen = {(s["metric"]["client"], s["metric"]["status_class"]) for s in prometheus.query(concrete(keys["expr"]))}
    assert seen == {("team-a", "2xx"), ("team-a", "5xx"), ("(no valid key)", "4xx")}


def test_every_gateway_metric_is_charted(prometheus: PrometheusServer) -> None:
    gateway_url = next(
        t["scrapeUrl"] for t in prometheus.api("targets")["data"]["activeTargets"] if t["labels"]["job"] == "gateway"
    )
    # (prometheus_client's *_created series are each counter's creation time, nothing to chart)
    families = {
        f.name
        for f in text_string_to_metric_families(get(gateway_url).body.decode())
        if f.name.startswith("llm_gateway_") and not f.name.endswith("_created")
    }
    exprs = "\n".join(t["expr"] for panel in panels(DASHBOARD["panels"]) for t in panel["targets"])
    uncharted = {f for f in families if not re.search(rf"\b{f}(_total|_bucket)?\b", exprs)}
    assert uncharted == set(NOT_CHARTED), uncharted


def test_engine_panels_read_both_engines_real_names(prometheus: PrometheusServer) -> None:
    exprs = "\n".join(t["expr"] for panel in panels(DASHBOARD["panels"]) for t in panel["targets"])
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "sglang:num_running_reqs",
        "sglang:num_queue_reqs",
        "sglang:token_usage",
    ):
        assert name in exprs
        jobs = {series["metric"]["job"] for series in prometheus.query(name)}
        assert jobs == {"vllm-llama-32-1b" if name.startswith("vllm") else "sglang-llama-32-1b"}


def test_alert_rules_evaluate_on_real_metrics(prometheus: PrometheusServer) -> None:
    """Every rule evaluates without error; the down models' alerts are pending, the healthy one has none."""

    def evaluated() -> list[dict[str, Any]]:
        rules = [r for g in prometheus.api("rules")["data"]["groups"] for r in g["rules"]]
        never = "0001-01-01T00:00:00Z"  # Prometheus' lastEvaluation of a rule not evaluated yet
        return rules if rules and all(r["lastEvaluation"] != never for r in rules) else []

    wait_for(evaluated, timeout=10, interval=0.2, message="every rule evaluated")
    rules = evaluated()
    assert {r["name"] for r in rules} == {
        "LLMGatewayHighErrorRatio", "LLMGatewayNoReadyEngine", "LLMGatewaySlowTimeToFirstByte", "LLMGatewayRestarted",
        "LLMGatewayConfigReloadFailed",
    }  # fmt: skip
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []

    def active(alert: str) -> set[str]:
        return {
            a["labels"].get("model", "")
            for a in prometheus.api("alerts")["data"]["alerts"]
            if a["labels"]["alertname"] == alert
        }

    # the flaky model is served by its fallback, but none of its own engines is ready; nobody asked for the
    # idle model, its engine is known from llm_gateway_engine_info
    wait_for(
        lambda: active("LLMGatewayNoReadyEngine") == {"down-model", "flaky-model", "idle-model"},
        timeout=10,
        interval=0.2,
        message="no-ready-engine alerts for the down models",
    )
    wait_for(
        lambda: active("LLMGatewayHighErrorRatio") == {"down-model"},
        timeout=10,
        interval=0.2,
        message="an error-ratio alert for the model that answered 502",
    )
    assert not active("LLMGatewaySlowTimeToFirstByte") and not active("LLMGatewayRestarted")
