"""Balancing benchmark: the gateway's endpoint-aware pick against plain round-robin, with one slow replica.

Four simulators serve model `m`: three answer after 5 ms (`--ttft-ms 5`), one after 200 ms. Two gateways
reach the same four through one engine with `urls: [...]`, and differ only in `settings.balancing`:
`round_robin` (rotation, what a Kubernetes Service does per connection) and the default `power_of_two`
(the replica with fewer requests outstanding of two picked at random). Each gets the same
fixed-concurrency non-streaming load in turn; each replica's share is the change in its own
`vllm:e2e_request_latency_seconds_count` over the measured window.

    .venv/bin/python bench/balance.py [--duration 10] [--concurrency 8] [--max-tokens 16] [--output PATH]

Process start, pinning and stop are processes.py's; the requests are load.py's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
from environment import describe, format_load
from load import REQUEST_TIMEOUT, fmt, request_body, run_client, run_phase, summarize
from processes import (
    REPO_ROOT,
    choose_pinning,
    cpu_seconds,
    free_port,
    metric_sum,
    own_cpu_seconds,
    process_group,
    run_and_report,
    scrape,
    start_gateway,
    start_simulator,
)

MODEL = "m"
REPLICA_TTFT_MS = (5, 5, 5, 200)  # the last one is the slow one
POLICIES = ("round_robin", "power_of_two")
SERVED = "vllm:e2e_request_latency_seconds_count"
# The simulator counts a request as it finishes the answer, a hair after the client has it.
SETTLE_S = 0.2


@dataclass(frozen=True)
class Replica:
    url: str
    ttft_ms: float
    pid: int


@dataclass
class PolicyResult:
    policy: str
    requests: int  # successful, in the measured window
    errors: int
    seconds: float
    requests_per_s: float
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    served: list[int]  # per replica, in the order of REPLICA_TTFT_MS, from the replicas' own metrics
    share_percent: list[float]
    gateway_busy_percent: float  # of its one CPU
    cpu0_busy_percent: float  # simulators + load generator
    error_examples: list[str]


def routes(replicas: list[Replica], policy: str) -> str:
    urls = ", ".join(f'"{r.url}"' for r in replicas)
    return f"settings: {{balancing: {policy}}}\nengines:\n  - {{name: balance-vllm, model: {MODEL}, owned_by: vllm, urls: [{urls}]}}\n"


def served_counts(replicas: list[Replica]) -> list[int]:
    return [int(metric_sum(scrape(r.url), SERVED)) for r in replicas]


async def run_policy(
    args: argparse.Namespace,
    policy: str,
    gateway_url: str,
    gateway_pid: int,
    replicas: list[Replica],
) -> PolicyResult:
    url = f"{gateway_url}/v1/chat/completions"
    body = request_body(False, args.max_tokens, MODEL)
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=REQUEST_TIMEOUT) as session:
        await run_phase(session, url, body, headers, False, True, args.concurrency, args.warmup)
        await asyncio.sleep(SETTLE_S)
        before = served_counts(replicas)
        cpu = [cpu_seconds(gateway_pid), own_cpu_seconds() + sum(cpu_seconds(r.pid) for r in replicas)]
        started = time.perf_counter()
        samples = await run_phase(session, url, body, headers, False, True, args.concurrency, args.duration)
        seconds = time.perf_counter() - started
        gateway_cpu = cpu_seconds(gateway_pid) - cpu[0]
        cpu0 = own_cpu_seconds() + sum(cpu_seconds(r.pid) for r in replicas) - cpu[1]
        await asyncio.sleep(SETTLE_S)
        served = [after - then for after, then in zip(served_counts(replicas), before, strict=True)]
    total = sum(served) or 1
    return PolicyResult(
        policy=policy,
        **summarize(samples, seconds),
        served=served,
        share_percent=[100 * n / total for n in served],
        gateway_busy_percent=gateway_cpu * 100 / seconds,
        cpu0_busy_percent=cpu0 * 100 / seconds,
        error_examples=sorted({s.error for s in samples if s.error})[:5],
    )


async def run_policies(
    args: argparse.Namespace,
    gateways: dict[str, tuple[str, int]],
    replicas: list[Replica],
) -> list[PolicyResult]:
    results = []
    for policy in POLICIES:
        url, pid = gateways[policy]
        result = await run_policy(args, policy, url, pid, replicas)
        print(
            f"  {policy:<13} {result.requests_per_s:6.0f} req/s, p50 {fmt(result.p50_ms)} ms, "
            f"p99 {fmt(result.p99_ms)} ms, slow replica {result.share_percent[-1]:.1f} %",
            flush=True,
        )
        results.append(result)
    return results


def ratio(value: float | None, baseline: float | None) -> float | None:
    return None if value is None or not baseline else value / baseline


def comparison(results: list[PolicyResult]) -> dict[str, Any]:
    """Round-robin over balanced: above 1 means the balanced gateway is faster."""
    by_policy = {r.policy: r for r in results}
    rr, balanced = by_policy["round_robin"], by_policy["power_of_two"]
    return {
        "p50_ratio_round_robin_over_balanced": ratio(rr.p50_ms, balanced.p50_ms),
        "p90_ratio_round_robin_over_balanced": ratio(rr.p90_ms, balanced.p90_ms),
        "p99_ratio_round_robin_over_balanced": ratio(rr.p99_ms, balanced.p99_ms),
        "throughput_ratio_balanced_over_round_robin": ratio(balanced.requests_per_s, rr.requests_per_s),
        "slow_replica_share_percent": {r.policy: r.share_percent[-1] for r in results},
    }


def print_report(results: list[PolicyResult], gain: dict[str, Any], replicas: list[Replica]) -> None:
    replica_columns = " ".join(f"{f'r{i} {r.ttft_ms:g}ms':>9}" for i, r in enumerate(replicas, 1))
    header = (
        f"{'policy':<13} {'req/s':>7} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'errors':>6} "
        f"{replica_columns} {'gw busy':>7} {'cpu0 busy':>9}"
    )
    print(f"\nshare of requests per replica (r1-r{len(replicas)}, by time to first token)")
    print(header)
    print("-" * len(header))
    for r in results:
        shares = " ".join(f"{share:>8.1f}%" for share in r.share_percent)
        print(
            f"{r.policy:<13} {r.requests_per_s:>7.0f} {fmt(r.p50_ms):>7} {fmt(r.p90_ms):>7} {fmt(r.p99_ms):>7} "
            f"{r.errors:>6} {shares} {r.gateway_busy_percent:>6.0f}% {r.cpu0_busy_percent:>8.0f}%"
        )
    print(
        f"\nround-robin / balanced: p50 {fmt(gain['p50_ratio_round_robin_over_balanced'])}x, "
        f"p90 {fmt(gain['p90_ratio_round_robin_over_balanced'])}x, "
        f"p99 {fmt(gain['p99_ratio_round_robin_over_balanced'])}x; "
        f"req/s balanced / round-robin {fmt(gain['throughput_ratio_balanced_over_round_robin'])}x"
    )
    shares = gain["slow_replica_share_percent"]
    print("slow replica's share: " + ", ".join(f"{policy} {share:.1f} %" for policy, share in shares.items()))
    for r in results:
        counted, sent = sum(r.served), r.requests + r.errors
        if abs(counted - sent) > count_tolerance(sent):
            print(f"  note: the replicas counted {counted} requests for {r.policy}, the client sent {sent}")
        if r.error_examples:
            print(f"  errors with {r.policy}: {'; '.join(r.error_examples)}")


def count_tolerance(sent: int) -> int:
    """How far the replicas' count may drift from the client's (answers finishing across the window's edges)."""
    return max(2, sent // 1000)


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    load_average = os.getloadavg()
    pinning = choose_pinning()
    if pinning.load_generator:
        os.sched_setaffinity(0, pinning.load_generator)
    with process_group() as group:
        replicas = []
        for number, ttft_ms in enumerate(REPLICA_TTFT_MS, 1):
            proc, url = start_simulator(group, f"simulator-{number}", pinning.simulator, MODEL, ttft_ms=ttft_ms)
            replicas.append(Replica(url, ttft_ms, proc.pid))
        gateways = {}
        for policy in POLICIES:
            port = free_port()
            gateway = start_gateway(group, f"gateway-{policy}", pinning, routes(replicas, policy), port)
            gateways[policy] = (f"http://127.0.0.1:{port}", gateway.pid)
        pinned = {
            "gateways": sorted(os.sched_getaffinity(gateways[POLICIES[0]][1])),
            "simulators": sorted(os.sched_getaffinity(replicas[0].pid)),
            "load_generator": sorted(os.sched_getaffinity(0)),
        }
        print(
            f"replicas {', '.join(f'{r.url} (ttft {r.ttft_ms:g} ms)' for r in replicas)}; "
            f"gateways {', '.join(f'{p} {u}' for p, (u, _) in gateways.items())}; CPUs {pinned}",
            flush=True,
        )
        results = run_client(run_policies(args, gateways, replicas))
    load_average_at_end = os.getloadavg()
    gain = comparison(results)
    print_report(results, gain, replicas)
    print(
        f"\nload average (1, 5, 15 min): {format_load(load_average)} at start, {format_load(load_average_at_end)} at end "
        f"on {os.cpu_count()} CPUs"
    )
    return {
        "environment": describe(load_average, load_average_at_end, pinned),
        "settings": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "concurrency": args.concurrency,
            "max_tokens": args.max_tokens,
            "model": MODEL,
            "replica_ttft_ms": list(REPLICA_TTFT_MS),
        },
        "policies": [asdict(r) for r in results],
        "comparison": gain,
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per policy")
    parser.add_argument("--warmup", type=float, default=1.0, help="uncounted seconds before each policy")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "bench" / "results" / "balance.json")
    args = parser.parse_args()
    if args.concurrency < 1 or args.duration <= 0:
        parser.error("--concurrency must be at least 1 and --duration positive")
    return args


def main() -> int:
    args = parse_args()
    report, code = run_and_report("balance", lambda: run_benchmark(args), args.output)
    if report is None:
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
