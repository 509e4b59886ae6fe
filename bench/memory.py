"""Gateway memory benchmark: the gateway's resident memory stays flat under load and with many open streams.

One gateway in front of two simulators of model `m`: a fast one (`--itl-ms 0`, the default engine) for
the request phases, and a slow one (`--itl-ms 200`, reached with `owned_by: slow`) whose streams stay
open. The gateway's RSS (VmRSS in /proc/<pid>/status) is read at five points:

  a. after start-up and a warm-up of 500 requests;
  b. after 20,000 more, non-streaming and streaming in turn, 16 in flight;
  c. while 1,000 streams through the gateway are open at once (each client has had its first chunk,
     and the gateway's llm_gateway_requests_in_flight says 1,000);
  d. after those streams ended and 5,000 more requests;
  e. after 1,000 streams again and 5,000 more requests: if d − b is memory the allocator kept for
     reuse, e − d is near 0; if it leaked, e − d is about c − b again.

    .venv/bin/python bench/memory.py [--requests 20000] [--streams 1000] [--stream-seconds 10] [--output PATH]

Process start, pinning and stop are processes.py's; the requests are load.py's.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
from environment import describe, format_load
from load import (
    REQUEST_TIMEOUT,
    Sample,
    fmt,
    one_request,
    request_body,
    run_client,
    run_count,
)
from processes import (
    REPO_ROOT,
    choose_pinning,
    fd_limit,
    free_port,
    memory_kib,
    metric_sum,
    open_fds,
    process_group,
    raise_fd_limit,
    run_and_report,
    start_gateway,
    start_simulator,
)

MODEL = "m"
FAST_ENGINE, SLOW_ENGINE = "memory-fast", "memory-slow"
SLOW_OWNED_BY = "slow"
SLOW_ITL_MS = 200
HEADERS = {"Content-Type": "application/json"}
# Streams are opened in batches, so that 1,000 connections do not all arrive in the same instant.
OPEN_BATCH = 100
OPEN_PAUSE_S = 0.1


@dataclass(frozen=True)
class Memory:
    rss_kib: int
    peak_rss_kib: int  # VmHWM: the highest RSS so far
    open_fds: int


@dataclass(frozen=True)
class Point:
    """The gateway's memory at one point of the run."""

    name: str  # a to e
    what: str
    requests: int  # sent through the gateway since it started, streams included
    errors: int  # in the phase that led to this point
    seconds: float  # how long that phase took
    rss_kib: int
    peak_rss_kib: int
    open_fds: int
    error_examples: list[str]


def read_memory(pid: int) -> Memory:
    return Memory(*memory_kib(pid), open_fds(pid))


def point(name: str, what: str, requests: int, samples: list[Sample], seconds: float, memory: Memory) -> Point:
    errors = [s for s in samples if not s.ok]
    return Point(
        name,
        what,
        requests,
        len(errors),
        round(seconds, 2),
        memory.rss_kib,
        memory.peak_rss_kib,
        memory.open_fds,
        sorted({s.error for s in errors if s.error})[:5],
    )


def routes(fast_url: str, slow_url: str) -> str:
    """Two engines of one model: the fast one serves by default, `owned_by: slow` reaches the slow one."""
    return (
        "engines:\n"
        f'  - {{name: {FAST_ENGINE}, model: {MODEL}, owned_by: vllm, url: "{fast_url}"}}\n'
        f'  - {{name: {SLOW_ENGINE}, model: {MODEL}, owned_by: {SLOW_OWNED_BY}, url: "{slow_url}"}}\n'
    )


async def send_mixed(gateway_url: str, count: int, concurrency: int, max_tokens: int) -> tuple[list[Sample], float]:
    """`count` requests to the fast engine, non-streaming and streaming in turn; the samples and the seconds."""
    mixed = [(request_body(False, max_tokens, MODEL), False), (request_body(True, max_tokens, MODEL), True)]
    plan = itertools.islice(itertools.cycle(mixed), count)
    started = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=REQUEST_TIMEOUT) as session:
        samples = await run_count(session, f"{gateway_url}/v1/chat/completions", HEADERS, plan, concurrency)
    return samples, time.perf_counter() - started


async def in_flight(session: aiohttp.ClientSession, gateway_url: str) -> int:
    async with session.get(f"{gateway_url}/metrics") as response:
        text = await response.text()
    return int(metric_sum(text, "llm_gateway_requests_in_flight", engine=SLOW_ENGINE))


async def hold_streams(
    args: argparse.Namespace,
    gateway_url: str,
    pid: int,
) -> tuple[list[Sample], float, Memory, dict[str, Any]]:
    """Open `--streams` slow streams through the gateway, read the gateway's memory once all are open,
    then let them run to their end; the samples, the seconds, the memory with all open, and how it went."""
    max_tokens = max(1, round(args.stream_seconds * 1000 / SLOW_ITL_MS))
    body = request_body(True, max_tokens, MODEL, owned_by=SLOW_OWNED_BY)
    url = f"{gateway_url}/v1/chat/completions"
    opened = 0

    def count_open() -> None:
        nonlocal opened
        opened += 1

    timeout = aiohttp.ClientTimeout(total=args.stream_seconds * 3 + 60, connect=30)
    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        streams = []
        for number in range(1, args.streams + 1):
            streams.append(asyncio.create_task(one_request(session, url, body, HEADERS, True, True, count_open)))
            if number % OPEN_BATCH == 0:
                await asyncio.sleep(OPEN_PAUSE_S)
        # Wait until every client has its first chunk and the gateway counts them all, or until the
        # first stream ends (then they will never all be open at once, and the report says how many were).
        gateway_count = 0
        while True:
            gateway_count = await in_flight(session, gateway_url)
            if (opened >= args.streams and gateway_count >= args.streams) or any(s.done() for s in streams):
                break
            await asyncio.sleep(0.1)
        seconds_to_open = time.perf_counter() - started
        memory = read_memory(pid)
        samples = await asyncio.gather(*streams)
    seconds = time.perf_counter() - started
    durations = sorted(s.latency_s for s in samples if s.ok)
    report = {
        "streams": args.streams,
        "max_tokens": max_tokens,
        "itl_ms": SLOW_ITL_MS,
        "open_at_sample": opened,
        "gateway_in_flight_at_sample": gateway_count,
        "all_open_at_sample": opened >= args.streams and gateway_count >= args.streams,
        "seconds_to_open_all": round(seconds_to_open, 2),
        "stream_seconds_p50": round(durations[len(durations) // 2], 2) if durations else None,
        "errors": len(samples) - len(durations),
    }
    return samples, seconds, memory, report


async def measure(args: argparse.Namespace, gateway_url: str, pid: int) -> tuple[list[Point], list[dict[str, Any]]]:
    c, n = args.concurrency, args.streams
    samples, seconds = await send_mixed(gateway_url, args.warmup_requests, c, args.max_tokens)
    sent = args.warmup_requests
    points = [point("a", f"after start-up and {sent:,} warm-up requests", sent, samples, seconds, read_memory(pid))]
    print(f"  a: {points[-1].rss_kib / 1024:.1f} MiB", flush=True)

    samples, seconds = await send_mixed(gateway_url, args.requests, c, args.max_tokens)
    sent += args.requests
    points.append(
        point("b", f"after {args.requests:,} more (mixed, {c} in flight)", sent, samples, seconds, read_memory(pid))
    )
    print(f"  b: {points[-1].rss_kib / 1024:.1f} MiB ({args.requests / seconds:.0f} req/s)", flush=True)

    samples, seconds, memory, first = await hold_streams(args, gateway_url, pid)
    sent += n
    points.append(
        point(
            "c",
            f"{n:,} streams open (gateway in flight: {first['gateway_in_flight_at_sample']:,})",
            sent,
            samples,
            seconds,
            memory,
        )
    )
    print(f"  c: {memory.rss_kib / 1024:.1f} MiB with {first['open_at_sample']:,} streams open", flush=True)

    samples, seconds = await send_mixed(gateway_url, args.requests_after, c, args.max_tokens)
    sent += args.requests_after
    points.append(
        point("d", f"streams ended, then {args.requests_after:,} more", sent, samples, seconds, read_memory(pid))
    )
    print(f"  d: {points[-1].rss_kib / 1024:.1f} MiB", flush=True)

    # The same again. Memory that the first streams left and the second ones reuse is kept by the
    # allocator, not leaked: e − d stays near 0, where a leak would add about c − b again.
    stream_samples, stream_seconds, _, second = await hold_streams(args, gateway_url, pid)
    samples, seconds = await send_mixed(gateway_url, args.requests_after, c, args.max_tokens)
    sent += n + args.requests_after
    points.append(
        point(
            "e",
            f"{n:,} streams again, then {args.requests_after:,} more",
            sent,
            stream_samples + samples,
            stream_seconds + seconds,
            read_memory(pid),
        )
    )
    print(f"  e: {points[-1].rss_kib / 1024:.1f} MiB", flush=True)
    return points, [first, second]


def summary(points: list[Point], streams: int) -> dict[str, float]:
    a, b, c, d, e = (p.rss_kib for p in points)
    return {
        "growth_b_minus_a_mib": (b - a) / 1024,
        "growth_d_minus_b_mib": (d - b) / 1024,
        "growth_e_minus_d_mib": (e - d) / 1024,
        "per_open_stream_kib": (c - b) / streams,
    }


def print_report(points: list[Point], figures: dict[str, float], streams: list[dict[str, Any]], pid: int) -> None:
    print(f"\ngateway memory (pid {pid}; RSS and its peak from /proc/<pid>/status)")
    header = f"{'':<2} {'point':<48} {'requests':>8} {'errors':>6} {'RSS MiB':>8} {'peak MiB':>8} {'fds':>5}"
    print(header)
    print("-" * len(header))
    for p in points:
        print(
            f"{p.name:<2} {p.what:<48} {p.requests:>8,} {p.errors:>6} {p.rss_kib / 1024:>8.1f} "
            f"{p.peak_rss_kib / 1024:>8.1f} {p.open_fds:>5}"
        )
    a, b, c, d, _ = points
    n = streams[0]["streams"]
    print(f"\ngrowth b−a: {figures['growth_b_minus_a_mib']:+.2f} MiB over {b.requests - a.requests:,} requests")
    print(
        f"growth d−b: {figures['growth_d_minus_b_mib']:+.2f} MiB over {n:,} streams and {d.requests - c.requests:,} requests"
    )
    print(
        f"growth e−d: {figures['growth_e_minus_d_mib']:+.2f} MiB over the same again "
        "(near 0: d−b is memory kept for reuse, not a leak)"
    )
    print(f"per open stream (c−b)/{n:,}: {figures['per_open_stream_kib']:.1f} KiB (its client and engine connections)")
    for number, report in enumerate(streams, 1):
        print(
            f"streams, round {number}: {report['max_tokens']} tokens {report['itl_ms']} ms apart; "
            f"{report['open_at_sample']:,} open (gateway in flight: {report['gateway_in_flight_at_sample']:,}) "
            f"{report['seconds_to_open_all']} s after the first; p50 stream {fmt(report['stream_seconds_p50'], 1)} s; "
            f"{report['errors']} errors"
        )
        if not report["all_open_at_sample"]:
            print("  WARNING: not all open at once when memory was read: the first ended before the last opened")
    for p in points:
        if p.error_examples:
            print(f"  errors before {p.name}: {'; '.join(p.error_examples)}")


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    load_average = os.getloadavg()
    # The gateway holds a client and an engine socket per stream; children inherit this limit.
    limit = raise_fd_limit(2 * args.streams + 1024)
    pinning = choose_pinning()
    if pinning.load_generator:
        os.sched_setaffinity(0, pinning.load_generator)
    with process_group() as group:
        fast, fast_url = start_simulator(group, "simulator-fast", pinning.simulator, MODEL)
        _, slow_url = start_simulator(group, "simulator-slow", pinning.simulator, MODEL, itl_ms=SLOW_ITL_MS)
        port = free_port()
        gateway = start_gateway(group, "gateway", pinning, routes(fast_url, slow_url), port)
        gateway_url = f"http://127.0.0.1:{port}"
        pinned = {
            "gateway": sorted(os.sched_getaffinity(gateway.pid)),
            "simulators": sorted(os.sched_getaffinity(fast.pid)),
            "load_generator": sorted(os.sched_getaffinity(0)),
        }
        gateway_fd_limit = fd_limit(gateway.pid)
        print(
            f"simulators {fast_url} (itl 0), {slow_url} (itl {SLOW_ITL_MS} ms); gateway {gateway_url} "
            f"(pid {gateway.pid}); CPUs {pinned}; open-file limit {limit} (gateway: {gateway_fd_limit})",
            flush=True,
        )
        points, streams = run_client(measure(args, gateway_url, gateway.pid))
    load_average_at_end = os.getloadavg()
    figures = summary(points, args.streams)
    print_report(points, figures, streams, gateway.pid)
    print(
        f"\nload average (1, 5, 15 min): {format_load(load_average)} at start, {format_load(load_average_at_end)} at end "
        f"on {os.cpu_count()} CPUs"
    )
    return {
        "environment": describe(load_average, load_average_at_end, pinned),
        "settings": {
            "warmup_requests": args.warmup_requests,
            "requests": args.requests,
            "requests_after": args.requests_after,
            "concurrency": args.concurrency,
            "max_tokens": args.max_tokens,
            "streams": args.streams,
            "stream_seconds": args.stream_seconds,
            "model": MODEL,
            "open_file_limit": limit,
            "gateway_open_file_limit": gateway_fd_limit,
        },
        "points": [asdict(p) for p in points],
        "streams": streams,
        **figures,
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup-requests", type=int, default=500, help="requests before point a")
    parser.add_argument("--requests", type=int, default=20_000, help="mixed requests between a and b")
    parser.add_argument("--requests-after", type=int, default=5_000, help="mixed requests after the streams (d)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight in the mixed phases")
    parser.add_argument("--max-tokens", type=int, default=16, help="per request in the mixed phases")
    parser.add_argument("--streams", type=int, default=1_000, help="streams open at once at point c")
    parser.add_argument(
        "--stream-seconds",
        type=float,
        default=10.0,
        help=f"how long each of those streams lasts (tokens {SLOW_ITL_MS} ms apart)",
    )
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "bench" / "results" / "memory.json")
    args = parser.parse_args()
    if min(args.warmup_requests, args.requests, args.requests_after, args.concurrency, args.streams) < 1:
        parser.error("request counts, --concurrency and --streams must be at least 1")
    return args


def main() -> int:
    args = parse_args()
    report, code = run_and_report("memory", lambda: run_benchmark(args), args.output)
    if report is None:
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
