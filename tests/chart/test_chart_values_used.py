"""A value the user sets reaches a rendered object, or `helm template` refuses it naming it: never a no-op.

Every key of values.schema.json is read by a template (no key that only looks like a setting), and every
object level of the schema refuses unknown keys, so a typo such as `engines[0].replica` or
`gateway.resorces` is an error naming it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from fnmatch import fnmatch
from typing import Any

import pytest

from tests.chart.conftest import CHART_DIR, Helm

SCHEMA = json.loads((CHART_DIR / "values.schema.json").read_text())
TEMPLATES = "\n".join(path.read_text() for path in sorted((CHART_DIR / "templates").rglob("*")) if path.is_file())
TYPO = "zzUnknownKey"

# Subtrees a template writes whole (toYaml/toJson), so their own keys never appear in a template: where.
VERBATIM = {
    "global": "helm's own, for subcharts",
    "gateway.settings": "the routing map's settings block (tests/chart/test_chart_schema.py matches its keys)",
    "engines[].timeouts": "the routing map's engine timeouts",
    "engines[].concurrency": "the routing map's engine concurrency",
    "auth.keys[]": "the keys file in the Secret",
    "httpRoute.parentRefs[]": "the HTTPRoute's parentRefs",
    "httpRoute.timeouts": "the HTTPRoute rule's timeouts",
    "*.resources": "a container's resources (merged over the preset's for engines)",
}


def verbatim(where: str) -> bool:
    return any(fnmatch(where, subtree) or fnmatch(where, f"{subtree}.*") for subtree in VERBATIM)


def _resolve(node: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The node behind any chain of $refs, and whether the chain passes through a Kubernetes definition or a
    string map (copied into objects whole, checked by Kubernetes' own schema)."""
    kubernetes = False
    while "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        kubernetes |= name.startswith("io.k8s.") or name == "stringMap"
        target: Any = SCHEMA
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node, kubernetes


def chart_levels(node: dict[str, Any] = SCHEMA, path: tuple[str | int, ...] = ()) -> Iterator[tuple[tuple[str | int, ...], dict[str, Any]]]:  # fmt: skip
    """Every object level of the chart's own schema (not the embedded Kubernetes types) with its properties;
    list items are path element 0."""
    node, kubernetes = _resolve(node)
    if kubernetes:
        return
    if "properties" in node:
        yield path, node
        for key, child in node["properties"].items():
            yield from chart_levels(child, (*path, key))
    for combinator in ("anyOf", "allOf", "oneOf"):
        for child in node.get(combinator, []):
            yield from chart_levels(child, path)
    if isinstance(node.get("items"), dict):
        yield from chart_levels(node["items"], (*path, 0))


def dotted(path: tuple[str | int, ...]) -> str:
    return ".".join(str(part) for part in path).replace(".0", "[]")


def test_every_schema_key_is_read_by_a_template() -> None:
    """A key the schema accepts but no template reads would be dropped without a word. Keys are looked up by
    name (`.key` or "key" in a template); a verbatim subtree counts as read through its parent."""
    unread = []
    for path, level in chart_levels():
        for key in level["properties"]:
            if verbatim(dotted((*path, key))):
                continue
            if not re.search(rf'\.{re.escape(key)}\b|"{re.escape(key)}"', TEMPLATES):
                unread.append(dotted((*path, key)))
    assert not unread, f"schema keys no template reads: {unread}"
    for subtree in VERBATIM:
        key = subtree.removesuffix("[]").rsplit(".", 1)[-1]  # the subtree itself is read
        assert re.search(rf"\.{key}\b", TEMPLATES) or subtree == "global", subtree


def test_every_object_level_refuses_unknown_keys(helm: Helm) -> None:
    """One render with an unknown key at every object level of the schema (engines[0], engines[0].lora,
    gateway.autoscaling, ...): helm refuses each, naming its path."""
    levels = [path for path, _ in chart_levels()]
    assert len(levels) > 80  # the walk reaches every level, list items included
    values: dict[str, Any] = {}
    for path in levels:
        node: Any = values
        for at, part in enumerate(path):
            empty: Any = [] if at + 1 < len(path) and isinstance(path[at + 1], int) else {}
            if isinstance(part, int):
                if not node:
                    node.append(empty)
                node = node[0]
            else:
                node = node.setdefault(part, empty)
        node[TYPO] = 1
    message = helm.template_error(values=values)
    refused = set(re.findall(rf"at '([^']*)': additional properties '{TYPO}' not allowed", message))
    missing = {"/" + "/".join(str(p) for p in path) if path else "" for path in levels} - refused
    assert not missing, f"object levels that accept an unknown key: {sorted(missing)}"


@pytest.mark.parametrize(
    ("values", "path", "key"),
    [
        ({"engines": [{"name": "a", "engine": "vllm", "model": "m", "replica": 2}]}, "/engines/0", "replica"),
        ({"gateway": {"resorces": {"limits": {"memory": "1Gi"}}}}, "/gateway", "resorces"),
        ({"engineDefaults": {"modelStorage": {"sizelimit": "10Gi"}}}, "/engineDefaults/modelStorage", "sizelimit"),
        ({"engineDefaults": {"affinity": {"nodeAfinity": {}}}}, "/engineDefaults/affinity", "nodeAfinity"),
    ],
)
def test_typos_are_refused_naming_them(helm: Helm, values: dict[str, Any], path: str, key: str) -> None:
    message = helm.template_error(values=values)
    assert f"at '{path}': additional properties '{key}' not allowed" in message, message


# --- The simulator preset's image -------------------------------------------------------------------------

DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("preset", "gateway", "image"),
    [
        ({}, {}, "ghcr.io/llm-gateway/llm-gateway:0.1.0"),
        ({}, {"tag": "0.3.0"}, "ghcr.io/llm-gateway/llm-gateway:0.3.0"),
        ({"tag": "0.2.0"}, {}, "ghcr.io/llm-gateway/llm-gateway:0.2.0"),
        ({"tag": "0.2.0"}, {"tag": "0.3.0", "digest": DIGEST}, "ghcr.io/llm-gateway/llm-gateway:0.2.0"),
        ({"digest": DIGEST}, {}, f"ghcr.io/llm-gateway/llm-gateway@{DIGEST}"),
        ({"repository": "example.com/sim", "tag": "1"}, {}, "example.com/sim:1"),
    ],
)
def test_simulator_preset_fields_fall_back_one_by_one(helm: Helm, preset: dict[str, str], gateway: dict[str, str], image: str) -> None:  # fmt: skip
    """enginePresets.simulator.image's empty fields come from gateway.image: a tag or digest of its own is a
    version of the gateway image for the simulators, and the gateway keeps its own."""
    values = {"enginePresets": {"simulator": {"image": preset}}, "gateway": {"image": gateway}}
    rendered = helm.template(values=values)
    spec = rendered.get("Deployment", "sim-llama-32-1b")["spec"]["template"]["spec"]
    assert spec["containers"][0]["image"] == image
    own = rendered.get("Deployment", "my-llm-llm-gateway")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert own.endswith(gateway.get("tag", "0.1.0") + (f"@{DIGEST}" if "digest" in gateway else ""))


def test_a_latest_simulator_preset_is_refused(helm: Helm) -> None:
    message = helm.template_error(values={"enginePresets": {"simulator": {"image": {"tag": "latest"}}}})
    assert "llm-gateway:latest is not allowed" in message
