"""Render a bench.py result as a PNG: latency percentiles and CPU per request, direct and through the gateway.

    .venv/bin/python bench/plot.py bench/results/latest.json            # writes bench/results/latest.png
    .venv/bin/python bench/plot.py results.json --output elsewhere.png

One row per mode (non-streaming, streaming); in each, one latency panel per concurrency (p50, p90, p99,
direct next to gateway) and one CPU panel (the simulator's CPU per request, with the gateway's stacked
on top when the requests went through it). bench.py calls `write_png` after each run. matplotlib, with
the Agg backend (no display needed), is imported only when plotting, so the benchmark runs without it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

MODES = {"non-stream": "non-streaming", "stream": "streaming"}
TARGET_COLORS = {"direct": "#9e9e9e", "gateway": "#1f77b4"}
SIMULATOR_COLOR = "#d0d0d0"
PERCENTILES = (("p50", "p50_ms"), ("p90", "p90_ms"), ("p99", "p99_ms"))
MISSING_MATPLOTLIB = (
    "matplotlib is not installed, so no plot: .venv/bin/pip install matplotlib, then "
    ".venv/bin/python bench/plot.py {json}"
)


def png_path(json_path: Path) -> Path:
    """Where the plot of a result goes: next to its JSON, same name, .png."""
    return json_path.with_suffix(".png")


def write_png(report: dict[str, Any], json_path: Path) -> Path | None:
    """Render the plot of `report` next to `json_path`; without matplotlib, say so and skip it."""
    try:
        path = render(report, png_path(json_path))
    except ImportError:
        print(MISSING_MATPLOTLIB.format(json=json_path), file=sys.stderr)
        return None
    print(f"wrote {path}")
    return path


def title(report: dict[str, Any]) -> str:
    env, settings = report["environment"], report["settings"]
    git = env.get("git") or {}
    commit = (git.get("commit") or "unknown")[:10] + (" (uncommitted changes)" if git.get("dirty") else "")
    date = env["date"].replace("T", " ").replace("+00:00", " UTC")
    load = "→".join(f"{env[key][0]:.2f}" for key in ("load_average_at_start", "load_average_at_end"))
    pinned = env.get("pinning", {}).get("gateway")
    where = f"gateway on CPU {','.join(map(str, pinned))}" if pinned else "unpinned"
    return (
        f"llm-gateway overhead: direct vs through the gateway\n"
        f"{date}, commit {commit}; {settings['duration_s']:g} s per scenario, streams of {settings['max_tokens']} tokens, "
        f"{env['cpu_count']} CPUs, {where}, load average {load}"
    )


def value(number: float | None) -> float:
    return math.nan if number is None else number


def label(number: float | None) -> str:
    return "-" if number is None else f"{number:.2f}"


def latency_panel(ax: Any, scenarios: dict[tuple[str, str, int], dict[str, Any]], mode: str, concurrency: int) -> None:
    width = 0.38
    for offset, target in ((-width / 2, "direct"), (width / 2, "gateway")):
        r = scenarios.get((target, mode, concurrency))
        if r is None:
            continue
        numbers = [r[key] for _, key in PERCENTILES]
        bars = ax.bar(
            [i + offset for i in range(len(PERCENTILES))],
            [value(n) for n in numbers],
            width,
            label=target + (f" ({r['errors']} errors)" if r["errors"] else ""),
            color=TARGET_COLORS[target],
        )
        ax.bar_label(bars, labels=[label(n) for n in numbers], fontsize=8, padding=2)
    ax.set_xticks(range(len(PERCENTILES)), [name for name, _ in PERCENTILES])
    ax.set_title(f"{MODES[mode]}, concurrency {concurrency}: latency", fontsize=10)
    ax.set_ylabel("ms")
    leave_room_for_legend(ax)


def cpu_panel(
    ax: Any,
    scenarios: dict[tuple[str, str, int], dict[str, Any]],
    mode: str,
    levels: list[int],
    target_ms: float | None,
) -> None:
    positions, ticks, simulator, gateway = [], [], [], []
    for i, concurrency in enumerate(levels):
        for j, target in enumerate(("direct", "gateway")):
            r = scenarios.get((target, mode, concurrency))
            if r is None:
                continue
            positions.append(i * 2.6 + j)
            ticks.append(f"{target}\nc={concurrency}")
            simulator.append(r["simulator_cpu_ms_per_request"])
            gateway.append(r["gateway_cpu_ms_per_request"] or 0.0)
    engine = ax.bar(positions, simulator, 0.8, color=SIMULATOR_COLOR, label="simulator (the engine)")
    ax.bar_label(engine, fmt="%.3f", label_type="center", fontsize=8)
    on_top = ax.bar(positions, gateway, 0.8, bottom=simulator, color=TARGET_COLORS["gateway"], label="gateway")
    ax.bar_label(
        on_top,
        labels=[f"{g:.3f}" if g else "" for g in gateway],
        label_type="center",
        fontsize=8,
        color="white",
        fontweight="bold",
    )
    ax.set_xticks(positions, ticks, fontsize=8)
    target = f" (gateway target ≤ {target_ms:g} ms)" if target_ms is not None else ""
    ax.set_title(f"{MODES[mode]}: CPU per request{target}", fontsize=10)
    ax.set_ylabel("CPU ms per request")
    leave_room_for_legend(ax)


def leave_room_for_legend(ax: Any) -> None:
    """Raise the top of the axis so that the legend, above the bars, covers none of them or their labels."""
    bottom, top = ax.get_ylim()
    ax.set_ylim(bottom, top * 1.3)
    ax.legend(fontsize=8, loc="upper center", ncols=2, frameon=False)


def render(report: dict[str, Any], path: Path) -> Path:
    """Write the plot of `report` to `path`; raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = {(r["target"], r["mode"], r["concurrency"]): r for r in report["scenarios"]}
    modes = [mode for mode in MODES if any(key[1] == mode for key in scenarios)]
    levels = sorted({key[2] for key in scenarios})
    # The CPU targets bench.py printed, by mode (the stream one is set for 16 tokens).
    target_ms = {"non-stream": None, "stream": None}
    for goal in report.get("targets", []):
        if goal["target"].startswith("gateway CPU per non-streaming request,"):
            target_ms["non-stream"] = goal["limit_ms"]
        elif goal["target"].startswith("gateway CPU per ") and "-token stream" in goal["target"]:
            target_ms["stream"] = goal["limit_ms"]

    columns = len(levels) + 1
    fig, axes = plt.subplots(len(modes), columns, figsize=(4.6 * columns, 4.2 * len(modes)), squeeze=False)
    for row, mode in enumerate(modes):
        for column, concurrency in enumerate(levels):
            latency_panel(axes[row][column], scenarios, mode, concurrency)
        cpu_panel(axes[row][-1], scenarios, mode, levels, target_ms[mode])
    fig.suptitle(title(report), fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="a result written by bench.py, e.g. bench/results/latest.json")
    parser.add_argument("--output", type=Path, help="the PNG to write (default: the JSON's path with .png)")
    args = parser.parse_args()
    report = json.loads(args.json.read_text())
    try:
        path = render(report, args.output or png_path(args.json))
    except ImportError:
        print(MISSING_MATPLOTLIB.format(json=args.json), file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
