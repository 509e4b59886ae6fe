"""Fixtures for the chart's tests: a real `helm`, cached `helm template` renders, cluster probing.

helm comes from $HELM_BIN, else <repo>/.tools/bin/helm, else ci/install-helm.sh installs it there.
Every render is cached for the session: each distinct set of values is templated once.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway_app.config import RoutingMap, parse_routing_map

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "charts" / "llm-gateway"
EXAMPLES_DIR = CHART_DIR / "examples"
ALL_FEATURES = Path(__file__).resolve().parent / "values-all-features.yaml"
SECURED = Path(__file__).resolve().parent / "values-secured.yaml"
INSTALL_HELM = REPO_ROOT / "ci" / "install-helm.sh"

RELEASE = "my-llm"
NAMESPACE = "llm"
# The gateway image's default tag, and the simulators': the chart's appVersion (Chart.yaml is its source).
APP_VERSION: str = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())["appVersion"]
GATEWAY_IMAGE = f"ghcr.io/llm-gateway/llm-gateway:{APP_VERSION}"

# name -> values file (None: the chart's defaults). Every test that loops over "every example" uses this.
VALUE_SETS: dict[str, Path | None] = {
    "defaults": None,
    "example1": EXAMPLES_DIR / "values-example1.yaml",
    "example2": EXAMPLES_DIR / "values-example2.yaml",
    "cpu": EXAMPLES_DIR / "values-cpu.yaml",
    "scale-to-zero": EXAMPLES_DIR / "values-scale-to-zero.yaml",
    "all-features": ALL_FEATURES,
    "secured": SECURED,
}
EXAMPLES = ("example1", "example2", "cpu", "scale-to-zero")


def local_engine_keys(routing: dict[str, Any], directory: Path) -> dict[str, Any]:
    """The routing map with each `api_key_file` pointed at a file under `directory` holding a test key.

    The gateway reads the file when it loads the map, and the pod's path (where the kubelet mounts the
    engine's Secret) does not exist here. The map is changed in place and returned.
    """
    for engine in routing["engines"]:
        if "api_key_file" in engine:
            local = directory / engine["name"] / "api-key"
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_text(f"sk-test-{engine['name']}\n")
            engine["api_key_file"] = str(local)
    return routing


class HelmError(Exception):
    """helm exited non-zero; the message is its stderr."""


@dataclass
class Rendered:
    """The parsed documents of one `helm template`; `key_dir` holds test copies of the engines' key files."""

    docs: list[dict[str, Any]]
    key_dir: Path | None = None

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [doc for doc in self.docs if doc["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = [doc for doc in self.of_kind(kind) if doc["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} named {name!r}, found {len(found)}"
        return found[0]

    @property
    def routing_text(self) -> str:
        """The `routes.yaml` text of the routing ConfigMap."""
        return self.get("ConfigMap", f"{RELEASE}-llm-gateway-routes")["data"]["routes.yaml"]

    @property
    def routing(self) -> dict[str, Any]:
        return yaml.safe_load(self.routing_text)

    def load_routing(self) -> RoutingMap:
        """The routing map through the gateway's loader, which reads each api_key_file: a test key under
        key_dir stands in for the Secret the kubelet mounts in the pod."""
        routing = self.routing
        if self.key_dir is not None:
            local_engine_keys(routing, self.key_dir)
        return parse_routing_map(yaml.safe_dump(routing, sort_keys=False), "routes.yaml")

    def pod_specs(self) -> dict[str, dict[str, Any]]:
        """Every pod spec by owner name: Deployments' templates and bare Pods (the test hook)."""
        specs = {doc["metadata"]["name"]: doc["spec"]["template"]["spec"] for doc in self.of_kind("Deployment")}
        specs.update({doc["metadata"]["name"]: doc["spec"] for doc in self.of_kind("Pod")})
        return specs


@dataclass
class Helm:
    """A helm binary plus a per-session cache of renders."""

    binary: str
    work_dir: Path
    _renders: dict[str, Rendered] = field(default_factory=dict)

    def run(self, *args: str, env: dict[str, str] | None = None, timeout: float = 60) -> str:
        result = subprocess.run(
            [self.binary, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO_ROOT
        )
        if result.returncode != 0:
            raise HelmError(result.stderr.strip() or result.stdout.strip())
        return result.stdout

    def values_file(self, values: dict[str, Any]) -> Path:
        """Write inline values to a file named by their content (so equal values share one file).

        JSON, which is YAML too: every string stays quoted (helm's YAML 1.1 reads a bare n as false).
        """
        text = json.dumps(values, sort_keys=True, indent=1)
        path = self.work_dir / f"values-{hashlib.sha256(text.encode()).hexdigest()[:16]}.yaml"
        if not path.exists():
            path.write_text(text)
        return path

    def template_args(self, *files: Path | None, values: dict[str, Any] | None = None) -> list[str]:
        args = ["template", RELEASE, str(CHART_DIR), "--namespace", NAMESPACE]
        for values_file in files:
            if values_file is not None:
                args += ["-f", str(values_file)]
        if values:
            args += ["-f", str(self.values_file(values))]
        return args

    def template(self, *files: Path | None, values: dict[str, Any] | None = None) -> Rendered:
        """`helm template` with these values files (then inline values), parsed; cached per session."""
        args = self.template_args(*files, values=values)
        key = json.dumps(args)
        if key not in self._renders:
            docs = [doc for doc in yaml.safe_load_all(self.run(*args)) if doc]
            self._renders[key] = Rendered(docs, key_dir=self.work_dir / "engine-keys")
        return self._renders[key]

    def template_error(self, *files: Path | None, values: dict[str, Any] | None = None) -> str:
        """helm's error message for values that must be refused; fails the test if helm accepts them."""
        try:
            self.run(*self.template_args(*files, values=values))
        except HelmError as error:
            return str(error)
        pytest.fail(f"helm template accepted values it should refuse: {values}")


def find_helm() -> str:
    explicit = os.environ.get("HELM_BIN")
    if explicit:
        return explicit
    local = REPO_ROOT / ".tools" / "bin" / "helm"
    if not local.exists():
        result = subprocess.run(["bash", str(INSTALL_HELM)], capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            pytest.exit(f"ci/install-helm.sh failed:\n{result.stderr}", returncode=2)
        local = Path(result.stdout.strip().splitlines()[-1])
    return str(local)


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return Helm(binary=find_helm(), work_dir=tmp_path_factory.mktemp("chart-values"))


@pytest.fixture(scope="session")
def renders(helm: Helm) -> dict[str, Rendered]:
    """Every value set of VALUE_SETS rendered once."""
    return {name: helm.template(path) for name, path in VALUE_SETS.items()}


# --- Cluster tests: run only when KUBECONFIG points at a cluster that answers /version ------------


def cluster_unavailable_reason() -> str | None:
    """None when a cluster is reachable through KUBECONFIG, else why the cluster tests are skipped."""
    kubeconfig = os.environ.get("KUBECONFIG", "")
    if not kubeconfig:
        return "KUBECONFIG is not set (cluster tests need a reachable cluster)"
    first = kubeconfig.split(os.pathsep)[0]
    if not Path(first).is_file():
        return f"KUBECONFIG file {first} does not exist"
    try:
        import pykube

        client = pykube.HTTPClient(pykube.KubeConfig.from_file(first), timeout=5)
        response = client.session.get(client.url.rstrip("/") + "/version", timeout=5)
        response.raise_for_status()
    except Exception as error:  # any failure to reach the API server means "no cluster here"
        return f"cluster in {first} is not reachable: {type(error).__name__}: {error}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    cluster_items = [item for item in items if item.get_closest_marker("cluster")]
    if not cluster_items:
        return
    reason = cluster_unavailable_reason()
    if reason:
        for item in cluster_items:
            item.add_marker(pytest.mark.skip(reason=reason))
