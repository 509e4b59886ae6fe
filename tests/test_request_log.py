"""Request ids end to end, and the one structured log line per request."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.conftest import LLAMA, write_routing_map
from tests.recording_engine import RecordingEngine
from tests.support import RunningProcess, start_gateway
from tests.web import get, post, wait_for

CHAT = "/v1/chat/completions"
PROMPT = "SECRET-PROMPT-TEXT-4711"


@pytest.fixture(scope="module")
def engine() -> Iterator[RecordingEngine]:
    recording = RecordingEngine().start()
    yield recording
    recording.stop()


@pytest.fixture(scope="module")
def logged_gateway(engine, tutorial_engines, log_dir, tmp_path_factory) -> Iterator[RunningProcess]:
    config = write_routing_map(
        tmp_path_factory.mktemp("log") / "routes.yaml",
        [
            {"name": "rec", "model": "rec-model", "owned_by": "vllm", "url": engine.url},
            {"name": "llama", "model": LLAMA, "owned_by": "vllm", "url": tutorial_engines["vllm-llama-32-1b"].url},
            {"name": "down", "model": "down-model", "owned_by": "vllm", "url": "http://127.0.0.1:9"},
        ],
    )
    running = start_gateway(config, log_dir, extra_args=["--log-format", "json"])
    yield running
    running.stop()


def log_line(gateway: RunningProcess, request_id: str) -> dict:
    """The gateway's log line for one request (written within a fraction of a second)."""
    found: list[dict] = []

    def present() -> bool:
        for line in gateway.log().splitlines(keepends=True):
            # Only whole lines: the file may be read while the gateway is in the middle of writing one.
            if line.startswith("{") and line.endswith("\n") and f'"request_id":"{request_id}"' in line:
                found.append(json.loads(line))
                return True
        return False

    wait_for(present, timeout=5, message=f"log line for {request_id}")
    return found[0]


def test_client_request_id_goes_to_the_engine_and_back(logged_gateway, engine):
    answer = post(logged_gateway.url + CHAT, {"model": "rec-model"}, headers={"X-Request-Id": "trace-me-123"})
    assert answer.headers["x-request-id"] == "trace-me-123"
    # the engine gets it with a random suffix: vLLM refuses a request id that is already running
    sent = {k.lower(): v for k, v in engine.received[-1].headers.items()}["x-request-id"]
    assert sent.startswith("trace-me-123-") and len(sent) == len("trace-me-123-") + 8


@pytest.mark.parametrize("bad", ["has space", "x" * 200, "semi;colon"])
def test_unusable_request_ids_are_replaced_consistently(logged_gateway, engine, bad):
    answer = post(logged_gateway.url + CHAT, {"model": "rec-model"}, headers={"X-Request-Id": bad})
    own = answer.headers["x-request-id"]
    assert own != bad and len(own) == 24
    assert {k.lower(): v for k, v in engine.received[-1].headers.items()}["x-request-id"] == own


def test_every_answer_carries_a_request_id(logged_gateway):
    for answer in (
        post(logged_gateway.url + CHAT, {"model": "no-such-model"}),
        post(logged_gateway.url + CHAT, b"not json"),
        get(logged_gateway.url + "/nowhere"),
        get(logged_gateway.url + "/v1/models"),
        get(logged_gateway.url + "/healthz"),
    ):
        assert len(answer.headers["x-request-id"]) == 24


def test_log_line_of_a_streamed_request(logged_gateway):
    post(
        logged_gateway.url + CHAT,
        {
            "model": LLAMA,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": 4,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        headers={"X-Request-Id": "stream-log-1"},
    )
    line = log_line(logged_gateway, "stream-log-1")
    assert line["status"] == 200 and line["stream"] is True
    assert line["model"] == LLAMA and line["owned_by"] == "vllm" and line["engine"] == "llama"
    assert line["endpoint"].startswith("http://127.0.0.1:") and line["path"] == CHAT
    assert line["completion_tokens"] == 4 and line["prompt_tokens"] > 0
    assert line["bytes"] > 0 and line["duration_ms"] >= line["ttfb_ms"] > 0
    assert "time" in line and "error_kind" not in line
    assert PROMPT not in logged_gateway.log()  # never the prompt


def test_log_line_of_a_failed_request(logged_gateway):
    post(logged_gateway.url + CHAT, {"model": "down-model", "messages": []}, headers={"X-Request-Id": "fail-log-1"})
    line = log_line(logged_gateway, "fail-log-1")
    assert line["status"] == 502 and line["error_kind"] == "connect" and line["engine"] == "down"
    post(logged_gateway.url + CHAT, {"model": "no-such"}, headers={"X-Request-Id": "fail-log-2"})
    line = log_line(logged_gateway, "fail-log-2")
    assert line["status"] == 404 and line["error_kind"] == "model_not_found" and "model" not in line
