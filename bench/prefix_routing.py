"""Prefix-aware routing benchmark: chat traffic over four simulated GPU replicas, routed by each policy.

Conversations of 3-6 turns whose history grows, over a handful of shared system prompts of 2-4k tokens,
arrive as a Poisson process near the four replicas' capacity (chat_workload.py). The same seeded plan is
played through the gateway with `settings.balancing` `round_robin`, `power_of_two` and `cache_aware`, and
through SGLang's and vLLM's Rust routers with `--policy cache_aware` when their PyPI packages are there
(routers.py). Each target gets four fresh simulators (`simulate --engine vllm --timing gpu`), so every
policy starts with cold prefix caches. Two more workloads check the edges: no shared prefixes (a system
prompt per conversation) and one hot prefix (one system prompt for all).

    .venv/bin/python bench/prefix_routing.py                 # every workload and target (~8 min)
    .venv/bin/python bench/prefix_routing.py --quick         # shorter windows (~5 min)
    .venv/bin/python bench/prefix_routing.py --install-routers --targets cache_aware,sglang
    .venv/bin/python bench/prefix_routing.py --plot bench/results/prefix_routing.json   # the PNG again

Reported per workload and target: TTFT and end-to-end percentiles, throughput, the prefix-cache hit rate
and the prefill tokens computed (from the simulators' own `vllm:prefix_cache_*` counters), each replica's
share of the requests (from its `vllm:e2e_request_latency_seconds_count`) and its peak queue; what makes
the tail: the requests that computed about a whole system prompt again, the slowest 1 % with what each
computed, and the gateway's balancing decisions.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from chat_workload import TurnSample, WorkloadPlan, WorkloadShape, plan_workload, run_workload
from environment import describe, format_load
from load import fmt, percentile, run_client
from processes import (
    REPO_ROOT,
    Pinning,
    choose_pinning,
    metric_samples,
    metric_sum,
    process_group,
    run_and_report,
    scrape,
    simulate_help,
    start_simulators,
)
from routers import GATEWAY_POLICIES, RUST_POLICY, RUST_ROUTERS, Target, ensure_router, gateway_policies, start_front

MODEL = "chat-model"
REPLICAS = 4
QUERIES, HITS = "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"
SERVED, WAITING = "vllm:e2e_request_latency_seconds_count", "vllm:num_requests_waiting"
DECISIONS = "llm_gateway_balancing_decisions_total"
# A request that computed this many prompt tokens or more recomputed about a whole system prompt (1,500-2,500).
COLD_PREFILL_TOKENS = 1024
KV_USAGE = "vllm:kv_cache_usage_perc"
SCRAPE_EVERY_S = 0.5
# A larger model than the simulator's default (20,000 prompt tokens/s): prefill bounds the replicas at request
# rates that two CPUs can drive, and what a policy makes them recompute shows in TTFT.
GPU_PROFILE = ("--prefill-tokens-per-s", "4000")
FIXED_PACE = ("--ttft-ms", "30", "--itl-ms", "5")  # only when this tree's simulator has no --timing gpu
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=120, connect=5)

# The simulator's context is 4,096 tokens (MAX_MODEL_LEN in gateway_app/simulator/engines.py): the longest
# conversation, 2,500 + 300 + 5 x (48 + 150) tokens and the chat template, stays under it.
_CHAT = {
    "system_prompt_tokens": (1500, 2500),
    "turns": (3, 6),
    "first_message_tokens": (100, 300),
    "message_tokens": (20, 150),
    "think_time_s": 0.5,
    "max_tokens": 48,
}
SHAPES = {
    "shared": WorkloadShape("shared", system_prompts=6, **_CHAT),  # type: ignore[arg-type]
    "unique": WorkloadShape("unique", system_prompts=0, **_CHAT),  # type: ignore[arg-type]
    "hot": WorkloadShape("hot", system_prompts=1, **_CHAT),  # type: ignore[arg-type]
}
MEAN_TURNS = sum(_CHAT["turns"]) / 2  # type: ignore[arg-type]
# Arrival windows (s) per workload: full run, --quick.
DURATIONS = {"shared": (30.0, 10.0), "unique": (15.0, 6.0), "hot": (15.0, 6.0)}
# Requests a second offered to the four replicas (see the README: calibrated with --calibrate).
DEFAULT_RATE = 20.0


@dataclass
class RunResult:
    workload: str
    target: str
    conversations: int
    requests: int  # answered in full
    errors: int
    seconds: float  # from the start to the last answer
    requests_per_s: float  # answers finished within the arrival window, per second of it
    ttft_p50_ms: float | None
    ttft_p90_ms: float | None
    ttft_p99_ms: float | None
    e2e_p50_ms: float | None
    e2e_p99_ms: float | None
    prompt_tokens: int  # from the answers' usage
    usage_cached_tokens: int | None  # usage.prompt_tokens_details.cached_tokens, summed
    cache_queries: int | None  # the simulators' own counters, summed over the replicas
    cache_hits: int | None
    hit_rate_percent: float | None
    prefill_tokens: int | None  # queries - hits: what the replicas computed
    served: list[int]  # per replica
    max_share_percent: float | None
    max_over_min: float | None  # None when a replica served nothing
    peak_waiting: list[int] | None  # per replica, sampled every SCRAPE_EVERY_S
    peak_kv_usage_percent: list[float] | None
    decisions: dict[str, int] | None  # the gateway's llm_gateway_balancing_decisions_total by decision
    cold_prefills: int | None  # requests that computed >= COLD_PREFILL_TOKENS of their prompt
    slowest: list[dict[str, Any]]  # the 1 % slowest TTFTs: what each one computed (what makes the p99)
    error_examples: list[str] = field(default_factory=list)


def replica_counters(urls: list[str]) -> list[dict[str, float]]:
    counters = []
    for url in urls:
        text = scrape(url)
        names = {name for name in (QUERIES, HITS) if metric_samples(text, name)}
        counters.append({name: metric_sum(text, name) for name in (SERVED, *names)})
    return counters


async def watch_replicas(session: aiohttp.ClientSession, urls: list[str], peaks: dict[str, list[float]]) -> None:
    """Until cancelled: the highest queue and KV-cache use each replica reports."""
    while True:
        for i, url in enumerate(urls):
            try:
                async with session.get(f"{url}/metrics") as response:
                    text = await response.text()
            except (TimeoutError, aiohttp.ClientError):
                continue
            for name in (WAITING, KV_USAGE):
                if metric_samples(text, name):
                    peaks[name][i] = max(peaks[name][i], metric_sum(text, name))
        await asyncio.sleep(SCRAPE_EVERY_S)


async def play(front_url: str, replica_urls: list[str], plan: WorkloadPlan) -> tuple[list[TurnSample], float, dict]:
    peaks = {WAITING: [0.0] * len(replica_urls), KV_USAGE: [-1.0] * len(replica_urls)}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=REQUEST_TIMEOUT) as session:
        watcher = asyncio.create_task(watch_replicas(session, replica_urls, peaks))
        try:
            samples, seconds = await run_workload(session, front_url, MODEL, plan)
        finally:
            watcher.cancel()
    return samples, seconds, peaks


def run_target(pinning: Pinning, target: Target, plan: WorkloadPlan, simulator_args: tuple[str, ...]) -> RunResult:
    with process_group() as group:
        names = [f"replica-{i}" for i in range(1, REPLICAS + 1)]
        replica_urls = [url for _, url in start_simulators(group, names, pinning.simulator, MODEL, simulator_args)]
        _, front_url = start_front(group, pinning, target, MODEL, replica_urls)
        before = replica_counters(replica_urls)
        samples, seconds, peaks = run_client(play(front_url, replica_urls, plan))
        time.sleep(0.2)  # a replica counts a request a hair after its client has the answer
        after = replica_counters(replica_urls)
        decisions = gateway_decisions(front_url) if target.router is None else None
    return summarize(plan, target, samples, seconds, before, after, peaks, decisions)


def gateway_decisions(front_url: str) -> dict[str, int]:
    """How often the gateway's policy made each decision (load_override is the one to watch)."""
    counts: dict[str, int] = {}
    for labels, value in metric_samples(scrape(front_url), DECISIONS):
        counts[labels["decision"]] = counts.get(labels["decision"], 0) + int(value)
    return counts


def computed_tokens(sample: TurnSample) -> int | None:
    """The prompt tokens the replica computed for this request (not found in its prefix cache). vLLM sends
    `prompt_tokens_details` only when something was cached: without it, nothing was."""
    if sample.prompt_tokens is None:
        return None
    return sample.prompt_tokens - (sample.cached_tokens or 0)


def summarize(
    plan: WorkloadPlan,
    target: Target,
    samples: list[TurnSample],
    seconds: float,
    before: list[dict[str, float]],
    after: list[dict[str, float]],
    peaks: dict[str, list[float]],
    decisions: dict[str, int] | None,
) -> RunResult:
    good = [s for s in samples if s.ok]
    ttfts = sorted(s.ttft_s for s in good if s.ttft_s is not None)
    computed = [c for c in map(computed_tokens, good) if c is not None]
    by_ttft = sorted((s for s in good if s.ttft_s is not None), key=lambda s: s.ttft_s or 0.0, reverse=True)
    slowest = [
        {
            "ttft_ms": round(1000 * (s.ttft_s or 0.0)),
            "sent_s": round(s.sent_s, 2),
            "conversation": s.conversation,
            "turn": s.turn,
            "system_prompt": s.system_prompt,
            "computed_tokens": computed_tokens(s),
        }
        for s in by_ttft[: max(1, math.ceil(len(by_ttft) / 100))]
    ]
    latencies = sorted(s.latency_s for s in good)
    served = [int(a[SERVED] - b[SERVED]) for a, b in zip(after, before, strict=True)]
    has_cache = all(QUERIES in a and HITS in a for a in after)
    queries = (
        int(sum(a[QUERIES] - b.get(QUERIES, 0) for a, b in zip(after, before, strict=True))) if has_cache else None
    )
    hits = int(sum(a[HITS] - b.get(HITS, 0) for a, b in zip(after, before, strict=True))) if has_cache else None
    cached = [s.cached_tokens for s in good if s.cached_tokens is not None]
    total = sum(served)
    kv = peaks[KV_USAGE]
    return RunResult(
        workload=plan.shape.name,
        target=target.name,
        conversations=len(plan.conversations),
        requests=len(good),
        errors=len(samples) - len(good),
        seconds=round(seconds, 3),
        requests_per_s=sum(s.sent_s + s.latency_s <= plan.duration_s for s in good) / plan.duration_s,
        ttft_p50_ms=percentile(ttfts, 50),
        ttft_p90_ms=percentile(ttfts, 90),
        ttft_p99_ms=percentile(ttfts, 99),
        e2e_p50_ms=percentile(latencies, 50),
        e2e_p99_ms=percentile(latencies, 99),
        prompt_tokens=sum(s.prompt_tokens or 0 for s in good),
        usage_cached_tokens=sum(cached) if cached else None,
        cache_queries=queries,
        cache_hits=hits,
        hit_rate_percent=100 * hits / queries if queries and hits is not None else None,
        prefill_tokens=queries - hits if queries is not None and hits is not None else None,
        served=served,
        max_share_percent=100 * max(served) / total if total else None,
        max_over_min=max(served) / min(served) if min(served) > 0 else None,
        peak_waiting=[int(w) for w in peaks[WAITING]] if has_cache else None,
        peak_kv_usage_percent=[100 * k for k in kv] if min(kv) >= 0 else None,
        decisions=decisions,
        cold_prefills=sum(c >= COLD_PREFILL_TOKENS for c in computed) if computed else None,
        slowest=slowest,
        error_examples=sorted({s.error for s in samples if s.error})[:5],
    )


def choose_targets(args: argparse.Namespace) -> tuple[list[Target], list[str]]:
    """The targets that can run here, and a line for each one that cannot (or for each router found)."""
    notes = []
    accepted = gateway_policies()
    targets = []
    for name in args.targets:
        if name in GATEWAY_POLICIES:
            if name in accepted:
                targets.append(Target(name, None, name))
            else:
                notes.append(f"MISSING: the gateway does not accept settings.balancing: {name} yet; left out")
            continue
        router = RUST_ROUTERS[name]
        version, note = ensure_router(router, args.install_routers)
        notes.append(note if version is not None else f"MISSING: {note}; left out")
        if version is not None:
            targets.append(Target(f"{router.key} {RUST_POLICY}", router, RUST_POLICY))
    return targets, notes


def simulator_arguments() -> tuple[tuple[str, ...], str | None]:
    """`--timing gpu` when this tree's simulator has it; else the fixed pace, and a line saying what is missing."""
    if "--timing" in simulate_help():
        return ("--timing", "gpu", *GPU_PROFILE), None
    return FIXED_PACE, (
        "MISSING: `simulate --timing gpu` (the GPU-like engine model) is not in this tree: the replicas run "
        f"at a fixed pace ({' '.join(FIXED_PACE)}), without a prefix cache, batching or queue; hit rate and "
        "prefill tokens show '-'"
    )


def print_table(plan: WorkloadPlan, results: list[RunResult]) -> None:
    shape = plan.shape
    prompts = (
        "a system prompt per conversation" if not shape.system_prompts else f"{shape.system_prompts} system prompt(s)"
    )
    print(
        f"\nworkload {shape.name}: {prompts}, {len(plan.conversations)} conversations, {plan.requests} requests "
        f"over {plan.duration_s:g} s ({plan.requests / plan.duration_s:.1f} req/s offered)"
    )
    header = (
        f"{'target':<24} {'req/s':>6} {'ttft p50':>8} {'p90':>7} {'p99':>7} {'e2e p50':>7} {'p99':>7} "
        f"{'hit %':>6} {'prefill tok':>11} {'cold':>5} {'requests per replica':>24} {'max/min':>7} {'peak queue':>12} {'errors':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        served = " ".join(f"{n:>5}" for n in r.served)
        queue = " ".join(str(w) for w in r.peak_waiting) if r.peak_waiting is not None else "-"
        prefill = f"{r.prefill_tokens:,}" if r.prefill_tokens is not None else "-"
        print(
            f"{r.target:<24} {r.requests_per_s:>6.2f} {fmt(r.ttft_p50_ms, 0):>8} {fmt(r.ttft_p90_ms, 0):>7} "
            f"{fmt(r.ttft_p99_ms, 0):>7} {fmt(r.e2e_p50_ms, 0):>7} {fmt(r.e2e_p99_ms, 0):>7} "
            f"{fmt(r.hit_rate_percent, 1):>6} {prefill:>11} {fmt(r.cold_prefills, 0):>5} {served:>24} {fmt(r.max_over_min):>7} {queue:>12} {r.errors:>6}"
        )
    for r in results:
        if r.decisions:
            print(f"  decisions of {r.target}: " + ", ".join(f"{k} {v}" for k, v in sorted(r.decisions.items())))
    for r in results:
        slow = ", ".join(f"{s['ttft_ms']} ms ({fmt(s['computed_tokens'], 0)} tok)" for s in r.slowest)
        print(f"  slowest 1 % of {r.target}: {slow}")
    for r in results:
        if r.error_examples:
            print(f"  errors with {r.target}: {'; '.join(r.error_examples)}")


def check_targets(results: list[RunResult]) -> list[dict[str, Any]]:
    """The issue's targets, each with the figures it compares and whether it is met (None: cannot tell)."""
    by = {(r.workload, r.target): r for r in results}
    checks: list[dict[str, Any]] = []

    def check(text: str, met: bool | None, figures: str) -> None:
        checks.append({"target": text, "met": met, "figures": figures})

    ours, p2c = by.get(("shared", "cache_aware")), by.get(("shared", "power_of_two"))
    if ours and p2c and ours.prefill_tokens is not None and p2c.prefill_tokens:
        ratio = ours.prefill_tokens / p2c.prefill_tokens
        check("shared: cache_aware prefill <= 1/2 of power_of_two", ratio <= 0.5, f"{ratio:.2f}x")
    rust = [r for r in results if r.workload == "shared" and r.target.endswith(f" {RUST_POLICY}")]
    rust = [r for r in rust if r.hit_rate_percent is not None]
    if ours and rust and ours.hit_rate_percent is not None:
        best = max(rust, key=lambda r: r.hit_rate_percent or 0)
        check(
            f"shared: cache_aware hit rate >= best Rust router's ({best.target}) - 1 point",
            ours.hit_rate_percent >= best.hit_rate_percent - 1,  # type: ignore[operator]
            f"{ours.hit_rate_percent:.1f} % vs {best.hit_rate_percent:.1f} %",
        )
        for key in ("ttft_p50_ms", "ttft_p99_ms"):
            mine, theirs = getattr(ours, key), getattr(best, key)
            met = None if mine is None or theirs is None else mine <= theirs * 1.1
            check(
                f"shared: cache_aware {key[:8]} <= 1.1x {best.target}'s", met, f"{fmt(mine, 0)} vs {fmt(theirs, 0)} ms"
            )
        if ours.max_share_percent is not None and best.max_share_percent is not None:
            check(
                f"shared: cache_aware's busiest replica < {best.target}'s",
                ours.max_share_percent < best.max_share_percent,
                f"{ours.max_share_percent:.0f} % vs {best.max_share_percent:.0f} % of the requests",
            )
    ours_u, p2c_u = by.get(("unique", "cache_aware")), by.get(("unique", "power_of_two"))
    if ours_u and p2c_u:
        met = None
        if ours_u.ttft_p99_ms is not None and p2c_u.ttft_p99_ms is not None:
            met = ours_u.ttft_p99_ms <= p2c_u.ttft_p99_ms * 1.1 and ours_u.requests_per_s >= p2c_u.requests_per_s * 0.95
        check(
            "unique: cache_aware no worse than power_of_two (TTFT p99 within 10 %, req/s within 5 %)",
            met,
            f"p99 {fmt(ours_u.ttft_p99_ms, 0)} vs {fmt(p2c_u.ttft_p99_ms, 0)} ms, "
            f"{ours_u.requests_per_s:.2f} vs {p2c_u.requests_per_s:.2f} req/s",
        )
    ours_h = by.get(("hot", "cache_aware"))
    if ours_h and sum(ours_h.served):
        least = 100 * min(ours_h.served) / sum(ours_h.served)
        check(
            "hot: no replica starved under cache_aware (each >= 10 % of the requests)",
            least >= 10,
            f"least {least:.0f} %",
        )
    return checks


def print_checks(checks: list[dict[str, Any]]) -> None:
    print("\ntargets (issue 12), not asserted:")
    for c in checks:
        mark = {True: "met", False: "MISSED", None: "?"}[c["met"]]
        print(f"  {mark:<6} {c['target']}: {c['figures']}")


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    load_average = os.getloadavg()
    pinning = choose_pinning()
    if pinning.load_generator:
        os.sched_setaffinity(0, pinning.load_generator)
    simulator_args, simulator_note = simulator_arguments()
    targets, notes = choose_targets(args)
    for note in [simulator_note, *notes]:
        if note:
            print(note, flush=True)
    if not targets:
        raise RuntimeError("no target can run here")
    conversations_per_s = args.rate / MEAN_TURNS
    plans = {
        name: plan_workload(SHAPES[name], conversations_per_s, DURATIONS[name][args.quick], args.seed)
        for name in args.workloads
    }
    results: dict[str, list[RunResult]] = {}
    for name, plan in plans.items():
        print(f"\n{name}: {len(plan.conversations)} conversations, {plan.requests} requests", flush=True)
        for target in targets:
            result = run_target(pinning, target, plan, simulator_args)
            print(
                f"  {target.name:<24} ttft p50 {fmt(result.ttft_p50_ms, 0)} ms, p90 {fmt(result.ttft_p90_ms, 0)} ms, "
                f"p99 {fmt(result.ttft_p99_ms, 0)} ms, hit {fmt(result.hit_rate_percent, 1)} %, "
                f"cold prefills {result.cold_prefills}, per replica {result.served}, errors {result.errors}",
                flush=True,
            )
            results.setdefault(name, []).append(result)
    load_average_at_end = os.getloadavg()
    for name, plan in plans.items():
        print_table(plan, results[name])
    flat = [r for rs in results.values() for r in rs]
    checks = check_targets(flat)
    print_checks(checks)
    print(
        f"\nload average (1, 5, 15 min): {format_load(load_average)} at start, {format_load(load_average_at_end)} "
        f"at end on {os.cpu_count()} CPUs"
    )
    pinned = {
        "front": list(pinning.gateway),
        "simulators": list(pinning.simulator),
        "load_generator": list(pinning.load_generator),
    }
    return {
        "environment": describe(load_average, load_average_at_end, pinned),
        "settings": {
            "quick": args.quick,
            "seed": args.seed,
            "rate_requests_per_s": args.rate,
            "conversations_per_s": conversations_per_s,
            "replicas": REPLICAS,
            "model": MODEL,
            "simulator_args": list(simulator_args),
            "workloads": {name: {**asdict(plan.shape), "duration_s": plan.duration_s} for name, plan in plans.items()},
        },
        "notes": [n for n in [simulator_note, *notes] if n],
        "workloads": {
            name: {
                "conversations": len(plan.conversations),
                "requests": plan.requests,
                "results": [asdict(r) for r in results[name]],
            }
            for name, plan in plans.items()
        },
        "targets": checks,
    }


def run_calibration(args: argparse.Namespace) -> int:
    """The shared workload through `power_of_two` at each rate of --calibrate: where it stops keeping up
    (TTFT and the replicas' queues climb, req/s falls behind the offered rate) is the replicas' capacity."""
    simulator_args, note = simulator_arguments()
    if note:
        print(note)
    pinning = choose_pinning()
    if pinning.load_generator:
        os.sched_setaffinity(0, pinning.load_generator)
    target = Target("power_of_two", None, "power_of_two")
    print(
        f"{'req/s offered':>13} {'answered':>8} {'ttft p50':>8} {'p99':>7} {'hit %':>6} {'peak queue':>12} {'errors':>6}"
    )
    for rate in args.calibrate:
        plan = plan_workload(SHAPES["shared"], rate / MEAN_TURNS, DURATIONS["shared"][True], args.seed)
        r = run_target(pinning, target, plan, simulator_args)
        queue = " ".join(str(w) for w in r.peak_waiting) if r.peak_waiting is not None else "-"
        print(
            f"{plan.requests / plan.duration_s:>13.1f} {r.requests_per_s:>8.2f} {fmt(r.ttft_p50_ms, 0):>8} "
            f"{fmt(r.ttft_p99_ms, 0):>7} {fmt(r.hit_rate_percent, 1):>6} {queue:>12} {r.errors:>6}",
            flush=True,
        )
    return 0


def render(report: dict[str, Any], path: Path) -> Path:
    """One row per workload: TTFT p50/p99 per target, prefill tokens per target, requests per replica."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = report["workloads"]
    fig, axes = plt.subplots(len(workloads), 3, figsize=(16, 3.6 * len(workloads)), squeeze=False)
    for row, (name, workload) in enumerate(workloads.items()):
        results = workload["results"]
        names = [r["target"] for r in results]
        x = range(len(results))
        ttft, prefill, spread = axes[row]
        for offset, key, label in ((-0.2, "ttft_p50_ms", "p50"), (0.2, "ttft_p99_ms", "p99")):
            ttft.bar([i + offset for i in x], [r[key] or math.nan for r in results], 0.4, label=label)
        ttft.set_title(f"{name}: time to first token (ms)")
        ttft.legend(fontsize=8)
        bars = prefill.bar(x, [(r["prefill_tokens"] or math.nan) / 1e6 for r in results], 0.6, color="#8c6d31")
        prefill.bar_label(bars, labels=[f"hit {fmt(r['hit_rate_percent'], 0)} %" for r in results], fontsize=7)
        prefill.set_title(f"{name}: prefill tokens computed (millions)")
        width = 0.8 / REPLICAS
        for replica in range(REPLICAS):
            spread.bar(
                [i - 0.4 + width * (replica + 0.5) for i in x],
                [r["served"][replica] for r in results],
                width,
                label=f"replica {replica + 1}",
            )
        spread.set_title(f"{name}: requests per replica")
        spread.legend(fontsize=7)
        for ax in axes[row]:
            ax.set_xticks(list(x), names, rotation=20, ha="right", fontsize=8)
    env = report["environment"]
    commit = ((env.get("git") or {}).get("commit") or "unknown")[:10]
    fig.suptitle(
        f"prefix-aware routing, {REPLICAS} simulated replicas, {report['settings']['rate_requests_per_s']:g} req/s offered; "
        f"{env['date']}, commit {commit}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_png(report: dict[str, Any], json_path: Path) -> None:
    try:
        path = render(report, json_path.with_suffix(".png"))
    except ImportError:
        print(
            "matplotlib is not installed, so no plot: .venv/bin/pip install matplotlib, then "
            f".venv/bin/python bench/prefix_routing.py --plot {json_path}",
            file=sys.stderr,
        )
        return
    print(f"wrote {path}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter arrival windows (~5 min in all)")
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE, help="requests a second offered to the replicas")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--workloads", default=",".join(SHAPES), help="of: " + ",".join(SHAPES))
    targets = (*GATEWAY_POLICIES, *RUST_ROUTERS)
    parser.add_argument("--targets", default=",".join(targets), help="of: " + ",".join(targets))
    parser.add_argument("--install-routers", action="store_true", help="pip install a missing Rust router first")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "bench" / "results" / "prefix_routing.json")
    parser.add_argument("--plot", type=Path, metavar="JSON", help="only draw the PNG of an earlier result")
    parser.add_argument(
        "--calibrate",
        metavar="RATES",
        help="only run the shared workload through power_of_two at these req/s, e.g. 5,10,20",
    )
    args = parser.parse_args()
    args.workloads = args.workloads.split(",")
    args.targets = args.targets.split(",")
    args.calibrate = [float(rate) for rate in args.calibrate.split(",")] if args.calibrate else None
    unknown = [w for w in args.workloads if w not in SHAPES] + [t for t in args.targets if t not in targets]
    if unknown or args.rate <= 0:
        parser.error(f"unknown workload or target {unknown}, or --rate not positive")
    return args


def main() -> int:
    args = parse_args()
    if args.plot:
        import json

        write_png(json.loads(args.plot.read_text()), args.plot)
        return 0
    if args.calibrate:
        return run_calibration(args)
    report, code = run_and_report("prefix_routing", lambda: run_benchmark(args), args.output)
    if report is not None:
        write_png(report, args.output)
    return code


if __name__ == "__main__":
    sys.exit(main())
