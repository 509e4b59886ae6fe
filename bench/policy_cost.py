"""What a balancing policy costs in gateway CPU: the same gateway with `power_of_two` and with
`cache_aware`, beside one bare relay, in alternating turns of the same load, over four replicas.

`cache_aware` reads the prompt's prefix from every request (block hashes of its messages) and keeps a
table of where each prefix went; the issue's bound is CPU per request within 10 % of `power_of_two`.
The requests carry a chat of a realistic size (a ~2.5 KB system prompt, one of a handful sent in turn, and
a short user message) so that the prefix work is what it would be in production.

    .venv/bin/python bench/policy_cost.py [--concurrency 16] [--turns 5] [--duration 3] [--prompts 8]
"""

from __future__ import annotations

import argparse
import os
import random
import sys

import access_log
from load import alternate_turns, print_medians
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
    parser.add_argument("--prompts", type=int, default=8, help="system prompts sent in turn (1: one hot prefix)")
    args = parser.parse_args()
    load = argparse.Namespace(duration=args.duration, warmup=0.5, max_tokens=16, timeout=60)
    pinning = choose_pinning()
    if pinning.load_generator:
        os.sched_setaffinity(0, pinning.load_generator)
    # A handful of system prompts, in turn: one alone would be a single hot prefix, whose overflow to other
    # replicas (bound_load) is work of its own, and the same replica for every request (see --prompts).
    chats = [
        [{"role": "system", "content": system_prompt(seed)}, {"role": "user", "content": "Summarise that."}]
        for seed in range(1, args.prompts + 1)
    ]
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
        cpu = alternate_turns(
            targets, simulators[0][0].pid, args.turns, load, args.concurrency, False, model=MODEL, chats=chats
        )
    size = len(chats[0][0]["content"])
    print(f"non-streaming chats, {args.prompts} system prompt(s) of ~{size} characters in turn, c={args.concurrency}")
    print_medians(cpu, {"the relay": "relay", "power_of_two": "power_of_two"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
