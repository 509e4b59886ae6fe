"""What exactly reaches the engine and what exactly comes back: bodies, headers, streams."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.conftest import write_routing_map
from tests.web import post, request

HI = [{"role": "user", "content": "hi"}]
from tests.recording_engine import FIXED_ANSWER, STREAM_EVENTS, RecordingEngine
from tests.support import RunningProcess, start_gateway


@pytest.fixture(scope="module")
def engine() -> Iterator[RecordingEngine]:
    recording = RecordingEngine().start()
    yield recording
    recording.stop()


@pytest.fixture(scope="module")
def gateway_to_recorder(engine, log_dir, tmp_path_factory) -> Iterator[RunningProcess]:
    config = write_routing_map(
        tmp_path_factory.mktemp("recorder") / "routes.yaml",
        [
            {"name": "rec-vllm", "model": "org/model-a", "owned_by": "vllm", "url": engine.url,
             "aliases": ["short-a"], "headers": {"X-Engine-Token": "secret-for-engine"}},
            {"name": "rec-sglang", "model": "org/model-a", "owned_by": "sglang", "url": engine.url},
        ],
    )
    running = start_gateway(config, log_dir)
    yield running
    running.stop()


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
    body = {"model": "short-a", "owned_by": "sglang", "messages": [{"role": "user", "content": "hé"}],
            "guided_json": {"type": "object"}, "stream": False}
    answer = post(gateway_to_recorder.url + "/v1/chat/completions", body)
    assert answer.status == 200
    forwarded = json.loads(engine.received[-1].body)
    expected = dict(body, model="org/model-a")
    del expected["owned_by"]
    assert forwarded == expected
    assert answer.headers["x-gateway-engine"] == "rec-sglang"


def test_headers_to_engine(gateway_to_recorder, engine):
    post(gateway_to_recorder.url + "/v1/completions", {"model": "org/model-a", "prompt": "x"},
         headers={"X-Custom": "kept", "Connection": "keep-alive", "Content-Type": "text/plain"})
    headers = {k.lower(): v for k, v in engine.received[-1].headers.items()}
    assert headers["x-custom"] == "kept"
    assert headers["x-engine-token"] == "secret-for-engine"  # per-engine header from the routing map
    assert headers["content-type"] == "application/json"  # the body was read as JSON, say so
    assert engine.received[-1].path == "/v1/completions"


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
