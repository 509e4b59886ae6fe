"""Gateway overhead benchmark: the same load sent to an engine simulator directly and through the gateway.

The gateway's cost is the difference between the two, so both run as real processes on loopback,
pinned apart (gateway on CPU 1; simulator and this load generator on CPU 0) so that the gateway's CPU
time per request can be read from /proc without the load generator's work mixed in. Then the same
gateway is compared with gateways that check API keys and rate limits (bench/access.py), and a gateway
that writes its access log with one that does not (bench/access_log.py).

    .venv/bin/python bench/bench.py [--duration S] [--concurrency 1,16] [--max-tokens 16]
                                    [--access open,keys+memory,keys+redis|none] [--no-logging] [--output PATH]

The helpers live next to this script: processes.py (start, pin, measure, stop), load.py (the requests
and what a scenario measures), access.py and access_log.py (the comparisons), environment.py (the machine
and commit the JSON records), plot.py (the PNG next to the JSON). memory.py and balance.py are two more
benchmarks built on them.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import access
import access_log
import plot
from environment import describe, format_load
from load import Pids, ScenarioResult, fmt, run_client, run_scenario
from processes import (
    REPO_ROOT,
    Servers,
    choose_pinning,
    process_group,
    run_and_report,
    start_servers,
)

MODEL = "bench-model"
# Reported next to the results, never asserted: the machine may be shared and the figures noisy.
TARGET_CPU_MS_NON_STREAM = 0.5
TARGET_CPU_MS_STREAM_16 = 1.0
TARGET_ADDED_P50_MS_C1 = 1.0


# --- report ----------------------------------------------------------------------------------------


def compare(results: list[ScenarioResult]) -> list[dict[str, Any]]:
    """Gateway against direct at the same mode and concurrency."""
    by_key = {(r.target, r.mode, r.concurrency): r for r in results}
    rows = []
    for r in results:
        direct = by_key.get(("direct", r.mode, r.concurrency))
        if r.target != "gateway" or direct is None or r.p50_ms is None or direct.p50_ms is None:
            continue
        rows.append(
            {
                "mode": r.mode,
                "concurrency": r.concurrency,
                "added_p50_ms": r.p50_ms - direct.p50_ms,
                "throughput_ratio": r.requests_per_s / direct.requests_per_s if direct.requests_per_s else None,
                "p50_ratio": r.p50_ms / direct.p50_ms,
            }
        )
    return rows


def targets(results: list[ScenarioResult], comparisons: list[dict[str, Any]], max_tokens: int) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        if r.target != "gateway" or r.gateway_cpu_ms_per_request is None:
            continue
        limit = TARGET_CPU_MS_NON_STREAM if r.mode == "non-stream" else TARGET_CPU_MS_STREAM_16
        what = "non-streaming request" if r.mode == "non-stream" else f"{max_tokens}-token stream"
        if r.mode == "stream" and max_tokens != 16:
            what += " (the limit is set for 16 tokens)"
        rows.append(
            {
                "target": f"gateway CPU per {what}, c={r.concurrency}",
                "limit_ms": limit,
                "value_ms": r.gateway_cpu_ms_per_request,
                "met": r.gateway_cpu_ms_per_request <= limit,
            }
        )
    for c in comparisons:
        if c["concurrency"] == 1:
            rows.append(
                {
                    "target": f"added p50 latency, {c['mode']}, c=1",
                    "limit_ms": TARGET_ADDED_P50_MS_C1,
                    "value_ms": c["added_p50_ms"],
                    "met": c["added_p50_ms"] < TARGET_ADDED_P50_MS_C1,
                }
            )
    return rows


def print_report(results: list[ScenarioResult], comparisons: list[dict[str, Any]]) -> None:
    header = (
        f"{'target':<8} {'mode':<10} {'conc':>4} {'req/s':>8} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} "
        f"{'ttfc50':>7} {'errors':>6} {'gw cpu/req':>10} {'gw busy':>7} {'sim cpu/req':>11} {'cpu0 busy':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.target:<8} {r.mode:<10} {r.concurrency:>4} {r.requests_per_s:>8.0f} {fmt(r.p50_ms):>7} "
            f"{fmt(r.p90_ms):>7} {fmt(r.p99_ms):>7} {fmt(r.first_chunk_p50_ms):>7} {r.errors:>6} "
            f"{fmt(r.gateway_cpu_ms_per_request, 3):>10} {r.gateway_busy_percent:>6.0f}% "
            f"{fmt(r.simulator_cpu_ms_per_request, 3):>11} {r.cpu0_busy_percent:>8.0f}%"
        )
    print("\ngateway vs direct")
    print(f"{'mode':<10} {'conc':>4} {'added p50 ms':>12} {'req/s ratio':>11} {'p50 ratio':>9}")
    for c in comparisons:
        print(
            f"{c['mode']:<10} {c['concurrency']:>4} {c['added_p50_ms']:>12.3f} "
            f"{fmt(c['throughput_ratio']):>11} {c['p50_ratio']:>9.2f}"
        )
    for r in results:
        if r.error_examples:
            print(f"  errors in {r.target}/{r.mode}/c={r.concurrency}: {'; '.join(r.error_examples)}")


def print_targets(goals: list[dict[str, Any]]) -> None:
    print("\ntargets (reported, not asserted)")
    for g in goals:
        print(
            f"  {'met   ' if g['met'] else 'MISSED'} {g['target']}: {g['value_ms']:.3f} ms (limit {g['limit_ms']} ms)"
        )


# --- main ------------------------------------------------------------------------------------------


async def run_load(args: argparse.Namespace, servers: Servers) -> list[ScenarioResult]:
    results = []
    pids = Pids(gateway=servers.gateway.pid, simulator=servers.simulator.pid)
    # Direct and gateway runs alternate so that drift on a shared machine hits both alike.
    for concurrency in args.concurrency:
        for stream in (False, True):
            for target, url in (("direct", servers.simulator_url), ("gateway", servers.gateway_url)):
                result = await run_scenario(target, url, stream, concurrency, args, pids, model=MODEL)
                print(
                    f"  {target:<8} {result.mode:<10} c={concurrency:<3} {result.requests_per_s:8.0f} req/s, "
                    f"p50 {fmt(result.p50_ms)} ms, {result.errors} errors",
                    flush=True,
                )
                results.append(result)
    return results


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    load_average = os.getloadavg()
    pinning = choose_pinning()
    if pinning.load_generator:
        os.sched_setaffinity(0, pinning.load_generator)
    with process_group() as group:
        servers = start_servers(group, pinning, MODEL)
        gateways = access.start_gateways(group, pinning, servers, args.access, MODEL) if args.access else []
        logging_gateways = access_log.start_gateways(group, pinning, servers, MODEL) if args.logging else []
        pinned = {
            "gateway": sorted(os.sched_getaffinity(servers.gateway.pid)),
            "simulator": sorted(os.sched_getaffinity(servers.simulator.pid)),
            "load_generator": sorted(os.sched_getaffinity(0)),
        }
        print(
            f"simulator {servers.simulator_url} (pid {servers.simulator.pid}), "
            f"gateway {servers.gateway_url} (pid {servers.gateway.pid}); CPUs {pinned}",
            flush=True,
        )
        access.print_gateways(gateways)
        access_log.print_gateways(logging_gateways)
        results = run_client(run_load(args, servers))
        access_results = run_client(access.run_access(args, gateways, MODEL)) if gateways else []
        store = access.store_health(gateways)
        logging_turns = run_client(access_log.run_logging(args, logging_gateways, MODEL)) if logging_gateways else []
        lines_written = access_log.written(logging_gateways)
    load_average_at_end = os.getloadavg()
    comparisons = compare(results)
    goals = targets(results, comparisons, args.max_tokens)
    print()
    print_report(results, comparisons)
    access_section = access.report(access_results, store, args.max_tokens) if access_results else None
    if access_section is not None:
        access.print_report(access_section)
        goals += access.targets(access_results)
    logging_section = access_log.report(logging_turns, lines_written, args.duration) if logging_turns else None
    if logging_section is not None:
        access_log.print_report(logging_section)
        goals += access_log.targets(logging_section)
    print_targets(goals)
    print(
        f"\nload average (1, 5, 15 min): {format_load(load_average)} at start, {format_load(load_average_at_end)} at end "
        f"on {os.cpu_count()} CPUs"
    )
    report = {
        "environment": describe(load_average, load_average_at_end, pinned),
        "settings": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "concurrency": args.concurrency,
            "max_tokens": args.max_tokens,
            "model": MODEL,
            "access": args.access,
            "logging": args.logging,
        },
        "scenarios": [asdict(r) for r in results],
        "gateway_vs_direct": comparisons,
        "targets": goals,
    }
    if access_section is not None:
        report["access"] = access_section
    if logging_section is not None:
        report["access_log"] = logging_section
    return report


def concurrency_list(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(level < 1 for level in levels):
        raise argparse.ArgumentTypeError("every concurrency must be at least 1")
    return levels


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per scenario")
    parser.add_argument("--warmup", type=float, default=1.0, help="uncounted seconds before each scenario")
    parser.add_argument("--concurrency", type=concurrency_list, default=[1, 16], help="comma-separated, e.g. 1,16")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument(
        "--access",
        type=access.configuration_list,
        default=list(access.CONFIGURATIONS),
        help=f"access-control configurations to compare, comma-separated from {','.join(access.CONFIGURATIONS)}, "
        "or none (default: all)",
    )
    parser.add_argument(
        "--logging",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compare a gateway writing its JSON access log with one started with --no-access-log "
        "(non-streaming; default: on)",
    )
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "bench" / "results" / "latest.json")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    report, code = run_and_report("bench", lambda: run_benchmark(args), args.output)
    if report is None:
        return code
    plot.write_png(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
