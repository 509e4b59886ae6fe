"""The simulator's engine model (`--timing gpu`): prefix cache, batch limit and queue, the engines' metrics.

Real simulator processes on loopback. Assertions read the engine's own counters and the answers'
`usage.prompt_tokens_details.cached_tokens`, not the wall clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from typing import Any

import pytest

from gateway_app.simulator.engine_model import GpuEngine, GpuProfile
from gateway_app.simulator.prefix_cache import PrefixCache, block_hashes
from tests.raw_http import RawConnection, json_request
from tests.support import REPO_ROOT, Processes, RunningProcess, free_port
from tests.web import get, metric_value, post, wait_for

MODEL = "meta-llama/Llama-3.2-1B-Instruct"
ENGINES = ("vllm", "sglang")
BLOCK = 16  # --block-tokens' default
RUNNING = {"vllm": "vllm:num_requests_running", "sglang": "sglang:num_running_reqs"}
WAITING = {"vllm": "vllm:num_requests_waiting", "sglang": "sglang:num_queue_reqs"}


def start_gpu_simulator(processes: Processes, engine: str, *options: str) -> RunningProcess:
    port = free_port()
    args = ["simulate", "--engine", engine, "--model", MODEL, "--host", "127.0.0.1", "--port", str(port)]
    return processes.cli([*args, "--timing", "gpu", *options], port, "/health", f"sim-gpu-{engine}")


def metric(sim: RunningProcess, name: str) -> float:
    return metric_value(get(sim.url + "/metrics").body.decode(), name)


def complete(sim: RunningProcess, prompt: str, max_tokens: int = 1) -> dict[str, Any]:
    answer = post(sim.url + "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens})
    assert answer.status == 200, answer.body
    usage: dict[str, Any] = answer.json()["usage"]
    return usage


def chat(sim: RunningProcess, system: str, user: str) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    answer = post(sim.url + "/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 2})
    assert answer.status == 200, answer.body
    usage: dict[str, Any] = answer.json()["usage"]
    return usage


def cached(usage: dict[str, Any]) -> int:
    details = usage["prompt_tokens_details"]
    return 0 if details is None else int(details["cached_tokens"])


# --- the prefix cache -----------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_a_repeated_prompt_is_served_from_the_prefix_cache(processes: Processes, engine: str) -> None:
    sim = start_gpu_simulator(processes, engine)
    prompt = "The quick brown fox jumps over the lazy dog. " * 22  # 990 characters: 248 tokens at 4 a token
    first = complete(sim, prompt)
    assert first["prompt_tokens"] == 248
    # vLLM (--enable-prompt-tokens-details) leaves the details out when nothing was cached; SGLang
    # (--enable-cache-report) reports a zero.
    assert first["prompt_tokens_details"] == (None if engine == "vllm" else {"cached_tokens": 0})
    second = complete(sim, prompt)
    # Every full block but the one holding the last token, which is always computed: 15 blocks of 16.
    assert cached(second) == (248 - 1) // BLOCK * BLOCK == 240
    if engine == "vllm":
        assert metric(sim, "vllm:prefix_cache_queries_total") == 2 * 248
        assert metric(sim, "vllm:prefix_cache_hits_total") == 240
    else:
        assert metric(sim, "sglang:cache_hit_rate") == pytest.approx(240 / 248)
    # Nothing runs: cached blocks are reusable memory, not usage.
    assert metric(sim, "vllm:kv_cache_usage_perc" if engine == "vllm" else "sglang:token_usage") == 0


def test_the_usage_chunk_of_a_stream_reports_cached_tokens(processes: Processes) -> None:
    sim = start_gpu_simulator(processes, "vllm")
    body = {
        "model": MODEL,
        "prompt": "x" * 400,  # 100 tokens
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    post(sim.url + "/v1/completions", body)
    answer = post(sim.url + "/v1/completions", body)
    usage_chunk = [event for event in answer.body.decode().split("\n\n") if '"usage"' in event][-1]
    assert '"prompt_tokens_details":{"cached_tokens":96}' in usage_chunk


def test_chats_sharing_a_system_prompt_share_its_blocks(processes: Processes) -> None:
    sim = start_gpu_simulator(processes, "vllm")
    system = "You are a careful assistant who answers in one short sentence. " * 13  # 832 characters
    first = chat(sim, system, "What is the capital of France?")
    second = chat(sim, system, "How many legs has a spider?")
    assert cached(first) == 0
    # The rendered prompt starts with "<|system|>" + system + "<|end|>": 849 characters, 212 tokens,
    # of which 13 full blocks are common to both chats.
    assert cached(second) >= (len("<|system|>") + len(system) + len("<|end|>")) // 4 // BLOCK * BLOCK == 208
    assert cached(second) < second["prompt_tokens"]


def test_a_full_cache_evicts_the_least_recently_used_prompt(processes: Processes) -> None:
    # 16 blocks hold two prompts of 8 blocks (128 tokens) each: the third evicts the first.
    sim = start_gpu_simulator(processes, "vllm", "--cache-blocks", "16")
    first, second, third = ("a" * 512, "b" * 512, "c" * 512)
    for prompt in (first, second, third):
        assert cached(complete(sim, prompt)) == 0
    assert cached(complete(sim, second)) == 112
    assert cached(complete(sim, third)) == 112
    assert cached(complete(sim, first)) == 0


def test_prefix_cache_blocks_are_chained_and_evicted_tail_first() -> None:
    text = "x" * (4 * BLOCK * 3)  # three full blocks of one repeated character
    hashes = block_hashes(text, BLOCK)
    assert len(hashes) == 3 and len(set(hashes)) == 3  # equal blocks, different prefixes: different hashes
    assert block_hashes(text + "yz", BLOCK) == hashes  # a partial block is not hashed
    cache = PrefixCache(4)
    cache.acquire(hashes, private=1)
    assert cache.usage == 1.0
    cache.release(hashes, private=1)
    assert cache.usage == 0.0 and cache.cached_blocks == 3
    other = block_hashes("o" * (4 * BLOCK * 3), BLOCK)
    cache.acquire(other, private=0)  # needs 3 blocks, 1 is free: evicts 2, the chain's tail first
    assert cache.cached_prefix(hashes) == 1


def test_an_abandoned_prefill_gives_its_time_back() -> None:
    """A real engine drops an aborted request at its next step: a prefill whose client left must not
    hold the next request's prefill behind the time it would have taken."""

    async def scenario() -> tuple[float, float]:
        engine = GpuEngine(GpuProfile(prefill_tokens_per_s=1000))
        abandoned = asyncio.create_task(engine._prefill(2000))  # 2 s of prefill
        await asyncio.sleep(0.05)
        planned = engine._prefill_busy_until
        abandoned.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await abandoned
        return planned, await engine._prefill(1)

    planned, next_end = asyncio.run(scenario())
    assert next_end < planned  # it started when the first was abandoned, not after its planned end


# --- batching and queueing ------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_requests_beyond_max_running_wait_in_a_queue(processes: Processes, engine: str) -> None:
    sim = start_gpu_simulator(processes, engine, "--max-running", "1", "--decode-ms", "20")
    body = {"model": MODEL, "prompt": "count for me", "max_tokens": 100, "stream": True}
    with RawConnection(sim.url) as first, RawConnection(sim.url) as second:
        first.send(json_request(body, path="/v1/completions"))
        first.read_until(b"tok1 ")
        second.send(json_request(body, path="/v1/completions"))
        # 100 tokens at 20 ms take 2 s: the second request waits while the first runs.
        wait_for(lambda: metric(sim, WAITING[engine]) == 1, timeout=5, message="the second request waiting")
        assert metric(sim, RUNNING[engine]) == 1
        first.read_until(b"[DONE]")
        second.read_until(b"[DONE]")  # admitted once the first left
    wait_for(lambda: metric(sim, RUNNING[engine]) == 0, timeout=5, message="idle again")
    assert metric(sim, WAITING[engine]) == 0


def test_a_client_leaving_the_queue_frees_its_place(processes: Processes) -> None:
    sim = start_gpu_simulator(processes, "vllm", "--max-running", "1", "--decode-ms", "20")
    long_body = {"model": MODEL, "prompt": "go on", "max_tokens": 1000, "stream": True}
    with RawConnection(sim.url) as first:
        first.send(json_request(long_body, path="/v1/completions"))
        first.read_until(b"tok1 ")
        with RawConnection(sim.url) as second:
            second.send(json_request(long_body, path="/v1/completions"))
            wait_for(lambda: metric(sim, "vllm:num_requests_waiting") == 1, timeout=5, message="queued")
        wait_for(lambda: metric(sim, "vllm:num_requests_waiting") == 0, timeout=5, message="queue emptied")
        assert metric(sim, "vllm:num_requests_running") == 1
    wait_for(lambda: metric(sim, "vllm:num_requests_running") == 0, timeout=5, message="the first aborted")
    # Neither abandoned request holds a slot or KV blocks: the next one runs at once.
    assert complete(sim, "next", max_tokens=2)["completion_tokens"] == 2
    assert metric(sim, "vllm:kv_cache_usage_perc") == 0


# --- metrics --------------------------------------------------------------------------------------

METRIC_TYPES = {
    "vllm": {
        "vllm:num_requests_running": "gauge",
        "vllm:num_requests_waiting": "gauge",
        "vllm:kv_cache_usage_perc": "gauge",
        # Declared as Counter("vllm:prefix_cache_queries") in vLLM; prometheus_client exposes `_total`.
        "vllm:prefix_cache_queries_total": "counter",
        "vllm:prefix_cache_hits_total": "counter",
        "vllm:prompt_tokens_total": "counter",
        "vllm:time_to_first_token_seconds": "histogram",
    },
    "sglang": {
        "sglang:num_running_reqs": "gauge",
        "sglang:num_queue_reqs": "gauge",
        "sglang:token_usage": "gauge",
        "sglang:cache_hit_rate": "gauge",
        "sglang:prompt_tokens_total": "counter",
        "sglang:time_to_first_token_seconds": "histogram",
    },
}


@pytest.mark.parametrize("engine", ENGINES)
def test_metrics_have_the_engines_names_and_types(processes: Processes, engine: str) -> None:
    sim = start_gpu_simulator(processes, engine)
    complete(sim, "hello there", max_tokens=3)
    text = get(sim.url + "/metrics").body.decode()
    types = dict(line.split(" ")[2:4] for line in text.splitlines() if line.startswith("# TYPE "))
    for name, kind in METRIC_TYPES[engine].items():
        assert types.get(name) == kind, (name, types.get(name))
    if engine == "vllm":
        assert 'vllm:prefix_cache_queries_total{engine="0",model_name="' in text
    assert metric_value(text, f"{engine}:generation_tokens_total") == 3


# --- the fixed timing -----------------------------------------------------------------------------


def test_the_fixed_timing_is_unchanged(processes: Processes) -> None:
    port = free_port()
    args = ["simulate", "--engine", "vllm", "--model", MODEL, "--host", "127.0.0.1", "--port", str(port)]
    sim = processes.cli([*args, "--timing", "fixed"], port, "/health", "sim-fixed")
    prompt = "one two three four five " * 40
    for _ in range(2):
        usage = complete(sim, prompt)
        # Tokens are words in the fixed timing, and nothing is cached.
        assert usage["prompt_tokens"] == 200 and usage["prompt_tokens_details"] is None
    assert metric(sim, "vllm:prefix_cache_queries_total") == 0


def test_gpu_timing_refuses_the_fixed_delays() -> None:
    command = [sys.executable, "-m", "gateway_app", "simulate", "--engine", "vllm", "--model", "m"]
    done = subprocess.run(
        [*command, "--timing", "gpu", "--ttft-ms", "5"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2 and "--ttft-ms" in done.stderr
    done = subprocess.run(
        [*command, "--timing", "gpu", "--max-running", "0"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2 and "max_running" in done.stderr
