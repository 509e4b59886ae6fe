"""The front door holds: what one client can make the gateway hold (head bytes and count, time,
connections, body memory) is bounded, and the bounds answer clearly over a real socket."""

from __future__ import annotations

import resource
import threading

import pytest
import yaml

from gateway_app.auth import hash_key
from tests.raw_http import RawConnection, request_head
from tests.recording_engine import RecordingEngine
from tests.routes import write_routing_map
from tests.support import ConfigMapVolume, RunningProcess
from tests.web import get, metric_value, post, wait_for

CHAT = "/v1/chat/completions"
BODY = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
LIMITS = {
    "max_header_bytes": 4096,
    "max_headers": 30,
    "head_timeout": 1.0,
    "body_timeout": 1.0,
    "body_min_rate": 2048,
    "max_connections": 40,
    "max_body_memory": 1024 * 1024,
}


@pytest.fixture(scope="module")
def engine(module_processes) -> RecordingEngine:
    return module_processes.recording_engine()


@pytest.fixture(scope="module")
def gateway(engine: RecordingEngine, module_processes, tmp_path_factory) -> RunningProcess:
    config = write_routing_map(
        tmp_path_factory.mktemp("front-door") / "routes.yaml",
        [{"name": "e", "model": "m", "owned_by": "vllm", "url": engine.url}],
        settings={"max_body_bytes": 512 * 1024, "client_limits": LIMITS},
    )
    return module_processes.gateway(config)


def assert_openai_error(answer, status: int, code: str) -> dict:
    assert answer is not None, "the connection closed without an answer"
    assert answer.status == status, answer.body
    assert answer.header("content-type") == "application/json"
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    return error


def requests_seen(engine: RecordingEngine) -> int:
    return sum(1 for received in engine.received if received.path == CHAT)


def test_a_normal_request_within_the_bounds_is_served(gateway, engine):
    headers = {f"X-Custom-{i}": "v" * 100 for i in range(20)}  # 20 headers (and urllib's own), about 2.5 KiB
    assert post(gateway.url + CHAT, BODY, headers=headers).status == 200


def test_a_head_cut_into_pieces_is_measured_across_them(gateway):
    """The end of the head (CRLF CRLF) split between two reads, and a head sent a few bytes at a time."""
    head = request_head(body_length=len(BODY))
    with RawConnection(gateway.url) as connection:
        for start in range(0, len(head), 7):
            connection.send(head[start : start + 7])
        connection.send(BODY)
        assert connection.read_answer().status == 200
    with RawConnection(gateway.url) as connection:
        connection.send(head[:-2])
        connection.send(head[-2:] + BODY)
        assert connection.read_answer().status == 200


@pytest.mark.parametrize("shape", ["one-huge-header", "long-url", "many-small-headers"])
def test_a_head_over_the_byte_limit_gets_431_and_never_reaches_the_engine(gateway, engine, shape):
    before = requests_seen(engine)
    if shape == "one-huge-header":
        head = request_head(body_length=len(BODY), headers={"X-Big": "a" * 100_000})
    elif shape == "long-url":
        head = request_head(path=CHAT + "?" + "q" * 10_000, body_length=len(BODY))
    else:
        head = request_head(body_length=len(BODY), headers={f"X-{i}": "v" * 200 for i in range(25)})
    with RawConnection(gateway.url) as connection:
        connection.send(head + BODY)
        error = assert_openai_error(connection.read_answer(), 431, "request_header_too_large")
        assert "4096" in error["message"]
        assert connection.closed_by_peer()
    assert requests_seen(engine) == before


def test_too_many_headers_get_431_and_never_reach_the_engine(gateway, engine):
    before = requests_seen(engine)
    with RawConnection(gateway.url) as connection:
        connection.send(request_head(body_length=len(BODY), headers={f"X-{i}": "1" for i in range(40)}) + BODY)
        error = assert_openai_error(connection.read_answer(), 431, "request_header_too_large")
        assert (
            "43 headers" in error["message"]
        )  # Host, Content-Type, Content-Length and 40 and "30" in error["message"]
    assert requests_seen(engine) == before


def test_a_100_mb_head_is_cut_short_while_everyone_else_is_served(gateway):
    """The head is refused on its raw size, before parsing: the sender is cut off after a few MB at
    most (socket buffers), and the gateway keeps answering other clients meanwhile."""
    sent = {"bytes": 0}

    def attack() -> None:
        with RawConnection(gateway.url, timeout=30) as connection:
            connection.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Big: ")
            block = b"a" * (1 << 20)
            for _ in range(100):
                if not connection.send(block):
                    return
                sent["bytes"] += len(block)

    attacker = threading.Thread(target=attack)
    attacker.start()
    try:
        for _ in range(20):
            assert get(gateway.url + "/healthz", timeout=10).status == 200
            assert post(gateway.url + CHAT, BODY, timeout=10).status == 200
    finally:
        attacker.join(60)
    assert not attacker.is_alive()
    assert sent["bytes"] < 32 * (1 << 20), sent  # of 100 MB
    metrics = get(gateway.url + "/metrics").body.decode()
    assert metric_value(metrics, "llm_gateway_client_connections_closed_total", reason="head_too_large") >= 1
    assert metric_value(metrics, "llm_gateway_endpoint_available") == 1  # the engine was never thought down


def test_half_a_head_gets_408_and_is_closed(gateway):
    with RawConnection(gateway.url) as connection:
        connection.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Ty")
        error = assert_openai_error(connection.read_answer(), 408, "request_timeout")
        assert "head" in error["message"]
        assert connection.closed_by_peer()


def test_a_connection_that_sends_nothing_is_closed(gateway):
    with RawConnection(gateway.url) as connection:
        assert connection.closed_by_peer()


def test_half_a_body_gets_408_and_is_closed(gateway, engine):
    before = requests_seen(engine)
    with RawConnection(gateway.url) as connection:
        connection.send(request_head(body_length=1000) + b'{"model": "m", "messages": [')
        answer = connection.read_answer()
        error = assert_openai_error(answer, 408, "request_timeout")
        assert "body" in error["message"] and answer.header("connection") == "close"
        assert connection.closed_by_peer()
    assert requests_seen(engine) == before


def test_a_kept_alive_connection_gets_the_head_timeout_per_request(gateway):
    """After an answer, the idle wait for the next request is the keep-alive's (long); once its first
    byte arrives, the head must be whole within head_timeout."""
    with RawConnection(gateway.url) as connection:
        connection.send(request_head(body_length=len(BODY)) + BODY)
        assert connection.read_answer().status == 200
        connection.send(request_head(body_length=len(BODY)) + BODY)  # the connection is still usable
        assert connection.read_answer().status == 200
        connection.send(b"POST /v1/chat")
        assert_openai_error(connection.read_answer(), 408, "request_timeout")


def test_an_answer_given_before_the_body_was_read_closes_the_connection(gateway):
    with RawConnection(gateway.url) as connection:  # 413 from Content-Length: the body is never read
        connection.send(request_head(body_length=10_000_000) + b"x" * 1000)
        answer = connection.read_answer()
        assert_openai_error(answer, 413, "request_too_large")
        assert answer.header("connection") == "close"
        assert connection.closed_by_peer()
    with RawConnection(gateway.url) as connection:  # an unknown path never reads the body either
        connection.send(request_head(path="/v1/nothing-here", body_length=100_000) + b"x" * 1000)
        assert connection.read_answer().status == 404
        assert connection.closed_by_peer()


def test_bodies_share_a_memory_budget(gateway, engine):
    """Two clients hold 900 KiB of unfinished bodies; a third body would pass the 1 MiB budget: 503 with
    Retry-After, not a memory the process cannot give back. Once they finish, the third gets through."""
    size = 500 * 1024
    big = b'{"model": "m", "pad": "' + b"x" * (size - 26) + b'"}'
    assert len(big) == size - 1
    holders = [RawConnection(gateway.url) for _ in range(2)]
    try:
        for holder in holders:
            holder.send(request_head(body_length=len(big)) + big[: 450 * 1024])
        wait_for(
            lambda: (
                metric_value(get(gateway.url + "/metrics").body.decode(), "llm_gateway_request_body_bytes")
                >= 900 * 1024
            ),
            message="both bodies held",
        )
        with RawConnection(gateway.url) as third:
            third.send(request_head(body_length=len(big)) + big)
            answer = third.read_answer()
            assert_openai_error(answer, 503, "gateway_overloaded")
            assert answer.header("retry-after") == "1"
        for holder in holders:
            holder.send(big[450 * 1024 :])
            assert holder.read_answer().status == 200
    finally:
        for holder in holders:
            holder.close()
    assert post(gateway.url + CHAT, big).status == 200
    wait_for(
        lambda: metric_value(get(gateway.url + "/metrics").body.decode(), "llm_gateway_request_body_bytes") == 0,
        message="the budget is given back",
    )


def test_at_the_connection_limit_idle_connections_make_room(gateway):
    """40 connections at most: 60 that never send a request head do not keep a real client out."""
    idle = [RawConnection(gateway.url) for _ in range(60)]
    try:
        assert post(gateway.url + CHAT, BODY).status == 200
        assert get(gateway.url + "/healthz").status == 200
        metrics = get(gateway.url + "/metrics").body.decode()
        assert metric_value(metrics, "llm_gateway_client_connections_closed_total", reason="evicted") >= 20
        assert metric_value(metrics, "llm_gateway_client_connections") <= 40
        assert sum(connection.closed_by_peer(within=0.2) for connection in idle) >= 20  # the oldest went first
    finally:
        for connection in idle:
            connection.close()


def test_with_every_connection_busy_a_new_one_gets_503(processes, tmp_path):
    """Connections whose requests are being served are never evicted: past the limit, 503 at once."""
    engine = processes.recording_engine()
    config = write_routing_map(
        tmp_path / "routes.yaml",
        [{"name": "e", "model": "m", "owned_by": "vllm", "url": engine.url}],
        settings={"client_limits": {"max_connections": 3}},
    )
    gateway = processes.gateway(config)
    busy = [RawConnection(gateway.url) for _ in range(3)]
    try:
        for connection in busy:  # the engine holds these for 30 s
            connection.send(request_head(body_length=len(BODY), headers={"X-Test-Scenario": "never-answers"}) + BODY)
        wait_for(lambda: sum(r.path == CHAT for r in engine.received) == 3, message="three requests at the engine")
        with RawConnection(gateway.url) as refused:
            assert_openai_error(refused.read_answer(), 503, "gateway_overloaded")
    finally:  # before the gateway stops: it would wait for these requests to end
        for connection in busy:
            connection.close()


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/v1/chat/completions/", "not_found"),
        ("/healthz/", "not_found"),
        ("/v1/models/", "model_not_found"),  # the card of the model with an empty id
    ],
)
def test_a_trailing_slash_is_a_plain_404_never_a_redirect(gateway, path, code):
    with RawConnection(gateway.url) as connection:
        method = "POST" if path.startswith("/v1/chat") else "GET"
        connection.send(
            request_head(
                path=path,
                method=method,
                body_length=len(BODY) if method == "POST" else None,
                headers={"Host": "evil.example"},
            )
            + (BODY if method == "POST" else b"")
        )
        answer = connection.read_answer()
        assert_openai_error(answer, 404, code)
        assert answer.header("location") is None


def test_1100_half_open_connections_under_a_1024_file_limit(processes, tmp_path):
    """The original failure: half-open connections exhausted the descriptors, real requests were reset and
    a revoked key stayed valid because the keys file could no longer be read. Under the same limit, a
    normal request is served and a changed keys file takes effect."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2000:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    engine = processes.recording_engine()
    keys = ConfigMapVolume(tmp_path / "keys", "keys.yaml")
    keys.publish(yaml.safe_dump({"keys": [{"name": "old", "sha256": hash_key("sk-old")}]}))
    config = write_routing_map(
        tmp_path / "routes.yaml", [{"name": "e", "model": "m", "owned_by": "vllm", "url": engine.url}]
    )
    gateway = processes.gateway(config, extra_args=["--keys-file", str(keys.path)], fd_limit=1024)
    half_open: list[RawConnection] = []
    try:
        for index in range(1100):
            connection = RawConnection(gateway.url)
            connection.send(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                if index % 2
                else request_head(body_length=1000) + b"{"
            )
            half_open.append(connection)
        assert post(gateway.url + CHAT, BODY, headers={"Authorization": "Bearer sk-old"}).status == 200
        keys.publish(yaml.safe_dump({"keys": [{"name": "new", "sha256": hash_key("sk-new")}]}))
        wait_for(
            lambda: post(gateway.url + CHAT, BODY, headers={"Authorization": "Bearer sk-new"}).status == 200,
            timeout=15,
            message="the new key is accepted",
        )
        assert post(gateway.url + CHAT, BODY, headers={"Authorization": "Bearer sk-old"}).status == 401
        metrics = get(gateway.url + "/metrics").body.decode()
        assert metric_value(metrics, "llm_gateway_client_connections_limit") == (1024 - 64) // 2
        assert metric_value(metrics, "llm_gateway_client_connections") <= (1024 - 64) // 2
    finally:
        for connection in half_open:
            connection.close()
    gateway.stop()  # on purpose: its log is then complete
    assert "Too many open files" not in gateway.log()


@pytest.mark.parametrize("split", [False, True], ids=["one-segment", "body-apart"])
@pytest.mark.parametrize("upgrade", ["h2c", "websocket"])
def test_an_upgrade_offer_is_ignored_and_the_body_read_as_plain_http(gateway, engine, upgrade, split):
    """Java's RestClient and Ktor offer h2c on ordinary POSTs. llhttp ends such a request at its head;
    the gateway must still read its body, and read what follows as the next request, never as part of it."""
    head = request_head(
        body_length=len(BODY),
        headers={
            "Connection": "Upgrade, HTTP2-Settings",
            "Upgrade": upgrade,
            "HTTP2-Settings": "AAMAAABkAAQCAAAAAAIAAAAA",
        },
    )
    before = requests_seen(engine)
    with RawConnection(gateway.url) as connection:
        if split:
            connection.send(head)
            connection.send(BODY)
        else:
            connection.send(head + BODY)
        assert connection.read_answer().status == 200
        assert engine.received[-1].body == BODY
        assert "upgrade" not in {name.lower() for name in engine.received[-1].headers}
        connection.send(request_head(path="/version", method="GET"))  # the connection goes on as HTTP/1.1
        answer = connection.read_answer()
        assert answer.status == 200 and answer.json()["version"]
    assert requests_seen(engine) == before + 1


def test_pipelined_requests_are_answered_in_order(gateway):
    with RawConnection(gateway.url) as connection:
        connection.send(
            request_head(body_length=len(BODY))
            + BODY
            + request_head(path="/version", method="GET")
            + request_head(body_length=len(BODY))
            + BODY[:10]
        )
        assert connection.read_answer().status == 200
        assert connection.read_answer().json()["version"]
        connection.send(BODY[10:])
        assert connection.read_answer().status == 200


def test_a_body_that_trickles_in_is_cut_off(gateway):
    """Each chunk comes within body_timeout, but far slower than body_min_rate: 408, and the memory
    it held is given back."""
    with RawConnection(gateway.url) as connection:
        connection.send(request_head(body_length=100_000) + b'{"model": "m", "pad": "')
        answer = None
        for _ in range(100):
            if not connection.send(b"x"):
                break
            connection.sock.settimeout(0.5)
            try:
                answer = connection.read_answer()
                break
            except TimeoutError:
                continue
        error = assert_openai_error(answer, 408, "request_timeout")
        assert "slower than" in error["message"]


def test_a_body_that_would_swell_when_parsed_is_refused_before_parsing(gateway):
    """500 KB of `{}` elements would take about 17 MB as Python objects: its estimate passes the 1 MiB
    budget, so it is refused before it is parsed; a body as large made of one string is served."""
    bomb = b'{"model": "m", "pad": [' + b"{}," * 160_000 + b"{}]}"
    plain = b'{"model": "m", "pad": "' + b"x" * (len(bomb) - 26) + b'"}'
    assert len(bomb) < 512 * 1024 and abs(len(plain) - len(bomb)) < 8
    answer = post(gateway.url + CHAT, bomb)
    assert answer.status == 503 and answer.json()["error"]["code"] == "gateway_overloaded"
    assert post(gateway.url + CHAT, plain).status == 200
