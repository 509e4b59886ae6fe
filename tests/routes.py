"""The routing maps tests write: the tutorial's models and engines, and the file the gateway reads."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.support import RunningProcess

LLAMA = "meta-llama/Llama-3.2-1B-Instruct"
PHI = "/models/Phi-tiny-MoE-instruct"


def write_routing_map(path: Path, engines: list[dict], settings: dict | None = None) -> Path:
    document: dict = {"engines": engines}
    if settings:
        document["settings"] = settings
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def tutorial_routing(engines: dict[str, RunningProcess]) -> list[dict]:
    """The engines of both tutorial examples, at the URLs of the simulators standing in for them."""
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
