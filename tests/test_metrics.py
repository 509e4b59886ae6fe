"""The gateway's Prometheus metrics: names, labels from the routing map only, tokens from usage."""

from __future__ import annotations

from tests.routes import LLAMA, tutorial_routing, write_routing_map
from tests.support import free_port
from tests.web import get, metric_value, post

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]


def scrape(gateway) -> str:
    answer = get(gateway.url + "/metrics")
    assert answer.status == 200 and answer.headers["content-type"].startswith("text/plain")
    return answer.body.decode()


def test_requests_duration_and_tokens_are_counted(gateway):
    before = scrape(gateway)
    labels = {"model": LLAMA, "engine": "sglang-llama-32-1b"}
    answer = post(gateway.url + CHAT, {"model": LLAMA, "owned_by": "sglang", "messages": HI, "max_tokens": 7})
    assert answer.status == 200
    after = scrape(gateway)

    def delta(name: str, **extra: str) -> float:
        return metric_value(after, name, **labels, **extra) - metric_value(before, name, **labels, **extra)

    assert delta("llm_gateway_requests_total", endpoint=CHAT, status="200") == 1
    assert delta("llm_gateway_request_duration_seconds_count", endpoint=CHAT) == 1
    assert delta("llm_gateway_time_to_first_byte_seconds_count", endpoint=CHAT) == 1
    assert delta("llm_gateway_completion_tokens_total") == 7
    assert delta("llm_gateway_prompt_tokens_total") == answer.json()["usage"]["prompt_tokens"]


def test_streams_with_a_usage_chunk_count_tokens_once(gateway):
    labels = {"model": LLAMA, "engine": "vllm-llama-32-1b"}
    before = metric_value(scrape(gateway), "llm_gateway_completion_tokens_total", **labels)
    post(
        gateway.url + CHAT,
        {"model": LLAMA, "messages": HI, "max_tokens": 9, "stream": True, "stream_options": {"include_usage": True}},
    )
    after = metric_value(scrape(gateway), "llm_gateway_completion_tokens_total", **labels)
    assert after - before == 9


def test_client_chosen_strings_never_become_labels(gateway):
    post(gateway.url + CHAT, {"model": "attacker-chosen-model-name", "messages": HI})
    text = scrape(gateway)
    assert "attacker-chosen-model-name" not in text
    assert metric_value(text, "llm_gateway_requests_total", model="", engine="", status="404") >= 1


def test_metric_families_exist(gateway):
    text = scrape(gateway)
    for family in (
        "llm_gateway_requests_total",
        "llm_gateway_request_duration_seconds",
        "llm_gateway_time_to_first_byte_seconds",
        "llm_gateway_requests_in_flight",
        "llm_gateway_upstream_errors_total",
        "llm_gateway_prompt_tokens_total",
        "llm_gateway_completion_tokens_total",
        "llm_gateway_config_reloads_total",
        "llm_gateway_config_engines",
        "process_cpu_seconds_total",
    ):
        assert f"# TYPE {family.removesuffix('_total')}" in text or f"# TYPE {family}" in text, family


def test_streams_report_time_per_output_token(gateway):
    labels = {"model": LLAMA, "engine": "vllm-llama-32-1b"}
    before = metric_value(scrape(gateway), "llm_gateway_time_per_output_token_seconds_count", **labels)
    post(gateway.url + CHAT, {"model": LLAMA, "messages": HI, "max_tokens": 6, "stream": True})
    after = metric_value(scrape(gateway), "llm_gateway_time_per_output_token_seconds_count", **labels)
    assert after - before == 1  # one observation per stream, not one per token


def test_engine_info_and_traffic_by_client(gateway):
    text = scrape(gateway)
    assert (
        metric_value(text, "llm_gateway_engine_info", engine="sglang-llama-32-1b", model=LLAMA, owned_by="sglang") == 1
    )
    before = metric_value(text, "llm_gateway_client_requests_total", client="anonymous", status_class="2xx")
    post(gateway.url + CHAT, {"model": LLAMA, "messages": HI})
    after = metric_value(scrape(gateway), "llm_gateway_client_requests_total", client="anonymous", status_class="2xx")
    assert after - before == 1


def test_latency_histograms_keep_streams_apart(gateway):
    post(gateway.url + CHAT, {"model": LLAMA, "messages": HI, "stream": True})
    post(gateway.url + CHAT, {"model": LLAMA, "messages": HI})
    text = scrape(gateway)
    for stream in ("true", "false"):
        assert metric_value(text, "llm_gateway_time_to_first_byte_seconds_count", stream=stream) >= 1


def test_metrics_on_their_own_port_leave_the_api_port(tutorial_engines, processes, tmp_path):
    """With --metrics-port, /metrics (key names, traffic, engine URLs) is not on the API port at all."""
    metrics_port = free_port()
    config = write_routing_map(tmp_path / "routes.yaml", tutorial_routing(tutorial_engines))
    gateway = processes.gateway(config, extra_args=["--metrics-port", str(metrics_port)])
    assert post(gateway.url + CHAT, {"model": LLAMA, "messages": HI}).status == 200
    on_api = get(gateway.url + "/metrics")
    assert on_api.status == 404 and on_api.json()["error"]["code"] == "not_found"
    metrics_url = f"http://127.0.0.1:{metrics_port}"
    scraped = get(metrics_url + "/metrics")
    assert scraped.status == 200 and scraped.headers["content-type"].startswith("text/plain")
    assert metric_value(scraped.body.decode(), "llm_gateway_requests_total", model=LLAMA, status="200") == 1
    assert get(metrics_url + "/v1/models").status == 404  # the metrics port serves nothing else
    assert get(metrics_url + "/healthz").status == 404


def test_plain_metrics_expose_what_prometheus_clients_own_would():
    """The per-request metrics are moved without locks (plain_metrics.py); Prometheus must not see a
    difference: same samples, same values, bucket edges included (a value on an edge is in its bucket)."""
    from prometheus_client import CollectorRegistry, Counter, Histogram

    from gateway_app.plain_metrics import PlainCounter, PlainHistogram

    ours, theirs = CollectorRegistry(), CollectorRegistry()
    buckets = (0.005, 0.01, 0.25, 1, 60)
    plain_counter = PlainCounter("x_requests", "help", ("engine", "status"), registry=ours)
    counter = Counter("x_requests", "help", ("engine", "status"), registry=theirs)
    plain_histogram = PlainHistogram("x_seconds", "help", ("engine",), registry=ours, buckets=buckets)
    histogram = Histogram("x_seconds", "help", ("engine",), registry=theirs, buckets=buckets)
    for engine, status, seconds in [("a", "200", 0.01), ("a", "200", 0.3), ("b", "503", 61.0), ("a", "429", 0.0)]:
        plain_counter.labels(engine, status).inc()
        counter.labels(engine, status).inc()
        plain_histogram.labels(engine).observe(seconds)
        histogram.labels(engine).observe(seconds)

    def samples(registry: CollectorRegistry) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
        return {
            (s.name, tuple(sorted(s.labels.items())), round(s.value, 9))
            for family in registry.collect()
            for s in family.samples
            if not s.name.endswith("_created")
        }

    assert samples(ours) == samples(theirs)
    created = {s.name for family in ours.collect() for s in family.samples if s.name.endswith("_created")}
    assert created == {"x_requests_created", "x_seconds_created"}
