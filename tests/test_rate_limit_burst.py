"""Limits shared through Redis under a burst, and through a real outage, over real processes.

Two gateways share one redis-server; hundreds of requests arrive at once. A token bucket holds the
limit and refills at limit/60 a second, so "exact" means: at least the limit is admitted, and at most the
limit plus what refilled while the burst lasted. Nothing is refused as "unavailable" while Redis is up.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import yaml

from gateway_app.auth import hash_key
from tests.redis_server import RedisServer
from tests.routes import LLAMA, write_routing_map
from tests.support import Processes, RunningProcess
from tests.web import Answer, get, metric_value, post, wait_for

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]
BODY = {"model": LLAMA, "messages": HI, "max_tokens": 1}
KEY_BURST, KEY_OTHER = "sk-burst-secret-1", "sk-other-secret-2"
LIMIT = 60  # a minute's worth refills one a second: the burst's duration bounds the refill
BURST = 600
OTHER_REQUESTS = 30


@dataclass(frozen=True)
class Reply:
    key: str
    status: int
    code: str | None
    headers: dict[str, str]


@dataclass(frozen=True)
class Burst:
    replies: list[Reply]
    seconds: float  # from before the first request was sent until the last answer arrived

    def statuses(self, key: str) -> Counter:
        return Counter(reply.status for reply in self.replies if reply.key == key)

    def codes(self, key: str, status: int) -> Counter:
        return Counter(reply.code for reply in self.replies if reply.key == key and reply.status == status)

    def most_admitted(self, limit: int) -> int:
        """The limit plus what refilled during the burst, at limit/60 a second. No +1 for rounding: Redis
        refills between its first and last admission, which fall within the seconds measured here."""
        return limit + math.floor(self.seconds * limit / 60)


@pytest.fixture
def engine(tutorial_engines) -> RunningProcess:
    return tutorial_engines["vllm-llama-32-1b"]


@pytest.fixture
def redis(processes, tmp_path) -> RedisServer:
    return processes.add(RedisServer(tmp_path)).start()


def shared_gateways(
    redis_url: str,
    engine: RunningProcess,
    processes: Processes,
    tmp_path: Path,
    keys: list[dict],
    count: int = 2,
    fail_open: bool = True,
) -> list[RunningProcess]:
    """`count` gateways in front of one engine, their limits counted in one Redis."""
    config = write_routing_map(
        tmp_path / "routes.yaml",
        [{"name": "vllm-llama", "model": LLAMA, "owned_by": "vllm", "url": engine.url}],
        settings={"limits": {"fail_open": fail_open}},
    )
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump({"keys": keys}))
    args = ["--keys-file", str(keys_file), "--redis-url", redis_url]
    return [processes.gateway(config, extra_args=args) for _ in range(count)]


def key_entry(name: str, key: str, **limits: int) -> dict:
    return {"name": name, "sha256": hash_key(key), **limits}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def send_burst(gateways: list[RunningProcess], requests: list[tuple[str, dict]]) -> Burst:
    """Send every (key, body) at once, spread over the gateways in turn, each on its own connection."""

    async def one(session: aiohttp.ClientSession, url: str, key: str, body: dict) -> Reply:
        data, headers = json.dumps(body).encode(), {"Content-Type": "application/json", **bearer(key)}
        async with session.post(url + CHAT, data=data, headers=headers) as response:
            payload = await response.read()
            code = json.loads(payload)["error"]["code"] if response.status != 200 else None
            return Reply(key, response.status, code, {k.lower(): v for k, v in response.headers.items()})

    async def all_at_once() -> Burst:
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
            started = time.monotonic()
            replies = await asyncio.gather(
                *(one(session, gateways[i % len(gateways)].url, key, body) for i, (key, body) in enumerate(requests))
            )
            return Burst(list(replies), time.monotonic() - started)

    return asyncio.run(all_at_once())


def interleaved(burst: list[tuple[str, dict]], other: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """The other key's requests spread evenly through the burst, so that they arrive during it."""
    step = len(burst) // len(other)
    mixed = list(burst)
    for index, request in enumerate(other):
        mixed.insert(index * (step + 1), request)
    return mixed


@pytest.mark.parametrize("fail_open", [True, False], ids=["fail-open", "fail-closed"])
def test_a_burst_over_two_gateways_admits_exactly_the_limit(redis, engine, processes, tmp_path, fail_open):
    keys = [
        key_entry("burst", KEY_BURST, requests_per_minute=LIMIT),
        key_entry("other", KEY_OTHER, requests_per_minute=1000),
    ]
    gateways = shared_gateways(redis.url, engine, processes, tmp_path, keys, fail_open=fail_open)
    burst = send_burst(gateways, interleaved([(KEY_BURST, BODY)] * BURST, [(KEY_OTHER, BODY)] * OTHER_REQUESTS))
    admitted = burst.statuses(KEY_BURST)[200]
    print(f"admitted {admitted} of {BURST} in {burst.seconds:.2f}s; statuses {dict(burst.statuses(KEY_BURST))}")
    assert burst.statuses(KEY_BURST)[503] == 0 and burst.statuses(KEY_OTHER)[503] == 0
    assert LIMIT <= admitted <= burst.most_admitted(LIMIT), f"{admitted} admitted in {burst.seconds:.2f}s"
    assert burst.statuses(KEY_BURST) == {200: admitted, 429: BURST - admitted}
    assert burst.codes(KEY_BURST, 429) == {"rate_limit_requests": BURST - admitted}
    # the other key has its own bucket: the burst does not touch it
    assert burst.statuses(KEY_OTHER) == {200: OTHER_REQUESTS}
    assert {r.headers["x-ratelimit-limit-requests"] for r in burst.replies if r.key == KEY_OTHER} == {"1000"}
    for gateway in gateways:
        metrics = get(gateway.url + "/metrics").body.decode()
        assert metric_value(metrics, "llm_gateway_rate_limit_store_errors_total") == 0
        assert "rate-limit store unreachable" not in gateway.log()


def test_a_token_burst_admits_exactly_the_token_limit(redis, engine, processes, tmp_path):
    body = body_costing_what_it_uses(engine)
    cost = estimate(body)
    keys = [key_entry("burst", KEY_BURST, tokens_per_minute=LIMIT * cost)]
    gateways = shared_gateways(redis.url, engine, processes, tmp_path, keys)
    burst = send_burst(gateways, [(KEY_BURST, body)] * BURST)
    admitted = burst.statuses(KEY_BURST)[200]
    print(f"admitted {admitted} of {BURST} in {burst.seconds:.2f}s ({cost} tokens each)")
    # LIMIT requests' worth of tokens, refilling one request's worth a second
    assert LIMIT <= admitted <= burst.most_admitted(LIMIT), f"{admitted} admitted in {burst.seconds:.2f}s"
    assert burst.statuses(KEY_BURST) == {200: admitted, 429: BURST - admitted}
    assert burst.codes(KEY_BURST, 429) == {"rate_limit_tokens": BURST - admitted}


def estimate(body: dict) -> int:
    """What the gateway charges at admission for a chat body as sent (json.dumps): its bytes / 4, plus
    max_tokens."""
    return len(json.dumps(body).encode()) // 4 + body["max_tokens"]


def body_costing_what_it_uses(engine: RunningProcess) -> dict:
    """A chat body whose admission estimate equals the usage the engine reports, so that settling
    gives nothing back and takes nothing: the tokens bucket then moves only with admissions."""
    for words in range(1, 200):
        body = {"model": LLAMA, "messages": [{"role": "user", "content": " ".join(["hi"] * words)}], "max_tokens": 4}
        usage = post(engine.url + CHAT, body).json()["usage"]
        if usage["prompt_tokens"] + usage["completion_tokens"] == estimate(body):
            return body
    raise AssertionError("no body whose estimate equals its usage")


@pytest.mark.parametrize("fail_open", [True, False], ids=["fail-open", "fail-closed"])
def test_redis_stopped_is_decided_per_call_and_limits_return_with_it(redis, engine, processes, tmp_path, fail_open):
    keys = [key_entry("burst", KEY_BURST, requests_per_minute=2)]
    (gateway,) = shared_gateways(redis.url, engine, processes, tmp_path, keys, count=1, fail_open=fail_open)

    def request() -> Answer:
        return post(gateway.url + CHAT, BODY, headers=bearer(KEY_BURST))

    assert [request().status for _ in range(3)] == [200, 200, 429]
    redis.stop()
    during = [request() for _ in range(3)]
    if fail_open:
        assert [a.status for a in during] == [200, 200, 200]  # served without counting
        assert all("x-ratelimit-limit-requests" not in a.headers for a in during)
    else:
        assert [a.status for a in during] == [503, 503, 503]
        assert {a.json()["error"]["code"] for a in during} == {"rate_limiter_unavailable"}
        assert {a.headers["retry-after"] for a in during} == {"1"}
    metrics = get(gateway.url + "/metrics").body.decode()
    assert metric_value(metrics, "llm_gateway_rate_limit_store_errors_total") == 3  # one per failed call
    assert gateway.log().count("rate-limit store unreachable") == 1  # one line per change, not per call

    redis.start()  # same port, empty: the bucket is full again, the scripts must be loaded again
    # No switch keeps limits off for a while: the first request once Redis answers is counted.
    assert "x-ratelimit-limit-requests" in request().headers
    wait_for(lambda: request().status == 429, timeout=15, message="limits enforced again after Redis returned")
    assert gateway.log().count("rate-limit store reachable again") == 1


def test_a_redis_that_never_answers_is_an_outage_per_call(engine, processes, tmp_path):
    keys = [key_entry("burst", KEY_BURST, requests_per_minute=LIMIT), key_entry("other", KEY_OTHER)]
    with socket.socket() as silent:  # the kernel accepts connections to it; nothing ever reads or answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        (gateway,) = shared_gateways(url, engine, processes, tmp_path, keys, count=1, fail_open=False)
        started = time.monotonic()
        answer = post(gateway.url + CHAT, BODY, headers=bearer(KEY_BURST))
        print(f"one call refused after {time.monotonic() - started:.2f}s")
        assert answer.status == 503 and answer.json()["error"]["code"] == "rate_limiter_unavailable"
        burst = send_burst([gateway], [(KEY_BURST, BODY)] * 20 + [(KEY_OTHER, BODY)] * 5)
        print(f"20 calls refused in {burst.seconds:.2f}s")
        assert burst.statuses(KEY_BURST) == {503: 20}
        assert burst.statuses(KEY_OTHER) == {200: 5}  # no limits, no call to Redis
        assert "no answer from Redis within 1s" in gateway.log()


def test_scripts_flushed_from_redis_are_loaded_again(redis, engine, processes, tmp_path):
    keys = [key_entry("burst", KEY_BURST, requests_per_minute=3)]
    (gateway,) = shared_gateways(redis.url, engine, processes, tmp_path, keys, count=1)

    def status() -> int:
        return post(gateway.url + CHAT, BODY, headers=bearer(KEY_BURST)).status

    assert status() == 200
    assert redis.command("SCRIPT", "FLUSH").startswith(b"+OK")
    assert [status(), status(), status()] == [200, 200, 429]
    metrics = get(gateway.url + "/metrics").body.decode()
    assert metric_value(metrics, "llm_gateway_rate_limit_store_errors_total") == 0
