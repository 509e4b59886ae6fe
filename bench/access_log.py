"""What the access log costs: the same load through a gateway that writes one JSON line per request and
one that writes none.

- `json`: `serve --log-format json`, the access log on (the default), stderr to a file as in production;
- `off`: `serve --no-access-log`.

Both gateways run at once on the gateway's CPU, in front of the same simulator. At each concurrency they
take turns in the order json, off, off, json, each turn half of `--duration`, so that a drift on a shared
machine that is steady over the four turns cancels out. The cost is json's gateway CPU per request minus
off's, each pooled over its two turns. The gateway renders and writes its lines in a background task a
few times a second, in its own process, so that work is in its CPU time too.
"""

from __future__ import annotations

import argparse
import json
import secrets
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from load import Pids, fmt, run_scenario
from processes import Pinning, ProcessGroup, Servers, free_port, metric_sum, routing_map, scrape, start_gateway

LOG_ARGS = {"json": ("--log-format", "json"), "off": ("--no-access-log",)}
DESCRIPTIONS = {
    "json": "--log-format json: one JSON line per request on stderr, redirected to a file",
    "off": "--no-access-log: no line per request",
}
TURN_ORDER = ("json", "off", "off", "json")  # symmetric: a steady drift adds the same to both
FLUSH_WAIT_S = 1.0  # the gateway writes its buffered lines every 0.2 s
# Reported next to the results, never asserted.
TARGET_CPU_MS_PER_REQUEST = 0.05


@dataclass(frozen=True)
class LoggingGateway:
    name: str  # a key of LOG_ARGS
    url: str
    pids: Pids
    log_file: Path  # the gateway's stdout and stderr


def start_gateways(group: ProcessGroup, pinning: Pinning, servers: Servers, model: str) -> list[LoggingGateway]:
    routes = routing_map(model, servers.simulator_url)
    gateways = []
    for name, extra_args in LOG_ARGS.items():
        port = free_port()
        process_name = f"gateway-log-{name}"
        gateway = start_gateway(group, process_name, pinning, routes, port, extra_args)
        gateways.append(
            LoggingGateway(
                name,
                f"http://127.0.0.1:{port}",
                Pids(gateway.pid, servers.simulator.pid),
                group.log_dir / f"{process_name}.log",
            )
        )
    check_logging(gateways, model)
    return gateways


def request_lines(log_file: Path) -> list[str]:
    """The access-log lines in a gateway's log (its other lines, warnings, have no request id)."""
    return [line for line in log_file.read_text(errors="replace").splitlines() if '"request_id":' in line]


def check_logging(gateways: list[LoggingGateway], model: str) -> None:
    """Fail before measuring if a gateway does not do what its flags say: `json` writes a JSON line with
    the request's id, `off` writes none."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).encode()
    request_ids = {}
    for gateway in gateways:
        request_ids[gateway.name] = "bench-log-check-" + secrets.token_hex(8)
        request = urllib.request.Request(
            f"{gateway.url}/v1/chat/completions",
            data=body,
            headers={"Content-Type": "application/json", "x-request-id": request_ids[gateway.name]},
        )
        try:
            urllib.request.urlopen(request, timeout=5).close()
        except urllib.error.HTTPError as error:
            raise RuntimeError(f"the {gateway.name} access-log gateway answered {error.code}") from None
    time.sleep(FLUSH_WAIT_S)
    for gateway in gateways:
        lines = [line for line in request_lines(gateway.log_file) if request_ids[gateway.name] in line]
        if gateway.name == "off" and lines:
            raise RuntimeError(f"the gateway started with --no-access-log wrote an access-log line: {lines[0]}")
        if gateway.name == "json":
            if not lines:
                raise RuntimeError("the gateway started with --log-format json wrote no access-log line")
            try:
                json.loads(lines[0])
            except ValueError:
                raise RuntimeError(
                    f"the gateway started with --log-format json wrote a line that is not JSON: {lines[0]}"
                ) from None


def print_gateways(gateways: list[LoggingGateway]) -> None:
    for gateway in gateways:
        print(f"access log {gateway.name} gateway {gateway.url} (pid {gateway.pids.gateway})", flush=True)


async def run_logging(args: argparse.Namespace, gateways: list[LoggingGateway], model: str) -> list[dict[str, Any]]:
    """Non-streaming requests, the two gateways taking turns at each concurrency; one row per turn."""
    print("access log:", flush=True)
    by_name = {gateway.name: gateway for gateway in gateways}
    turn_args = argparse.Namespace(**{**vars(args), "duration": args.duration / (len(TURN_ORDER) // len(LOG_ARGS))})
    turns = []
    for concurrency in args.concurrency:
        for turn, name in enumerate(TURN_ORDER, start=1):
            gateway = by_name[name]
            result = await run_scenario(
                "gateway", gateway.url, False, concurrency, turn_args, gateway.pids, model=model
            )
            print(
                f"  {name:<4} c={concurrency:<3} turn {turn} {result.requests_per_s:8.0f} req/s, "
                f"p50 {fmt(result.p50_ms)} ms, gw cpu {fmt(result.gateway_cpu_ms_per_request, 3)} ms/req, "
                f"{result.errors} errors",
                flush=True,
            )
            turns.append({"log": name, "turn": turn, **asdict(result)})
    return turns


def written(gateways: list[LoggingGateway]) -> dict[str, dict[str, int]]:
    """After the run: each gateway's access-log lines against the requests it answered."""
    if not gateways:
        return {}
    time.sleep(FLUSH_WAIT_S)
    counts = {}
    for gateway in gateways:
        lines = request_lines(gateway.log_file)
        counts[gateway.name] = {
            "requests_answered": round(metric_sum(scrape(gateway.url), "llm_gateway_requests_total")),
            "lines": len(lines),
            "bytes": sum(len(line) + 1 for line in lines),
        }
    return counts


def pooled(turns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each gateway's turns at one concurrency added up: CPU per request is total CPU over total requests."""
    rows = []
    for key in dict.fromkeys((t["log"], t["concurrency"]) for t in turns):
        mine = [t for t in turns if (t["log"], t["concurrency"]) == key]
        completed = sum(t["requests"] + t["errors"] for t in mine)
        cpu_ms = sum(t["gateway_cpu_ms_per_request"] * (t["requests"] + t["errors"] or 1) for t in mine)
        seconds = sum(t["seconds"] for t in mine)
        p50s = [t["p50_ms"] for t in mine if t["p50_ms"] is not None]
        rows.append(
            {
                "log": key[0],
                "concurrency": key[1],
                "requests": sum(t["requests"] for t in mine),
                "errors": sum(t["errors"] for t in mine),
                "seconds": round(seconds, 3),
                "requests_per_s": sum(t["requests"] for t in mine) / seconds,
                "mean_p50_ms": sum(p50s) / len(p50s) if p50s else None,
                "gateway_cpu_ms_per_request": cpu_ms / (completed or 1),
                "gateway_busy_percent": sum(t["gateway_busy_percent"] * t["seconds"] for t in mine) / seconds,
                "cpu0_busy_percent": sum(t["cpu0_busy_percent"] * t["seconds"] for t in mine) / seconds,
            }
        )
    return rows


def costs(turns: list[dict[str, Any]], totals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """json minus off at each concurrency: pooled, and for each pair of neighbouring turns (the spread)."""
    total = {(row["log"], row["concurrency"]): row for row in totals}
    rows = []
    for concurrency in dict.fromkeys(row["concurrency"] for row in totals):
        json_, off = total[("json", concurrency)], total[("off", concurrency)]
        cpu = {(t["log"], t["turn"]): t["gateway_cpu_ms_per_request"] for t in turns if t["concurrency"] == concurrency}
        rows.append(
            {
                "concurrency": concurrency,
                "json_cpu_ms_per_request": json_["gateway_cpu_ms_per_request"],
                "off_cpu_ms_per_request": off["gateway_cpu_ms_per_request"],
                "added_cpu_ms_per_request": json_["gateway_cpu_ms_per_request"] - off["gateway_cpu_ms_per_request"],
                # turns 1-2 and 3-4 of TURN_ORDER: json then off, off then json
                "added_cpu_ms_per_request_by_half": [
                    cpu[("json", 1)] - cpu[("off", 2)],
                    cpu[("json", 4)] - cpu[("off", 3)],
                ],
                "added_p50_ms": None
                if json_["mean_p50_ms"] is None or off["mean_p50_ms"] is None
                else json_["mean_p50_ms"] - off["mean_p50_ms"],
            }
        )
    return rows


def report(turns: list[dict[str, Any]], lines: dict[str, dict[str, int]], duration: float) -> dict[str, Any]:
    """The `access_log` section of the JSON output."""
    totals = pooled(turns)
    return {
        "configurations": DESCRIPTIONS,
        "turns": f"non-streaming; at each concurrency {', '.join(TURN_ORDER)}, "
        f"{duration / (len(TURN_ORDER) // len(LOG_ARGS)):g} s each",
        "scenarios": turns,
        "pooled": totals,
        "json_minus_off": costs(turns, totals),
        "lines_written": lines,
    }


def targets(section: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "target": f"access log (JSON) CPU per non-streaming request, c={row['concurrency']}",
            "limit_ms": TARGET_CPU_MS_PER_REQUEST,
            "value_ms": row["added_cpu_ms_per_request"],
            "met": row["added_cpu_ms_per_request"] < TARGET_CPU_MS_PER_REQUEST,
        }
        for row in section["json_minus_off"]
    ]


def print_report(section: dict[str, Any]) -> None:
    print(f"\naccess log: the gateway's CPU per request with and without it ({section['turns']})")
    header = (
        f"{'log':<5} {'conc':>4} {'req/s':>8} {'p50 ms':>7} {'errors':>6} {'gw cpu/req':>10} "
        f"{'gw busy':>7} {'cpu0 busy':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in section["pooled"]:
        print(
            f"{r['log']:<5} {r['concurrency']:>4} {r['requests_per_s']:>8.0f} {fmt(r['mean_p50_ms']):>7} "
            f"{r['errors']:>6} {fmt(r['gateway_cpu_ms_per_request'], 3):>10} {r['gateway_busy_percent']:>6.0f}% "
            f"{r['cpu0_busy_percent']:>8.0f}%"
        )
    print("  pooled over each gateway's two turns (p50: the mean of the two)")
    print(
        f"\n{'conc':>4} {'json cpu/req':>12} {'off cpu/req':>11} {'+cpu/req':>8} {'by half (1-2, 3-4)':>18} {'+p50 ms':>7}"
    )
    for c in section["json_minus_off"]:
        halves = ", ".join(fmt(value, 3, sign=True) for value in c["added_cpu_ms_per_request_by_half"])
        print(
            f"{c['concurrency']:>4} {c['json_cpu_ms_per_request']:>12.3f} {c['off_cpu_ms_per_request']:>11.3f} "
            f"{fmt(c['added_cpu_ms_per_request'], 3, sign=True):>8} {halves:>18} {fmt(c['added_p50_ms'], 3, sign=True):>7}"
        )
    for c in section["json_minus_off"]:
        first, second = c["added_cpu_ms_per_request_by_half"]
        if abs(first - second) > TARGET_CPU_MS_PER_REQUEST:
            print(
                f"  note: at c={c['concurrency']} the two halves differ by {abs(first - second):.3f} ms, more than the "
                f"{TARGET_CPU_MS_PER_REQUEST} ms target: noise; measure longer (--duration) on a quieter machine"
            )
    for name, count in section["lines_written"].items():
        per_line = f", {count['bytes'] / count['lines']:.0f} bytes a line" if count["lines"] else ""
        print(
            f"  {name} gateway: {count['lines']:,} access-log lines for {count['requests_answered']:,} requests "
            f"answered{per_line}"
        )
    json_count = section["lines_written"].get("json")
    if json_count and json_count["lines"] != json_count["requests_answered"]:
        print(
            "  WARNING: the json gateway's lines and requests differ (lines dropped past its buffer, or not yet written)"
        )
    for r in section["scenarios"]:
        if r["error_examples"]:
            print(f"  errors in {r['log']}/c={r['concurrency']}/turn {r['turn']}: {'; '.join(r['error_examples'])}")
