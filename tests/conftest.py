"""Fixtures: the processes a test starts (stopped after it, pass or fail), and the tutorial's topology.

Helpers that tests import live in modules of their own (`tests.routes`, `tests.support`, `tests.web`,
`tests.raw_http`); this file holds fixtures only."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.routes import LLAMA, PHI, tutorial_routing, write_routing_map
from tests.support import Processes, RunningProcess


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture
def processes(log_dir: Path) -> Iterator[Processes]:
    """Start a test's own gateways, simulators and stand-in servers through this; all stop after it."""
    with Processes(log_dir) as started:
        yield started


@pytest.fixture(scope="module")
def module_processes(log_dir: Path) -> Iterator[Processes]:
    """The same for a module's shared fixtures: all stop after the module's last test."""
    with Processes(log_dir) as started:
        yield started


@pytest.fixture(scope="session")
def tutorial_engines(log_dir: Path) -> Iterator[dict[str, RunningProcess]]:
    """The engines of both tutorial examples, simulated: vLLM and SGLang for Llama, vLLM for Phi."""
    with Processes(log_dir) as started:
        yield {
            "vllm-llama-32-1b": started.simulator("vllm", LLAMA),
            "sglang-llama-32-1b": started.simulator("sglang", LLAMA),
            "vllm-phi-tiny-moe": started.simulator("vllm", PHI),
        }


@pytest.fixture(scope="session")
def gateway(
    tutorial_engines: dict[str, RunningProcess], log_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningProcess]:
    """The gateway in front of the tutorial engines (Example 1 and Example 2 together)."""
    config = write_routing_map(tmp_path_factory.mktemp("gateway") / "routes.yaml", tutorial_routing(tutorial_engines))
    with Processes(log_dir) as started:
        yield started.gateway(config)
