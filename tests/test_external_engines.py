"""Engines the chart does not deploy: OpenAI-compatible providers at a base URL, with their own key and
no /health, and engines whose host name no longer resolves (an engine just removed from the values)."""

from __future__ import annotations

import openai
import pytest

from tests.recording_engine import RecordingEngine
from tests.routes import write_routing_map
from tests.support import RunningProcess
from tests.web import get, metric_value, post, wait_for

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def provider(module_processes) -> RecordingEngine:
    """A provider whose every path but /v1/models answers as a chat completion, /health included (so a
    gateway that checked /health would see 200 ... unless told to fail it, below)."""
    engine = module_processes.recording_engine()
    engine.models = ["provider-model"]
    return engine


@pytest.fixture(scope="module")
def provider_key(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "provider-key"
    path.write_text("sk-provider-first\n")
    return path


@pytest.fixture(scope="module")
def gateway(provider, provider_key, module_processes, tmp_path_factory) -> RunningProcess:
    shared_key = tmp_path_factory.mktemp("shared") / "engine-key"
    shared_key.write_text("sk-shared")
    config = write_routing_map(
        tmp_path_factory.mktemp("external") / "routes.yaml",
        [
            {
                "name": "hosted",
                "model": "provider-model",
                "owned_by": "provider",
                "base_url": provider.url + "/openai/v1",
                "api_key_file": str(provider_key),
            },
            {"name": "removed", "model": "gone-model", "owned_by": "vllm", "url": "http://removed-engine.invalid:8000"},
            {"name": "keyless", "model": "free-model", "owned_by": "provider", "base_url": provider.url + "/free"},
        ],
        settings={"health": {"interval": 0.1}, "retries": {"max_attempts": 1}},
    )
    return module_processes.gateway(config, extra_args=["--engine-api-key-file", str(shared_key)])


def test_a_base_url_gets_the_openai_path_without_v1(gateway, provider):
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
    client.chat.completions.create(model="provider-model", messages=HI)  # type: ignore[arg-type]
    assert provider.received[-1].path == "/openai/v1/chat/completions"
    listed = [card.id for card in client.models.list()]
    assert "provider-model" in listed
    assert any(r.path == "/openai/v1/models" for r in provider.received)


def test_an_engine_key_file_replaces_the_shared_key_and_follows_its_file(gateway, provider, provider_key):
    post(gateway.url + "/v1/chat/completions", {"model": "provider-model", "messages": HI})
    assert provider.received[-1].headers["Authorization"] == "Bearer sk-provider-first"
    provider_key.write_text("sk-provider-rotated\n")  # as kubelet does when the Secret changes

    def uses_the_new_key() -> bool:
        post(gateway.url + "/v1/chat/completions", {"model": "provider-model", "messages": HI})
        return provider.received[-1].headers["Authorization"] == "Bearer sk-provider-rotated"

    wait_for(uses_the_new_key, timeout=15, interval=0.5, message="the rotated key in use")


def test_a_base_url_is_not_health_checked_so_it_never_looks_down(gateway, provider):
    provider.fail_with, provider.fail_health = 404, True  # what a provider without /health answers
    try:
        wait_for(lambda: any(r.path.endswith("/v1/models") for r in provider.received), message="catalog asked")
        metrics = get(gateway.url + "/metrics").body.decode()
        assert metric_value(metrics, "llm_gateway_endpoint_available", engine="hosted") == 1
        assert not any(r.path.endswith("/health") for r in provider.received)
    finally:
        provider.fail_with = None


def test_an_engine_whose_name_does_not_resolve_gets_a_clear_503(gateway):
    answer = post(gateway.url + "/v1/chat/completions", {"model": "gone-model", "messages": HI})
    assert answer.status == 503
    error = answer.json()["error"]
    assert error["code"] == "engine_not_found"
    assert "`removed` cannot be found" in error["message"]
    assert answer.headers["retry-after"] == "5"
    metrics = get(gateway.url + "/metrics").body.decode()
    assert metric_value(metrics, "llm_gateway_upstream_errors_total", engine="removed", kind="engine_not_found") >= 1


def test_the_shared_engine_key_never_goes_to_a_provider(gateway, provider):
    """--engine-api-key-file is this cluster's key for its own engines: a base_url engine without a key
    file of its own gets no Authorization at all."""
    assert post(gateway.url + "/v1/chat/completions", {"model": "free-model", "messages": HI}).status == 200
    assert provider.received[-1].path == "/free/chat/completions"
    assert "Authorization" not in provider.received[-1].headers


def test_a_provider_serves_only_the_openai_paths(gateway, provider):
    before = len(provider.received)
    answer = post(gateway.url + "/tokenize", {"model": "provider-model", "prompt": "hi"})
    assert answer.status == 404
    assert "serves the /v1/ paths, not /tokenize" in answer.json()["error"]["message"]
    assert not any(r.path.endswith("/tokenize") for r in provider.received[before:])


def test_a_key_file_that_goes_bad_keeps_the_last_key_and_says_so(gateway, provider, provider_key):
    def refused() -> float:
        metrics = get(gateway.url + "/metrics").body.decode()
        return metric_value(metrics, "llm_gateway_config_file_refused", file="api_key_files")

    current = provider_key.read_text()
    assert refused() == 0
    provider_key.write_text("")  # a Secret emptied by mistake
    try:
        wait_for(lambda: refused() == 1, timeout=15, interval=0.5, message="the empty key file refused")
        post(gateway.url + "/v1/chat/completions", {"model": "provider-model", "messages": HI})
        assert provider.received[-1].headers["Authorization"] == f"Bearer {current.strip()}"
    finally:
        provider_key.write_text(current)
    wait_for(lambda: refused() == 0, timeout=15, interval=0.5, message="the key file fixed")
