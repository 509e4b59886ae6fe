"""Gateway overhead benchmark: the same load sent to an engine simulator directly, through a bare relay
and through the gateway.

The gateway's cost is the difference between direct and through it, so all run as real processes on
loopback, pinned apart (gateway on CPU 1; simulator and this load generator on CPU 0) so that the gateway's
CPU time per request can be read from /proc without the load generator's work mixed in. The bare relay
(bare_relay.py: uvicorn + aiohttp and nothing else, on the gateway's CPU) is the least the gateway's stack
can do; the gateway's CPU over the relay's is what our own code costs. Then the same gateway is compared
with gateways that check API keys and rate limits (bench/access.py), and a gateway that writes its access
log with one that does not (bench/access_log.py).

    .venv/bin/python bench/bench.py [--duration S] [--concurrency 1,16] [--max-tokens 16] [--stream-tokens 256]
                                    [--stream-itl-ms MS] [--no-relay] [--gateway-log json|off]
                                    [--access open,keys+memory,keys+redis|none] [--no-logging] [--output PATH]

The helpers live next to this script: processes.py (start, pin, measure, stop), load.py (the requests
and what a scenario measures), bare_relay.py (the baseline), access.py and access_log.py (the comparisons),
environment.py (the machine and commit the JSON records), plot.py (the PNG next to the JSON). memory.py and
balance.py are two more benchmarks built on them; compare.py runs this tree against another commit, turn by turn.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import access
import access_log
import plot
from environment import describe, format_load
from load import Pids, ScenarioResult, fmt, run_client, run_scenario
from processes import (
    REPO_ROOT,
    Pinning,
    ProcessGroup,
    choose_pinning,
    engine_entry,
    process_group,
    run_and_report,
    start_relay,
    start_servers,
    start_simulator,
)

MODEL = "bench-model"
PACED_MODEL = "bench-model-paced"  # served by the simulator of --stream-itl-ms, routed by the same gateway
# Reported next to the results, never asserted: the machine may be shared and the figures noisy.
TARGET_CPU_MS_NON_STREAM = 0.5
TARGET_CPU_MS_STREAM_16 = 1.0
TARGET_ADDED_P50_MS_C1 = 1.0
TARGET_MODES = ("non-stream", "stream")  # the modes the targets above are set for (streams of 16 tokens)
# Issue 10: the gateway's CPU per request at most this much over the bare relay's, per mode.
TARGET_OVER_RELAY_PERCENT = {"non-stream": 40.0, "stream-256": 15.0}


@dataclass(frozen=True)
class Target:
    """Where one series of scenarios sends its requests, and whose CPU it reads."""

    name: str  # "direct", "relay" or "gateway"
    url: str
    pids: Pids  # for "relay", Pids.gateway is the relay's process
    model: str = MODEL  # the model asked for, which picks the simulator behind the relay or the gateway


def long_stream_mode(args: argparse.Namespace) -> str | None:
    """The name of the mode of --stream-tokens streams; None when it is left out (0, or --max-tokens again)."""
    if args.stream_tokens and args.stream_tokens != args.max_tokens:
        return f"stream-{args.stream_tokens}"
    return None


def modes(args: argparse.Namespace) -> list[tuple[str, bool, int]]:
    """(name, stream, max_tokens) of each measured mode: non-streaming and streaming with --max-tokens,
    and streams of --stream-tokens when that is another length."""
    chosen = [("non-stream", False, args.max_tokens), ("stream", True, args.max_tokens)]
    long_mode = long_stream_mode(args)
    if long_mode is not None:
        chosen.append((long_mode, True, args.stream_tokens))
    return chosen


# --- the paced simulator of --stream-itl-ms -------------------------------------------------------


def start_paced_simulator(group: ProcessGroup, pinning: Pinning, args: argparse.Namespace) -> tuple[Any, str] | None:
    """With --stream-itl-ms, a second simulator, of PACED_MODEL, that sends a token every that many ms;
    None without it.

    An unpaced simulator writes a long stream as fast as it can, and its events reach the relay or the
    gateway coalesced, fewer reads the busier the reader: the slower process relays fewer, bigger chunks,
    which flatters it. Paced, every token is its own chunk for direct, relay and gateway alike, as from a
    real engine. Started before the gateway, whose routing map must list it."""
    if not args.stream_itl_ms:
        return None
    return start_simulator(group, "simulator-paced", pinning.simulator, PACED_MODEL, itl_ms=args.stream_itl_ms)


def paced_targets(
    group: ProcessGroup,
    pinning: Pinning,
    args: argparse.Namespace,
    paced: tuple[Any, str],
    gateway_url: str,
    gateway_pid: int,
) -> list[Target]:
    """Direct, a second bare relay (with --relay) and the same gateway, all asking for PACED_MODEL: the
    targets of the long-stream mode. The gateway's CPU is read as for the other modes; the simulator's is
    the paced one's."""
    simulator, simulator_url = paced
    pids = Pids(gateway=gateway_pid, simulator=simulator.pid)
    chosen = [Target("direct", simulator_url, pids, PACED_MODEL)]
    if args.relay:
        relay, relay_url = start_relay(group, pinning.gateway, simulator_url, name="relay-paced")
        chosen.append(Target("relay", relay_url, Pids(gateway=relay.pid, simulator=simulator.pid), PACED_MODEL))
        print(f"bare relay for the paced simulator {relay_url} (pid {relay.pid})", flush=True)
    chosen.append(Target("gateway", gateway_url, pids, PACED_MODEL))
    return chosen


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


def versus_relay(results: list[ScenarioResult]) -> list[dict[str, Any]]:
    """The gateway's CPU per request against the bare relay's at the same mode and concurrency: what our own
    code costs over the stack it runs on. `gateway_over_relay_percent` is gateway / relay − 1."""
    by_key = {(r.target, r.mode, r.concurrency): r for r in results}
    rows = []
    for r in results:
        relay = by_key.get(("relay", r.mode, r.concurrency))
        if r.target != "gateway" or relay is None:
            continue
        gateway_ms, relay_ms = r.gateway_cpu_ms_per_request, relay.gateway_cpu_ms_per_request
        if gateway_ms is None or not relay_ms:
            continue
        rows.append(
            {
                "mode": r.mode,
                "concurrency": r.concurrency,
                "relay_cpu_ms_per_request": relay_ms,
                "gateway_cpu_ms_per_request": gateway_ms,
                "added_cpu_ms_per_request": gateway_ms - relay_ms,
                "gateway_over_relay_percent": (gateway_ms / relay_ms - 1) * 100,
                "added_p50_ms": None if r.p50_ms is None or relay.p50_ms is None else r.p50_ms - relay.p50_ms,
            }
        )
    return rows


def targets(
    results: list[ScenarioResult],
    comparisons: list[dict[str, Any]],
    relay_comparisons: list[dict[str, Any]],
    max_tokens: int,
) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        if r.target != "gateway" or r.gateway_cpu_ms_per_request is None or r.mode not in TARGET_MODES:
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
        if c["concurrency"] == 1 and c["mode"] in TARGET_MODES:
            rows.append(
                {
                    "target": f"added p50 latency, {c['mode']}, c=1",
                    "limit_ms": TARGET_ADDED_P50_MS_C1,
                    "value_ms": c["added_p50_ms"],
                    "met": c["added_p50_ms"] < TARGET_ADDED_P50_MS_C1,
                }
            )
    for c in relay_comparisons:
        limit = TARGET_OVER_RELAY_PERCENT.get(c["mode"])
        if limit is not None:
            rows.append(
                {
                    "target": f"gateway CPU over the bare relay's, {c['mode']}, c={c['concurrency']}",
                    "limit_percent": limit,
                    "value_percent": c["gateway_over_relay_percent"],
                    "met": c["gateway_over_relay_percent"] <= limit,
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
    if any(r.target == "relay" for r in results):
        print("  relay rows: the gw columns are the bare relay's own process")


def print_versus_relay(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print("\ngateway vs bare relay: CPU ms per request; gw/relay = gateway / relay − 1, what our own code costs")
    print(
        f"{'mode':<10} {'conc':>4} {'relay cpu/req':>13} {'gw cpu/req':>10} {'+cpu/req':>8} {'gw/relay':>8} {'+p50 ms':>7}"
    )
    for row in rows:
        print(
            f"{row['mode']:<10} {row['concurrency']:>4} {row['relay_cpu_ms_per_request']:>13.3f} "
            f"{row['gateway_cpu_ms_per_request']:>10.3f} {fmt(row['added_cpu_ms_per_request'], 3, sign=True):>8} "
            f"{row['gateway_over_relay_percent']:>+6.0f} % {fmt(row['added_p50_ms'], 3, sign=True):>7}"
        )
    long_mode = long_stream_mode(args)
    if long_mode is not None:
        pacing = f"a token every {args.stream_itl_ms:g} ms" if args.stream_itl_ms else "unpaced (--itl-ms 0)"
        print(f"  {long_mode}: the simulator {pacing}")


def print_targets(goals: list[dict[str, Any]]) -> None:
    print("\ntargets (reported, not asserted)")
    for g in goals:
        if "limit_percent" in g:
            figures = f"{g['value_percent']:+.0f} % (limit +{g['limit_percent']:g} %)"
        else:
            figures = f"{g['value_ms']:.3f} ms (limit {g['limit_ms']} ms)"
        print(f"  {'met   ' if g['met'] else 'MISSED'} {g['target']}: {figures}")


# --- main ------------------------------------------------------------------------------------------


async def run_load(
    args: argparse.Namespace, load_targets: list[Target], long_stream_targets: list[Target]
) -> list[ScenarioResult]:
    """Every mode at every concurrency; the long-stream mode against `long_stream_targets` (the paced
    simulator's, with --stream-itl-ms)."""
    results = []
    long_mode = long_stream_mode(args)
    # Direct, relay and gateway runs take turns so that drift on a shared machine hits them alike.
    for concurrency in args.concurrency:
        for mode, stream, max_tokens in modes(args):
            for target in long_stream_targets if mode == long_mode else load_targets:
                result = await run_scenario(
                    target.name,
                    target.url,
                    stream,
                    concurrency,
                    args,
                    target.pids,
                    model=target.model,
                    max_tokens=max_tokens,
                    mode=mode,
                )
                print(
                    f"  {target.name:<8} {result.mode:<10} c={concurrency:<3} {result.requests_per_s:8.0f} req/s, "
                    f"p50 {fmt(result.p50_ms)} ms, cpu {fmt(result.gateway_cpu_ms_per_request, 3)} ms/req, "
                    f"{result.errors} errors",
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
        # The gateway as in production: the access log on, JSON, stderr to a file (its log in the bench's
        # temporary directory); --gateway-log off starts it with --no-access-log instead.
        paced = start_paced_simulator(group, pinning, args)
        more_engines = engine_entry("bench-vllm-paced", PACED_MODEL, paced[1]) if paced else ""
        servers = start_servers(group, pinning, MODEL, access_log.LOG_ARGS[args.gateway_log], more_engines)
        gateway_pids = Pids(gateway=servers.gateway.pid, simulator=servers.simulator.pid)
        gateway_log = access_log.LoggingGateway(
            args.gateway_log, servers.gateway_url, gateway_pids, group.log_dir / "gateway.log"
        )
        access_log.check_logging([gateway_log], MODEL)
        pinned = {
            "gateway": sorted(os.sched_getaffinity(servers.gateway.pid)),
            "simulator": sorted(os.sched_getaffinity(servers.simulator.pid)),
            "load_generator": sorted(os.sched_getaffinity(0)),
        }
        print(
            f"simulator {servers.simulator_url} (pid {servers.simulator.pid}), "
            f"gateway {servers.gateway_url} (pid {servers.gateway.pid}, access log {args.gateway_log}); CPUs {pinned}",
            flush=True,
        )
        load_targets = [Target("direct", servers.simulator_url, gateway_pids)]
        if args.relay:  # on the gateway's CPU, so that its CPU time is its own as the gateway's is
            relay, relay_url = start_relay(group, pinning.gateway, servers.simulator_url)
            pinned["relay"] = sorted(os.sched_getaffinity(relay.pid))
            print(f"bare relay {relay_url} (pid {relay.pid}); CPUs {pinned['relay']}", flush=True)
            load_targets.append(Target("relay", relay_url, Pids(gateway=relay.pid, simulator=servers.simulator.pid)))
        load_targets.append(Target("gateway", servers.gateway_url, gateway_pids))
        long_stream_targets = load_targets
        if paced:
            print(f"paced simulator {paced[1]} (pid {paced[0].pid}, --itl-ms {args.stream_itl_ms:g})", flush=True)
            pinned["simulator_paced"] = sorted(os.sched_getaffinity(paced[0].pid))
            long_stream_targets = paced_targets(group, pinning, args, paced, servers.gateway_url, servers.gateway.pid)
        gateways = access.start_gateways(group, pinning, servers, args.access, MODEL) if args.access else []
        logging_gateways = access_log.start_gateways(group, pinning, servers, MODEL) if args.logging else []
        access.print_gateways(gateways)
        access_log.print_gateways(logging_gateways)
        results = run_client(run_load(args, load_targets, long_stream_targets))
        access_results = run_client(access.run_access(args, gateways, MODEL)) if gateways else []
        store = access.store_health(gateways)
        logging_turns = run_client(access_log.run_logging(args, logging_gateways, MODEL)) if logging_gateways else []
        lines_written = access_log.written(logging_gateways)
        gateway_lines = access_log.written([gateway_log])[args.gateway_log]
    load_average_at_end = os.getloadavg()
    comparisons = compare(results)
    relay_comparisons = versus_relay(results)
    goals = targets(results, comparisons, relay_comparisons, args.max_tokens)
    print()
    print_report(results, comparisons)
    if relay_comparisons:
        print_versus_relay(relay_comparisons, args)
    print(
        f"  the gateway's access log ({args.gateway_log}): {gateway_lines['lines']:,} lines for "
        f"{gateway_lines['requests_answered']:,} requests answered"
    )
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
            "stream_tokens": args.stream_tokens,
            "stream_itl_ms": args.stream_itl_ms,
            "relay": args.relay,
            "gateway_log": args.gateway_log,
            "model": MODEL,
            "paced_model": PACED_MODEL if paced else None,
            "access": args.access,
            "logging": args.logging,
        },
        "scenarios": [asdict(r) for r in results],
        "gateway_vs_direct": comparisons,
        "gateway_vs_relay": relay_comparisons,
        "gateway_access_log": {"log": args.gateway_log, **gateway_lines},
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
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per request of non-stream and stream")
    parser.add_argument(
        "--stream-tokens",
        type=int,
        default=256,
        help="one more streaming mode, stream-N, with streams of N tokens (default 256; 0 to leave it out)",
    )
    parser.add_argument(
        "--stream-itl-ms",
        type=float,
        default=0.0,
        metavar="MS",
        help="measure the stream-N mode against a second simulator sending a token every MS ms, so that every "
        "token is its own chunk (default 0: the one unpaced simulator)",
    )
    parser.add_argument(
        "--relay",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure the bare uvicorn + aiohttp relay (bench/bare_relay.py) next to the gateway (default: on)",
    )
    parser.add_argument(
        "--gateway-log",
        choices=tuple(access_log.LOG_ARGS),
        default="json",
        help="the measured gateway's access log: json (as in production: one JSON line per request, stderr to "
        "a file) or off (--no-access-log); default: json",
    )
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
    args = parser.parse_args()
    if args.stream_itl_ms < 0:
        parser.error("--stream-itl-ms must not be negative")
    if args.stream_itl_ms and long_stream_mode(args) is None:
        parser.error("--stream-itl-ms paces the stream-N mode: it needs --stream-tokens other than 0 and --max-tokens")
    return args


def main() -> int:
    args = parse_args()
    report, code = run_and_report("bench", lambda: run_benchmark(args), args.output)
    if report is None:
        return code
    plot.write_png(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
