"""What each per-request feature costs: the gateway against copies of itself with one feature cut out,
beside one bare relay, in alternating turns of the same load.

    .venv/bin/python bench/ablate.py [--ablations access_log,connection_guard,...]
                                     [--concurrency 16] [--turns 7] [--duration 3]

Non-streaming chat completions of 16 tokens only: what a request costs apart from its chunks.

Each ablation is a copy of this tree's `gateway_app/` in a temporary folder with a few lines replaced
(ABLATIONS below), so that the feature's work is not done; `all` cuts every one of them at once, which
leaves what routing and forwarding cost by themselves. The copies are for measuring only: they drop
bounds, log lines or headers that clients and operators rely on. Every request of every turn must still
get a 200; a copy that fails requests stops the run, since its CPU figure would mean nothing.

Reports each gateway's CPU ms per request by turn, the median, the median over the relay's, and what
each cut saves against the whole gateway, in microseconds per request. When the text a patch
replaces changes, the patch no longer applies and the run stops naming it (tests/test_bench_ablate.py
checks that every patch applies to the tree as it is, and that each copy imports). A cut that returns
early is placed right after its function's docstring, so that what the function comes to do later is cut
too.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import processes
from compare import MODEL, start_gateway_from
from load import alternate_turns
from processes import choose_pinning, process_group, start_relay, start_simulator


@dataclass(frozen=True)
class Patch:
    """Replace `old` (which must occur exactly once) with `new` in `gateway_app/<module>`."""

    module: str
    old: str
    new: str


@dataclass(frozen=True)
class Ablation:
    what: str  # the work that the copy no longer does
    patches: tuple[Patch, ...]


def _return_at_once(module: str, docstring: str, statement: str) -> Patch:
    """A function that returns right after its docstring (`statement`): whatever its body comes to hold,
    the copy skips all of it."""
    return Patch(module, docstring, docstring + statement)


ABLATIONS: dict[str, Ablation] = {
    "access_log": Ablation(
        "the JSON access log: the line is neither kept, rendered nor written",
        (
            _return_at_once(
                "request_log.py", '        """Called on the hot path: no formatting, no I/O."""\n', "        return\n"
            ),
        ),
    ),
    "connection_guard": Ablation(
        "the front door's bounds (uvicorn's own protocol instead of GuardedHttpProtocol) and the "
        "server's notice of a client that left",
        (
            Patch(
                "server.py",
                "http=functools.partial(GuardedHttpProtocol, guard_for=guard_for),",
                'http="httptools",',
            ),
            Patch(
                "exchange_clock.py",
                '    extension = scope.get("extensions", {}).get(CLIENT_GONE_EXTENSION)\n',
                "    import contextlib\n\n    return contextlib.nullcontext()\n",
            ),
        ),
    ),
    "headers_to_engine": Ablation(
        "the client's headers forwarded to the engine (only Content-Type and X-Request-Id go)",
        (
            _return_at_once(
                "upstream.py",
                '    """The client\'s headers minus hop-by-hop ones, plus the engine\'s configured headers."""\n',
                '    return [("Content-Type", "application/json")]\n',
            ),
        ),
    ),
    "headers_to_client": Ablation(
        "the engine's headers and the gateway's own (x-gateway-engine, x-request-id) on the answer",
        (
            _return_at_once(
                "upstream.py",
                '    """The engine\'s response headers minus hop-by-hop ones (names lower-cased, as ASGI wants)."""\n',
                '    return [(b"content-type", b"application/json")]\n',
            ),
            Patch(
                "forwarding.py",
                "            headers.append((ENGINE_HEADER, engine.name_header))\n"
                "            headers.extend(self.request.extra_headers)\n"
                "            if streaming:",
                "            if streaming:",
            ),
        ),
    ),
    "usage": Ablation(
        "reading the token counts in a JSON answer (set to fixed numbers instead; streams are not measured here)",
        (
            Patch(
                "forwarding.py",
                "                    self._count_tokens(find_usage(chunk))\n",
                "                    self._count_tokens((1, 1))\n",
            ),
        ),
    ),
    "request_id": Ablation(
        "the request id: the client's read or a new one drawn (one fixed id instead)",
        (
            Patch("app.py", '        ids = request_ids(scope["headers"])\n', "        ids = _FIXED_IDS\n"),
            Patch(
                "app.py",
                "\nclass Router:",
                '\nfrom gateway_app.request_id import RequestIds\n\n_FIXED_IDS = RequestIds("0", "0")\n\n\nclass Router:',
            ),
        ),
    ),
}
ALL = "all"
TOKENS = 16  # completion tokens per request, as bench.py's default


def ablated_copy(names: list[str], into: Path) -> Path:
    """A copy of this tree's gateway_app/ under `into`, with the named ablations' patches applied; returns
    the folder to run it from."""
    target = into / "gateway_app"
    shutil.copytree(processes.REPO_ROOT / "gateway_app", target, ignore=shutil.ignore_patterns("__pycache__"))
    for name in names:
        for patch in ABLATIONS[name].patches:
            path = target / patch.module
            text = path.read_text()
            if text.count(patch.old) != 1:
                raise SystemExit(
                    f"ablation `{name}`: gateway_app/{patch.module} no longer holds the text it replaces "
                    "exactly once; update ABLATIONS in bench/ablate.py to the code"
                )
            path.write_text(text.replace(patch.old, patch.new))
    return into


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ablations", default=",".join([*ABLATIONS, ALL]), help="comma-separated; `all` cuts them all")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--turns", type=int, default=7)
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per turn")
    args = parser.parse_args()
    names = [name.strip() for name in args.ablations.split(",") if name.strip()]
    unknown = [name for name in names if name not in ABLATIONS and name != ALL]
    if unknown:
        parser.error(f"unknown ablation(s) {', '.join(unknown)}; known: {', '.join([*ABLATIONS, ALL])}")
    load = argparse.Namespace(duration=args.duration, warmup=0.5, max_tokens=TOKENS, timeout=60)
    pinning = choose_pinning()
    if pinning.load_generator:
        os.sched_setaffinity(0, pinning.load_generator)
    with tempfile.TemporaryDirectory(prefix="llm-gateway-ablate-") as folder:
        copies = {name: ablated_copy(list(ABLATIONS) if name == ALL else [name], Path(folder) / name) for name in names}
        with process_group() as group:  # stopped before their folder goes
            simulator, simulator_url = start_simulator(group, "simulator", pinning.simulator, MODEL)
            relay, relay_url = start_relay(group, pinning.gateway, simulator_url)
            whole, whole_url = start_gateway_from(processes.REPO_ROOT, group, "gateway", pinning, simulator_url)
            targets = [("relay", relay_url, relay.pid), ("gateway", whole_url, whole.pid)]
            for name, root in copies.items():
                process, url = start_gateway_from(root, group, f"without-{name}", pinning, simulator_url)
                targets.append((f"without {name}", url, process.pid))
            cpu = alternate_turns(
                targets, simulator.pid, args.turns, load, args.concurrency, False,
                model=MODEL, max_tokens=TOKENS, mode="non-stream",
            )  # fmt: skip
    print(f"non-stream, c={args.concurrency}, {args.turns} turns of {args.duration:g} s; CPU ms per request")
    medians = {name: statistics.median(values) for name, values in cpu.items()}
    for name, values in cpu.items():
        over = 100 * (medians[name] / medians["relay"] - 1)
        saved = "" if name in ("relay", "gateway") else f"  saves {1000 * (medians['gateway'] - medians[name]):5.1f} µs"
        turns = " ".join(f"{value:.3f}" for value in values)
        print(f"  {name:<28} median {medians[name]:.3f} ms  over the relay {over:+4.0f} %{saved}  ({turns})")
    for name in names:
        print(f"  {name}: {'every cut above' if name == ALL else ABLATIONS[name].what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
