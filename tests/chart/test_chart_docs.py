"""values.yaml, values.schema.json and the chart README describe the same keys."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.chart.conftest import CHART_DIR, VALUE_SETS, Helm

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


def table_keys(heading: str) -> set[str]:
    """The keys in the first column of the README table under `### <heading>`."""
    section = README.split(f"\n### {heading}", 1)[1].split("\n#", 1)[0]
    return {key for row in re.findall(r"^\| (.+?) \|", section, re.MULTILINE) for key in re.findall(r"`([^`]+)`", row)}


def test_every_engine_key_is_documented() -> None:
    """A row of its own in the engines[] table, and a line in values.yaml's comment on engines."""
    engine_keys = set(SCHEMA["definitions"]["engine"]["properties"])
    default_keys = set(SCHEMA["properties"]["engineDefaults"]["properties"])
    values_text = (CHART_DIR / "values.yaml").read_text()
    commented = set(re.findall(r"^#   (\w+) ", values_text, re.MULTILINE))
    rows = table_keys("`engines[]`")
    for key in engine_keys - default_keys:
        assert key in rows, f"engines[].{key} has no row in the README's engines[] table"
        assert key in commented, f"engines[].{key} is not described in values.yaml's comment on engines"


def settings_paths(node: dict[str, Any], prefix: str = "") -> Iterator[str]:
    """Every key of the settings block, nested ones as `parent.key`."""
    for key, child in resolve(node)["properties"].items():
        yield f"{prefix}{key}"
        child = resolve(child)
        if child.get("type") == "object" and "properties" in child:
            yield from settings_paths(child, f"{prefix}{key}.")


def test_every_settings_key_is_documented() -> None:
    """gateway.settings is rendered verbatim, so its keys are documented where users look: the README's
    gateway.settings row (nested keys as `parent.{a,b}`) and values.yaml's comment above `settings: {}`."""
    (row,) = [line for line in README.splitlines() if line.startswith("| `gateway.settings` |")]
    named = set()
    for text in re.findall(r"`([^`]+)`", row):
        if match := re.fullmatch(r"(\w+)\.\{([\w,]+)\}", text):
            named |= {match[1]} | {f"{match[1]}.{key}" for key in match[2].split(",")}
        else:
            named.add(text)
    values_text = (CHART_DIR / "values.yaml").read_text()
    comment = values_text[
        values_text.index("  # -- The routing map's `settings:` block") : values_text.index("  settings: {}")
    ]
    for path in settings_paths(SCHEMA["definitions"]["settings"]):
        assert path in named, f"gateway.settings.{path} is not named in the README's gateway.settings row"
        assert re.search(rf"\b{path.rsplit('.', 1)[-1]}\b", comment), f"gateway.settings.{path}: not in values.yaml"
    balancing = SCHEMA["definitions"]["settings"]["properties"]["balancing"]["enum"]
    assert all(f"`{policy}`" in row and policy in comment for policy in balancing)


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
        if where in ("", ".gateway", ".engineDefaults", ".ingress", ".serviceMonitor", ".networkPolicy", ".auth",
                     ".engineApiKey", ".redis", ".tests", ".grafanaDashboard", ".prometheusRule",
                     ".prometheusRule.errorRatio", ".prometheusRule.noReadyEngine", ".prometheusRule.timeToFirstByte",
                     ".prometheusRule.gatewayRestarts", ".prometheusRule.configReloadFailed", ".persistence"):  # fmt: skip
            assert set(properties) - {"global"} <= set(values), f"{where}: schema keys with no default"

    walk(VALUES, SCHEMA, "")


def resolve(schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        node: Any = SCHEMA
        for part in schema["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        schema = node
    return schema


CREDENTIAL_HEADER = re.compile(r"authorization|bearer|api[-_]?key|x-api|token", re.IGNORECASE)


def test_headers_are_never_suggested_for_credentials() -> None:
    """An engine's headers land in plain text in the routing ConfigMap: no value or example puts a key there."""
    values_text = (CHART_DIR / "values.yaml").read_text()
    start = values_text.index("#   headers ")
    headers_doc = values_text[start : values_text.index("#   timeouts ", start)]
    assert not CREDENTIAL_HEADER.search(headers_doc), headers_doc
    assert "ConfigMap" in headers_doc and "Secret-backed engine credential" in headers_doc, headers_doc
    for name, path in VALUE_SETS.items():
        values = yaml.safe_load(path.read_text()) if path else VALUES
        for entry in values.get("engines", []):
            for header in entry.get("headers", {}):
                assert not CREDENTIAL_HEADER.search(header), f"{name}: engine {entry['name']} sends {header}"
    (note,) = [bullet for bullet in README.split("\n- ") if bullet.startswith("**`headers` are not secret.**")]
    assert "ConfigMap" in note and "Secret-backed engine credential, not headers" in " ".join(note.split())


# An engine for the README's snippets that name a model without listing engines of their own.
SNIPPET_BASE = {"engines": [{"name": "sim", "engine": "simulator", "model": "m", "aliases": ["llama-1b"]}]}
PLACEHOLDER_HASH = re.compile(r"sha256: (\.\.\.|[0-9a-f]+\.\.\.[0-9a-f]+)")


def readme_values_snippets() -> list[tuple[int, str]]:
    """The README's YAML blocks that are chart values (every top-level key a key of values.yaml), by line."""
    snippets = []
    for match in re.finditer(r"```yaml\n(.*?)```", README, re.DOTALL):
        block = yaml.safe_load(match[1])
        if isinstance(block, dict) and set(block) <= set(SCHEMA["properties"]):
            snippets.append((README[: match.start()].count("\n") + 1, match[1]))
    return snippets


def test_readme_has_values_snippets() -> None:
    assert len(readme_values_snippets()) >= 9


@pytest.mark.parametrize(
    ("line", "snippet"), readme_values_snippets(), ids=lambda x: str(x) if isinstance(x, int) else ""
)
def test_readme_values_snippets_render(helm: Helm, line: int, snippet: str) -> None:
    """What the README tells users to put in their values is accepted as written (a hash elided as `...`
    aside): no key the schema refuses, no combination the templates refuse."""
    values = yaml.safe_load(PLACEHOLDER_HASH.sub("sha256: " + "ab" * 32, snippet))
    helm.template(values={**SNIPPET_BASE, **values})
