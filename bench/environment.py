"""What the JSON results record about the machine and the code they were measured on."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from typing import Any

import aiohttp
from processes import REPO_ROOT


def describe(
    load_average_at_start: tuple[float, float, float],
    load_average_at_end: tuple[float, float, float],
    pinning: dict[str, list[int]],
) -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "aiohttp": aiohttp.__version__,
        "load_average_at_start": load_average_at_start,
        "load_average_at_end": load_average_at_end,
        "pinning": pinning,
        "git": git_commit(),
    }


def format_load(load_average: tuple[float, float, float]) -> str:
    return " ".join(f"{value:.2f}" for value in load_average)


def git_commit() -> dict[str, Any] | None:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout

    try:
        return {"commit": git("rev-parse", "HEAD").strip(), "dirty": bool(git("status", "--porcelain").strip())}
    except (OSError, subprocess.CalledProcessError):
        return None
