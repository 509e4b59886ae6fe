"""API keys and rate limits over real processes: gateways, simulators and a real redis-server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import yaml

from gateway_app.auth import hash_key
from tests.redis_server import RedisServer
from tests.routes import LLAMA, PHI, write_routing_map
from tests.support import ConfigMapVolume, Processes, RunningProcess, free_port
from tests.web import get, metric_value, post, sse_events, wait_for

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]
KEY_A, KEY_B, KEY_LIMITED = "sk-team-a-secret-1", "sk-team-b-secret-2", "sk-limited-secret-3"


def keys_yaml(*entries: dict) -> str:
    return yaml.safe_dump({"keys": list(entries)})


def key_entry(name: str, key: str, **extra) -> dict:
    return {"name": name, "sha256": hash_key(key), **extra}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def keys_volume(tmp_path_factory) -> ConfigMapVolume:
    volume = ConfigMapVolume(tmp_path_factory.mktemp("keys"), "keys.yaml")
    volume.publish(
        keys_yaml(
            key_entry("team-a", KEY_A),
            key_entry("team-b", KEY_B, models=[PHI]),
            key_entry("limited", KEY_LIMITED, requests_per_minute=3),
        )
    )
    return volume


@pytest.fixture(scope="module")
def auth_gateway(tutorial_engines, keys_volume, module_processes, tmp_path_factory) -> RunningProcess:
    engines = [
        {"name": name, "model": LLAMA if "llama" in name else PHI, "owned_by": name.split("-")[0], "url": sim.url}
        for name, sim in tutorial_engines.items()
    ]
    config = write_routing_map(tmp_path_factory.mktemp("auth") / "routes.yaml", engines)
    return module_processes.gateway(config, extra_args=["--keys-file", str(keys_volume.path)])


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-key"},
        {"Authorization": f"Basic {KEY_A}"},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer "},
        {"X-API-Key": "wrong"},
        {"X-API-Key": ""},
        {"Authorization": KEY_A},
    ],
    ids=[
        "missing",
        "wrong",
        "basic-scheme",
        "bearer-empty",
        "bearer-blank",
        "x-api-key-wrong",
        "x-api-key-empty",
        "no-scheme",
    ],
)
def test_missing_wrong_and_malformed_keys_get_the_same_401(auth_gateway, headers):
    answer = post(auth_gateway.url + CHAT, {"model": LLAMA, "messages": HI}, headers=headers)
    assert answer.status == 401
    assert answer.headers["www-authenticate"] == "Bearer"
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "invalid_api_key"
    assert error["message"] == "A valid API key is required: send `Authorization: Bearer <key>`."


def test_keys_work_as_bearer_and_as_x_api_key(auth_gateway):
    assert post(auth_gateway.url + CHAT, {"model": LLAMA, "messages": HI}, headers=bearer(KEY_A)).status == 200
    assert post(auth_gateway.url + CHAT, {"model": LLAMA, "messages": HI}, headers={"X-API-Key": KEY_A}).status == 200


def test_a_key_limited_to_some_models_is_told_of_no_other(auth_gateway):
    forbidden = post(auth_gateway.url + CHAT, {"model": LLAMA, "messages": HI}, headers=bearer(KEY_B))
    unknown = post(auth_gateway.url + CHAT, {"model": "no-such-model", "messages": HI}, headers=bearer(KEY_B))
    assert forbidden.status == unknown.status == 404
    assert forbidden.json()["error"]["code"] == unknown.json()["error"]["code"] == "model_not_found"
    assert forbidden.json()["error"]["message"] == unknown.json()["error"]["message"].replace("no-such-model", LLAMA)
    assert LLAMA not in unknown.json()["error"]["message"] and PHI in unknown.json()["error"]["message"]
    assert post(auth_gateway.url + CHAT, {"model": PHI, "messages": HI}, headers=bearer(KEY_B)).status == 200
    listed = {card["id"] for card in get(auth_gateway.url + "/v1/models", headers=bearer(KEY_B)).json()["data"]}
    assert listed == {PHI}


def test_probes_and_metrics_stay_open_but_models_need_a_key(auth_gateway):
    for path in ("/healthz", "/readyz", "/metrics", "/health"):
        assert get(auth_gateway.url + path).status == 200, path
    assert get(auth_gateway.url + "/v1/models").status == 401


def test_openai_client_with_a_key(auth_gateway):
    client = openai.OpenAI(base_url=auth_gateway.url + "/v1", api_key=KEY_A, max_retries=0)
    assert {m.id for m in client.models.list()} == {LLAMA, PHI}
    reply = client.chat.completions.create(model=LLAMA, messages=HI, max_tokens=3, extra_body={"owned_by": "sglang"})
    assert reply.usage.completion_tokens == 3
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=auth_gateway.url + "/v1", api_key="sk-nope", max_retries=0).models.list()


def test_rejections_are_counted_by_key_name_never_by_key(auth_gateway):
    post(auth_gateway.url + CHAT, {"model": LLAMA, "messages": HI}, headers=bearer(KEY_B))
    post(auth_gateway.url + CHAT, {"model": LLAMA, "messages": HI}, headers=bearer("sk-leaked-looking-key"))
    metrics = get(auth_gateway.url + "/metrics").body.decode()
    assert metric_value(metrics, "llm_gateway_rejected_requests_total", reason="forbidden_model", client="team-b") >= 1
    assert metric_value(metrics, "llm_gateway_rejected_requests_total", reason="auth", client="") >= 1
    for secret in (KEY_A, KEY_B, KEY_LIMITED, "sk-leaked-looking-key"):
        assert secret not in metrics and secret not in auth_gateway.log()


def test_rate_limit_in_memory_with_openai_headers(auth_gateway):
    answers = [
        post(auth_gateway.url + CHAT, {"model": PHI, "messages": HI}, headers=bearer(KEY_LIMITED)) for _ in range(4)
    ]
    assert [a.status for a in answers[:3]] == [200, 200, 200]
    assert answers[0].headers["x-ratelimit-limit-requests"] == "3"
    assert [a.headers["x-ratelimit-remaining-requests"] for a in answers[:3]] == ["2", "1", "0"]
    assert answers[0].headers["x-ratelimit-reset-requests"].endswith("s")
    refused = answers[3]
    assert refused.status == 429 and int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["code"] == "rate_limit_requests"
    assert refused.json()["error"]["type"] == "rate_limit_error"


def test_rotated_key_takes_effect_without_restart(auth_gateway, keys_volume):
    new_key = "sk-team-a-rotated"
    assert post(auth_gateway.url + CHAT, {"model": LLAMA, "messages": HI}, headers=bearer(new_key)).status == 401
    keys_volume.publish(
        keys_yaml(
            key_entry("team-a", new_key),
            key_entry("team-b", KEY_B, models=[PHI]),
            key_entry("limited", KEY_LIMITED, requests_per_minute=3),
        )
    )
    wait_for(
        lambda: post(auth_gateway.url + CHAT, {"model": LLAMA, "messages": HI}, headers=bearer(new_key)).status == 200,
        message="new key accepted",
    )
    assert post(auth_gateway.url + CHAT, {"model": LLAMA, "messages": HI}, headers=bearer(KEY_A)).status == 401
    keys_volume.publish("keys: [{name: broken}]\n")  # a bad file is refused; the keys in service stay
    wait_for(
        lambda: (
            metric_value(
                get(auth_gateway.url + "/metrics").body.decode(),
                "llm_gateway_config_reloads_total",
                file="api_keys",
                result="failure",
            )
            == 1
        ),
        message="refused",
    )
    assert post(auth_gateway.url + CHAT, {"model": LLAMA, "messages": HI}, headers=bearer(new_key)).status == 200


# --- the engine credential: the client's key never reaches an engine ---------------------------------


def test_engine_gets_the_gateway_credential_not_the_clients(processes, tmp_path):
    engine = processes.recording_engine()
    key_file = tmp_path / "engine-key"
    key_file.write_text("engine-secret-1\n")
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(keys_yaml(key_entry("team-a", KEY_A)))
    config = write_routing_map(
        tmp_path / "routes.yaml", [{"name": "rec", "model": "m", "owned_by": "x", "url": engine.url}]
    )
    gateway = processes.gateway(
        config, extra_args=["--keys-file", str(keys_file), "--engine-api-key-file", str(key_file)]
    )
    assert post(gateway.url + CHAT, {"model": "m"}, headers=bearer(KEY_A)).status == 200
    received = {k.lower(): v for k, v in engine.received[-1].headers.items()}
    assert received["authorization"] == "Bearer engine-secret-1"
    assert "x-api-key" not in received
    key_file.write_text("engine-secret-2\n")  # rotation of the mounted Secret
    wait_for(
        lambda: (
            post(gateway.url + CHAT, {"model": "m"}, headers=bearer(KEY_A)).status == 200
            and engine.received[-1].headers.get("Authorization") == "Bearer engine-secret-2"
        ),
        message="rotated",
    )


def test_serve_refuses_a_bad_keys_file(tmp_path):
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text("keys:\n  - {name: a, sha256: not-a-hash}\n")
    config = write_routing_map(
        tmp_path / "routes.yaml", [{"name": "e", "model": "m", "owned_by": "x", "url": "http://127.0.0.1:9"}]
    )
    result = subprocess.run(
        [sys.executable, "-m", "gateway_app", "serve", "--config", str(config), "--keys-file", str(keys_file)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and "keys[0].sha256" in result.stderr


@pytest.mark.parametrize("text", ["", "keys: []\n"], ids=["empty-file", "empty-list"])
def test_a_keys_file_that_lists_no_keys_refuses_everything(processes, tmp_path, text):
    """An empty Secret must not open the gateway: every request gets 401, and the log says why, once."""
    engine = processes.recording_engine()
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(text)
    config = write_routing_map(
        tmp_path / "routes.yaml", [{"name": "rec", "model": "m", "owned_by": "vllm", "url": engine.url}]
    )
    gateway = processes.gateway(config, extra_args=["--keys-file", str(keys_file), "--log-format", "json"])
    for headers in ({}, bearer(KEY_A), {"X-API-Key": KEY_A}):
        for answer in (
            post(gateway.url + CHAT, {"model": "m", "messages": HI}, headers=headers),
            get(gateway.url + "/v1/models", headers=headers),
            get(gateway.url + "/v1/models/m", headers=headers),
        ):
            assert answer.status == 401 and answer.json()["error"]["code"] == "invalid_api_key", answer.body
    assert [r.path for r in engine.received if r.path != "/health"] == []  # nothing reached the engine
    assert get(gateway.url + "/healthz").status == get(gateway.url + "/readyz").status == 200  # probes stay open
    warnings = [json.loads(line) for line in gateway.log().splitlines() if "lists no keys" in line]
    assert len(warnings) == 1, warnings  # at start, not per request
    assert warnings[0]["level"] == "warning" and str(keys_file) in warnings[0]["message"]


# --- limits shared through Redis ---------------------------------------------------------------------


@pytest.fixture
def redis(processes, tmp_path) -> RedisServer:
    return processes.add(RedisServer(tmp_path)).start()


def shared_gateways(
    redis, tutorial_engines, processes: Processes, tmp_path: Path, limits: dict, key: dict, count: int = 2
) -> list[RunningProcess]:
    config = write_routing_map(
        tmp_path / "routes.yaml",
        [{"name": "vllm-llama", "model": LLAMA, "owned_by": "vllm", "url": tutorial_engines["vllm-llama-32-1b"].url}],
        settings={"limits": limits},
    )
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(keys_yaml(key))
    args = ["--keys-file", str(keys_file), "--redis-url", redis.url]
    return [processes.gateway(config, extra_args=args) for _ in range(count)]


def test_two_gateways_sharing_redis_enforce_one_limit(redis, tutorial_engines, processes, tmp_path):
    gateways = shared_gateways(
        redis, tutorial_engines, processes, tmp_path, {"requests_per_minute": 4}, key_entry("team-a", KEY_A)
    )
    statuses = [
        post(gateways[i % 2].url + CHAT, {"model": LLAMA, "messages": HI}, headers=bearer(KEY_A)).status
        for i in range(6)
    ]
    assert statuses == [200, 200, 200, 200, 429, 429]  # 4 in all, not 4 per replica


def test_redis_stopped_mid_test_fails_open_then_limits_return(redis, tutorial_engines, processes, tmp_path):
    (gateway,) = shared_gateways(
        redis, tutorial_engines, processes, tmp_path, {"requests_per_minute": 2}, key_entry("team-a", KEY_A), count=1
    )
    request = lambda: post(gateway.url + CHAT, {"model": LLAMA, "messages": HI}, headers=bearer(KEY_A))  # noqa: E731
    assert [request().status for _ in range(3)] == [200, 200, 429]
    redis.stop()
    assert [request().status for _ in range(3)] == [200, 200, 200]  # fail open: keep serving
    metrics = get(gateway.url + "/metrics").body.decode()
    assert metric_value(metrics, "llm_gateway_rate_limit_store_errors_total") >= 1
    assert "rate-limit store unreachable" in gateway.log()
    redis.start()  # same port, empty: the buckets are full again
    wait_for(lambda: request().status == 429, timeout=15, message="limits enforced again after Redis returned")
    assert "reachable again" in gateway.log()


def test_redis_down_with_fail_closed_refuses_with_503(redis, tutorial_engines, processes, tmp_path):
    (gateway,) = shared_gateways(
        redis,
        tutorial_engines,
        processes,
        tmp_path,
        {"requests_per_minute": 100, "fail_open": False},
        key_entry("team-a", KEY_A),
        count=1,
    )
    assert post(gateway.url + CHAT, {"model": LLAMA, "messages": HI}, headers=bearer(KEY_A)).status == 200
    redis.stop()
    answer = post(gateway.url + CHAT, {"model": LLAMA, "messages": HI}, headers=bearer(KEY_A))
    assert answer.status == 503 and answer.json()["error"]["code"] == "rate_limiter_unavailable"


def test_streamed_tokens_are_counted_exactly_once_and_the_usage_chunk_stays_hidden(
    redis, tutorial_engines, processes, tmp_path
):
    # 60 tokens a minute refill one token a second: the bucket barely moves during the test.
    (gateway,) = shared_gateways(
        redis, tutorial_engines, processes, tmp_path, {"tokens_per_minute": 60}, key_entry("team-a", KEY_A), count=1
    )
    body = {"model": LLAMA, "messages": HI, "max_tokens": 5}
    direct = post(tutorial_engines["vllm-llama-32-1b"].url + CHAT, body).json()["usage"]
    used = direct["prompt_tokens"] + direct["completion_tokens"]
    answer = post(gateway.url + CHAT, dict(body, stream=True), headers=bearer(KEY_A))
    events = sse_events(answer.body)
    assert events[-1] == "[DONE]"
    assert all("usage" not in json.loads(e) or json.loads(e)["usage"] is None for e in events[:-1])  # not asked for

    def charged() -> float:
        return 60 - float(redis.command("HGET", "llm-gateway:rl:{team-a}:t", "l").split(b"\r\n")[1])

    # The estimate is settled against the usage within a second. Charged once: `used`, less what
    # refilled meanwhile (1 token a second); charged twice would be about 2 * used.
    wait_for(lambda: used - 4 <= charged() <= used + 0.5, timeout=5, message=f"{used} tokens charged")
    # a client that asks for usage still gets it, and it is counted once too
    answer = post(
        gateway.url + CHAT, dict(body, stream=True, stream_options={"include_usage": True}), headers=bearer(KEY_A)
    )
    assert json.loads(sse_events(answer.body)[-2])["usage"]["completion_tokens"] == 5


def test_gateway_reaches_an_engine_that_wants_an_api_key(processes, tmp_path):
    port = free_port()
    sim = processes.cli(
        [
            "simulate",
            "--engine",
            "vllm",
            "--model",
            "m",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--api-key",
            "engine-secret",
        ],
        port,
        "/health",
        "sim-keyed",
    )
    key_file = tmp_path / "engine-key"
    key_file.write_text("engine-secret")
    config = write_routing_map(
        tmp_path / "routes.yaml", [{"name": "keyed", "model": "m", "owned_by": "vllm", "url": sim.url}]
    )
    gateway = processes.gateway(config, extra_args=["--engine-api-key-file", str(key_file)])
    assert post(sim.url + CHAT, {"model": "m", "messages": HI}).status == 401  # the engine really checks
    assert post(gateway.url + CHAT, {"model": "m", "messages": HI}).status == 200
    assert [c["id"] for c in get(gateway.url + "/v1/models").json()["data"]] == ["m"]


def test_token_limit_refuses_with_token_headers(tutorial_engines, processes, tmp_path):
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(keys_yaml(key_entry("team-a", KEY_A, tokens_per_minute=50)))
    config = write_routing_map(
        tmp_path / "routes.yaml",
        [{"name": "vllm-llama", "model": LLAMA, "owned_by": "vllm", "url": tutorial_engines["vllm-llama-32-1b"].url}],
    )
    gateway = processes.gateway(config, extra_args=["--keys-file", str(keys_file)])
    body = {"model": LLAMA, "messages": HI, "max_tokens": 100}  # the estimate exceeds the whole bucket
    first = post(gateway.url + CHAT, body, headers=bearer(KEY_A))
    assert first.status == 200 and first.headers["x-ratelimit-limit-tokens"] == "50"
    assert "x-ratelimit-limit-requests" not in first.headers  # no request limit configured
    refused = post(gateway.url + CHAT, body, headers=bearer(KEY_A))
    assert refused.status == 429 and refused.json()["error"]["code"] == "rate_limit_tokens"
    assert int(refused.headers["retry-after"]) >= 1 and refused.headers["x-ratelimit-remaining-tokens"] == "0"
