"""Engine answers are never read without bound: whole answers are relayed as they arrive, error
answers read to decide a retry are read up to a small cap. A careless engine costs the gateway a few MB."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from aiohttp import web

from gateway_app.failures import Failure
from tests.background_server import BackgroundServer
from tests.raw_http import RawConnection, request_head
from tests.routes import write_routing_map
from tests.support import RunningProcess
from tests.web import get, metric_value, post, wait_for

CHUNK = b"x" * (1 << 20)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class CarelessEngine:
    """A stand-in engine (a third party) whose answers are as large, endless or slow as a test wants."""

    def __init__(self) -> None:
        self.second_half = threading.Event()  # set by the test: the slow answer may finish
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.answer)
        app.router.add_get("/health", self.health)
        self.server = BackgroundServer(app).start()
        self.url = self.server.url

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def answer(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        mode = request.headers.get("X-Mode", "")
        if mode == "slow-json":
            first, second = (
                b'{"id": "x", "choices": [{"text": "first half"',
                b'}], "usage": {"prompt_tokens": 2, "completion_tokens": 5}}',
            )
            response = web.StreamResponse(
                headers={"Content-Type": "application/json", "Content-Length": str(len(first + second))}
            )
            await response.prepare(request)
            await response.write(first)
            await asyncio.get_running_loop().run_in_executor(None, self.second_half.wait, 20)
            await response.write(second)
            return response
        if mode == "stream-with-cache-control":
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await response.prepare(request)
            await response.write(b'data: {"choices": [{"delta": {"content": "a"}}]}\n\ndata: [DONE]\n\n')
            return response
        status = 503 if mode in ("endless-503", "big-503") else 200
        headers = {"Content-Type": "application/json"}
        if mode in ("huge-json", "big-503"):
            headers["Content-Length"] = str(4_000_000_000 if mode == "huge-json" else 10_000_000)
        response = web.StreamResponse(status=status, headers=headers)
        await response.prepare(request)
        try:
            for _ in range(4000):  # up to 4 GB, as fast as the gateway takes it
                await response.write(CHUNK)
        except (ConnectionError, RuntimeError):
            pass
        return response

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(scope="module")
def engine(module_processes) -> CarelessEngine:
    return module_processes.add(CarelessEngine())


@pytest.fixture(scope="module")
def gateway(engine: CarelessEngine, module_processes, tmp_path_factory) -> RunningProcess:
    config = write_routing_map(
        tmp_path_factory.mktemp("careless") / "routes.yaml",
        [{"name": "careless", "model": "m", "owned_by": "vllm", "url": engine.url}],
        settings={"retries": {"max_attempts": 1}},
    )
    return module_processes.gateway(config)


BODY = b'{"model": "m", "messages": []}'


def test_a_4_gb_answer_is_relayed_as_it_arrives_not_held(gateway):
    """The client reads 200 MB of a 4 GB answer; the gateway holds a few MB at any moment."""
    before = rss_mib(gateway.process.pid)
    with RawConnection(gateway.url) as connection:
        connection.send(request_head(body_length=len(BODY), headers={"X-Mode": "huge-json"}) + BODY)
        received, peak = 0, before
        head = connection.read_until(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"content-length: 4000000000" in head
        while received < 200 * (1 << 20):
            received += len(connection.sock.recv(1 << 20))
            peak = max(peak, rss_mib(gateway.process.pid))
    assert peak - before < 64, (before, peak)


@pytest.mark.parametrize("mode", ["endless-503", "big-503"])
def test_an_oversized_error_answer_is_not_read_to_its_end(gateway, mode):
    before = rss_mib(gateway.process.pid)
    answer = post(gateway.url + "/v1/chat/completions", BODY, headers={"X-Mode": mode}, timeout=30)
    assert answer.status == 502
    assert answer.json()["error"]["code"] == "engine_bad_answer"
    assert rss_mib(gateway.process.pid) - before < 64
    metrics = get(gateway.url + "/metrics").body.decode()
    assert metric_value(metrics, "llm_gateway_upstream_errors_total", engine="careless", kind=Failure.BAD_ANSWER) >= 1


def test_a_whole_answer_reaches_the_client_before_the_engine_has_finished_it(gateway, engine):
    engine.second_half.clear()
    with RawConnection(gateway.url) as connection:
        connection.send(request_head(body_length=len(BODY), headers={"X-Mode": "slow-json"}) + BODY)
        connection.read_until(b"first half")  # arrives while the engine still holds the second half back
        engine.second_half.set()
        answer = connection.read_answer()
    assert answer.status == 200 and answer.json()["usage"]["completion_tokens"] == 5
    metrics = get(gateway.url + "/metrics").body.decode()
    assert metric_value(metrics, "llm_gateway_completion_tokens_total", engine="careless") >= 5


def test_a_stream_says_cache_control_once(gateway):
    with RawConnection(gateway.url) as connection:
        connection.send(request_head(body_length=len(BODY), headers={"X-Mode": "stream-with-cache-control"}) + BODY)
        answer = connection.read_answer()
    assert answer.status == 200 and b"[DONE]" in answer.body
    assert [value for name, value in answer.headers if name == "cache-control"] == ["no-cache"]
    assert [value for name, value in answer.headers if name == "x-accel-buffering"] == ["no"]


def test_clients_that_stop_reading_their_answers_lose_their_place(engine, processes, tmp_path):
    """A 4 GB answer to clients that never read it: the gateway holds each for at most send_timeout,
    and meanwhile such connections give way to new clients, so they cannot hold the connection budget."""
    config = write_routing_map(
        tmp_path / "routes.yaml",
        [{"name": "careless", "model": "m", "owned_by": "vllm", "url": engine.url}],
        settings={"client_limits": {"max_connections": 3, "send_timeout": 2}},
    )
    gateway = processes.gateway(config)
    not_reading = [RawConnection(gateway.url, receive_buffer=4096) for _ in range(3)]
    try:
        for connection in not_reading:
            connection.send(request_head(body_length=len(BODY), headers={"X-Mode": "huge-json"}) + BODY)

        def closed(metrics: str) -> float:
            return sum(
                metric_value(metrics, "llm_gateway_client_connections_closed_total", reason=reason)
                for reason in ("send_timeout", "evicted")
            )

        wait_for(lambda: get(gateway.url + "/healthz").status == 200, message="a new client is served")
        wait_for(lambda: closed(get(gateway.url + "/metrics").body.decode()) >= 3, message="all three dropped")
        assert all(connection.closed_by_peer(within=5) for connection in not_reading)
    finally:
        for connection in not_reading:
            connection.close()
