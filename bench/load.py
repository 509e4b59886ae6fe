"""The load: a fixed number of chat completions in flight, and what one scenario of it measured."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import statistics
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
from processes import cpu_seconds, own_cpu_seconds

REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=60, connect=5)
USAGE_KEY = b'"usage"'
T = TypeVar("T")


@dataclass(frozen=True)
class Pids:
    """The processes whose CPU time a scenario reads."""

    gateway: int
    simulator: int
    redis: int | None = None  # on CPU 0 with the simulator


@dataclass(frozen=True)
class Sample:
    ok: bool
    latency_s: float
    first_chunk_s: float | None = None
    error: str | None = None


@dataclass
class ScenarioResult:
    target: str  # "direct", "relay" (bench/bare_relay.py) or "gateway"
    mode: str  # "non-stream" or "stream" (both --max-tokens), or e.g. "stream-256"
    concurrency: int
    requests: int  # successful requests in the measured window
    errors: int
    seconds: float
    requests_per_s: float
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    first_chunk_p50_ms: float | None
    # Of the process in front of the simulator (Pids.gateway): the gateway, or the bare relay; None for direct.
    gateway_cpu_ms_per_request: float | None
    gateway_busy_percent: float  # of its one CPU; near 100 means the gateway, not the engine, is the limit
    simulator_cpu_ms_per_request: float
    load_generator_cpu_ms_per_request: float
    cpu0_busy_percent: float  # simulator + load generator (+ Redis); near 100 means CPU 0 caps the throughput
    error_examples: list[str]
    redis_cpu_ms_per_request: float | None = None  # only when the gateway keeps its limits in Redis


def redis_cpu_seconds(pids: Pids) -> float:
    return cpu_seconds(pids.redis) if pids.redis is not None else 0.0


def run_client(main: Coroutine[Any, Any, T]) -> T:
    """Run the load generator, on uvloop when it is installed: a cheaper client loop leaves more of CPU 0
    to the simulator. Called outside any event loop, so that Ctrl-C unwinds through the caller's cleanup."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def request_body(
    stream: bool,
    max_tokens: int,
    model: str,
    include_usage: bool = True,
    owned_by: str | None = None,
    messages: list[dict[str, str]] | None = None,
) -> bytes:
    body: dict[str, Any] = {
        "model": model,
        "messages": messages or [{"role": "user", "content": "Say something"}],
        "max_tokens": max_tokens,
    }
    if owned_by is not None:
        body["owned_by"] = owned_by
    if stream:
        body["stream"] = True
        if include_usage:
            body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


async def one_request(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str],
    stream: bool,
    usage_allowed: bool,
    on_first_chunk: Callable[[], None] | None = None,
) -> Sample:
    started = time.perf_counter()
    first_chunk: float | None = None
    try:
        async with session.post(url, data=body, headers=headers) as response:
            if not stream:
                await response.read()
                ok = response.status == 200
                return Sample(ok, time.perf_counter() - started, error=None if ok else f"HTTP {response.status}")
            tail = b""  # enough of the end of the body to see the final event
            usage_seen = False
            async for chunk in response.content.iter_any():
                if first_chunk is None:
                    first_chunk = time.perf_counter() - started
                    if on_first_chunk is not None:
                        on_first_chunk()
                window = tail + chunk
                usage_seen = usage_seen or USAGE_KEY in window
                tail = window[-64:]
            latency = time.perf_counter() - started
            if response.status != 200:
                return Sample(False, latency, first_chunk, f"HTTP {response.status}")
            if not tail.rstrip().endswith(b"data: [DONE]"):
                return Sample(False, latency, first_chunk, "stream ended without data: [DONE]")
            if usage_seen and not usage_allowed:
                return Sample(False, latency, first_chunk, "usage chunk in a stream that did not ask for it")
            return Sample(True, latency, first_chunk)
    except (TimeoutError, aiohttp.ClientError) as error:
        return Sample(False, time.perf_counter() - started, first_chunk, type(error).__name__ + f": {error}")


async def run_phase(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes | Sequence[bytes],
    headers: dict[str, str],
    stream: bool,
    usage_allowed: bool,
    concurrency: int,
    seconds: float,
) -> list[Sample]:
    """Keep `concurrency` requests in flight until `seconds` have passed; in-flight requests finish.
    Several bodies are sent in turn."""
    deadline = time.perf_counter() + seconds
    samples: list[Sample] = []
    bodies = itertools.cycle([body] if isinstance(body, bytes) else body)

    async def worker() -> None:
        while time.perf_counter() < deadline:
            samples.append(await one_request(session, url, next(bodies), headers, stream, usage_allowed))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples


async def run_count(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    plan: Iterable[tuple[bytes, bool]],
    concurrency: int,
) -> list[Sample]:
    """Send every (body, stream) of `plan`, `concurrency` at a time, in order; streams may carry usage."""
    samples: list[Sample] = []
    requests = iter(plan)

    async def worker() -> None:
        for body, stream in requests:  # one shared iterator: each request is sent once
            samples.append(await one_request(session, url, body, headers, stream, usage_allowed=True))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile, in ms."""
    if not sorted_values:
        return None
    rank = min(len(sorted_values), max(1, math.ceil(q / 100 * len(sorted_values))))
    return sorted_values[rank - 1] * 1000


def summarize(samples: list, seconds: float) -> dict[str, Any]:
    """Counts, rate and latency percentiles of one measured phase: the fields every result shares."""
    good = [s for s in samples if s.ok]
    latencies = sorted(s.latency_s for s in good)
    return {
        "requests": len(good),
        "errors": len(samples) - len(good),
        "seconds": round(seconds, 3),
        "requests_per_s": len(good) / seconds,
        "p50_ms": percentile(latencies, 50),
        "p90_ms": percentile(latencies, 90),
        "p99_ms": percentile(latencies, 99),
    }


def fmt(value: float | None, digits: int = 2, sign: bool = False) -> str:
    """A number as the tables print it; `-` for none."""
    return "-" if value is None else f"{value:{'+' if sign else ''}.{digits}f}"


async def run_scenario(
    target: str,
    base_url: str,
    stream: bool,
    concurrency: int,
    args: argparse.Namespace,
    pids: Pids,
    *,
    model: str,
    api_key: str | None = None,
    include_usage: bool = True,
    max_tokens: int | None = None,
    mode: str | None = None,
    messages: list[dict[str, str]] | None = None,
    chats: list[list[dict[str, str]]] | None = None,
) -> ScenarioResult:
    """Warm up, then measure; `include_usage=False` sends streams without `stream_options`, and a usage
    chunk in the answer then counts as an error. `max_tokens` defaults to `args.max_tokens`, `mode`
    (the name in the results) to "stream" or "non-stream", `messages` to one short user message; `chats`
    (several lists of messages) are sent in turn instead."""
    url = f"{base_url}/v1/chat/completions"
    max_tokens = args.max_tokens if max_tokens is None else max_tokens
    body: bytes | list[bytes] = request_body(stream, max_tokens, model, include_usage, messages=messages)
    if chats:
        body = [request_body(stream, max_tokens, model, include_usage, messages=chat) for chat in chats]
    headers = {"Content-Type": "application/json"}
    if api_key is not None:
        headers["Authorization"] = f"Bearer {api_key}"
    # Keep-alive (the default) and one connection per worker, as a real client pool would have.
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=REQUEST_TIMEOUT) as session:
        await run_phase(session, url, body, headers, stream, include_usage, concurrency, args.warmup)
        gw_cpu, sim_cpu, redis_cpu = cpu_seconds(pids.gateway), cpu_seconds(pids.simulator), redis_cpu_seconds(pids)
        client_cpu = own_cpu_seconds()
        started = time.perf_counter()
        samples = await run_phase(session, url, body, headers, stream, include_usage, concurrency, args.duration)
        seconds = time.perf_counter() - started
        gw_cpu = cpu_seconds(pids.gateway) - gw_cpu
        sim_cpu = cpu_seconds(pids.simulator) - sim_cpu
        redis_cpu = redis_cpu_seconds(pids) - redis_cpu
        client_cpu = own_cpu_seconds() - client_cpu

    first_chunks = sorted(s.first_chunk_s for s in samples if s.ok and s.first_chunk_s is not None)
    completed = len(samples) or 1  # CPU is spent on failed requests too
    return ScenarioResult(
        target=target,
        mode=mode or ("stream" if stream else "non-stream"),
        concurrency=concurrency,
        **summarize(samples, seconds),
        first_chunk_p50_ms=percentile(first_chunks, 50) if stream else None,
        gateway_cpu_ms_per_request=gw_cpu * 1000 / completed if target != "direct" else None,
        gateway_busy_percent=gw_cpu * 100 / seconds,
        simulator_cpu_ms_per_request=sim_cpu * 1000 / completed,
        load_generator_cpu_ms_per_request=client_cpu * 1000 / completed,
        cpu0_busy_percent=(sim_cpu + client_cpu + redis_cpu) * 100 / seconds,
        error_examples=sorted({s.error for s in samples if s.error})[:5],
        redis_cpu_ms_per_request=redis_cpu * 1000 / completed if pids.redis is not None else None,
    )


def alternate_turns(
    targets: list[tuple[str, str, int]],
    simulator_pid: int,
    turns: int,
    load: argparse.Namespace,
    concurrency: int,
    stream: bool,
    **scenario: Any,
) -> dict[str, list[float]]:
    """CPU ms per request of each (name, url, pid) target, one scenario each per turn, in turn, so that
    drift on a shared machine hits them all alike. `scenario` goes to `run_scenario` (model, mode, ...).
    A target that fails a request stops the run: the CPU figure of one that fails means nothing."""
    cpu: dict[str, list[float]] = {name: [] for name, _, _ in targets}
    for _ in range(turns):
        for name, url, pid in targets:
            scenario_result = run_scenario(name, url, stream, concurrency, load, Pids(pid, simulator_pid), **scenario)
            result = run_client(scenario_result)
            if result.errors or result.gateway_cpu_ms_per_request is None:
                raise SystemExit(f"{name}: {result.errors} failed requests, e.g. {result.error_examples[:2]}")
            cpu[name].append(result.gateway_cpu_ms_per_request)
    return cpu


def print_medians(cpu: dict[str, list[float]], baselines: dict[str, str]) -> None:
    """Each target's median CPU ms per request, over each baseline's median (label: target name), and
    its turns."""
    medians = {name: statistics.median(values) for name, values in cpu.items()}
    for name, values in cpu.items():
        over = "  ".join(
            f"over {label} {100 * (medians[name] / medians[base] - 1):+4.0f} %" for label, base in baselines.items()
        )
        turns = " ".join(f"{value:.3f}" for value in values)
        print(f"  {name:<16} median {medians[name]:.3f} ms  {over}  ({turns})")
