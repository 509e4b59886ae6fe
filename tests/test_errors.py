"""Every error the gateway makes: OpenAI-shaped, with the right status, never a stack trace."""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator

import pytest

from gateway_app.failures import Failure
from tests.raw_http import RawConnection, request_head
from tests.routes import LLAMA, PHI, write_routing_map
from tests.support import RunningProcess
from tests.web import get, metric_value, post, request


@pytest.fixture(scope="module")
def slow_engine(module_processes) -> RunningProcess:
    return module_processes.simulator("vllm", "slow-model", ttft_ms=5000)


@pytest.fixture(scope="module")
def unused_sockets() -> Iterator[dict[str, socket.socket]]:
    """A port nobody listens on (held, so no later process gets it) and one that never answers."""
    refusing = socket.socket()
    refusing.bind(("127.0.0.1", 0))
    silent = socket.create_server(("127.0.0.1", 0), backlog=16)  # the kernel accepts; nobody ever reads
    yield {"refusing": refusing, "silent": silent}
    refusing.close()
    silent.close()


def url_of(sock: socket.socket) -> str:
    return f"http://127.0.0.1:{sock.getsockname()[1]}"


class UnfinishedHandshakes:
    """A port where a TCP handshake never completes, as with an engine behind a firewall that drops packets:
    a listener whose accept queue is full (backlog 0, and a connection nobody accepts), so that Linux drops
    every further SYN and whoever connects waits until it gives up."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=0)
        self.url = url_of(self.listener)
        self.stalls = False
        self._queued: list[socket.socket] = []
        for _ in range(8):  # fill the queue, whatever its exact length, until a connection attempt stalls
            attempt = socket.socket()
            attempt.setblocking(False)
            attempt.connect_ex(self.listener.getsockname())
            self._queued.append(attempt)
            _, connected, _ = select.select([], [attempt], [], 0.2)
            if not connected:
                self.stalls = True
                break

    def close(self) -> None:
        for sock in (*self._queued, self.listener):
            sock.close()


@pytest.fixture(scope="module")
def unfinished_handshakes() -> Iterator[UnfinishedHandshakes]:
    port = UnfinishedHandshakes()
    yield port
    port.close()


CONNECT_TIMEOUT = 0.5


@pytest.fixture(scope="module")
def error_gateway(
    tutorial_engines, slow_engine, unused_sockets, unfinished_handshakes, module_processes, tmp_path_factory
) -> RunningProcess:
    config = write_routing_map(
        tmp_path_factory.mktemp("errors") / "routes.yaml",
        [
            {
                "name": "vllm-llama-32-1b",
                "model": LLAMA,
                "owned_by": "vllm",
                "url": tutorial_engines["vllm-llama-32-1b"].url,
                "aliases": ["hidden-alias"],
            },
            {
                "name": "sglang-llama-32-1b",
                "model": LLAMA,
                "owned_by": "sglang",
                "url": tutorial_engines["sglang-llama-32-1b"].url,
            },
            {"name": "down", "model": "down-model", "owned_by": "vllm", "url": url_of(unused_sockets["refusing"])},
            {
                "name": "silent",
                "model": "silent-model",
                "owned_by": "vllm",
                "url": url_of(unused_sockets["silent"]),
                "timeouts": {"first_byte": 0.5},
            },
            {
                "name": "slow",
                "model": "slow-model",
                "owned_by": "vllm",
                "url": slow_engine.url,
                "timeouts": {"first_byte": 0.5},
            },
            {
                "name": "unconnectable",
                "model": "unconnectable-model",
                "owned_by": "vllm",
                "url": unfinished_handshakes.url,
                "timeouts": {"connect": CONNECT_TIMEOUT},
            },
        ],
        settings={"max_body_bytes": 4096, "models_timeout": 0.5, "list_aliases": False},
    )
    return module_processes.gateway(config)


def assert_openai_error(answer, status: int, param=None) -> dict:
    assert answer.status == status, answer.body
    assert answer.headers["content-type"] == "application/json"
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in error["message"]
    assert error["param"] == param
    return error


CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("body", [b"not json", b"{", b"", b"\xff\xfe"])
def test_body_not_json_is_400(error_gateway, body):
    assert_openai_error(post(error_gateway.url + CHAT, body), 400)


@pytest.mark.parametrize("body", [b"[1, 2]", b'"text"', b"42", b"null"])
def test_body_not_an_object_is_400(error_gateway, body):
    assert "object" in assert_openai_error(post(error_gateway.url + CHAT, body), 400)["message"]


@pytest.mark.parametrize("body", [{"messages": HI}, {"model": None}, {"model": 3}, {"model": ["a"]}])
def test_model_missing_or_not_a_string_is_400(error_gateway, body):
    assert_openai_error(post(error_gateway.url + CHAT, body), 400, param="model")


def test_owned_by_not_a_string_is_400(error_gateway):
    assert_openai_error(post(error_gateway.url + CHAT, {"model": LLAMA, "owned_by": 1}), 400, param="owned_by")


def test_unknown_model_is_404_listing_models(error_gateway):
    error = assert_openai_error(post(error_gateway.url + CHAT, {"model": "gpt-4", "messages": HI}), 404, param="model")
    assert LLAMA in error["message"] and "slow-model" in error["message"]
    assert error["code"] == "model_not_found"


def test_unknown_owned_by_is_404_listing_engines(error_gateway):
    answer = post(error_gateway.url + CHAT, {"model": LLAMA, "owned_by": "trtllm", "messages": HI})
    error = assert_openai_error(answer, 404, param="owned_by")
    assert "`vllm`" in error["message"] and "`sglang`" in error["message"]


def test_body_over_the_limit_is_413(error_gateway):
    body = {"model": LLAMA, "messages": [{"role": "user", "content": "x" * 5000}]}
    assert_openai_error(post(error_gateway.url + CHAT, body), 413)


def test_chunked_body_over_the_limit_is_413(error_gateway):
    """No Content-Length to refuse early: the limit holds while the body streams in."""
    with RawConnection(error_gateway.url, timeout=10) as connection:
        connection.send(
            request_head(CHAT, headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
        )
        for _ in range(5):  # 5 x 1000 bytes, over the 4096-byte limit; the gateway may stop reading early
            if not connection.send(b"3e8\r\n" + b"x" * 1000 + b"\r\n"):
                break
        answer = connection.read_answer()
        assert answer is not None and answer.status == 413


def test_engine_unreachable_is_502(error_gateway):
    answer = post(error_gateway.url + CHAT, {"model": "down-model", "messages": HI})
    error = assert_openai_error(answer, 502)
    assert "`down`" in error["message"]
    assert answer.headers["x-gateway-engine"] == "down"


def test_engine_timeout_is_504(error_gateway):
    error = assert_openai_error(post(error_gateway.url + CHAT, {"model": "slow-model", "messages": HI}), 504)
    assert error["code"] == "engine_timeout"


def test_unknown_path_and_wrong_method(error_gateway):
    assert_openai_error(get(error_gateway.url + "/v1/nothing-here"), 404)
    assert_openai_error(post(error_gateway.url + "/v1/nothing-here", {"model": LLAMA}), 404)
    assert_openai_error(request("DELETE", error_gateway.url + "/v1/models"), 405)
    assert_openai_error(get(error_gateway.url + CHAT), 405)


@pytest.mark.parametrize("owned_by", ["vllm", "sglang"])
def test_engine_errors_pass_through_unchanged(error_gateway, tutorial_engines, owned_by):
    body = {"model": LLAMA, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}
    direct = post(tutorial_engines[f"{owned_by}-llama-32-1b"].url + CHAT, body)
    through = post(error_gateway.url + CHAT, dict(body, owned_by=owned_by))
    assert direct.status >= 400
    assert (through.status, through.body) == (direct.status, direct.body)
    assert through.headers["x-gateway-engine"] == f"{owned_by}-llama-32-1b"


def test_models_listing_leaves_out_engines_that_are_down_or_silent(error_gateway):
    answer = get(error_gateway.url + "/v1/models", timeout=10)
    assert answer.status == 200
    ids = {card["id"] for card in answer.json()["data"]}
    assert LLAMA in ids and "slow-model" in ids
    assert "down-model" not in ids and "silent-model" not in ids and PHI not in ids
    assert "hidden-alias" not in ids  # list_aliases: false hides aliases ...
    assert post(error_gateway.url + CHAT, {"model": "hidden-alias", "messages": HI}).status == 200  # ... not routing


def test_engine_that_accepts_but_never_answers_is_504(error_gateway):
    assert_openai_error(post(error_gateway.url + CHAT, {"model": "silent-model", "messages": HI}), 504)


def test_an_engine_that_never_completes_the_handshake_is_504_after_the_connect_timeout(
    error_gateway, unfinished_handshakes
):
    if not unfinished_handshakes.stalls:
        pytest.skip("this kernel does not leave a connection to a full accept queue pending: no port to hang on")

    def connect_timeouts() -> float:
        metrics = get(error_gateway.url + "/metrics").body.decode()
        return metric_value(
            metrics, "llm_gateway_upstream_errors_total", engine="unconnectable", kind=Failure.TIMEOUT_CONNECT
        )

    before = connect_timeouts()
    started = time.monotonic()
    answer = post(error_gateway.url + CHAT, {"model": "unconnectable-model", "messages": HI})
    waited = time.monotonic() - started
    error = assert_openai_error(answer, 504)
    assert (error["type"], error["code"]) == ("upstream_error", "engine_timeout")
    assert "`unconnectable`" in error["message"]
    assert CONNECT_TIMEOUT <= waited < CONNECT_TIMEOUT + 1.5, waited  # not the first-byte timeout (600 s)
    assert connect_timeouts() - before == 1


def test_upstream_errors_are_counted_by_kind(error_gateway):
    post(error_gateway.url + CHAT, {"model": "down-model", "messages": HI})
    metrics = get(error_gateway.url + "/metrics").body.decode()
    assert metric_value(metrics, "llm_gateway_upstream_errors_total", engine="down", kind=Failure.CONNECT) >= 1
    assert (
        metric_value(metrics, "llm_gateway_upstream_errors_total", engine="slow", kind=Failure.TIMEOUT_FIRST_BYTE) >= 1
    )


def test_an_engine_left_out_of_the_model_list_is_logged_once_not_per_call(
    tutorial_engines, unused_sockets, processes, tmp_path
):
    config = write_routing_map(
        tmp_path / "routes.yaml",
        [
            {
                "name": "vllm-llama-32-1b",
                "model": LLAMA,
                "owned_by": "vllm",
                "url": tutorial_engines["vllm-llama-32-1b"].url,
            },
            {"name": "down", "model": "down-model", "owned_by": "vllm", "url": url_of(unused_sockets["refusing"])},
        ],
        settings={"models_cache_ttl": 0, "models_timeout": 0.5},
    )
    gateway = processes.gateway(config)
    for _ in range(5):
        assert {card["id"] for card in get(gateway.url + "/v1/models").json()["data"]} == {LLAMA}
    gateway.stop()  # on purpose: its log is then complete
    lines = [line for line in gateway.log().splitlines() if "left out of /v1/models" in line]
    assert len(lines) == 1 and "engine down" in lines[0], lines
