"""Before/after: the gateway of this working tree against the gateway of another commit, beside one bare
relay, in alternating turns of the same load.

Between two runs of bench.py the machine drifts by 10–20 points; within one run, turns that alternate
between the two gateways see the same drift. Use this to tell whether a change to the hot path paid off.

    .venv/bin/python bench/compare.py --baseline <git ref> [--mode non-stream|stream|stream-<N>]
                                      [--concurrency 16] [--turns 5] [--duration 3] [--itl-ms 0]

The baseline is checked out with `git worktree` into a temporary folder and run from there by this
interpreter (so with this tree's dependencies). Reports each one's CPU ms per request by turn, the
median, and the median over the relay's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import access_log
import processes
from load import alternate_turns, print_medians
from processes import choose_pinning, free_port, process_group, routing_map, start_gateway, start_relay, start_simulator

MODEL = "bench-model"


def checkout(ref: str, into: Path) -> None:
    subprocess.run(
        ["git", "-C", str(processes.REPO_ROOT), "worktree", "add", "--detach", "--force", str(into), ref],
        check=True,
        capture_output=True,
    )


def remove_checkout(path: Path) -> None:
    subprocess.run(
        ["git", "-C", str(processes.REPO_ROOT), "worktree", "remove", "--force", str(path)], capture_output=True
    )


def start_gateway_from(
    root: Path, group: processes.ProcessGroup, name: str, pinning: processes.Pinning, simulator_url: str
) -> tuple[subprocess.Popen[bytes], str]:
    """A gateway run from `root` (the process's working folder comes first on its import path)."""
    saved, processes.REPO_ROOT = processes.REPO_ROOT, root
    try:
        port = free_port()
        proc = start_gateway(group, name, pinning, routing_map(MODEL, simulator_url), port, access_log.LOG_ARGS["json"])
    finally:
        processes.REPO_ROOT = saved
    return proc, f"http://127.0.0.1:{port}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="the git ref to compare with, e.g. HEAD~3 or a tag")
    parser.add_argument("--mode", default="non-stream", help="non-stream, stream, or stream-<tokens>")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per turn")
    parser.add_argument("--itl-ms", type=float, default=0.0, help="the simulator's delay between tokens")
    args = parser.parse_args()
    stream = args.mode != "non-stream"
    tokens = int(args.mode.split("-")[1]) if args.mode.startswith("stream-") else 16
    load = argparse.Namespace(duration=args.duration, warmup=0.5, max_tokens=tokens, timeout=60)
    pinning = choose_pinning()
    if pinning.load_generator:
        os.sched_setaffinity(0, pinning.load_generator)
    cpu: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="llm-gateway-baseline-") as folder:
        baseline_root = Path(folder) / "tree"
        checkout(args.baseline, baseline_root)
        try:
            with process_group() as group:  # stopped before their folder goes
                simulator, simulator_url = start_simulator(
                    group, "simulator", pinning.simulator, MODEL, itl_ms=args.itl_ms
                )
                relay, relay_url = start_relay(group, pinning.gateway, simulator_url)
                before, before_url = start_gateway_from(baseline_root, group, "baseline", pinning, simulator_url)
                after, after_url = start_gateway_from(processes.REPO_ROOT, group, "this-tree", pinning, simulator_url)
                targets = [("relay", relay_url, relay.pid), (args.baseline, before_url, before.pid)]
                targets.append(("this tree", after_url, after.pid))
                cpu = alternate_turns(
                    targets, simulator.pid, args.turns, load, args.concurrency, stream,
                    model=MODEL, max_tokens=tokens, mode=args.mode,
                )  # fmt: skip
        finally:
            remove_checkout(baseline_root)
    print(f"{args.mode}, c={args.concurrency}, {args.turns} turns of {args.duration:g} s; CPU ms per request")
    print_medians(cpu, {"the relay": "relay"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
