"""Front-door attack benchmark: how normal requests fare while the gateway is under attack.

Every phase starts a fresh simulator and a fresh gateway (API keys on) and runs `--concurrency` victim
clients for `--duration` seconds: `GET /healthz` and non-streaming chat completions in turn, a new
connection per request (`--keep-alive` to reuse them). In every phase but `none`, one attack runs at
the same time. A `none` phase before the attacks and one after them, pooled, are the baseline of the
ratios. Per phase it reports:

  - the victims' p50/p99/max latency (successful requests) and their errors;
  - whether the gateway marked an engine endpoint unavailable (`llm_gateway_endpoint_available`,
    scraped every 0.5 s, from `--metrics-port` when `serve --help` lists it, else the API port);
  - the gateway's RSS (VmRSS sampled every 20 ms: before, peak, after), open file descriptors, CPU seconds;
  - whether a key added to the keys file 2 s into the phase is accepted, and how soon;
  - what the attackers got.

A phase whose gateway (or simulator) passes `--rss-cap` has its attack stopped there ("stopped at X GiB");
past the cap plus 1 GiB the process is killed, so that a bench run cannot take the machine's memory.

    .venv/bin/python bench/attacks.py [--duration 6] [--attacks huge-head,slow-heads] [--rss-cap 3] [--output PATH]

The attack clients are attackers.py (a child process), the hostile engine flood_engine.py; processes.py
starts, pins and stops every process; load.py's Sample and summarize() turn victim requests into figures.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from attackers import FLOOD_MODELS, Target, chat_body, exchange, request_head
from environment import describe, format_load
from load import Sample, request_body, run_client, summarize
from processes import (
    REPO_ROOT,
    Pinning,
    ProcessGroup,
    choose_pinning,
    cpu_seconds,
    fd_limit,
    free_port,
    http_ok,
    memory_kib,
    metric_samples,
    open_fds,
    process_group,
    raise_fd_limit,
    run_and_report,
    start_simulator,
    stop,
)

HERE = Path(__file__).resolve().parent
PHASE_ATTACKS = ("huge-head", "many-headers", "slow-heads", "slow-bodies", "big-bodies", "engine-flood")
PROBES = ("trailing-slash",)  # quick checks on the first gateway, not phases
MODEL = "m"
ENGINE = "bench-vllm"  # the victims' engine
KINDS = ("healthz", "chat")
MAX_TOKENS = 16
ATTACKER_NICENESS = 10
SLOW_HEADS_OPEN_FILES = 1024  # the limit under which the original failure was seen
SAMPLE_EVERY_S = 0.02
FDS_EVERY = 5  # RSS samples per count of open file descriptors (0.1 s)
HARD_MARGIN_KIB = 1 << 20  # 1 GiB past the cap: the process is killed
SCRAPE_EVERY_S = 0.5
KEY_CHANGE_AT_S = 2.0  # into the phase, or a third of it when shorter
KEY_PROBE_EVERY_S = 0.2
RAMP_S = 0.5  # between the attack's start and the victims' (1,100 connections take a moment to open)
AFTER_S = 1.0  # after the attack stopped, the gateway's "after" figures
BIG_BODIES_SETTLE_S = 10.0
FLOOD_GRACE_S = 1.0  # between stopping the flood engine and its clients: what does the gateway answer them?


@dataclass(frozen=True)
class Servers:
    simulator: subprocess.Popen[bytes]
    gateway: subprocess.Popen[bytes]
    port: int
    metrics_url: str
    flood: subprocess.Popen[bytes] | None


class KeysFile:
    """The gateway's keys file, alone in its folder (the gateway watches the folder): the victims' key,
    and a second key added during the phase."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir()
        self.path = folder / "keys.yaml"
        self.victim_key, self.added_key = (f"sk-bench-{secrets.token_urlsafe(16)}" for _ in range(2))
        self._write({"victim": self.victim_key})

    def add_key(self) -> None:
        self._write({"victim": self.victim_key, "added": self.added_key})

    def _write(self, keys: dict[str, str]) -> None:
        lines = [
            f"  - {{name: {name}, sha256: {hashlib.sha256(key.encode()).hexdigest()}}}" for name, key in keys.items()
        ]
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text("keys:\n" + "\n".join(lines) + "\n")
        os.replace(temporary, self.path)  # whole, as a Secret volume update is


class ResourceWatch(threading.Thread):
    """Samples the RSS of the gateway and the simulator every 20 ms and the gateway's open file
    descriptors every 0.1 s. When either RSS passes the cap, stops the attack (once); past the cap plus
    1 GiB, kills that process. A thread, so that a busy event loop cannot delay it."""

    def __init__(
        self, pids: dict[str, int], cap_kib: int, stop_attack: Callable[[], None], kill: Callable[[str], None]
    ) -> None:
        super().__init__(name="resource-watch", daemon=True)
        self.pids = pids
        self.cap_kib = cap_kib
        self.stop_attack = stop_attack
        self.kill = kill
        self.started = time.perf_counter()
        self.peak_kib = dict.fromkeys(pids, 0)
        self.peak_fds = 0
        self.capped: dict[str, Any] | None = None
        self.killed: list[str] = []
        self._done = threading.Event()

    def run(self) -> None:
        for tick in itertools.count():
            for who, pid in self.pids.items():
                rss = current_rss_kib(pid)
                if rss is None:
                    continue
                self.peak_kib[who] = max(self.peak_kib[who], rss)
                if rss > self.cap_kib and self.capped is None:
                    self.capped = {
                        "process": who,
                        "rss_gib": round(rss / 2**20, 2),
                        "at_s": round(time.perf_counter() - self.started, 2),
                    }
                    self.stop_attack()
                if rss > self.cap_kib + HARD_MARGIN_KIB and who not in self.killed:
                    self.killed.append(who)
                    self.kill(who)
            if tick % FDS_EVERY == 0:
                self.peak_fds = max(self.peak_fds, count_fds(self.pids["gateway"]) or 0)
            if self._done.wait(SAMPLE_EVERY_S):
                return

    def finish(self) -> None:
        self._done.set()
        self.join()


def current_rss_kib(pid: int) -> int | None:
    try:
        return memory_kib(pid)[0]
    except (OSError, KeyError):  # gone, or a zombie (no VmRSS line)
        return None


def count_fds(pid: int) -> int | None:
    try:
        return open_fds(pid)
    except OSError:
        return None


def gateway_resources(pid: int) -> dict[str, Any]:
    rss = current_rss_kib(pid)
    return {"rss_mib": round(rss / 1024, 1) if rss is not None else None, "fds": count_fds(pid)}


def signal_all(processes: list[subprocess.Popen[bytes]]) -> None:
    """Ask each process still running to stop (SIGTERM): they close their sockets and report."""
    for proc in processes:
        if proc.poll() is None:
            proc.terminate()


def stop_in_order(processes: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM the first process now and the others FLOOD_GRACE_S later, without waiting here."""
    signal_all(processes[:1])
    if processes[1:]:
        threading.Timer(FLOOD_GRACE_S, signal_all, (processes[1:],)).start()


def serve_flags() -> str:
    return subprocess.run(
        [sys.executable, "-m", "gateway_app", "serve", "--help"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout


def routes(simulator_url: str, flood_urls: dict[str, str]) -> str:
    engines = [f'  - {{name: {ENGINE}, model: {MODEL}, owned_by: vllm, url: "{simulator_url}"}}']
    engines += [
        f'  - {{name: {model}, model: {model}, owned_by: vllm, url: "{url}"}}' for model, url in flood_urls.items()
    ]
    return "engines:\n" + "\n".join(engines) + "\n"


def start_servers(
    group: ProcessGroup,
    attack: str,
    pinning: Pinning,
    keys: KeysFile,
    metrics_port_flag: bool,
) -> Servers:
    """The simulator, the flood engine when the attack needs it, then the gateway in front of them."""
    simulator, simulator_url = start_simulator(group, "simulator", pinning.simulator, MODEL)
    flood, flood_urls = None, {}
    if attack == "engine-flood":
        ports = free_port(), free_port()
        flood = group.start(
            "flood-engine",
            [
                sys.executable,
                str(HERE / "flood_engine.py"),
                "--length-port",
                str(ports[0]),
                "--unavailable-port",
                str(ports[1]),
                "--stats",
                str(group.log_dir / "flood.json"),
            ],
            pinning.simulator,
            niceness=ATTACKER_NICENESS,
        )
        flood_urls = {model: f"http://127.0.0.1:{port}" for model, port in zip(FLOOD_MODELS, ports, strict=False)}
        for url in flood_urls.values():
            group.wait_ready("flood-engine", flood, http_ok(f"{url}/health"))
    config = group.log_dir / "config"  # a folder of its own: the gateway watches it, the logs go elsewhere
    config.mkdir()
    (config / "routes.yaml").write_text(routes(simulator_url, flood_urls))
    port = free_port()
    args = [
        "serve",
        "--config",
        str(config / "routes.yaml"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--keys-file",
        str(keys.path),
        "--shutdown-grace-seconds",
        "1",
    ]
    metrics_url = f"http://127.0.0.1:{port}/metrics"
    if metrics_port_flag:
        metrics_port = free_port()
        args += ["--metrics-port", str(metrics_port)]
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    open_files = SLOW_HEADS_OPEN_FILES if attack == "slow-heads" else None
    gateway = group.start_gateway_app("gateway", args, pinning.gateway, open_files=open_files)
    group.wait_ready("gateway", gateway, http_ok(f"http://127.0.0.1:{port}/readyz"))
    group.wait_ready("gateway", gateway, http_ok(metrics_url))
    return Servers(simulator, gateway, port, metrics_url, flood)


def start_attacker(group: ProcessGroup, attack: str, pinning: Pinning, port: int, key: str) -> subprocess.Popen[bytes]:
    """attackers.py in a child process on the load generator's CPU at a lower priority; returns once
    its attack has started."""
    ready = group.log_dir / "attacker.ready"
    proc = group.start(
        "attacker",
        [
            sys.executable,
            str(HERE / "attackers.py"),
            attack,
            "--port",
            str(port),
            "--key",
            key,
            "--model",
            MODEL,
            "--result",
            str(group.log_dir / "attacker.json"),
            "--ready",
            str(ready),
        ],
        pinning.load_generator,
        niceness=ATTACKER_NICENESS,
    )
    group.wait_ready("attacker", proc, ready.exists)
    return proc


def read_json(path: Path, log: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
        return {"failure": f"no report; its log ends with: {tail}"}


# --- the victims, the endpoint scrapes and the key check: one event loop in this process ---


async def victim(
    session: aiohttp.ClientSession,
    base_url: str,
    key: str,
    first: int,
    pause_s: float,
    deadline: float,
    samples: dict[str, list[Sample]],
) -> None:
    chat = request_body(False, MAX_TOKENS, MODEL)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    for kind in itertools.islice(itertools.cycle(KINDS), first, None):
        if time.perf_counter() >= deadline:
            return
        started = time.perf_counter()
        try:
            if kind == "healthz":
                request = session.get(f"{base_url}/healthz")
            else:
                request = session.post(f"{base_url}/v1/chat/completions", data=chat, headers=headers)
            async with request as response:
                await response.read()
            ok = response.status == 200
            error = None if ok else f"HTTP {response.status}"
        except (TimeoutError, aiohttp.ClientError) as exc:
            ok, error = False, describe_error(exc)
        samples[kind].append(Sample(ok, time.perf_counter() - started, error=error))
        await asyncio.sleep(pause_s)


def key_change_at(seconds: float) -> float:
    return min(KEY_CHANGE_AT_S, seconds / 3)


def describe_error(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    if isinstance(exc, aiohttp.ClientOSError) and exc.errno:
        return f"{type(exc).__name__} ({os.strerror(exc.errno)})"
    if isinstance(exc, aiohttp.ClientConnectorError) and isinstance(cause, OSError) and cause.errno:
        return f"{type(exc).__name__} ({os.strerror(cause.errno)})"
    return type(exc).__name__


async def check_new_key(
    session: aiohttp.ClientSession, base_url: str, keys: KeysFile, change_at_s: float, deadline: float
) -> dict[str, Any]:
    """Add a key to the keys file, then try it every 0.2 s until it is accepted or the phase ends."""
    await asyncio.sleep(change_at_s)
    keys.add_key()
    changed = time.perf_counter()
    headers = {"Authorization": f"Bearer {keys.added_key}", "Content-Type": "application/json"}
    body = request_body(False, 1, MODEL)
    attempts, outcomes = 0, Counter()
    while time.perf_counter() < deadline:
        attempts += 1
        try:
            async with session.post(f"{base_url}/v1/chat/completions", data=body, headers=headers) as response:
                await response.read()
            if response.status == 200:
                return {
                    "accepted": True,
                    "after_s": round(time.perf_counter() - changed, 2),
                    "attempts": attempts,
                    "answers_before": dict(outcomes),
                }
            outcomes[f"HTTP {response.status}"] += 1
        except (TimeoutError, aiohttp.ClientError) as exc:
            outcomes[describe_error(exc)] += 1
        await asyncio.sleep(KEY_PROBE_EVERY_S)
    return {
        "accepted": False,
        "waited_s": round(time.perf_counter() - changed, 2),
        "attempts": attempts,
        "answers_before": dict(outcomes),
    }


async def watch_endpoints(metrics_url: str, deadline: float) -> dict[str, Any]:
    """Scrape the gateway's metrics every 0.5 s: how many scrapes saw each engine with an endpoint down."""
    scrapes, failures = 0, Counter()
    unavailable: Counter[str] = Counter()
    first_seen: dict[str, float] = {}
    started = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=2)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True), timeout=timeout) as session:
        while time.perf_counter() < deadline:
            try:
                async with session.get(metrics_url) as response:
                    text = await response.text()
                if response.status != 200:
                    raise aiohttp.ClientResponseError(response.request_info, (), status=response.status)
                scrapes += 1
                for labels, value in metric_samples(text, "llm_gateway_endpoint_available"):
                    engine = labels.get("engine", "?")
                    if value < 1:
                        unavailable[engine] += 1
                        first_seen.setdefault(engine, round(time.perf_counter() - started, 2))
            except (TimeoutError, aiohttp.ClientError) as exc:
                failures[describe_error(exc)] += 1
            await asyncio.sleep(SCRAPE_EVERY_S)
    return {
        "scrapes": scrapes,
        "failed_scrapes": dict(failures),
        "scrapes_with_engine_unavailable": dict(unavailable),
        "first_unavailable_at_s": first_seen,
    }


async def run_victims(
    args: argparse.Namespace, port: int, keys: KeysFile, seconds: float, metrics_url: str | None = None
) -> tuple[dict[str, list[Sample]], dict[str, Any]]:
    """The victims for `seconds`; with `metrics_url`, the endpoint scrapes and the key check too."""
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.perf_counter() + seconds
    samples: dict[str, list[Sample]] = {kind: [] for kind in KINDS}
    connector = aiohttp.TCPConnector(limit=0, force_close=not args.keep_alive)
    timeout = aiohttp.ClientTimeout(total=args.victim_timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        clients = asyncio.gather(
            *(
                victim(session, base_url, keys.victim_key, number % 2, args.pause_ms / 1000, deadline, samples)
                for number in range(args.concurrency)
            )
        )
        if metrics_url is None:
            await clients
            return samples, {}
        _, key_check, endpoints = await asyncio.gather(
            clients,
            check_new_key(session, base_url, keys, key_change_at(seconds), deadline),
            watch_endpoints(metrics_url, deadline),
        )
    return samples, {"key_reload": key_check, "endpoints": endpoints}


async def probe_trailing_slash(port: int, key: str) -> dict[str, Any]:
    """`POST /v1/chat/completions/` with `Host: evil.example`: does the gateway redirect, and where to?"""
    body = chat_body(MODEL)
    head = request_head(Target(port, key, MODEL), len(body), path="/v1/chat/completions/", host="evil.example")
    reply = await exchange(port, [head + body])
    return {
        "status": reply.status,
        "status_line": reply.status_line,
        "location": reply.headers.get("location"),
        "body_start": reply.body_start,
        "ended": reply.ended,
    }


# --- one phase ---


def victim_figures(samples: list[Sample], seconds: float) -> dict[str, Any]:
    figures = summarize(samples, seconds)
    latencies = [s.latency_s for s in samples if s.ok]
    figures["max_ms"] = max(latencies) * 1000 if latencies else None
    figures["error_kinds"] = dict(Counter(s.error for s in samples if not s.ok).most_common(5))
    return figures


def log_highlights(path: Path, top: int = 4) -> list[dict[str, Any]]:
    """The gateway's most frequent log messages of the phase (digits folded, so alike lines count together)."""
    counts: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        try:
            entry = json.loads(line)
        except ValueError:
            entry = {"message": line}
        if not isinstance(entry, dict) or "message" not in entry:
            continue  # an access-log line: one per request, not news
        message = str(entry["message"])
        if entry.get("exception"):  # its last line names the error
            message += " — " + str(entry["exception"]).strip().splitlines()[-1]
        counts[re.sub(r"\d+", "N", message)[:200]] += 1
    return [{"message": message, "count": count} for message, count in counts.most_common(top)]


def run_phase(
    attack: str, args: argparse.Namespace, pinning: Pinning, metrics_port_flag: bool, probes: tuple[str, ...]
) -> tuple[dict[str, Any], dict[str, list[Sample]]]:
    """One phase on its own simulator and gateway, all stopped when it ends; its report and victim samples."""
    print(f"\n== {attack}", flush=True)
    with process_group() as group:
        keys = KeysFile(group.log_dir / "keys")
        servers = start_servers(group, attack, pinning, keys, metrics_port_flag)
        gateway = servers.gateway
        run_client(run_victims(args, servers.port, keys, args.warmup))
        before = gateway_resources(gateway.pid)
        # The source of the load first: the flood engine when there is one (its clients are harmless
        # without it, and then report what the gateway answered them), else the attacker.
        attack_processes = [p for p in (servers.flood,) if p is not None]

        def kill(who: str) -> None:
            for proc in attack_processes:
                proc.kill()
            (gateway if who == "gateway" else servers.simulator).kill()

        watch = ResourceWatch(
            {"gateway": gateway.pid, "simulator": servers.simulator.pid},
            int(args.rss_cap * 2**20),
            lambda: stop_in_order(attack_processes),
            kill,
        )
        cpu_before = cpu_seconds(gateway.pid)
        watch.start()
        try:
            attacker = None
            if attack != "none":
                attacker = start_attacker(group, attack, pinning, servers.port, keys.victim_key)
                attack_processes.append(attacker)
                time.sleep(RAMP_S)
            samples, checks = run_client(run_victims(args, servers.port, keys, args.duration, servers.metrics_url))
            probe_results = {name: run_client(probe_trailing_slash(servers.port, keys.victim_key)) for name in probes}
            for proc in attack_processes:  # each writes its report on SIGTERM, then exits
                stop(proc)
                if proc is servers.flood:
                    time.sleep(FLOOD_GRACE_S)
            attacker_report = flood_report = None
            if attacker is not None:
                attacker_report = read_json(group.log_dir / "attacker.json", group.log_dir / "attacker.log")
            if servers.flood is not None:
                flood_report = read_json(group.log_dir / "flood.json", group.log_dir / "flood-engine.log")
            stopped_at = time.perf_counter()
            time.sleep(AFTER_S)
            after = gateway_resources(gateway.pid)
            cpu = cpu_seconds(gateway.pid) - cpu_before if gateway.poll() is None else None
            settled = None
            if attack == "big-bodies":
                time.sleep(max(0.0, BIG_BODIES_SETTLE_S - (time.perf_counter() - stopped_at)))
                settled = gateway_resources(gateway.pid)
        finally:
            watch.finish()
        report = {
            "attack": attack,
            "gateway": {
                "pid": gateway.pid,
                "open_file_limit": fd_limit(gateway.pid) if gateway.poll() is None else None,
                "exit_code": gateway.poll(),
                "rss_before_mib": before["rss_mib"],
                "rss_peak_mib": round(watch.peak_kib["gateway"] / 1024, 1),
                "rss_after_mib": after["rss_mib"],
                "rss_10s_after_mib": settled["rss_mib"] if settled else None,
                "fds_before": before["fds"],
                "fds_peak": watch.peak_fds,
                "fds_after": after["fds"],
                "cpu_seconds": round(cpu, 2) if cpu is not None else None,
                "log_highlights": log_highlights(group.log_dir / "gateway.log"),
            },
            "simulator_rss_peak_mib": round(watch.peak_kib["simulator"] / 1024, 1),
            "stopped_at_rss_cap": watch.capped,
            "killed": watch.killed,
            "victims": {kind: victim_figures(samples[kind], args.duration) for kind in KINDS},
            **checks,
            "attacker": attacker_report,
            "flood_engine": flood_report,
            "probes": probe_results,
        }
    print_phase(report)
    return report, samples


# --- the report ---


def short(value: float | None, digits: int | None = None) -> str:
    """A number in a table cell: fewer decimals as it grows, so that a stall does not break the columns."""
    if value is None:
        return "-"
    if digits is None:
        digits = 2 if abs(value) < 10 else 1 if abs(value) < 100 else 0
    return f"{value:.{digits}f}"


def ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def endpoint_verdict(phase: dict[str, Any]) -> str:
    """yes/no for the victims' engine; `?` when no scrape succeeded."""
    endpoints = phase.get("endpoints") or {}
    if not endpoints.get("scrapes"):
        return "?"
    return "yes" if endpoints["scrapes_with_engine_unavailable"].get(ENGINE) else "no"


def key_verdict(phase: dict[str, Any]) -> str:
    check = phase.get("key_reload")
    if not check:
        return "-"
    return f"{check['after_s']:.1f} s" if check["accepted"] else f"no ({check['waited_s']:.0f} s)"


def print_phase(phase: dict[str, Any]) -> None:
    gateway, victims = phase["gateway"], phase["victims"]
    print(
        f"  victims: healthz p50 {short(victims['healthz']['p50_ms'])} ms, chat p50 {short(victims['chat']['p50_ms'])} ms, "
        f"errors {victims['healthz']['errors'] + victims['chat']['errors']}; gateway RSS peak "
        f"{gateway['rss_peak_mib']} MiB, fds peak {gateway['fds_peak']}",
        flush=True,
    )
    if phase["stopped_at_rss_cap"]:
        cap = phase["stopped_at_rss_cap"]
        print(f"  attack stopped at {cap['rss_gib']} GiB ({cap['process']} RSS, {cap['at_s']} s in)", flush=True)


def attacker_lines(phase: dict[str, Any]) -> list[str]:
    """What the attackers got, in a line or three."""
    report, attack = phase["attacker"], phase["attack"]
    if report is None:
        return []
    if report.get("failure") and "seconds" not in report:
        return [f"attacker failed: {report['failure'][:300]}"]

    def outcomes(tally: dict[str, Any]) -> str:
        """Counts by status, how soon answers came, and the oldest exchange still waiting."""
        text = ", ".join(f"{name} ×{count}" for name, count in tally["outcomes"].items()) or "nothing"
        if tally["seconds_to_answer_max"] is not None:
            text += (
                f" (answered after p50 {short(tally['seconds_to_answer_p50'])} s, "
                f"max {short(tally['seconds_to_answer_max'])} s)"
            )
        if tally["pending"]:
            oldest = tally["pending"][0]
            text += f"; still waiting when stopped: {oldest['seconds']} s, {oldest['sent']:,} bytes sent"
        return text

    def first_answer(tally: dict[str, Any]) -> str:
        example = next((e for e in tally["examples"] if e["status"] is not None), None)
        return f"; first answer: {example['status_line']!r} {example['body_start'][:90]!r}" if example else ""

    lines = [
        f"attacker: pid {report['pid']}, CPU {report['cpus']}, nice {report['niceness']}, "
        f"{report['cpu_seconds']} s CPU in {report['seconds']} s"
    ]
    if attack == "huge-head":
        lines.append(f"{report['exchanges']} connection(s) ended: {outcomes(report)}")
        for example in report["examples"]:
            sent = example["sent_at_reply"] if example["sent_at_reply"] is not None else example["sent"]
            seconds = example["seconds_to_reply"] if example["seconds_to_reply"] is not None else example["seconds"]
            lines.append(
                f"  got {example['status_line'] or example['ended']!r} after {sent:,} bytes sent, {short(seconds)} s"
            )
    elif attack in ("many-headers", "engine-flood"):
        for kind in ("10,000 headers", "1 MiB header value", *FLOOD_MODELS):
            if kind in report:
                lines.append(f"{kind}: {outcomes(report[kind])}{first_answer(report[kind])}")
    elif attack in ("slow-heads", "slow-bodies"):
        lines.append(
            f"{report['connections']:,} connections of {report['payload_bytes']:,} bytes: at most "
            f"{report['max_open']:,} open at once ({report['open_at_stop']:,} when stopped), "
            f"{report['opened']:,} opened; closed by the gateway: {report['closed_by_gateway'] or 'none'}; "
            f"connect errors: {report['connect_errors'] or 'none'}"
        )
    elif attack == "big-bodies":
        lines.append(
            f"{report['clients']} clients, {report['body_bytes']:,}-byte bodies: "
            f"{outcomes(report)}{first_answer(report)}"
        )
    if report.get("failure"):
        lines.append(f"attacker failure: {report['failure'][:300]}")
    return lines


def phase_details(phase: dict[str, Any]) -> list[str]:
    """The lines under the table for one phase: the attackers, then whatever went wrong for the gateway."""
    details = attacker_lines(phase)
    victims, gateway = phase["victims"], phase["gateway"]
    if victims["healthz"]["errors"] or victims["chat"]["errors"]:
        details.append(
            f"victim errors: healthz {victims['healthz']['error_kinds']}, chat {victims['chat']['error_kinds']}"
        )
    if phase["stopped_at_rss_cap"]:
        cap = phase["stopped_at_rss_cap"]
        details.append(f"stopped at {cap['rss_gib']} GiB ({cap['process']}, {cap['at_s']} s in)")
    if phase["killed"]:
        details.append(f"killed past the cap + 1 GiB: {', '.join(phase['killed'])}")
    if gateway["exit_code"] is not None:
        details.append(f"the gateway exited during the phase with code {gateway['exit_code']}")
    if gateway["rss_10s_after_mib"] is not None:
        details.append(
            f"gateway RSS: {gateway['rss_before_mib']} MiB before, {gateway['rss_peak_mib']} peak, "
            f"{gateway['rss_10s_after_mib']} 10 s after; simulator peak {phase['simulator_rss_peak_mib']} MiB"
        )
    endpoints = phase.get("endpoints") or {}
    if endpoints.get("failed_scrapes"):
        details.append(f"metrics scrapes: {endpoints['scrapes']} ok, failed {endpoints['failed_scrapes']}")
    others = {e: n for e, n in endpoints.get("scrapes_with_engine_unavailable", {}).items() if e != ENGINE}
    if others:
        details.append(f"other engines unavailable in scrapes: {others}")
    check = phase.get("key_reload") or {}
    if check and not check["accepted"]:
        details.append(
            f"new key not accepted in {check['waited_s']} s ({check['attempts']} tries: {check['answers_before']})"
        )
    if phase["flood_engine"]:
        sent = [
            f"{mode} {figures['requests']} requests, {figures['bytes'] / 2**30:.2f} GiB"
            for mode, figures in phase["flood_engine"].items()
            if mode in ("length", "503")
        ]
        details.append("flood engine sent: " + ", ".join(sent))
    if phase["attack"] == "slow-heads":
        details.append(f"gateway open-file limit {gateway['open_file_limit']}")
    if gateway["log_highlights"] and phase["attack"] != "none":
        details.append(
            "gateway log: " + "; ".join(f"{h['message'][:160]!r} ×{h['count']}" for h in gateway["log_highlights"][:3])
        )
    if "trailing-slash" in phase["probes"]:
        probe = phase["probes"]["trailing-slash"]
        details.append(
            f"trailing-slash probe (POST /v1/chat/completions/, Host: evil.example): "
            f"{probe['status_line'] or probe['ended']}, Location: {probe['location']}"
        )
    return details


def print_report(phases: list[dict[str, Any]], baseline: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    connection = "keep-alive connections" if args.keep_alive else "a new connection per request"
    print(
        f"\nvictims: {args.concurrency} clients, healthz and non-streaming chat in turn, {args.pause_ms:g} ms apart, "
        f"{connection}; latency in ms of successful requests; × = ratio to none (pooled)"
    )
    header = (
        f"{'attack':<14}{'hz p50':>8}{'p99':>7}{'max':>7}{'×p50':>6}{'×p99':>6}"
        f"{'chat p50':>10}{'p99':>7}{'max':>7}{'×p50':>6}{'×p99':>6}{'ok':>6}{'errors':>7}{'unavail':>8}"
        f"{'RSS peak':>10}{'after':>7}{'fds':>6}{'CPU s':>7}{'new key':>10}"
    )
    print(header)
    print("-" * len(header))
    rows: list[tuple[str, dict[str, Any], dict[str, Any] | None]] = [("none (pooled)", baseline, None)]
    rows += [(p["attack"], p["victims"], p) for p in phases]
    for name, victims, phase in rows:
        cells = f"{name:<14}"
        for kind, width in (("healthz", 8), ("chat", 10)):
            figures, base = victims[kind], baseline[kind]
            cells += (
                f"{short(figures['p50_ms']):>{width}}{short(figures['p99_ms']):>7}{short(figures['max_ms']):>7}"
                f"{short(ratio(figures['p50_ms'], base['p50_ms'])):>6}"
                f"{short(ratio(figures['p99_ms'], base['p99_ms'])):>6}"
            )
        cells += f"{victims['healthz']['requests'] + victims['chat']['requests']:>6}"
        cells += f"{victims['healthz']['errors'] + victims['chat']['errors']:>7}"
        if phase is not None:
            gateway = phase["gateway"]
            peak = f"{gateway['rss_peak_mib']:.0f}{'*' if phase['stopped_at_rss_cap'] else ''}"
            cells += (
                f"{endpoint_verdict(phase):>8}{peak:>10}{short(gateway['rss_after_mib'], 0):>7}"
                f"{gateway['fds_peak']:>6}{short(gateway['cpu_seconds']):>7}{key_verdict(phase):>10}"
            )
        print(cells)
    print(
        "RSS in MiB (peak sampled every 20 ms, after: 1 s after the attack stopped); * the attack was stopped at the "
        f"RSS cap ({args.rss_cap:g} GiB); unavail: the victims' engine marked unavailable in a scrape; "
        f"new key: a key added to the keys file {key_change_at(args.duration):.1f} s in, accepted after"
    )
    for phase in phases:
        details = phase_details(phase)
        if details:
            print(f"\n{phase['attack']}:")
            for line in details:
                print(f"  {line}")


def cpus(pinned: tuple[int, ...]) -> str:
    return ",".join(map(str, pinned)) if pinned else "any (unpinned)"


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    load_average = os.getloadavg()
    raise_fd_limit(4096)  # the attacker holds 1,100 connections; children inherit this
    pinning = choose_pinning()
    if pinning.load_generator:
        os.sched_setaffinity(0, pinning.load_generator)
    metrics_port_flag = "--metrics-port" in serve_flags()
    placement = {
        "gateway": f"CPU {cpus(pinning.gateway)} alone",
        "simulator": f"CPU {cpus(pinning.simulator)}",
        "victims": f"this process (pid {os.getpid()}), CPU {cpus(pinning.load_generator)}",
        "attackers": f"a child process per phase (attackers.py; and flood_engine.py for engine-flood), "
        f"CPU {cpus(pinning.load_generator)}, nice {ATTACKER_NICENESS}",
    }
    print("where: " + "; ".join(f"{who}: {where}" for who, where in placement.items()))
    print(
        f"metrics scraped from {'--metrics-port' if metrics_port_flag else 'the API port (serve has no --metrics-port)'}; "
        f"RSS cap {args.rss_cap:g} GiB",
        flush=True,
    )
    plan = ["none", *args.attacks, "none"]
    phases, pooled = [], {kind: [] for kind in KINDS}
    for number, attack in enumerate(plan):
        probes = args.probes if number == 0 else ()
        report, samples = run_phase(attack, args, pinning, metrics_port_flag, probes)
        phases.append(report)
        if attack == "none":
            for kind in KINDS:
                pooled[kind] += samples[kind]
    baseline = {kind: victim_figures(pooled[kind], 2 * args.duration) for kind in KINDS}
    for phase in phases:
        phase["ratio_to_none"] = {
            kind: {q: ratio(phase["victims"][kind][f"{q}_ms"], baseline[kind][f"{q}_ms"]) for q in ("p50", "p99")}
            for kind in KINDS
        }
    load_average_at_end = os.getloadavg()
    print_report(phases, baseline, args)
    print(
        f"\nload average (1, 5, 15 min): {format_load(load_average)} at start, {format_load(load_average_at_end)} "
        f"at end on {os.cpu_count()} CPUs"
    )
    pinned = {
        "gateway": list(pinning.gateway),
        "simulator": list(pinning.simulator),
        "load_generator": list(pinning.load_generator),
    }
    return {
        "environment": describe(load_average, load_average_at_end, pinned),
        "settings": {
            "duration": args.duration,
            "attacks": args.attacks,
            "probes": list(args.probes),
            "concurrency": args.concurrency,
            "pause_ms": args.pause_ms,
            "keep_alive": args.keep_alive,
            "victim_timeout": args.victim_timeout,
            "warmup": args.warmup,
            "rss_cap_gib": args.rss_cap,
            "metrics_port": metrics_port_flag,
            "slow_heads_open_files": SLOW_HEADS_OPEN_FILES,
        },
        "placement": placement,
        "baseline": baseline,
        "phases": phases,
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    every = ",".join(PHASE_ATTACKS + PROBES)
    parser.add_argument("--attacks", default=every, help=f"comma-separated, from {every} (default: all)")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds of victim traffic per phase")
    parser.add_argument("--concurrency", type=int, default=4, help="victim clients")
    parser.add_argument("--pause-ms", type=float, default=20.0, help="each victim's pause between two requests")
    parser.add_argument("--keep-alive", action="store_true", help="victims reuse connections (default: a new one each)")
    parser.add_argument("--victim-timeout", type=float, default=5.0, help="seconds before a victim request fails")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds of victim traffic before each phase")
    parser.add_argument(
        "--rss-cap", type=float, default=3.0, help="GiB of gateway (or simulator) RSS that stops an attack"
    )
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "bench" / "results" / "attacks.json")
    args = parser.parse_args()
    chosen = [name.strip() for name in args.attacks.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(PHASE_ATTACKS + PROBES))
    if unknown:
        parser.error(f"unknown attack(s) {', '.join(unknown)}; choose from {every}")
    args.attacks = [name for name in chosen if name in PHASE_ATTACKS]
    args.probes = tuple(name for name in chosen if name in PROBES)
    if args.duration < 1 or args.concurrency < 1 or args.rss_cap <= 0:
        parser.error("--duration must be at least 1, --concurrency at least 1, --rss-cap positive")
    return args


def main() -> int:
    args = parse_args()
    _, code = run_and_report("attacks", lambda: run_benchmark(args), args.output)
    return code


if __name__ == "__main__":
    sys.exit(main())
