"""The Kubernetes definitions that values.schema.json embeds, derived from the Kubernetes OpenAPI schemas.

Values such as `affinity`, `tolerations`, `env` or `extraVolumes` are copied into pod specs verbatim, so the
chart checks them with Kubernetes' own definitions (the strict schemas that kubernetes-validate bundles, of
the oldest Kubernetes version the tests cover): a misspelt `nodeAfinity` or an `env` value that is not a
string is refused by `helm install`, not by the API server. Descriptions are dropped to keep the file
small. test_chart_schema.py checks that values.schema.json holds exactly these definitions; after a
change of ROOTS or VERSION, rewrite them with:

    .venv/bin/python -m tests.chart.kubernetes_definitions
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes_validate

from tests.chart.conftest import CHART_DIR

VERSION = "1.30.0"
PREFIX = "io.k8s."
# The Kubernetes types the values use (their dependencies come along).
ROOTS = (
    "io.k8s.api.core.v1.Affinity",
    "io.k8s.api.core.v1.Container",
    "io.k8s.api.core.v1.EnvFromSource",
    "io.k8s.api.core.v1.EnvVar",
    "io.k8s.api.core.v1.LocalObjectReference",
    "io.k8s.api.core.v1.PodSecurityContext",
    "io.k8s.api.core.v1.Probe",
    "io.k8s.api.core.v1.SecurityContext",
    "io.k8s.api.core.v1.Toleration",
    "io.k8s.api.core.v1.TopologySpreadConstraint",
    "io.k8s.api.core.v1.Volume",
    "io.k8s.api.core.v1.VolumeMount",
    "io.k8s.api.networking.v1.NetworkPolicyPeer",
)
SCHEMA_FILE = CHART_DIR / "values.schema.json"


def kubernetes_definitions(version: str = VERSION) -> dict[str, Any]:
    """Every definition in the strict schemas of `version`, by its OpenAPI name."""
    folder = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{version}-local-strict"
    return json.loads((folder / "_definitions.json").read_text())["$defs"]


def _simplify(node: Any) -> Any:
    """Descriptions dropped; references pointed at values.schema.json's own definitions."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "description":
                continue
            if key == "$ref":
                value = "#/definitions/" + value.rsplit("/", 1)[-1]
            out[key] = _simplify(value)
        return out
    if isinstance(node, list):
        return [_simplify(item) for item in node]
    return node


def _references(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["$ref"].rsplit("/", 1)[-1]} if "$ref" in node else set()
        for value in node.values():
            found |= _references(value)
        return found
    if isinstance(node, list):
        return set().union(*(_references(item) for item in node)) if node else set()
    return set()


def derive(roots: tuple[str, ...] = ROOTS, version: str = VERSION) -> dict[str, Any]:
    """The definitions of `roots` and of everything they refer to, simplified."""
    source = kubernetes_definitions(version)
    wanted: dict[str, Any] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in wanted:
            continue
        wanted[name] = _simplify(source[name])
        todo.extend(_references(source[name]))
    return dict(sorted(wanted.items()))


def write_schema() -> None:
    """Replace the io.k8s.* definitions of values.schema.json with freshly derived ones.

    They are written one per line at the top of `definitions`, so that the hand-written rest of the file
    keeps its layout.
    """
    lines = [line for line in SCHEMA_FILE.read_text().splitlines() if not line.startswith(f'    "{PREFIX}')]
    at = lines.index('  "definitions": {') + 1
    generated = [f"    {json.dumps(name)}: {json.dumps(body, ensure_ascii=False)}," for name, body in derive().items()]
    SCHEMA_FILE.write_text("\n".join(lines[:at] + generated + lines[at:]) + "\n")


if __name__ == "__main__":
    write_schema()
