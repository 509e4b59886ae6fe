"""Shared fixtures: real simulator and gateway processes on loopback, the tutorial's topology."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.support import RunningProcess, start_gateway, start_simulator

LLAMA = "meta-llama/Llama-3.2-1B-Instruct"
PHI = "/models/Phi-tiny-MoE-instruct"


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def tutorial_engines(log_dir: Path) -> Iterator[dict[str, RunningProcess]]:
    """The engines of both tutorial examples, simulated: vLLM and SGLang for Llama, vLLM for Phi."""
    started: dict[str, RunningProcess] = {}
    try:
        started["vllm-llama-32-1b"] = start_simulator("vllm", LLAMA, log_dir)
        started["sglang-llama-32-1b"] = start_simulator("sglang", LLAMA, log_dir)
        started["vllm-phi-tiny-moe"] = start_simulator("vllm", PHI, log_dir)
        yield started
    finally:
        for process in started.values():
            process.stop()


def write_routing_map(path: Path, engines: list[dict], settings: dict | None = None) -> Path:
    document: dict = {"engines": engines}
    if settings:
        document["settings"] = settings
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def tutorial_routing(engines: dict[str, RunningProcess]) -> list[dict]:
    return [
        {
            "name": "vllm-llama-32-1b",
            "model": LLAMA,
            "owned_by": "vllm",
            "url": engines["vllm-llama-32-1b"].url,
            "default": True,
            "aliases": ["llama-1b"],
        },
        {"name": "sglang-llama-32-1b", "model": LLAMA, "owned_by": "sglang", "url": engines["sglang-llama-32-1b"].url},
        {"name": "vllm-phi-tiny-moe", "model": PHI, "owned_by": "vllm", "url": engines["vllm-phi-tiny-moe"].url},
    ]


@pytest.fixture(scope="session")
def gateway(tutorial_engines: dict[str, RunningProcess], log_dir: Path, tmp_path_factory) -> Iterator[RunningProcess]:
    """The gateway in front of the tutorial engines (Example 1 and Example 2 together)."""
    config = write_routing_map(tmp_path_factory.mktemp("gateway") / "routes.yaml", tutorial_routing(tutorial_engines))
    running = start_gateway(config, log_dir)
    yield running
    running.stop()
