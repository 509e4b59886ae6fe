"""What API keys and rate limits cost: the same load through gateways that differ only in access control.

- `open`: no keys, no limits (the gateway of the direct-vs-gateway scenarios);
- `keys+memory`: one API key, limits far too high to refuse, counters in the gateway's memory;
- `keys+redis`: the same, counters in a redis-server the bench starts on CPU 0 next to the simulator.

Every configuration is its own gateway process on the gateway's CPU, all running at once, and the
configurations take turns at each concurrency so that drift on a shared machine hits them alike. The
cost of access control is each configuration's gateway CPU per request minus `open`'s, from the same run.
Streams (`--max-tokens`, 16 by default; the client not asking for usage) compare `keys+memory` with `open`: with a token
limit the gateway asks the engine for the usage chunk and takes it out of the client's stream.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import secrets
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from typing import Any

from load import Pids, ScenarioResult, fmt, run_scenario
from processes import (
    Pinning,
    ProcessGroup,
    Servers,
    free_port,
    redis_command,
    routing_map,
    start_gateway,
    start_redis,
)

CONFIGURATIONS = ("open", "keys+memory", "keys+redis")
STREAM_CONFIGURATIONS = ("open", "keys+memory")
DESCRIPTIONS = {
    "open": "no API keys, no limits",
    "keys+memory": "one API key; 10^9 requests and tokens per minute (never refuses); counters in process memory",
    "keys+redis": "as keys+memory, counters in a local redis-server (no persistence) on the simulator's CPU",
}
NEVER_REFUSING = 10**9
# Reported next to the results, never asserted.
TARGET_CPU_MS_NON_STREAM_WITH_LIMITS = 0.7


@dataclass(frozen=True)
class AccessGateway:
    name: str  # one of CONFIGURATIONS
    url: str
    pids: Pids
    api_key: str | None  # None: the gateway has no keys
    redis_port: int | None = None


def start_gateways(
    group: ProcessGroup,
    pinning: Pinning,
    servers: Servers,
    names: list[str],
    model: str,
) -> list[AccessGateway]:
    """One gateway per configuration; `open` is the one already in front of the simulator."""
    api_key = "sk-bench-" + secrets.token_urlsafe(24)
    keys_file = group.log_dir / "keys.yaml"
    keys_file.write_text(f"keys:\n  - {{name: bench, sha256: {hashlib.sha256(api_key.encode()).hexdigest()}}}\n")
    limits = f"{{limits: {{requests_per_minute: {NEVER_REFUSING}, tokens_per_minute: {NEVER_REFUSING}}}}}"
    limited_map = routing_map(model, servers.simulator_url, settings=limits)
    gateways = []
    for name in names:
        if name == "open":
            gateways.append(
                AccessGateway(name, servers.gateway_url, Pids(servers.gateway.pid, servers.simulator.pid), None)
            )
            continue
        extra_args = ["--keys-file", str(keys_file)]
        redis_port = redis_pid = None
        if name == "keys+redis":
            redis_port = free_port()
            redis_pid = start_redis(group, pinning.simulator, redis_port).pid
            extra_args += ["--redis-url", f"redis://127.0.0.1:{redis_port}/0"]
        port = free_port()
        gateway = start_gateway(
            group, f"gateway-{name.replace('+', '-')}", pinning, limited_map, port, tuple(extra_args)
        )
        gateways.append(
            AccessGateway(
                name,
                f"http://127.0.0.1:{port}",
                Pids(gateway.pid, servers.simulator.pid, redis_pid),
                api_key,
                redis_port,
            )
        )
    for gateway in gateways:
        check_access_control(gateway, model)
    return gateways


def check_access_control(gateway: AccessGateway, model: str) -> None:
    """Fail before measuring if a gateway does not do what its configuration says: refuse a request
    without a key, and count one with it (the x-ratelimit-* headers, absent when Redis fails open)."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).encode()

    def post(api_key: str | None) -> tuple[int, dict[str, str]]:
        headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {api_key}"} if api_key else {})
        request = urllib.request.Request(f"{gateway.url}/v1/chat/completions", data=body, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, {k.lower(): v for k, v in response.headers.items()}
        except urllib.error.HTTPError as error:
            return error.code, {}

    status, headers = post(gateway.api_key)
    if status != 200:
        raise RuntimeError(f"{gateway.name} gateway answered {status} to a request with its key")
    if gateway.api_key is None:
        return
    if headers.get("x-ratelimit-limit-requests") != str(NEVER_REFUSING):
        raise RuntimeError(f"{gateway.name} gateway did not count a request (no x-ratelimit-* headers)")
    status, _ = post(None)
    if status != 401:
        raise RuntimeError(f"{gateway.name} gateway answered {status}, not 401, to a request without a key")


def print_gateways(gateways: list[AccessGateway]) -> None:
    for gateway in gateways:
        if gateway.name != "open":
            redis = f", redis-server pid {gateway.pids.redis}" if gateway.pids.redis is not None else ""
            print(f"{gateway.name} gateway {gateway.url} (pid {gateway.pids.gateway}){redis}", flush=True)


async def run_access(
    args: argparse.Namespace, gateways: list[AccessGateway], model: str
) -> list[tuple[str, ScenarioResult]]:
    print("access control:", flush=True)
    results = []
    plan = [(False, gateways)] + [(True, [g for g in gateways if g.name in STREAM_CONFIGURATIONS])]
    for stream, taking_turns in plan:
        for concurrency in args.concurrency:
            for gateway in taking_turns:
                result = await run_scenario(
                    "gateway",
                    gateway.url,
                    stream,
                    concurrency,
                    args,
                    gateway.pids,
                    model=model,
                    api_key=gateway.api_key,
                    include_usage=not stream,
                )
                print(
                    f"  {gateway.name:<12} {result.mode:<10} c={concurrency:<3} {result.requests_per_s:8.0f} req/s, "
                    f"p50 {fmt(result.p50_ms)} ms, gw cpu {fmt(result.gateway_cpu_ms_per_request, 3)} ms/req, "
                    f"{result.errors} errors",
                    flush=True,
                )
                results.append((gateway.name, result))
    return results


def store_health(gateways: list[AccessGateway]) -> dict[str, Any] | None:
    """After the run: Redis really held the counters, and the gateway never failed to reach it."""
    gateway = next((g for g in gateways if g.redis_port is not None), None)
    if gateway is None:
        return None
    with urllib.request.urlopen(f"{gateway.url}/metrics", timeout=5) as response:
        metrics = response.read().decode()
    found = re.search(r"^llm_gateway_rate_limit_store_errors_total (\S+)$", metrics, re.MULTILINE)
    return {
        "redis_keys": int(redis_command(gateway.redis_port, "DBSIZE").lstrip(b":")),
        "gateway_store_errors": float(found.group(1)) if found else None,
    }


def versus_open(results: list[tuple[str, ScenarioResult]]) -> list[dict[str, Any]]:
    """Each configuration against `open` at the same mode and concurrency."""
    baseline = {(r.mode, r.concurrency): r for name, r in results if name == "open"}
    rows = []
    for name, r in results:
        open_ = baseline.get((r.mode, r.concurrency))
        if name == "open" or open_ is None:
            continue
        rows.append(
            {
                "access": name,
                "mode": r.mode,
                "concurrency": r.concurrency,
                "added_gateway_cpu_ms_per_request": difference(
                    r.gateway_cpu_ms_per_request, open_.gateway_cpu_ms_per_request
                ),
                "added_p50_ms": difference(r.p50_ms, open_.p50_ms),
                "throughput_ratio": r.requests_per_s / open_.requests_per_s if open_.requests_per_s else None,
            }
        )
    return rows


def targets(results: list[tuple[str, ScenarioResult]]) -> list[dict[str, Any]]:
    rows = []
    for name, r in results:
        if name == "open" or r.mode != "non-stream" or r.gateway_cpu_ms_per_request is None:
            continue
        rows.append(
            {
                "target": f"gateway CPU per non-streaming request with limits ({name}), c={r.concurrency}",
                "limit_ms": TARGET_CPU_MS_NON_STREAM_WITH_LIMITS,
                "value_ms": r.gateway_cpu_ms_per_request,
                "met": r.gateway_cpu_ms_per_request <= TARGET_CPU_MS_NON_STREAM_WITH_LIMITS,
            }
        )
    return rows


def report(results: list[tuple[str, ScenarioResult]], store: dict[str, Any] | None, max_tokens: int) -> dict[str, Any]:
    """The `access` section of the JSON output."""
    return {
        "configurations": {name: DESCRIPTIONS[name] for name in dict.fromkeys(name for name, _ in results)},
        "streams": f"{max_tokens} tokens, without stream_options: with a token limit the gateway asks the engine "
        "for the usage chunk and strips it from the client's stream",
        "scenarios": [{"access": name, **asdict(r)} for name, r in results],
        "vs_open": versus_open(results),
        "redis": store,
    }


def print_report(section: dict[str, Any]) -> None:
    print("\naccess control: the gateway's cost per request by configuration")
    added = {(row["access"], row["mode"], row["concurrency"]): row for row in section["vs_open"]}
    header = (
        f"{'access':<12} {'mode':<10} {'conc':>4} {'req/s':>8} {'p50 ms':>7} {'errors':>6} {'gw cpu/req':>10} "
        f"{'+cpu/req':>8} {'+p50 ms':>7} {'redis cpu/req':>13} {'gw busy':>7} {'cpu0 busy':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in section["scenarios"]:
        row = added.get((r["access"], r["mode"], r["concurrency"]), {})
        print(
            f"{r['access']:<12} {r['mode']:<10} {r['concurrency']:>4} {r['requests_per_s']:>8.0f} "
            f"{fmt(r['p50_ms']):>7} {r['errors']:>6} {fmt(r['gateway_cpu_ms_per_request'], 3):>10} "
            f"{fmt(row.get('added_gateway_cpu_ms_per_request'), 3, sign=True):>8} "
            f"{fmt(row.get('added_p50_ms'), 3, sign=True):>7} {fmt(r['redis_cpu_ms_per_request'], 3):>13} "
            f"{r['gateway_busy_percent']:>6.0f}% {r['cpu0_busy_percent']:>8.0f}%"
        )
    print(f"  +cpu/req, +p50 ms: against open at the same mode and concurrency; streams: {section['streams']}")
    if section["redis"] is not None:
        store = section["redis"]
        print(
            f"  redis after the run: {store['redis_keys']} keys; gateway store errors: {fmt(store['gateway_store_errors'], 0)}"
        )
        if store["gateway_store_errors"]:
            print("  WARNING: the keys+redis gateway could not always reach Redis; some requests went uncounted")
    for r in section["scenarios"]:
        if r["error_examples"]:
            print(f"  errors in {r['access']}/{r['mode']}/c={r['concurrency']}: {'; '.join(r['error_examples'])}")


def difference(value: float | None, baseline: float | None) -> float | None:
    return None if value is None or baseline is None else value - baseline


def configuration_list(text: str) -> list[str]:
    """`--access`: comma-separated configurations, or `none`."""
    if text.strip() == "none":
        return []
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in CONFIGURATIONS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown {', '.join(unknown)}; choose from {', '.join(CONFIGURATIONS)} or none"
        )
    return [name for name in CONFIGURATIONS if name in names]  # always in this order: open first
