"""Request ids end to end, and the one structured log line per request."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from gateway_app import request_log
from tests.recording_engine import RecordingEngine
from tests.routes import LLAMA, write_routing_map
from tests.support import RunningProcess
from tests.web import get, post, wait_for

CHAT = "/v1/chat/completions"
PROMPT = "SECRET-PROMPT-TEXT-4711"


@pytest.fixture(scope="module")
def engine(module_processes) -> RecordingEngine:
    return module_processes.recording_engine()


@pytest.fixture(scope="module")
def logged_gateway(engine, tutorial_engines, module_processes, tmp_path_factory) -> RunningProcess:
    config = write_routing_map(
        tmp_path_factory.mktemp("log") / "routes.yaml",
        [
            {"name": "rec", "model": "rec-model", "owned_by": "vllm", "url": engine.url},
            {"name": "llama", "model": LLAMA, "owned_by": "vllm", "url": tutorial_engines["vllm-llama-32-1b"].url},
            {"name": "down", "model": "down-model", "owned_by": "vllm", "url": "http://127.0.0.1:9"},
        ],
    )
    return module_processes.gateway(config, extra_args=["--log-format", "json"])


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


FORWARDED_KEYS = [
    "time", "request_id", "path", "status", "client", "duration_ms", "model", "base_model", "owned_by", "engine",
    "endpoint", "stream", "ttfb_ms", "prompt_tokens", "completion_tokens", "bytes",
]  # fmt: skip


def test_log_lines_keep_their_keys_in_order(logged_gateway):
    """Readers that split lines by position (text format, ad-hoc scripts) depend on the order."""
    post(logged_gateway.url + CHAT, {"model": LLAMA, "messages": []}, headers={"X-Request-Id": "order-log-1"})
    assert list(log_line(logged_gateway, "order-log-1")) == FORWARDED_KEYS  # error_kind, wake_wait_ms: None, left out
    post(logged_gateway.url + CHAT, {"model": "down-model"}, headers={"X-Request-Id": "order-log-2"})
    assert list(log_line(logged_gateway, "order-log-2")) == [*FORWARDED_KEYS[:12], "bytes", "error_kind"]
    post(logged_gateway.url + CHAT, {"model": "no-such"}, headers={"X-Request-Id": "order-log-3"})
    assert list(log_line(logged_gateway, "order-log-3")) == [*FORWARDED_KEYS[:6], "error_kind"]


def routes_to(engine: RecordingEngine, path: Path) -> Path:
    return write_routing_map(
        path,
        [
            {"name": "rec", "model": "rec-model", "owned_by": "vllm", "url": engine.url},
            {"name": "down", "model": "down-model", "owned_by": "vllm", "url": "http://127.0.0.1:9"},
        ],
    )


def test_no_access_log_writes_no_request_line_but_still_logs_errors(engine, processes, tmp_path):
    gateway = processes.gateway(
        routes_to(engine, tmp_path / "routes.yaml"), extra_args=["--log-format", "json", "--no-access-log"]
    )
    assert post(gateway.url + CHAT, {"model": "rec-model"}, headers={"X-Request-Id": "quiet-200"}).status == 200
    assert post(gateway.url + CHAT, {"model": "down-model"}, headers={"X-Request-Id": "quiet-502"}).status == 502
    assert post(gateway.url + CHAT, {"model": "no-such"}, headers={"X-Request-Id": "quiet-404"}).status == 404
    gateway.stop()  # on purpose: the request log is flushed at shutdown, so the file now holds all it ever will
    lines = [json.loads(line) for line in gateway.log().splitlines() if line.startswith("{")]
    assert lines and "quiet-" not in gateway.log()
    assert [line for line in lines if "request_id" in line or "path" in line] == []
    # the gateway's own lines are still written, the failing engine's warning among them
    assert [line for line in lines if line["level"] == "warning" and "engine down" in line["message"]], lines


def test_log_format_text_writes_request_lines_as_text(engine, processes, tmp_path):
    gateway = processes.gateway(routes_to(engine, tmp_path / "routes.yaml"), extra_args=["--log-format", "text"])
    assert post(gateway.url + CHAT, {"model": "rec-model"}, headers={"X-Request-Id": "text-log-1"}).status == 200
    gateway.stop()  # on purpose: the request log is flushed at shutdown
    lines = gateway.log().splitlines()
    (line,) = [line for line in lines if "text-log-1" in line]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT[\d:.]+\+00:00 200 /v1/chat/completions .+", line), line
    fields = dict(field.split("=", 1) for field in line.split()[3:])
    assert fields["request_id"] == "text-log-1" and fields["engine"] == "rec" and fields["model"] == "rec-model"
    assert lines and not any(line.startswith("{") for line in lines)  # the gateway's own lines are text too


ENTRY = {"request_id": "abc", "path": CHAT, "status": 200, "client": None, "duration_ms": 1.5, "stream": False}


def test_lines_are_written_whole_and_in_order_whatever_their_number(monkeypatch):
    """A batch of lines, to a binary stream (as stderr) and to a text-only one: the access log's bytes."""
    monkeypatch.setattr(request_log.time, "time", lambda: 1767225600.25)  # 2026-01-01T00:00:00.250
    count = 300
    for stream in (io.TextIOWrapper(io.BytesIO(), encoding="utf-8"), io.StringIO()):
        log = request_log.RequestLog(stream, "json")
        for number in range(count):
            log.record({**ENTRY, "bytes": number})
        log.flush()
        stream.seek(0)
        lines = stream.read().splitlines()
        assert len(lines) == count
        assert lines[0] == (
            '{"time":"2026-01-01T00:00:00.250+00:00","request_id":"abc","path":"/v1/chat/completions",'
            '"status":200,"duration_ms":1.5,"stream":false,"bytes":0}'
        )
        assert [json.loads(line)["bytes"] for line in lines] == list(range(count))


def test_text_lines_leave_out_empty_fields(monkeypatch):
    monkeypatch.setattr(request_log.time, "time", lambda: 1767225600.25)
    stream = io.StringIO()
    log = request_log.RequestLog(stream, "text")
    log.record(dict(ENTRY))
    log.flush()
    assert stream.getvalue() == (
        "2026-01-01T00:00:00.250+00:00 200 /v1/chat/completions request_id=abc duration_ms=1.5 stream=False\n"
    )
