"""Streams relayed as they come, closed upstream the moment the client goes away, timeouts per phase."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import uvicorn
import yaml

from gateway_app.app import GatewayApp
from gateway_app.auth import hash_key
from gateway_app.request_log import RequestLog
from gateway_app.server import load_setup
from tests.raw_http import RawConnection, json_request
from tests.redis_server import RedisServer
from tests.routes import write_routing_map
from tests.support import RunningProcess, free_port
from tests.web import get, metric_value, post, sse_events, wait_for

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def slow_first_token(module_processes) -> RunningProcess:
    return module_processes.simulator("vllm", "think-model", ttft_ms=30000)


@pytest.fixture(scope="module")
def slow_tokens(module_processes) -> RunningProcess:
    return module_processes.simulator("sglang", "drip-model", itl_ms=400)


@pytest.fixture(scope="module")
def stream_gateway(slow_first_token, slow_tokens, module_processes, tmp_path_factory) -> RunningProcess:
    config = write_routing_map(
        tmp_path_factory.mktemp("streams") / "routes.yaml",
        [
            {"name": "think", "model": "think-model", "owned_by": "vllm", "url": slow_first_token.url},
            {"name": "drip", "model": "drip-model", "owned_by": "sglang", "url": slow_tokens.url},
            # The same engine again under another owned_by, with an idle timeout shorter than its pace.
            {
                "name": "drip-impatient",
                "model": "drip-model",
                "owned_by": "impatient",
                "url": slow_tokens.url,
                "timeouts": {"idle": 0.15},
            },
            {
                "name": "drip-hurried",
                "model": "drip-model",
                "owned_by": "hurried",
                "url": slow_tokens.url,
                "timeouts": {"total": 1.0},
            },
        ],
    )
    return module_processes.gateway(config)


def running_requests(sim: RunningProcess, name: str) -> float:
    return metric_value(get(sim.url + "/metrics").body.decode(), name)


def test_client_leaving_a_non_streaming_wait_closes_the_engine_request(stream_gateway, slow_first_token):
    with RawConnection(stream_gateway.url) as connection:
        connection.send(json_request({"model": "think-model", "messages": HI}))
        wait_for(lambda: running_requests(slow_first_token, "vllm:num_requests_running") == 1, message="engine busy")
    wait_for(
        lambda: running_requests(slow_first_token, "vllm:num_requests_running") == 0,
        timeout=3,
        message="engine request closed",
    )
    metrics = get(stream_gateway.url + "/metrics").body.decode()
    assert metric_value(metrics, "llm_gateway_client_disconnects_total", engine="think") >= 1


def test_client_leaving_mid_stream_closes_the_engine_request(stream_gateway, slow_tokens):
    with RawConnection(stream_gateway.url) as connection:
        connection.send(json_request({"model": "drip-model", "messages": HI, "max_tokens": 100, "stream": True}))
        received = connection.read_until(b"data:")
        assert b"text/event-stream" in received
        assert running_requests(slow_tokens, "sglang:num_running_reqs") == 1
    wait_for(
        lambda: running_requests(slow_tokens, "sglang:num_running_reqs") == 0, timeout=3, message="engine stream closed"
    )


def test_client_leaving_while_its_request_waits_for_admission_is_noticed(slow_first_token, processes, tmp_path):
    """A client that hangs up while the gateway waits for the rate-limit store (paused here) is gone before
    its exchange starts: the exchange must know it at once, not open an engine request for nobody."""
    redis = processes.add(RedisServer(tmp_path)).start()
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [{"name": "team", "sha256": hash_key("sk-team")}]}))
    config = write_routing_map(
        tmp_path / "routes.yaml",
        [{"name": "think-limited", "model": "think-model", "owned_by": "vllm", "url": slow_first_token.url}],
        # Health checks often enough that a kept-alive engine connection is always in the pool: a request
        # sent on one is written before the gateway's first pause, the moment a late notice would come.
        settings={"limits": {"requests_per_minute": 100000}, "health": {"interval": 0.1}},
    )
    gateway = processes.gateway(config, extra_args=["--keys-file", str(keys), "--redis-url", redis.url])
    assert (
        post(gateway.url + CHAT, {"model": "nope", "messages": HI}, headers={"Authorization": "Bearer sk-team"}).status
        == 404
    )

    def body_bytes_held() -> float:
        return metric_value(get(gateway.url + "/metrics").body.decode(), "llm_gateway_request_body_bytes")

    prompts_before = running_requests(slow_first_token, "vllm:prompt_tokens_total")
    with socket.create_connection(("127.0.0.1", redis.port), timeout=5) as store:
        store.sendall(b"*4\r\n$6\r\nCLIENT\r\n$5\r\nPAUSE\r\n$4\r\n2000\r\n$3\r\nALL\r\n")
        assert store.recv(64).startswith(b"+OK")
    with RawConnection(gateway.url) as connection:
        connection.send(
            json_request({"model": "think-model", "messages": HI}, headers={"Authorization": "Bearer sk-team"})
        )
        wait_for(lambda: body_bytes_held() > 0, message="the request waits for admission")
    wait_for(
        lambda: (
            metric_value(
                get(gateway.url + "/metrics").body.decode(),
                "llm_gateway_client_disconnects_total",
                engine="think-limited",
            )
            == 1
        ),
        timeout=8,
        message="the client's leaving counted",
    )
    # The engine never got it (its prompt would be counted at arrival), not even for an instant.
    assert running_requests(slow_first_token, "vllm:prompt_tokens_total") == prompts_before
    assert running_requests(slow_first_token, "vllm:num_requests_running") == 0


def test_client_leaving_is_noticed_under_another_asgi_server(slow_first_token, tmp_path):
    """Served by uvicorn's own protocol, which does not tell of a lost connection the way ours does
    (exchange_clock.CLIENT_GONE_EXTENSION), the gateway watches for `http.disconnect` instead."""
    config = write_routing_map(
        tmp_path / "routes.yaml",
        [{"name": "think-plain", "model": "think-model", "owned_by": "vllm", "url": slow_first_token.url}],
    )
    app = GatewayApp(load_setup(config, None, None, None, RequestLog(enabled=False)))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http="httptools", log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, message="in-process gateway started")
        with RawConnection(f"http://127.0.0.1:{port}") as connection:
            connection.send(json_request({"model": "think-model", "messages": HI}))
            wait_for(lambda: running_requests(slow_first_token, "vllm:num_requests_running") == 1, message="busy")
        wait_for(
            lambda: running_requests(slow_first_token, "vllm:num_requests_running") == 0,
            timeout=3,
            message="engine request closed",
        )
        metrics = app_metrics(port)
        assert metric_value(metrics, "llm_gateway_client_disconnects_total", engine="think-plain") == 1
    finally:
        server.should_exit = True
        thread.join(10)


def app_metrics(port: int) -> str:
    return get(f"http://127.0.0.1:{port}/metrics").body.decode()


def test_chunks_arrive_as_the_engine_sends_them(stream_gateway):
    """With 400 ms between tokens, a buffering proxy would deliver everything at the end."""
    import urllib.request

    req = urllib.request.Request(
        stream_gateway.url + CHAT,
        method="POST",
        headers={"Content-Type": "application/json"},
        data=json.dumps({"model": "drip-model", "messages": HI, "max_tokens": 4, "stream": True}).encode(),
    )
    arrivals = []
    with urllib.request.urlopen(req, timeout=10) as response:
        for line in response:
            if line.startswith(b"data: "):
                arrivals.append((time.monotonic(), line.strip()))
    assert arrivals[-1][1] == b"data: [DONE]"
    content_times = [t for t, line in arrivals if b'"content"' in line]
    assert len(content_times) >= 4
    # Spread over time, not in one burst: the first and last token are at least two intervals apart.
    assert content_times[-1] - content_times[0] >= 0.8


def test_idle_timeout_mid_stream_ends_with_an_sse_error_and_done(stream_gateway, slow_tokens):
    answer = post(
        stream_gateway.url + CHAT,
        {"model": "drip-model", "owned_by": "impatient", "messages": HI, "max_tokens": 10, "stream": True},
    )
    assert answer.status == 200
    events = sse_events(answer.body)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "engine_timeout" and "drip-impatient" in error["message"]
    # and the engine was told: its request is closed, not left generating for nobody
    wait_for(lambda: running_requests(slow_tokens, "sglang:num_running_reqs") == 0, timeout=3)


def test_total_timeout_ends_a_long_stream_cleanly(stream_gateway, slow_tokens):
    answer = post(
        stream_gateway.url + CHAT,
        {"model": "drip-model", "owned_by": "hurried", "messages": HI, "max_tokens": 50, "stream": True},
    )
    events = sse_events(answer.body)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "engine_timeout"
    wait_for(lambda: running_requests(slow_tokens, "sglang:num_running_reqs") == 0, timeout=3)


def test_stream_usage_counts_tokens(stream_gateway):
    before = metric_value(
        get(stream_gateway.url + "/metrics").body.decode(), "llm_gateway_completion_tokens_total", engine="drip"
    )
    answer = post(
        stream_gateway.url + CHAT,
        {
            "model": "drip-model",
            "messages": HI,
            "max_tokens": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert sse_events(answer.body)[-1] == "[DONE]"
    after = metric_value(
        get(stream_gateway.url + "/metrics").body.decode(), "llm_gateway_completion_tokens_total", engine="drip"
    )
    assert after - before == 2
