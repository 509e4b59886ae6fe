"""values.yaml, values.schema.json and the chart README describe the same keys."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import yaml

from tests.chart.conftest import CHART_DIR

VALUES = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
SCHEMA = json.loads((CHART_DIR / "values.schema.json").read_text())
README = (CHART_DIR / "README.md").read_text()
DOCUMENTED = set(re.findall(r"`([A-Za-z][\w.\[\]]*)`", README))

# Maps whose keys are data (annotations, labels, resource names), not chart settings.
OPAQUE = {"resources", "podSecurityContext", "securityContext", "annotations", "settings"}


def leaf_paths(node: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(node, dict) and node and prefix.rsplit(".", 1)[-1] not in OPAQUE:
        for key, value in node.items():
            yield from leaf_paths(value, f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix


def test_every_value_is_documented_in_the_readme() -> None:
    missing = []
    for path in leaf_paths({k: v for k, v in VALUES.items() if k != "engines"}):
        parts = path.split(".")
        # a key is documented by itself or by its parent row (e.g. enginePresets.vllm.image)
        if not any(".".join(parts[:n]) in DOCUMENTED for n in range(len(parts), 0, -1) if n > 1 or len(parts) == 1):
            missing.append(path)
    assert not missing, f"values without a README row: {missing}"


def test_every_engine_key_is_documented() -> None:
    engine_keys = set(SCHEMA["definitions"]["engine"]["properties"])
    default_keys = set(SCHEMA["properties"]["engineDefaults"]["properties"])
    for key in engine_keys - default_keys:
        assert f"`{key}`" in README, f"engines[].{key} has no README row"


def test_schema_and_values_agree() -> None:
    """Every default in values.yaml is allowed by the schema's keys, and the schema has no stale keys."""

    def walk(values: dict[str, Any], schema: dict[str, Any], where: str) -> None:
        schema = resolve(schema)
        properties = schema.get("properties", {})
        if schema.get("additionalProperties") is False:
            assert set(values) <= set(properties), f"{where}: {set(values) - set(properties)} not in the schema"
        for key, value in values.items():
            if isinstance(value, dict) and key in properties and key not in OPAQUE:
                walk(value, properties[key], f"{where}.{key}")
        if where in ("", ".gateway", ".engineDefaults", ".ingress", ".serviceMonitor", ".networkPolicy"):
            assert set(properties) - {"global"} <= set(values), f"{where}: schema keys with no default"

    walk(VALUES, SCHEMA, "")


def resolve(schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        node: Any = SCHEMA
        for part in schema["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        schema = node
    return schema
