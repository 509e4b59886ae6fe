"""The seed tutorial's Example 1 and Example 2, every request it shows, through the real gateway."""

from __future__ import annotations

import json

import openai
import pytest

from tests.routes import LLAMA, PHI
from tests.web import get, post, sse_events


def chat(gateway, model: str, content: str, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def test_example1_lists_both_models(gateway):
    answer = get(gateway.url + "/v1/models")
    assert answer.status == 200
    listing = answer.json()
    assert listing["object"] == "list"
    pairs = [(card["id"], card["owned_by"]) for card in listing["data"]]
    assert (LLAMA, "vllm") in pairs and (PHI, "vllm") in pairs
    for card in listing["data"]:
        assert card["object"] == "model" and isinstance(card["created"], int)


def test_example2_lists_one_model_on_two_engines(gateway):
    pairs = [(c["id"], c["owned_by"]) for c in get(gateway.url + "/v1/models").json()["data"]]
    assert pairs.count((LLAMA, "vllm")) == 1 and pairs.count((LLAMA, "sglang")) == 1


@pytest.mark.parametrize(
    ("model", "content", "engine"),
    [
        (LLAMA, "What is machine learning?", "vllm-llama-32-1b"),
        (PHI, "What is a mixture of experts?", "vllm-phi-tiny-moe"),
    ],
)
def test_example1_routes_by_model(gateway, model, content, engine):
    answer = post(gateway.url + "/v1/chat/completions", chat(gateway, model, content, max_tokens=100))
    assert answer.status == 200, answer.body
    assert answer.headers["x-gateway-engine"] == engine
    completion = answer.json()
    assert completion["model"] == model
    assert completion["usage"]["completion_tokens"] == 100


def test_example1_streaming(gateway):
    answer = post(gateway.url + "/v1/chat/completions", chat(gateway, LLAMA, "Explain quantum computing", stream=True))
    assert answer.status == 200
    assert answer.headers["content-type"].startswith("text/event-stream")
    assert answer.headers["x-accel-buffering"] == "no"
    events = sse_events(answer.body)
    assert events[-1] == "[DONE]"
    text = "".join(
        choice["delta"].get("content") or "" for event in events[:-1] for choice in json.loads(event)["choices"]
    )
    assert text


@pytest.mark.parametrize(
    ("owned_by", "engine"),
    [("vllm", "vllm-llama-32-1b"), ("sglang", "sglang-llama-32-1b"), (None, "vllm-llama-32-1b")],
)
def test_example2_routes_by_owned_by(gateway, owned_by, engine):
    body = chat(gateway, LLAMA, "What is machine learning?", max_tokens=100)
    if owned_by:
        body["owned_by"] = owned_by
    answer = post(gateway.url + "/v1/chat/completions", body)
    assert answer.status == 200, answer.body
    assert answer.headers["x-gateway-engine"] == engine


def test_openai_client_with_owned_by(gateway):
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
    models = {(m.id, m.owned_by) for m in client.models.list()}
    assert {(LLAMA, "vllm"), (LLAMA, "sglang"), (PHI, "vllm")} <= models
    for owned_by in ("vllm", "sglang"):
        raw = client.chat.completions.with_raw_response.create(
            model=LLAMA, messages=[{"role": "user", "content": "hi"}], max_tokens=5, extra_body={"owned_by": owned_by}
        )
        assert raw.headers["x-gateway-engine"] == f"{owned_by}-llama-32-1b"
        assert raw.parse().usage.completion_tokens == 5
    stream = client.chat.completions.create(
        model=LLAMA,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"owned_by": "sglang"},
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    completion = client.completions.create(model=PHI, prompt="Hello", max_tokens=3)
    assert completion.usage.completion_tokens == 3
    embedding = client.embeddings.create(model=LLAMA, input=["a", "b"], extra_body={"owned_by": "sglang"})
    assert len(embedding.data) == 2


def test_openai_client_error_for_unknown_model(gateway):
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert LLAMA in caught.value.message


def test_alias_routes_to_its_model_and_is_listed(gateway):
    answer = post(
        gateway.url + "/v1/chat/completions", chat(gateway, "llama-1b", "hi", max_tokens=2, owned_by="sglang")
    )
    assert answer.status == 200, answer.body
    assert answer.headers["x-gateway-engine"] == "sglang-llama-32-1b"
    assert answer.json()["model"] == LLAMA  # the engine got the id it serves
    pairs = [(c["id"], c["owned_by"]) for c in get(gateway.url + "/v1/models").json()["data"]]
    assert ("llama-1b", "vllm") in pairs


def test_vllm_side_routes_answer(gateway):
    assert get(gateway.url + "/health").status == 200
    assert get(gateway.url + "/healthz").status == 200
    assert get(gateway.url + "/readyz").status == 200
    assert "version" in get(gateway.url + "/version").json()
    card = get(gateway.url + "/v1/models/" + PHI.lstrip("/"))
    assert card.status == 404  # ids are exact: the leading slash is part of PHI's id
    card = get(gateway.url + "/v1/models/" + LLAMA)
    assert card.status == 200 and card.json()["id"] == LLAMA
