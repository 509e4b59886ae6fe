"""Gateway overhead benchmark: the same load sent to an engine simulator directly and through the gateway.

The gateway's cost is the difference between the two, so both run as real processes on loopback,
pinned apart (gateway on CPU 1; simulator and this load generator on CPU 0) so that the gateway's CPU
time per request can be read from /proc without the load generator's work mixed in.

    .venv/bin/python bench/bench.py [--duration S] [--concurrency 1,16] [--max-tokens 16] [--output PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL = "bench-model"
READY_TIMEOUT_S = 30.0
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=60, connect=5)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Reported next to the results, never asserted: the machine may be shared and the figures noisy.
TARGET_CPU_MS_NON_STREAM = 0.5
TARGET_CPU_MS_STREAM_16 = 1.0
TARGET_ADDED_P50_MS_C1 = 1.0


@dataclass(frozen=True)
class Pinning:
    """Which CPUs each party runs on; empty means unpinned (fewer than 2 CPUs)."""

    gateway: tuple[int, ...]
    simulator: tuple[int, ...]
    load_generator: tuple[int, ...]


@dataclass(frozen=True)
class Sample:
    ok: bool
    latency_s: float
    first_chunk_s: float | None = None
    error: str | None = None


@dataclass
class ScenarioResult:
    target: str  # "direct" or "gateway"
    mode: str  # "non-stream" or "stream"
    concurrency: int
    requests: int  # successful requests in the measured window
    errors: int
    seconds: float
    requests_per_s: float
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    first_chunk_p50_ms: float | None
    gateway_cpu_ms_per_request: float | None
    gateway_busy_percent: float  # of its one CPU; near 100 means the gateway, not the engine, is the limit
    simulator_cpu_ms_per_request: float
    load_generator_cpu_ms_per_request: float
    cpu0_busy_percent: float  # simulator + load generator; near 100 means CPU 0 caps the throughput
    error_examples: list[str]


# --- processes -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads) from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15 of proc(5)


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def pin_to(cpus: tuple[int, ...]) -> Callable[[], None] | None:
    # Runs in the child between fork and exec, so the pinning holds from the first instruction.
    return (lambda: os.sched_setaffinity(0, cpus)) if cpus else None


def start(name: str, args: list[str], cpus: tuple[int, ...], log_dir: Path) -> subprocess.Popen[bytes]:
    with (log_dir / f"{name}.log").open("wb") as log:
        # A new session keeps Ctrl-C away from the children: the bench stops them itself, in order.
        return subprocess.Popen(
            [sys.executable, "-m", "gateway_app", *args],
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=pin_to(cpus),
            start_new_session=True,
        )


def wait_ready(name: str, proc: subprocess.Popen[bytes], url: str, log_dir: Path) -> None:
    """Poll `url` until it answers 200; fail early, with the process's log, if the process dies."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.05)
    log = (log_dir / f"{name}.log").read_text(errors="replace")[-3000:]
    state = f"exited with {proc.returncode}" if proc.poll() is not None else "not ready in time"
    raise RuntimeError(f"{name} {state} ({url}); its log:\n{log}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass(frozen=True)
class Servers:
    simulator: subprocess.Popen[bytes]
    simulator_url: str
    gateway: subprocess.Popen[bytes]
    gateway_url: str


@contextmanager
def running_servers(pinning: Pinning) -> Iterator[Servers]:
    """Start the simulator, then the gateway in front of it; always stop both."""
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="llm-gateway-bench-") as tmp:
        tmp_dir = Path(tmp)
        try:
            sim_port, gw_port = free_port(), free_port()
            sim_url, gw_url = f"http://127.0.0.1:{sim_port}", f"http://127.0.0.1:{gw_port}"
            simulator = start(
                "simulator",
                ["simulate", "--engine", "vllm", "--model", MODEL, "--host", "127.0.0.1", "--port", str(sim_port),
                 "--ttft-ms", "0", "--itl-ms", "0"],
                pinning.simulator,
                tmp_dir,
            )
            procs.append(simulator)
            wait_ready("simulator", simulator, f"{sim_url}/health", tmp_dir)
            config = tmp_dir / "routes.yaml"
            config.write_text(
                f'engines:\n  - {{name: bench-vllm, model: {MODEL}, owned_by: vllm, url: "{sim_url}"}}\n'
            )
            gateway = start(
                "gateway",
                ["serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(gw_port),
                 "--log-level", "warning"],
                pinning.gateway,
                tmp_dir,
            )
            procs.append(gateway)
            wait_ready("gateway", gateway, f"{gw_url}/readyz", tmp_dir)
            yield Servers(simulator, sim_url, gateway, gw_url)
        finally:
            for proc in reversed(procs):
                stop(proc)


# --- load ------------------------------------------------------------------------------------------


def request_body(stream: bool, max_tokens: int) -> bytes:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say something"}],
        "max_tokens": max_tokens,
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return json.dumps(body).encode()


async def one_request(session: aiohttp.ClientSession, url: str, body: bytes, stream: bool) -> Sample:
    started = time.perf_counter()
    first_chunk: float | None = None
    try:
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as response:
            if not stream:
                await response.read()
                ok = response.status == 200
                return Sample(ok, time.perf_counter() - started, error=None if ok else f"HTTP {response.status}")
            tail = b""  # enough of the end of the body to see the final event
            async for chunk in response.content.iter_any():
                if first_chunk is None:
                    first_chunk = time.perf_counter() - started
                tail = (tail + chunk)[-64:]
            latency = time.perf_counter() - started
            if response.status != 200:
                return Sample(False, latency, first_chunk, f"HTTP {response.status}")
            if not tail.rstrip().endswith(b"data: [DONE]"):
                return Sample(False, latency, first_chunk, "stream ended without data: [DONE]")
            return Sample(True, latency, first_chunk)
    except (aiohttp.ClientError, asyncio.TimeoutError) as error:
        return Sample(False, time.perf_counter() - started, first_chunk, type(error).__name__ + f": {error}")


async def run_phase(
    session: aiohttp.ClientSession, url: str, body: bytes, stream: bool, concurrency: int, seconds: float
) -> list[Sample]:
    """Keep `concurrency` requests in flight until `seconds` have passed; in-flight requests finish."""
    deadline = time.perf_counter() + seconds
    samples: list[Sample] = []

    async def worker() -> None:
        while time.perf_counter() < deadline:
            samples.append(await one_request(session, url, body, stream))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile, in ms."""
    if not sorted_values:
        return None
    rank = min(len(sorted_values), max(1, math.ceil(q / 100 * len(sorted_values))))
    return sorted_values[rank - 1] * 1000


async def run_scenario(
    target: str, base_url: str, stream: bool, concurrency: int, args: argparse.Namespace,
    gateway_pid: int, simulator_pid: int,
) -> ScenarioResult:
    url = f"{base_url}/v1/chat/completions"
    body = request_body(stream, args.max_tokens)
    # Keep-alive (the default) and one connection per worker, as a real client pool would have.
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=REQUEST_TIMEOUT) as session:
        await run_phase(session, url, body, stream, concurrency, args.warmup)
        gw_cpu, sim_cpu, client_cpu = cpu_seconds(gateway_pid), cpu_seconds(simulator_pid), own_cpu_seconds()
        started = time.perf_counter()
        samples = await run_phase(session, url, body, stream, concurrency, args.duration)
        seconds = time.perf_counter() - started
        gw_cpu = cpu_seconds(gateway_pid) - gw_cpu
        sim_cpu = cpu_seconds(simulator_pid) - sim_cpu
        client_cpu = own_cpu_seconds() - client_cpu

    good = [s for s in samples if s.ok]
    latencies = sorted(s.latency_s for s in good)
    first_chunks = sorted(s.first_chunk_s for s in good if s.first_chunk_s is not None)
    completed = len(samples) or 1  # CPU is spent on failed requests too
    return ScenarioResult(
        target=target,
        mode="stream" if stream else "non-stream",
        concurrency=concurrency,
        requests=len(good),
        errors=len(samples) - len(good),
        seconds=round(seconds, 3),
        requests_per_s=len(good) / seconds,
        p50_ms=percentile(latencies, 50),
        p90_ms=percentile(latencies, 90),
        p99_ms=percentile(latencies, 99),
        first_chunk_p50_ms=percentile(first_chunks, 50) if stream else None,
        gateway_cpu_ms_per_request=gw_cpu * 1000 / completed if target == "gateway" else None,
        gateway_busy_percent=gw_cpu * 100 / seconds,
        simulator_cpu_ms_per_request=sim_cpu * 1000 / completed,
        load_generator_cpu_ms_per_request=client_cpu * 1000 / completed,
        cpu0_busy_percent=(sim_cpu + client_cpu) * 100 / seconds,
        error_examples=sorted({s.error for s in samples if s.error})[:5],
    )


# --- report ----------------------------------------------------------------------------------------


def compare(results: list[ScenarioResult]) -> list[dict[str, Any]]:
    """Gateway against direct at the same mode and concurrency."""
    by_key = {(r.target, r.mode, r.concurrency): r for r in results}
    rows = []
    for r in results:
        direct = by_key.get(("direct", r.mode, r.concurrency))
        if r.target != "gateway" or direct is None or r.p50_ms is None or direct.p50_ms is None:
            continue
        rows.append({
            "mode": r.mode,
            "concurrency": r.concurrency,
            "added_p50_ms": r.p50_ms - direct.p50_ms,
            "throughput_ratio": r.requests_per_s / direct.requests_per_s if direct.requests_per_s else None,
            "p50_ratio": r.p50_ms / direct.p50_ms,
        })
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
        rows.append({"target": f"gateway CPU per {what}, c={r.concurrency}", "limit_ms": limit,
                     "value_ms": r.gateway_cpu_ms_per_request, "met": r.gateway_cpu_ms_per_request <= limit})
    for c in comparisons:
        if c["concurrency"] == 1:
            rows.append({"target": f"added p50 latency, {c['mode']}, c=1", "limit_ms": TARGET_ADDED_P50_MS_C1,
                         "value_ms": c["added_p50_ms"], "met": c["added_p50_ms"] < TARGET_ADDED_P50_MS_C1})
    return rows


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_report(results: list[ScenarioResult], comparisons: list[dict[str, Any]], goals: list[dict[str, Any]]) -> None:
    header = f"{'target':<8} {'mode':<10} {'conc':>4} {'req/s':>8} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} " \
             f"{'ttfc50':>7} {'errors':>6} {'gw cpu/req':>10} {'gw busy':>7} {'sim cpu/req':>11} {'cpu0 busy':>9}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r.target:<8} {r.mode:<10} {r.concurrency:>4} {r.requests_per_s:>8.0f} {fmt(r.p50_ms):>7} "
              f"{fmt(r.p90_ms):>7} {fmt(r.p99_ms):>7} {fmt(r.first_chunk_p50_ms):>7} {r.errors:>6} "
              f"{fmt(r.gateway_cpu_ms_per_request, 3):>10} {r.gateway_busy_percent:>6.0f}% "
              f"{fmt(r.simulator_cpu_ms_per_request, 3):>11} {r.cpu0_busy_percent:>8.0f}%")
    print("\ngateway vs direct")
    print(f"{'mode':<10} {'conc':>4} {'added p50 ms':>12} {'req/s ratio':>11} {'p50 ratio':>9}")
    for c in comparisons:
        print(f"{c['mode']:<10} {c['concurrency']:>4} {c['added_p50_ms']:>12.3f} "
              f"{fmt(c['throughput_ratio']):>11} {c['p50_ratio']:>9.2f}")
    print("\ntargets (reported, not asserted)")
    for g in goals:
        print(f"  {'met   ' if g['met'] else 'MISSED'} {g['target']}: {g['value_ms']:.3f} ms (limit {g['limit_ms']} ms)")
    for r in results:
        if r.error_examples:
            print(f"  errors in {r.target}/{r.mode}/c={r.concurrency}: {'; '.join(r.error_examples)}")


def git_commit() -> dict[str, Any] | None:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout

    try:
        return {"commit": git("rev-parse", "HEAD").strip(), "dirty": bool(git("status", "--porcelain").strip())}
    except (OSError, subprocess.CalledProcessError):
        return None


def choose_pinning() -> Pinning:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return Pinning((), (), ())
    return Pinning(gateway=(cpus[1],), simulator=(cpus[0],), load_generator=(cpus[0],))


# --- main ------------------------------------------------------------------------------------------


async def run_load(args: argparse.Namespace, servers: Servers) -> list[ScenarioResult]:
    results = []
    # Direct and gateway runs alternate so that drift on a shared machine hits both alike.
    for concurrency in args.concurrency:
        for stream in (False, True):
            for target, url in (("direct", servers.simulator_url), ("gateway", servers.gateway_url)):
                result = await run_scenario(
                    target, url, stream, concurrency, args, servers.gateway.pid, servers.simulator.pid
                )
                print(f"  {target:<8} {result.mode:<10} c={concurrency:<3} {result.requests_per_s:8.0f} req/s, "
                      f"p50 {fmt(result.p50_ms)} ms, {result.errors} errors", flush=True)
                results.append(result)
    return results


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    load_average = os.getloadavg()
    pinning = choose_pinning()
    if pinning.load_generator:
        os.sched_setaffinity(0, pinning.load_generator)
    try:
        import uvloop  # a cheaper client loop leaves more of CPU 0 to the simulator

        run: Callable[[Any], Any] = uvloop.run
    except ImportError:
        run = asyncio.run
    # Outside the event loop, so that Ctrl-C or SIGTERM anywhere unwinds through the cleanup.
    with running_servers(pinning) as servers:
        pinned = {"gateway": sorted(os.sched_getaffinity(servers.gateway.pid)),
                  "simulator": sorted(os.sched_getaffinity(servers.simulator.pid)),
                  "load_generator": sorted(os.sched_getaffinity(0))}
        print(f"simulator {servers.simulator_url} (pid {servers.simulator.pid}), "
              f"gateway {servers.gateway_url} (pid {servers.gateway.pid}); CPUs {pinned}", flush=True)
        results = run(run_load(args, servers))
    comparisons = compare(results)
    goals = targets(results, comparisons, args.max_tokens)
    print()
    print_report(results, comparisons, goals)
    return {
        "environment": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "aiohttp": aiohttp.__version__,
            "load_average_at_start": load_average,
            "pinning": pinned,
            "git": git_commit(),
        },
        "settings": {"duration_s": args.duration, "warmup_s": args.warmup, "concurrency": args.concurrency,
                     "max_tokens": args.max_tokens, "model": MODEL},
        "scenarios": [asdict(r) for r in results],
        "gateway_vs_direct": comparisons,
        "targets": goals,
    }


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
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "bench" / "results" / "latest.json")
    return parser.parse_args()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C, so the servers are stopped either way


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        report = run_benchmark(args)
    except KeyboardInterrupt:
        print("\nbench: interrupted; servers stopped", file=sys.stderr)
        return 130
    except RuntimeError as error:
        print(f"bench: {error}", file=sys.stderr)
        return 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
