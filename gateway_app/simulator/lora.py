"""LoRA adapters in the simulator: the `--lora-modules` list, and loading and unloading at run time.

vLLM takes `--lora-modules name=path ...` (or a JSON object per adapter with `name`, `path` and optional
`base_model_name`), SGLang `--lora-paths name=path ...` (or JSON with `lora_name`, `lora_path`); both
list the adapters in `/v1/models` with `parent` set to the base model. At run time vLLM answers
`POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter` when started with
`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`; SGLang answers `/load_lora_adapter` and `/unload_lora_adapter`.
"""

from __future__ import annotations

import json

RUNTIME_UPDATES_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
# At most this many adapters at once: what the simulated engine holds is bounded like the rest.
MAX_ADAPTERS = 10_000


def parse_lora_modules(values: list[str]) -> dict[str, str]:
    """Adapter name → path from the command line's forms; ValueError naming the bad one."""
    adapters: dict[str, str] = {}
    for value in values:
        if value.lstrip().startswith("{"):
            try:
                spec = json.loads(value)
            except ValueError:
                raise ValueError(f"not valid JSON: {value!r}") from None
            name = spec.get("name", spec.get("lora_name")) if isinstance(spec, dict) else None
            path = spec.get("path", spec.get("lora_path")) if isinstance(spec, dict) else None
        else:
            name, sep, path = value.partition("=")
            if not sep:
                raise ValueError(f"expected name=path or a JSON object, got {value!r}")
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise ValueError(f"an adapter needs a name and a path, got {value!r}")
        adapters[name] = path
    return adapters


def runtime_updates_allowed(environ_value: str | None) -> bool:
    """vLLM's reading of VLLM_ALLOW_RUNTIME_LORA_UPDATING: "true" or "1", any case."""
    return (environ_value or "").strip().lower() in ("true", "1")
