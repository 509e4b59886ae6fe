"""What exactly reaches the engine and what exactly comes back: bodies, headers, streams."""

from __future__ import annotations

import json
import time

import pytest

from gateway_app.upstream import is_event_stream
from tests.raw_http import RawConnection, json_request
from tests.recording_engine import FIXED_ANSWER, STREAM_EVENTS, RecordingEngine
from tests.routes import write_routing_map
from tests.support import RunningProcess
from tests.web import post, request

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def engine(module_processes) -> RecordingEngine:
    return module_processes.recording_engine()


@pytest.fixture(scope="module")
def gateway_to_recorder(engine, module_processes, tmp_path_factory) -> RunningProcess:
    config = write_routing_map(
        tmp_path_factory.mktemp("recorder") / "routes.yaml",
        [
            {
                "name": "rec-vllm",
                "model": "org/model-a",
                "owned_by": "vllm",
                "url": engine.url,
                "aliases": ["short-a"],
                "headers": {"X-Engine-Token": "secret-for-engine"},
            },
            {"name": "rec-sglang", "model": "org/model-a", "owned_by": "sglang", "url": engine.url},
            {
                "name": "rec-strict",
                "model": "org/model-a",
                "owned_by": "strict",
                "url": engine.url,
                "timeouts": {"idle": 0.3},
            },
        ],
    )
    return module_processes.gateway(config)


def test_body_is_forwarded_byte_for_byte_when_nothing_changes(gateway_to_recorder, engine):
    body = b'{"model":  "org/model-a", "messages": [], "unknown_field": {"x": [1, 2.50, "\\u00e9"]}, "top_k": 5}'
    answer = post(gateway_to_recorder.url + "/v1/chat/completions", body)
    assert answer.status == 200
    assert engine.received[-1].body == body
    assert engine.received[-1].path == "/v1/chat/completions"
    assert answer.body == FIXED_ANSWER
    assert answer.headers["x-engine-own"] == "yes"
    assert answer.headers["x-gateway-engine"] == "rec-vllm"


def test_owned_by_is_stripped_and_alias_replaced_other_fields_kept(gateway_to_recorder, engine):
    body = {
        "model": "short-a",
        "owned_by": "sglang",
        "messages": [{"role": "user", "content": "hé"}],
        "guided_json": {"type": "object"},
        "stream": False,
    }
    answer = post(gateway_to_recorder.url + "/v1/chat/completions", body)
    assert answer.status == 200
    forwarded = json.loads(engine.received[-1].body)
    expected = dict(body, model="org/model-a")
    del expected["owned_by"]
    assert forwarded == expected
    assert answer.headers["x-gateway-engine"] == "rec-sglang"


def test_headers_to_engine(gateway_to_recorder, engine):
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(gateway_to_recorder.url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    connection.request(
        "POST",
        "/v1/completions",
        body=json.dumps({"model": "org/model-a", "prompt": "x"}),
        headers={
            "X-Custom": "kept",
            "Content-Type": "text/plain",
            "TE": "trailers",
            "Upgrade": "h2c",
            "Proxy-Authorization": "Basic eA==",
            "Authorization": "Bearer client-key",
            "X-API-Key": "k",
            "Accept-Encoding": "gzip",
            "X-Drop-Me": "1",
            "Connection": "keep-alive, X-Drop-Me",
        },
    )
    response = connection.getresponse()
    response.read()
    connection.close()
    answer_headers = {k.lower(): v for k, v in response.getheaders()}
    headers = {k.lower(): v for k, v in engine.received[-1].headers.items()}
    assert headers["x-custom"] == "kept"
    assert headers["x-engine-token"] == "secret-for-engine"  # per-engine header from the routing map
    assert headers["content-type"] == "application/json"  # the body was read as JSON, say so
    for dropped in ("te", "upgrade", "proxy-authorization", "authorization", "x-api-key", "x-drop-me"):
        assert dropped not in headers, dropped
    assert "gzip" not in headers.get("accept-encoding", "")  # answers must stay readable for usage
    assert engine.received[-1].path == "/v1/completions"
    # and on the way back: hop-by-hop headers of the engine's answer stay with the engine
    assert "keep-alive" not in answer_headers and "x-hop" not in answer_headers
    assert answer_headers["x-engine-own"] == "yes"


def test_lone_surrogate_survives_a_rewrite(gateway_to_recorder, engine):
    body = b'{"model": "short-a", "owned_by": "vllm", "messages": [{"role": "user", "content": "\\ud800"}]}'
    answer = post(gateway_to_recorder.url + "/v1/chat/completions", body)
    assert answer.status == 200, answer.body
    assert json.loads(engine.received[-1].body)["messages"][0]["content"] == "\ud800"


def raw_exchange(url: str, body: dict, scenario: str, receive_buffer: int | None = None, pause: float = 0) -> bytes:
    """POST on a raw socket and read until the gateway closes or finishes the answer."""
    with RawConnection(url, receive_buffer=receive_buffer) as connection:
        connection.send(json_request(body, headers={"X-Test-Scenario": scenario, "Connection": "close"}))
        if pause:
            time.sleep(pause)  # a client that does not read for a while (that is the point of the test)
        return connection.read_until_close()


def test_non_sse_answer_cut_midway_is_cut_not_patched(gateway_to_recorder):
    received = raw_exchange(gateway_to_recorder.url, {"model": "org/model-a", "owned_by": "strict"}, "stalled-json")
    assert received.startswith(b"HTTP/1.1 200")
    assert b'{"id": "x", "choices": [' in received
    assert b"data:" not in received  # no SSE error glued onto JSON
    assert not received.endswith(b"0\r\n\r\n")  # the chunked body was not finished as if complete


@pytest.mark.parametrize("media_type", ["text/event-stream", "Text/Event-Stream; charset=utf-8"])
def test_sse_cut_mid_event_ends_the_event_then_reports(gateway_to_recorder, media_type):
    """An SSE answer is known by its media type, whatever its case and parameters."""
    with RawConnection(gateway_to_recorder.url) as connection:
        connection.send(
            json_request(
                {"model": "org/model-a", "owned_by": "strict"},
                headers={
                    "X-Test-Scenario": "stalled-mid-event",
                    "X-Test-Content-Type": media_type,
                    "Connection": "close",
                },
            )
        )
        body = connection.read_answer().body
    # the half event is closed off, so that the error is an event of its own, then [DONE]
    assert b'{"del\n\ndata: {"error"' in body
    assert body.endswith(b"\n\ndata: [DONE]\n\n")
    assert b"engine_timeout" in body


def test_slow_client_is_not_an_idle_engine(gateway_to_recorder):
    """The idle timeout (0.3 s) measures the engine; a client that reads late must not trip it."""
    received = raw_exchange(
        gateway_to_recorder.url,
        {"model": "org/model-a", "owned_by": "strict"},
        "big-fast-stream",
        receive_buffer=4096,
        pause=1.5,
    )
    assert b"data: [DONE]" in received
    assert b"engine_timeout" not in received


def test_stream_is_relayed_unchanged(gateway_to_recorder, engine):
    answer = post(gateway_to_recorder.url + "/v1/chat/completions", b'{"model": "org/model-a", "stream": true}')
    assert answer.status == 200
    assert answer.body == b"".join(STREAM_EVENTS)
    assert answer.headers["cache-control"] == "no-cache"


def test_other_vllm_json_routes_are_routed(gateway_to_recorder, engine):
    for path in ("/tokenize", "/v1/embeddings", "/v1/responses", "/v1/rerank", "/score"):
        answer = request("POST", gateway_to_recorder.url + path, {"model": "org/model-a", "input": "x"})
        assert answer.status == 200
        assert engine.received[-1].path == path


class OneRequestPerConnectionEngine:
    """Answers the first request on a connection, then hangs up on the next one without answering:
    what a pooled keep-alive connection looks like when the engine closes it at the moment it is reused."""

    def __init__(self) -> None:
        import socket
        import threading

        self.connections = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @staticmethod
    def _read_request(conn) -> bool:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return False
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        length = next(
            (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0
        )
        while len(rest) < length:
            rest += conn.recv(65536)
        return True

    def _serve(self) -> None:
        import threading

        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn) -> None:
        with conn:
            if not self._read_request(conn):
                return
            body = b'{"ok": true}'
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            self._read_request(conn)  # the reuse: read it, then hang up without a word

    def stop(self) -> None:
        self._server.close()


def test_request_on_a_connection_the_engine_just_closed_is_sent_again(processes, tmp_path):
    engine = processes.add(OneRequestPerConnectionEngine())
    config = write_routing_map(
        tmp_path / "routes.yaml",
        # No health checks: each would leave one more such connection in the pool, and a request that
        # meets two in a row fails (the gateway sends a request again once only, see _send_request).
        [{"name": "e", "model": "m", "owned_by": "x", "url": engine.url, "health_path": None}],
    )
    gateway = processes.gateway(config)
    for _ in range(3):
        answer = post(gateway.url + "/v1/chat/completions", {"model": "m"})
        assert answer.status == 200, answer.body
    assert engine.connections >= 3  # each reuse failed and a fresh connection served the request


@pytest.mark.parametrize(
    ("content_type", "sse"),
    [
        ("text/event-stream", True),
        ("Text/Event-Stream; charset=utf-8", True),
        ("  text/event-stream ;x=1", True),
        ("text/event-streamx", False),
        ("text/event-stream, text/plain", False),
        ("application/json", False),
        ("", False),
        (None, False),
    ],
)
def test_an_sse_answer_is_told_by_its_media_type_alone(content_type, sse):
    assert is_event_stream(content_type) is sse
