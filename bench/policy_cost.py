"""What a balancing policy costs in gateway CPU: the same gateway with `power_of_two` and with
`cache_aware`, beside one bare relay, in alternating turns of the same load, over four replicas.

`cache_aware` reads the prompt's prefix from every request (block hashes of its messages) and keeps a
table of where each prefix went; the issue's bound is CPU per request within 10 % of `power_of_two`.
The requests carry a chat of a realistic size (a ~2.5 KB system prompt, one of a handful, and a short
user message) so that the prefix work is what it would be in production.

    .venv/bin/python bench/policy_cost.py [--concurrency 16] [--turns 5] [--duration 3]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys

import access_log
from load import Pids, run_client, run_scenario
from processes import (
    choose_pinning,
    free_port,
    process_group,
    start_gateway,
    start_relay,
    start_simulator,
)

MODEL = "bench-model"
POLICIES = ("power_of_two", "cache_aware")
REPLICAS = 4


def system_prompt(seed: int) -> str:
    """About 2.5 KB of text, different for each seed."""
    words = random.Random(seed).choices(["gateway", "engine", "token", "cache", "replica", "prefix", "stream"], k=400)
    return "You are a helpful assistant. " + " ".join(words)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per turn")
    args = parser.parse_args()
    load = argparse.Namespace(duration=args.duration, warmup=0.5, max_tokens=16, timeout=60)
    pinning = choose_pinning()
    if pinning.load_generator:
        os.sched_setaffinity(0, pinning.load_generator)
    messages = [{"role": "system", "content": system_prompt(1)}, {"role": "user", "content": "Summarise that."}]
    cpu: dict[str, list[float]] = {}
    with process_group() as group:
        simulators = [start_simulator(group, f"simulator-{i}", pinning.simulator, MODEL) for i in range(REPLICAS)]
        urls = [url for _, url in simulators]
        relay, relay_url = start_relay(group, pinning.gateway, urls[0])
        targets = [("relay", relay_url, relay.pid)]
        for policy in POLICIES:
            port = free_port()
            replicas = ", ".join(f'"{url}"' for url in urls)
            routes = (
                f"settings: {{balancing: {policy}}}\nengines:\n"
                f"  - {{name: bench-vllm, model: {MODEL}, owned_by: vllm, urls: [{replicas}]}}\n"
            )
            gateway = start_gateway(group, policy, pinning, routes, port, access_log.LOG_ARGS["json"])
            targets.append((policy, f"http://127.0.0.1:{port}", gateway.pid))
        cpu = {name: [] for name, _, _ in targets}
        for _ in range(args.turns):  # alternating, so that drift hits all alike
            for name, url, pid in targets:
                result = run_client(
                    run_scenario(
                        name,
                        url,
                        False,
                        args.concurrency,
                        load,
                        Pids(pid, simulators[0][0].pid),
                        model=MODEL,
                        messages=messages,
                    )  # fmt: skip
                )
                cpu[name].append(result.gateway_cpu_ms_per_request or float("nan"))
    relay_median = statistics.median(cpu["relay"])
    base = statistics.median(cpu["power_of_two"])
    print(f"non-streaming chats of {len(messages[0]['content'])} characters, c={args.concurrency}, {REPLICAS} replicas")
    for name, values in cpu.items():
        median = statistics.median(values)
        turns = " ".join(f"{value:.3f}" for value in values)
        print(
            f"  {name:<14} median {median:.3f} ms  over the relay {100 * (median / relay_median - 1):+4.0f} %  "
            f"over power_of_two {100 * (median / base - 1):+4.0f} %  ({turns})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
