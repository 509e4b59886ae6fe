"""Engines with several replicas: balancing, passive and active health, retries, fallback, overload,
and a gateway that drains its streams on SIGTERM. Real processes on loopback throughout."""

from __future__ import annotations

import http.client
import json
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from gateway_app.auth import hash_key
from tests.raw_http import RawConnection, json_request
from tests.routes import write_routing_map
from tests.support import Processes, RunningProcess
from tests.web import get, metric_value, post, sse_events, wait_for

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]


def accepts_connections(url: str) -> bool:
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=1).close()
        return True
    except OSError:
        return False


def served_by(sim: RunningProcess) -> float:
    """Requests a simulator has finished, from its own metrics."""
    return metric_value(get(sim.url + "/metrics").body.decode(), "vllm:e2e_request_latency_seconds_count")


@pytest.fixture
def four_replicas(processes) -> list[RunningProcess]:
    slow = processes.simulator("vllm", "m", ttft_ms=300)
    return [slow, *(processes.simulator("vllm", "m", ttft_ms=5) for _ in range(3))]


def share_of_slow_replica(replicas, processes: Processes, tmp_path, balancing: str) -> float:
    config = write_routing_map(
        tmp_path / f"routes-{balancing}.yaml",
        [{"name": "e", "model": "m", "owned_by": "vllm", "urls": [s.url for s in replicas]}],
        settings={"balancing": balancing},
    )
    gateway = processes.gateway(config)
    before = [served_by(sim) for sim in replicas]
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: post(gateway.url + CHAT, {"model": "m", "messages": HI}).status, range(200)))
    assert statuses == [200] * 200
    counts = [served_by(sim) - b for sim, b in zip(replicas, before, strict=False)]
    assert sum(counts) == 200
    gateway.stop()  # the next gateway is measured alone
    return counts[0] / 200


def test_slow_replica_gets_clearly_fewer_requests_than_with_round_robin(four_replicas, processes, tmp_path):
    rotation = share_of_slow_replica(four_replicas, processes, tmp_path, "round_robin")
    balanced = share_of_slow_replica(four_replicas, processes, tmp_path, "power_of_two")
    assert rotation > 0.2  # a quarter, whatever its speed
    assert balanced < 0.15 and balanced < rotation / 2


def test_replica_killed_under_load_loses_no_request(processes, tmp_path):
    sims = [processes.simulator("vllm", "m", ttft_ms=20) for _ in range(2)]
    config = write_routing_map(
        tmp_path / "routes.yaml", [{"name": "e", "model": "m", "owned_by": "vllm", "urls": [s.url for s in sims]}]
    )
    gateway = processes.gateway(config)
    results = []

    def client() -> None:
        for _ in range(40):
            results.append(post(gateway.url + CHAT, {"model": "m", "messages": HI}).status)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(results) >= 20, message="load running")
    sims[0].process.send_signal(signal.SIGKILL)  # mid-load, requests in flight on it
    for thread in threads:
        thread.join(60)
    assert results == [200] * 160
    metrics = get(gateway.url + "/metrics").body.decode()
    assert metric_value(metrics, "llm_gateway_retries_total", engine="e") >= 1


def test_failing_replica_is_ejected_then_returns(processes, tmp_path):
    flaky, steady = processes.recording_engine(), processes.recording_engine()
    config = write_routing_map(
        tmp_path / "routes.yaml",
        [{"name": "e", "model": "m", "owned_by": "vllm", "urls": [flaky.url, steady.url]}],
        settings={"health": {"interval": 0.2, "ejection_base": 30}},
    )
    gateway = processes.gateway(config)
    available = lambda url: metric_value(  # noqa: E731
        get(gateway.url + "/metrics").body.decode(), "llm_gateway_endpoint_available", endpoint=url
    )
    flaky.fail_with = 500
    for _ in range(10):  # a 500 ejects; later requests avoid the flaky replica
        post(gateway.url + CHAT, {"model": "m"})
    wait_for(lambda: available(flaky.url) == 0, message="flaky replica ejected")
    before = len(flaky.received)
    assert all(post(gateway.url + CHAT, {"model": "m"}).status == 200 for _ in range(10))
    assert len([r for r in flaky.received[before:] if r.path != "/health"]) == 0
    flaky.fail_with = None  # recovers: the next passing health check brings it back
    wait_for(lambda: available(flaky.url) == 1, message="flaky replica back")


def test_503_is_retried_on_another_replica_and_fallback_engine_takes_over(processes, tmp_path):
    busy, spare = processes.recording_engine(), processes.recording_engine()
    busy.fail_with = 503
    config = write_routing_map(
        tmp_path / "routes.yaml",
        [
            {"name": "primary", "model": "m", "owned_by": "vllm", "urls": [busy.url], "fallback": "backup"},
            {"name": "backup", "model": "m-small", "owned_by": "vllm", "url": spare.url},
        ],
    )
    gateway = processes.gateway(config)
    answer = post(gateway.url + CHAT, {"model": "m", "messages": HI})
    assert answer.status == 200 and answer.headers["x-gateway-engine"] == "backup"
    assert json.loads(spare.received[-1].body)["model"] == "m-small"  # re-addressed to the fallback's model
    spare.fail_with = 503  # nobody can take it: the engine's own 503 is what the client gets
    answer = post(gateway.url + CHAT, {"model": "m", "messages": HI})
    assert answer.status == 503 and answer.json()["error"]["message"] == "failing on purpose"


def test_a_request_served_by_the_fallback_engine_is_counted(processes, tmp_path):
    spare = processes.recording_engine()
    config = write_routing_map(
        tmp_path / "routes.yaml",
        [
            {"name": "primary", "model": "m", "owned_by": "vllm", "url": "http://127.0.0.1:9", "fallback": "backup"},
            {"name": "backup", "model": "m-small", "owned_by": "vllm", "url": spare.url},
        ],
    )
    gateway = processes.gateway(config)

    def fallbacks(**labels: str) -> float:
        return metric_value(get(gateway.url + "/metrics").body.decode(), "llm_gateway_fallbacks_total", **labels)

    for served in (1, 2):
        answer = post(gateway.url + CHAT, {"model": "m", "messages": HI})
        assert answer.status == 200 and answer.headers["x-gateway-engine"] == "backup"
        assert fallbacks(engine="primary", fallback="backup") == served
    answer = post(gateway.url + CHAT, {"model": "m-small", "messages": HI})  # the backup asked for by name
    assert answer.status == 200 and answer.headers["x-gateway-engine"] == "backup"
    assert fallbacks() == 2  # no fallback there: every series together still counts two


def test_overloaded_engine_answers_429_with_retry_after(processes, tmp_path):
    sim = processes.simulator("vllm", "m", ttft_ms=1500)
    config = write_routing_map(
        tmp_path / "routes.yaml",
        [
            {
                "name": "e",
                "model": "m",
                "owned_by": "vllm",
                "url": sim.url,
                "concurrency": {"limit": 1, "queue": 1, "queue_timeout": 0.5},
            },
        ],
    )
    gateway = processes.gateway(config)
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: post(gateway.url + CHAT, {"model": "m", "messages": HI}), range(3)))
    statuses = sorted(a.status for a in answers)
    assert statuses == [200, 429, 429]  # one served; one queued past its timeout; one found the queue full
    refused = next(a for a in answers if a.status == 429)
    assert refused.json()["error"]["code"] == "engine_overloaded" and int(refused.headers["retry-after"]) >= 1
    metrics = get(gateway.url + "/metrics").body.decode()
    assert metric_value(metrics, "llm_gateway_engine_queue_wait_seconds_count", engine="e") >= 1


def test_an_overload_refusal_is_counted_under_the_key_that_sent_it(processes, tmp_path):
    engine = processes.recording_engine()
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [{"name": "team-a", "sha256": hash_key("sk-team-a")}]}))
    config = write_routing_map(
        tmp_path / "routes.yaml",
        [{"name": "e", "model": "m", "owned_by": "vllm", "url": engine.url, "concurrency": {"limit": 1, "queue": 0}}],
    )
    gateway = processes.gateway(config, extra_args=["--keys-file", str(keys)])
    key = {"Authorization": "Bearer sk-team-a"}
    with RawConnection(gateway.url) as first:  # holds the engine's one place until it closes
        first.send(json_request({"model": "m"}, headers={**key, "X-Test-Scenario": "never-answers"}))
        wait_for(lambda: any(r.path == CHAT for r in engine.received), message="the first request at the engine")
        refused = post(gateway.url + CHAT, {"model": "m"}, headers=key)
    assert refused.status == 429 and refused.json()["error"]["code"] == "engine_overloaded"
    metrics = get(gateway.url + "/metrics").body.decode()
    rejected = "llm_gateway_rejected_requests_total"
    assert metric_value(metrics, rejected, reason="engine_overloaded", client="team-a") == 1
    assert metric_value(metrics, rejected, reason="engine_overloaded", client="") == 0


def test_session_affinity_keeps_a_session_on_one_replica(processes, tmp_path):
    engines = [processes.recording_engine() for _ in range(3)]
    config = write_routing_map(
        tmp_path / "routes.yaml",
        [{"name": "e", "model": "m", "owned_by": "vllm", "urls": [e.url for e in engines]}],
        settings={"affinity": {"header": "x-session-id", "body_user": True}},
    )
    gateway = processes.gateway(config)
    for session in ("alice", "bob", "carol"):
        for _ in range(5):
            post(gateway.url + CHAT, {"model": "m"}, headers={"X-Session-Id": session})
        got = [
            sum(1 for r in e.received if r.path == CHAT and r.headers.get("x-session-id") == session) for e in engines
        ]
        assert sorted(got) == [0, 0, 5], (session, got)
    for user in ("user-1", "user-2"):  # the OpenAI `user` field works the same way
        for _ in range(4):
            post(gateway.url + CHAT, {"model": "m", "user": user})
        got = [sum(1 for r in e.received if r.path == CHAT and f'"user": "{user}"'.encode() in r.body) for e in engines]
        assert sorted(got) == [0, 0, 4], (user, got)


def test_sigterm_lets_50_open_streams_finish(processes, tmp_path):
    sim = processes.simulator("vllm", "m", itl_ms=100)
    config = write_routing_map(
        tmp_path / "routes.yaml", [{"name": "e", "model": "m", "owned_by": "vllm", "url": sim.url}]
    )
    gateway = processes.gateway(config)
    with ThreadPoolExecutor(50) as pool:  # 60 tokens at 100 ms: 6 s streams, ample time to open all 50
        futures = [
            pool.submit(
                post,
                gateway.url + CHAT,
                {"model": "m", "messages": HI, "max_tokens": 60, "stream": True},
                timeout=60,
            )
            for _ in range(50)
        ]
        wait_for(
            lambda: metric_value(get(gateway.url + "/metrics").body.decode(), "llm_gateway_requests_in_flight") == 50,
            timeout=20,
            message="50 streams open",
        )
        gateway.process.send_signal(signal.SIGTERM)
        # At once: no new connection is accepted (so readiness fails), while the 50 streams go on.
        wait_for(lambda: not accepts_connections(gateway.url), timeout=5, message="listener closed")
        assert not all(future.done() for future in futures)
        answers = [future.result() for future in futures]
    for answer in answers:
        events = sse_events(answer.body)
        assert events[-1] == "[DONE]"
        assert sum(1 for e in events[:-1] for c in json.loads(e)["choices"] if c["delta"].get("content")) == 60
    assert gateway.process.wait(timeout=30) == 0


def test_replica_killed_mid_stream_ends_the_stream_cleanly(processes, tmp_path):
    sim = processes.simulator("vllm", "m", itl_ms=100)
    config = write_routing_map(
        tmp_path / "routes.yaml", [{"name": "e", "model": "m", "owned_by": "vllm", "url": sim.url}]
    )
    gateway = processes.gateway(config)
    streaming = threading.Event()

    def stream() -> tuple[int, bytes]:
        """The answer's status and body, telling `streaming` once its first bytes came (not before: a kill
        before the engine answered is a 502, another test's matter)."""
        host, port = gateway.url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            body = json.dumps({"model": "m", "messages": HI, "max_tokens": 100, "stream": True})
            connection.request("POST", CHAT, body=body, headers={"Content-Type": "application/json"})
            answer = connection.getresponse()
            first = answer.read1(65536)
            streaming.set()
            return answer.status, first + answer.read()
        finally:
            connection.close()

    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(stream)
        assert streaming.wait(timeout=30), "the stream never started"
        sim.process.send_signal(signal.SIGKILL)
        status, body = future.result(timeout=30)
    assert status == 200
    events = sse_events(body)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "engine_unreachable"


def test_readyz_can_require_a_reachable_engine(processes, tmp_path):
    engine = processes.recording_engine()
    config = write_routing_map(
        tmp_path / "routes.yaml",
        [{"name": "e", "model": "m", "owned_by": "vllm", "url": engine.url}],
        settings={"ready_requires_engine": True, "health": {"interval": 0.2}},
    )
    gateway = processes.gateway(config)
    engine.fail_with = 500  # its /health fails too
    wait_for(lambda: get(gateway.url + "/readyz").status == 503, message="not ready without an engine")
    assert get(gateway.url + "/healthz").status == 200  # alive all the same
    engine.fail_with = None
    wait_for(lambda: get(gateway.url + "/readyz").status == 200, message="ready again")


def test_passive_ejection_alone_keeps_a_failing_replica_out(processes, tmp_path):
    """/health passes, real requests fail with 500: only what requests experience can eject it."""
    flaky, steady = processes.recording_engine(), processes.recording_engine()
    flaky.fail_with, flaky.fail_health = 500, False
    config = write_routing_map(
        tmp_path / "routes.yaml",
        [{"name": "e", "model": "m", "owned_by": "vllm", "urls": [flaky.url, steady.url]}],
        settings={"health": {"interval": 60, "ejection_base": 60}},
    )
    gateway = processes.gateway(config)
    statuses = [post(gateway.url + CHAT, {"model": "m"}).status for _ in range(20)]
    chat_requests = [r for r in flaky.received if r.path == CHAT]
    assert len(chat_requests) == 1  # one failure, then ejected for the rest
    assert statuses.count(500) == 1 and statuses.count(200) == 19


def gateway_falling_back_to_one_place(processes: Processes, tmp_path, backup_url: str) -> RunningProcess:
    """A gateway whose engine is down and falls back to `backup_url`, which takes one request at a time."""
    config = write_routing_map(
        tmp_path / "routes.yaml",
        [
            {"name": "primary", "model": "m", "owned_by": "vllm", "url": "http://127.0.0.1:9", "fallback": "backup"},
            {
                "name": "backup",
                "model": "m",
                "owned_by": "backup",
                "url": backup_url,
                "concurrency": {"limit": 1, "queue": 0},
            },
        ],
    )
    return processes.gateway(config)


def test_a_fallback_engine_keeps_its_own_concurrency_limit(processes, tmp_path):
    backup = processes.simulator("vllm", "m", ttft_ms=1500)
    gateway = gateway_falling_back_to_one_place(processes, tmp_path, backup.url)
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: post(gateway.url + CHAT, {"model": "m", "messages": HI}), range(2)))
    assert sorted(a.status for a in answers) == [200, 429]
    refused = next(a for a in answers if a.status == 429)
    assert refused.json()["error"]["code"] == "engine_overloaded"


def test_a_fallback_engine_keeps_its_limit_for_the_whole_stream(processes, tmp_path):
    """The fallback's place is held until its answer is relayed to the end, not only until its first chunk."""
    backup = processes.simulator("vllm", "m", itl_ms=200)
    gateway = gateway_falling_back_to_one_place(processes, tmp_path, backup.url)
    with RawConnection(gateway.url) as first:
        first.send(json_request({"model": "m", "messages": HI, "max_tokens": 20, "stream": True}))
        first.read_until(b"data:")  # under way on the fallback, tokens 200 ms apart
        second = post(gateway.url + CHAT, {"model": "m", "messages": HI})
        assert second.status == 429
        assert second.json()["error"]["code"] == "engine_overloaded"
