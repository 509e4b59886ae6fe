"""The engine simulator, run as a real process on loopback, answers as vLLM and SGLang do."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from gateway_app.simulator import build_simulator_app
from tests.raw_http import RawConnection, json_request
from tests.support import Processes, RunningProcess
from tests.web import wait_for

MODEL = "meta-llama/Llama-3.2-1B-Instruct"
ENGINES = ("vllm", "sglang")
RUNNING = {"vllm": "vllm:num_requests_running", "sglang": "sglang:num_running_reqs"}
# The slow simulators: a long first token, then a steady drip.
TTFT_S, ITL_S = 0.3, 0.05


# --- processes ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sim_log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("simulator-logs")


def _start_each_engine(log_dir: Path, **timing: float) -> Iterator[dict[str, RunningProcess]]:
    with Processes(log_dir) as started:
        yield {engine: started.simulator(engine, MODEL, **timing) for engine in ENGINES}


@pytest.fixture(scope="module")
def fast(sim_log_dir: Path) -> Iterator[dict[str, RunningProcess]]:
    """One simulator per engine answering at once (ttft = itl = 0)."""
    yield from _start_each_engine(sim_log_dir)


@pytest.fixture(scope="module")
def slow(sim_log_dir: Path) -> Iterator[dict[str, RunningProcess]]:
    """One simulator per engine that takes TTFT_S to the first token and ITL_S per token after it."""
    yield from _start_each_engine(sim_log_dir, ttft_ms=TTFT_S * 1000, itl_ms=ITL_S * 1000)


def client(sim: RunningProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=sim.url + "/v1", api_key="unused", max_retries=0, timeout=10)


# --- plain HTTP ---------------------------------------------------------------------------------


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)

    def events(self) -> list[str]:
        """The `data:` payloads of a server-sent event stream, in order."""
        assert self.body.endswith(b"\n\n"), self.body[-80:]
        events = self.body.decode().split("\n\n")[:-1]
        assert all(event.startswith("data: ") for event in events), events
        return [event[len("data: ") :] for event in events]


def request(url: str, body: bytes | dict[str, Any] | None = None, method: str | None = None) -> Answer:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return Answer(response.status, dict(response.headers), response.read())
    except urllib.error.HTTPError as error:
        return Answer(error.code, dict(error.headers), error.read())


def metric(sim: RunningProcess, name: str) -> float:
    """The value of an unlabelled-by-test series (the simulator has one label set per name)."""
    text = request(sim.url + "/metrics").body.decode()
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics:\n{text}")


def chat_body(max_tokens: int | None = 4, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello to the gateway"}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return {**body, **extra}


# --- discovery and info endpoints ---------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_models_lists_the_served_model_as_the_engine_does(fast: dict[str, RunningProcess], engine: str) -> None:
    answer = request(fast[engine].url + "/v1/models")
    assert answer.status == 200
    listing = answer.json()
    assert listing["object"] == "list"
    [card] = listing["data"]
    assert card["id"] == MODEL and card["root"] == MODEL and card["parent"] is None
    assert card["object"] == "model" and card["owned_by"] == engine
    assert isinstance(card["created"], int) and card["max_model_len"] == 4096
    assert ("permission" in card) == (engine == "vllm")
    assert [model.id for model in client(fast[engine]).models.list()] == [MODEL]


@pytest.mark.parametrize("engine", ENGINES)
def test_health_is_an_empty_200_and_unknown_paths_are_fastapi_404s(
    fast: dict[str, RunningProcess], engine: str
) -> None:
    health = request(fast[engine].url + "/health")
    assert (health.status, health.body) == (200, b"")
    missing = request(fast[engine].url + "/v1/nothing-here")
    assert (missing.status, missing.json()) == (404, {"detail": "Not Found"})
    wrong_method = request(fast[engine].url + "/v1/chat/completions")
    assert wrong_method.status == 405


def test_vllm_info_endpoints(fast: dict[str, RunningProcess]) -> None:
    assert request(fast["vllm"].url + "/version").json() == {"version": "0.12.0"}
    assert request(fast["vllm"].url + "/ping").status == 200
    assert request(fast["vllm"].url + "/get_model_info").status == 404


def test_sglang_info_endpoints(fast: dict[str, RunningProcess]) -> None:
    info = request(fast["sglang"].url + "/get_model_info").json()
    assert info["model_path"] == MODEL and info["is_generation"] is True
    assert request(fast["sglang"].url + "/version").status == 404


# --- non-streaming answers ------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_chat_completion(fast: dict[str, RunningProcess], engine: str) -> None:
    completion = client(fast[engine]).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello to the gateway"}], max_tokens=5
    )
    assert completion.id.startswith("chatcmpl-") and completion.object == "chat.completion"
    assert completion.model == MODEL
    [choice] = completion.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == "tok0 tok1 tok2 tok3 tok4 "
    assert choice.finish_reason == "length"
    usage = completion.usage
    assert usage.completion_tokens == 5 and usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.parametrize("engine", ENGINES)
def test_chat_without_max_tokens_stops_by_itself_after_16_tokens(fast: dict[str, RunningProcess], engine: str) -> None:
    answer = request(fast[engine].url + "/v1/chat/completions", chat_body(max_tokens=None)).json()
    assert answer["usage"]["completion_tokens"] == 16
    assert answer["choices"][0]["finish_reason"] == "stop"
    # max_completion_tokens is the current name of max_tokens for chat.
    answer = request(fast[engine].url + "/v1/chat/completions", chat_body(None, max_completion_tokens=2)).json()
    assert answer["choices"][0]["message"]["content"] == "tok0 tok1 "


@pytest.mark.parametrize("engine", ENGINES)
def test_text_completion(fast: dict[str, RunningProcess], engine: str) -> None:
    completion = client(fast[engine]).completions.create(model=MODEL, prompt="one two three", max_tokens=3)
    assert completion.id.startswith("cmpl-") and completion.object == "text_completion"
    assert completion.choices[0].text == "tok0 tok1 tok2 "
    assert completion.choices[0].finish_reason == "length"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (3, 3)


@pytest.mark.parametrize("engine", ENGINES)
def test_embeddings_are_deterministic_unit_vectors(fast: dict[str, RunningProcess], engine: str) -> None:
    embeddings = client(fast[engine]).embeddings.create(model=MODEL, input=["alpha", "beta gamma", "alpha"])
    assert [item.index for item in embeddings.data] == [0, 1, 2]
    first, second, third = (item.embedding for item in embeddings.data)
    assert len(first) == 16 and first == third and first != second
    assert abs(sum(value * value for value in first) - 1.0) < 1e-3
    assert embeddings.usage.prompt_tokens == 4
    raw = request(fast[engine].url + "/v1/embeddings", {"model": MODEL, "input": "alpha"}).json()
    assert raw["object"] == "list" and raw["data"][0]["object"] == "embedding"
    assert raw["data"][0]["embedding"] == first


# --- streaming ----------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_chat_stream_with_the_openai_client(fast: dict[str, RunningProcess], engine: str) -> None:
    stream = client(fast[engine]).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hello"}],
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert content == "tok0 tok1 tok2 tok3 "
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert len({chunk.id for chunk in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")


@pytest.mark.parametrize("engine", ENGINES)
def test_chat_stream_framing(fast: dict[str, RunningProcess], engine: str) -> None:
    answer = request(fast[engine].url + "/v1/chat/completions", chat_body(max_tokens=3, stream=True))
    assert answer.status == 200
    assert answer.headers["content-type"].startswith("text/event-stream")
    events = answer.events()
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [chunk["choices"][0]["delta"].get("content") for chunk in chunks[1:]]
    last = chunks[-1]["choices"][0]
    assert last["finish_reason"] == "length"
    if engine == "vllm":  # finish_reason rides on the last token
        assert deltas == ["tok0 ", "tok1 ", "tok2 "]
    else:  # SGLang closes with an empty-delta chunk of its own
        assert deltas == ["tok0 ", "tok1 ", "tok2 ", None] and last["delta"] == {}


@pytest.mark.parametrize("engine", ENGINES)
def test_completion_stream(fast: dict[str, RunningProcess], engine: str) -> None:
    body = {
        "model": MODEL,
        "prompt": "once upon",
        "max_tokens": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = request(fast[engine].url + "/v1/completions", body).events()
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert [chunk["choices"][0]["text"] for chunk in chunks[:-1]] == ["tok0 ", "tok1 "]
    assert [chunk["choices"][0]["finish_reason"] for chunk in chunks[:-1]] == [None, "length"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2
    assert all(chunk["object"] == "text_completion" for chunk in chunks)


USAGE_RULES = [
    # vLLM: include_usage defaults to true once stream_options is there at all.
    ("vllm", None, False),
    ("vllm", {}, True),
    ("vllm", {"include_usage": True}, True),
    ("vllm", {"include_usage": False}, False),
    # SGLang: usage only when asked for.
    ("sglang", None, False),
    ("sglang", {}, False),
    ("sglang", {"include_usage": True}, True),
    ("sglang", {"include_usage": False}, False),
]


@pytest.mark.parametrize(("engine", "stream_options", "expect_usage"), USAGE_RULES)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_usage_chunk_rules(
    fast: dict[str, RunningProcess], engine: str, stream_options: dict | None, expect_usage: bool, path: str
) -> None:
    if path == "/v1/chat/completions":
        body = chat_body(max_tokens=2, stream=True)
    else:
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 2, "stream": True}
    if stream_options is not None:
        body["stream_options"] = stream_options
    chunks = [json.loads(event) for event in request(fast[engine].url + path, body).events()[:-1]]
    usage_chunks = [chunk for chunk in chunks if chunk.get("usage")]
    if expect_usage:
        assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1] and usage_chunks[0]["choices"] == []
        assert usage_chunks[0]["usage"]["completion_tokens"] == 2
    else:
        assert usage_chunks == []


# --- refusals -----------------------------------------------------------------------------------


def test_vllm_error_shapes(fast: dict[str, RunningProcess]) -> None:
    url = fast["vllm"].url + "/v1/chat/completions"
    unknown = request(url, chat_body(model="no-such-model"))
    assert unknown.status == 404
    assert unknown.json() == {
        "error": {
            "message": "The model `no-such-model` does not exist.",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }
    }
    zero = request(url, chat_body(max_tokens=0))
    assert zero.status == 400
    assert zero.json()["error"]["type"] == "BadRequestError" and zero.json()["error"]["param"] == "max_tokens"
    assert zero.json()["error"]["code"] == 400
    for bad_body, param in (
        (b"{not json", "body.0"),
        (chat_body(messages="hi"), "body.messages"),
        ({"model": MODEL}, "body.messages"),
        (chat_body(max_tokens="ten"), "body.max_tokens"),
        (chat_body(stream_options={"include_usage": True}), "body"),
    ):
        answer = request(url, bad_body)
        assert answer.status == 400, bad_body
        error = answer.json()["error"]
        assert (error["type"], error["param"], error["code"]) == ("Bad Request", param, 400), bad_body
    too_long = request(url, chat_body(max_tokens=5000)).json()["error"]
    assert too_long["code"] == 400 and "maximum context length is 4096" in too_long["message"]


def test_sglang_error_shapes(fast: dict[str, RunningProcess]) -> None:
    url = fast["sglang"].url + "/v1/chat/completions"
    # Real SGLang serves any `model`; the simulator refuses a foreign one with the 404 body SGLang
    # uses for an unknown model on /v1/models/{model}.
    unknown = request(url, chat_body(model="no-such-model"))
    assert unknown.status == 404
    assert unknown.json() == {
        "error": {
            "message": "The model 'no-such-model' does not exist",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }
    for bad_body in (b"{not json", {"model": MODEL}, chat_body(max_tokens="ten"), chat_body(max_tokens=0)):
        answer = request(url, bad_body)
        assert answer.status == 400, bad_body
        body = answer.json()
        assert set(body) == {"object", "message", "type", "param", "code"}, bad_body
        assert (body["object"], body["type"], body["code"]) == ("error", "Bad Request", 400), bad_body
    empty = request(url, chat_body(messages=[])).json()
    assert (empty["type"], empty["message"]) == ("BadRequestError", "Messages cannot be empty.")
    # Unlike vLLM, SGLang does not mind stream_options on a non-streaming request.
    assert request(url, chat_body(stream_options={"include_usage": True})).status == 200


@pytest.mark.parametrize("engine", ENGINES)
def test_openai_client_sees_the_refusals_as_api_errors(fast: dict[str, RunningProcess], engine: str) -> None:
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError):
        client(fast[engine]).chat.completions.create(model="no-such-model", messages=messages)
    with pytest.raises(openai.BadRequestError):
        client(fast[engine]).chat.completions.create(model=MODEL, messages=messages, max_tokens=0)
    with pytest.raises(openai.NotFoundError):
        client(fast[engine]).embeddings.create(model="no-such-model", input="hi")


@pytest.mark.parametrize("engine", ENGINES)
def test_a_missing_model_means_the_served_one(fast: dict[str, RunningProcess], engine: str) -> None:
    answer = request(fast[engine].url + "/v1/completions", {"prompt": "hi", "max_tokens": 1})
    assert answer.status == 200
    # vLLM answers with the served name, SGLang echoes its default model name.
    assert answer.json()["model"] == (MODEL if engine == "vllm" else "default")


# --- pace -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_ttft_and_itl_are_honoured(slow: dict[str, RunningProcess], engine: str) -> None:
    # Lower bounds only: a busy machine may be slower, never faster.
    sim = slow[engine]
    start = time.monotonic()
    stream = client(sim).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True
    )
    arrivals = [time.monotonic() - start for chunk in stream if chunk.choices and chunk.choices[0].delta.content]
    assert len(arrivals) == 3
    assert arrivals[0] >= TTFT_S
    assert arrivals[-1] >= TTFT_S + 2 * ITL_S
    start = time.monotonic()
    client(sim).completions.create(model=MODEL, prompt="hi", max_tokens=3)
    assert time.monotonic() - start >= TTFT_S + 2 * ITL_S
    start = time.monotonic()
    client(sim).embeddings.create(model=MODEL, input="hi")
    assert time.monotonic() - start >= TTFT_S


# --- disconnects --------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_a_client_leaving_mid_stream_aborts_its_request(slow: dict[str, RunningProcess], engine: str) -> None:
    sim, running = slow[engine], RUNNING[engine]
    wait_for(lambda: metric(sim, running) == 0, timeout=5, message="idle before the test")
    # 1000 tokens at ITL_S take 50 s: only an abort frees the engine within the deadline below.
    with RawConnection(sim.url) as connection:
        connection.send(json_request(chat_body(max_tokens=1000, stream=True)))
        connection.read_until(b"tok1 ")
        assert metric(sim, running) == 1
    wait_for(lambda: metric(sim, running) == 0, timeout=5, message="running gauge back to 0 after the disconnect")


@pytest.mark.parametrize("engine", ENGINES)
def test_a_client_leaving_before_a_non_streaming_answer_aborts_it(slow: dict[str, RunningProcess], engine: str) -> None:
    sim, running = slow[engine], RUNNING[engine]
    wait_for(lambda: metric(sim, running) == 0, timeout=5, message="idle before the test")
    with RawConnection(sim.url) as connection:
        connection.send(json_request(chat_body(max_tokens=1000)))
        wait_for(lambda: metric(sim, running) == 1, timeout=5, message="the request is running")
    wait_for(lambda: metric(sim, running) == 0, timeout=5, message="running gauge back to 0 after the disconnect")
    # The aborted request generated far fewer tokens than it asked for, and was not a success.
    generated = metric(sim, "vllm:generation_tokens_total" if engine == "vllm" else "sglang:generation_tokens_total")
    assert generated < 1000


# --- metrics ------------------------------------------------------------------------------------

METRIC_NAMES = {
    "vllm": [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:time_to_first_token_seconds_count",
        "vllm:inter_token_latency_seconds_count",
        "vllm:e2e_request_latency_seconds_count",
    ],
    "sglang": [
        "sglang:num_running_reqs",
        "sglang:num_queue_reqs",
        "sglang:token_usage",
        "sglang:prompt_tokens_total",
        "sglang:generation_tokens_total",
        "sglang:time_to_first_token_seconds_count",
        "sglang:inter_token_latency_seconds_count",
        "sglang:e2e_request_latency_seconds_count",
    ],
}


@pytest.mark.parametrize("engine", ENGINES)
def test_metrics_use_the_engine_names_and_count_tokens(fast: dict[str, RunningProcess], engine: str) -> None:
    sim = fast[engine]
    prefix = engine + ":"
    before = {name: metric(sim, name) for name in METRIC_NAMES[engine]}
    answer = request(sim.url + "/v1/completions", {"model": MODEL, "prompt": "a b c d e", "max_tokens": 7})
    assert answer.status == 200
    after = {name: metric(sim, name) for name in METRIC_NAMES[engine]}
    assert after[prefix + "prompt_tokens_total"] - before[prefix + "prompt_tokens_total"] == 5
    assert after[prefix + "generation_tokens_total"] - before[prefix + "generation_tokens_total"] == 7
    ttft, itl, e2e = (name for name in METRIC_NAMES[engine] if name.endswith("_count"))
    assert after[ttft] - before[ttft] == 1 and after[e2e] - before[e2e] == 1 and after[itl] - before[itl] == 6
    text = request(sim.url + "/metrics").body.decode()
    expected_labels = f'engine="0",model_name="{MODEL}"' if engine == "vllm" else f'model_name="{MODEL}"'
    assert f"{RUNNING[engine]}{{{expected_labels}}} 0.0" in text


def test_simulators_in_one_process_keep_their_own_metrics() -> None:
    # The demo runs several simulators in one process: their registries must not collide.
    first, second = build_simulator_app("vllm", "a"), build_simulator_app("vllm", "b")
    assert first.metrics.registry is not second.metrics.registry
    assert b'model_name="a"' in first.metrics.render() and b'model_name="b"' not in first.metrics.render()
    with pytest.raises(ValueError):
        build_simulator_app("tgi", "a")
