"""The contract between the chart and the gateway, checked with the real processes.

Take the routing ConfigMap the chart renders, point each engine's URL at a simulator of the same kind
and model on loopback (nothing else in the map changes), start the real gateway on that file and route
every (model, owned_by), every default and every alias through it: the response must come from the
engine the chart named.

With API keys, the engine credential and the chart's Redis on, the processes are started from what the
chart renders: each command line with Kubernetes' $(VAR) expansion, each variable from its Secret, each
Secret and the ConfigMap laid out as the kubelet mounts them.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gateway_app.auth import hash_key
from gateway_app.config import parse_routing_map
from tests.chart.conftest import EXAMPLES, NAMESPACE, VALUE_SETS, Helm, Rendered, local_engine_keys
from tests.support import (
    ConfigMapVolume,
    RunningProcess,
    free_port,
    start_cli,
    start_gateway,
    start_simulator,
)

ENGINE_HEADER = "x-gateway-engine"


def call(url: str, body: dict[str, Any] | None = None, key: str | None = None) -> tuple[int, dict[str, str], Any]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read().decode(errors="replace")


class SimulatorPool:
    """One simulator per (engine kind, model), shared by every routing map of the module."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.running: dict[tuple[str, str], RunningProcess] = {}

    def url_for(self, kind: str, model: str) -> str:
        if (kind, model) not in self.running:
            self.running[(kind, model)] = start_simulator(kind, model, self.log_dir)
        return self.running[(kind, model)].url

    def stop(self) -> None:
        for process in self.running.values():
            process.stop()


@pytest.fixture(scope="module")
def contract_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("contract")


@pytest.fixture(scope="module")
def simulators(contract_logs: Path) -> Iterator[SimulatorPool]:
    pool = SimulatorPool(contract_logs)
    yield pool
    pool.stop()


@pytest.mark.parametrize("value_set", [*EXAMPLES, "defaults", "all-features", "secured"])
def test_gateway_routes_the_rendered_map(
    helm: Helm, simulators: SimulatorPool, contract_logs: Path, value_set: str
) -> None:
    routing = helm.template(VALUE_SETS[value_set]).routing
    assert [engine for engine in routing["engines"] if "discovery" in engine]  # on by default: kept as rendered
    for engine in routing["engines"]:
        # a simulator of the engine's kind stands in for it (of vllm for a provider's owned_by), reached the
        # way the chart wrote: its root as url or urls, or its /v1 as an OpenAI-compatible base_url
        kind = engine["owned_by"] if engine["owned_by"] in ("vllm", "sglang") else "vllm"
        simulator = simulators.url_for(kind, engine["model"])
        if "base_url" in engine:
            engine["base_url"] = simulator + "/v1"
        elif "urls" in engine:
            engine["urls"] = [simulator]
        else:
            engine["url"] = simulator
    local_engine_keys(routing, contract_logs / f"engine-keys-{value_set}")
    config = contract_logs / f"routes-{value_set}.yaml"
    config.write_text(yaml.safe_dump(routing, sort_keys=False))
    parse_routing_map(config.read_text())  # still the gateway's format after the rewrite

    gateway = start_gateway(config, contract_logs)
    try:
        status, _, listing = call(gateway.url + "/v1/models")
        assert status == 200, listing
        listed = {(card["id"], card["owned_by"]) for card in listing["data"]}

        for engine in routing["engines"]:
            route = (engine["model"], engine["owned_by"])
            assert route in listed, f"{route} missing from /v1/models: {sorted(listed)}"
            asks = [{"model": engine["model"], "owned_by": engine["owned_by"]}]
            if engine.get("default"):
                asks.append({"model": engine["model"]})
            asks += [{"model": alias, "owned_by": engine["owned_by"]} for alias in engine.get("aliases", [])]
            for ask in asks:
                body = {**ask, "messages": [{"role": "user", "content": "What is machine learning?"}], "max_tokens": 4}
                status, headers, answer = call(gateway.url + "/v1/chat/completions", body)
                assert status == 200, f"{ask}: {answer}\n{gateway.log()}"
                assert headers.get(ENGINE_HEADER) == engine["name"], f"{ask} went to {headers.get(ENGINE_HEADER)}"
                assert answer["choices"][0]["message"]["content"]
        if not (os.environ.get("KUBERNETES_SERVICE_HOST") or os.environ.get("LLM_GATEWAY_KUBE_API")):
            # outside a pod the discovery blocks are accepted, and each engine's url is used (above)
            assert "not in a Kubernetes pod" in gateway.log(), gateway.log()
    finally:
        gateway.stop()


# --- API keys, the engine credential and the chart's Redis -----------------------------------------

CLIENT_KEYS = {"team-a": "sk-contract-team-a", "team-b": "sk-contract-team-b"}
ENGINE_KEY = "engine-key-from-the-chart"
REDIS_PASSWORD = "redis-password-from-the-chart"
SECURED_CPU = {
    "auth": {
        "enabled": True,
        "keys": [
            {"name": "team-a", "sha256": hash_key(CLIENT_KEYS["team-a"])},
            {"name": "team-b", "sha256": hash_key(CLIENT_KEYS["team-b"]), "requests_per_minute": 2},
        ],
    },
    "engineApiKey": {"value": ENGINE_KEY},
    "redis": {"deploy": True, "password": REDIS_PASSWORD},
}
VARIABLE = re.compile(r"\$\((\w+)\)")
GATEWAY = "my-llm-llm-gateway"


def container_env(rendered: Rendered, spec: dict[str, Any]) -> dict[str, str]:
    """A container's variables as the kubelet sets them: literal values, and secretKeyRefs read from the
    chart's own Secrets."""
    env = {}
    for item in spec.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = base64.b64decode(rendered.get("Secret", ref["name"])["data"][ref["key"]]).decode()
    return env


def command_line(spec: dict[str, Any], env: dict[str, str], replace: dict[str, str]) -> list[str]:
    """The container's args with $(VAR) expanded like Kubernetes does, and the values after the flags in
    `replace` swapped (--host, --port: loopback instead of the pod's network)."""
    args = [VARIABLE.sub(lambda match: env[match[1]], arg) for arg in spec["args"]]
    for flag, value in replace.items():
        args[args.index(flag) + 1] = value
    return args


def mount_volumes(rendered: Rendered, pod: dict[str, Any], root: Path, edit: dict[str, Any]) -> dict[str, str]:
    """Lay out the container's ConfigMap and Secret volumes (one file each, as the chart mounts them)
    under `root` as the kubelet does, with ..data symlinks; `edit[volume name]` may rewrite a file's text.
    Returns mountPath -> local directory."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    local = {}
    for mount in pod["containers"][0]["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            files = rendered.get("ConfigMap", volume["configMap"]["name"])["data"]
        elif "secret" in volume:
            data = rendered.get("Secret", volume["secret"]["secretName"])["data"]
            files = {item["path"]: base64.b64decode(data[item["key"]]).decode() for item in volume["secret"]["items"]}
        else:
            continue  # emptyDir
        for name, text in files.items():
            ConfigMapVolume(root / mount["name"], name).publish(edit.get(mount["name"], lambda t: t)(text))
        local[mount["mountPath"]] = str(root / mount["name"])
    return local


def start_redis(rendered: Rendered, workdir: Path) -> tuple[subprocess.Popen, int]:
    """redis-server with the chart's arguments, on loopback."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed: run ci/install-system-deps.sh (ci/test.sh does)")
    spec = rendered.get("Deployment", f"{GATEWAY}-redis")["spec"]["template"]["spec"]["containers"][0]
    assert spec["command"] == ["redis-server"]
    port = free_port()
    args = command_line(spec, container_env(rendered, spec), {"--port": str(port)})
    local = ["--bind", "127.0.0.1", "--dir", str(workdir)]  # loopback only; the pod's /data is an emptyDir
    process = subprocess.Popen([binary, *args, *local], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return process, port
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("redis-server with the chart's arguments did not come up")


def redis_keys(port: int, password: str, pattern: str) -> bytes:
    """AUTH and KEYS on one connection (RESP inline commands)."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(f"AUTH {password}\r\nKEYS {pattern}\r\n".encode())
        time.sleep(0.1)
        return sock.recv(65536)


def start_engines(rendered: Rendered, log_dir: Path) -> dict[str, RunningProcess]:
    """Every engine from its Deployment: `--api-key $(ENGINE_API_KEY)`, the variable from its Secret."""
    engines = {}
    for route in rendered.routing["engines"]:
        spec = rendered.get("Deployment", route["name"])["spec"]["template"]["spec"]["containers"][0]
        assert spec["command"] == ["llm-gateway"]  # simulators: the same CLI as in the pod
        port = free_port()
        args = command_line(spec, container_env(rendered, spec), {"--host": "127.0.0.1", "--port": str(port)})
        engines[route["name"]] = start_cli(args, port, "/health", log_dir, f"keyed-{route['name']}")
    return engines


def start_rendered_gateway(
    rendered: Rendered, engines: dict[str, RunningProcess], redis_port: int, root: Path, log_dir: Path
) -> tuple[RunningProcess, str]:
    """The gateway from its Deployment: its files from the mounted volumes (the routing map pointed at the
    simulators), the chart's Redis at the Service's address (mapped to loopback), its variables. Returns the
    process (its url: the API port) and the URL of its metrics port."""
    pod = rendered.get("Deployment", GATEWAY)["spec"]["template"]["spec"]
    spec = pod["containers"][0]

    def to_simulators(text: str) -> str:
        routing = yaml.safe_load(text)
        for engine in routing["engines"]:
            engine["url"] = engines[engine["name"]].url
        return yaml.safe_dump(routing, sort_keys=False)

    port, metrics_port = free_port(), free_port()
    args = command_line(spec, {}, {"--host": "127.0.0.1", "--port": str(port), "--metrics-port": str(metrics_port)})
    for mount_path, local in mount_volumes(rendered, pod, root, {"routes": to_simulators}).items():
        args = [local + arg.removeprefix(mount_path) if arg.startswith(mount_path + "/") else arg for arg in args]
    assert not [arg for arg in args if arg.startswith(("/etc/", "/var/"))], f"a file that is not mounted: {args}"
    at = args.index("--redis-url") + 1
    redis_url = urlsplit(args[at])
    service_port = rendered.get("Service", f"{GATEWAY}-redis")["spec"]["ports"][0]["port"]
    assert (redis_url.hostname, redis_url.port) == (f"{GATEWAY}-redis.{NAMESPACE}.svc.cluster.local", service_port)
    args[at] = redis_url._replace(netloc=f"127.0.0.1:{redis_port}").geturl()
    gateway = start_cli(args, port, "/readyz", log_dir, "keyed-gateway", container_env(rendered, spec))
    return gateway, f"http://127.0.0.1:{metrics_port}"


def run_helm_test_script(rendered: Rendered, models_url: str, api_key: str | None) -> str:
    """The `helm test` pod's script, run here against `models_url`; returns what it printed."""
    (pod,) = rendered.of_kind("Pod")
    spec = pod["spec"]["containers"][0]
    env = {**container_env(rendered, spec), "MODELS_URL": models_url, **({"API_KEY": api_key} if api_key else {})}
    result = subprocess.run(
        [sys.executable, *spec["command"][1:]], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_gateway_enforces_the_rendered_keys_and_engine_credential(
    helm: Helm, contract_logs: Path, tmp_path: Path
) -> None:
    rendered = helm.template(VALUE_SETS["cpu"], values=SECURED_CPU)
    engines: dict[str, RunningProcess] = {}
    gateway: RunningProcess | None = None
    redis_process, redis_port = start_redis(rendered, tmp_path)
    try:
        engines = start_engines(rendered, contract_logs)
        gateway, metrics_url = start_rendered_gateway(
            rendered, engines, redis_port, tmp_path / "volumes", contract_logs
        )
        routes = rendered.routing["engines"]
        body = {"model": routes[0]["model"], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        chat = gateway.url + "/v1/chat/completions"

        # the engines really check their key
        engine_chat = engines[routes[0]["name"]].url + "/v1/chat/completions"
        assert call(engine_chat, body)[0] == 401
        assert call(engine_chat, body, key=ENGINE_KEY)[0] == 200

        # no key or a wrong one: 401; probes and metrics stay open, /metrics on the metrics port only
        for key in (None, "sk-wrong"):
            assert call(gateway.url + "/v1/models", key=key)[0] == 401
            assert call(chat, body, key=key)[0] == 401
        assert call(gateway.url + "/readyz")[0] == 200
        with urllib.request.urlopen(metrics_url + "/metrics", timeout=5) as response:
            assert response.status == 200 and b"llm_gateway_config_engines" in response.read()
        status, headers, answer = call(gateway.url + "/metrics")
        assert status == 404 and headers["content-type"].startswith("application/json"), answer
        assert json.loads(answer)["error"], answer  # the OpenAI error shape

        # a right key: every (model, owned_by) and every default, through the engine the chart named
        status, _, listing = call(gateway.url + "/v1/models", key=CLIENT_KEYS["team-a"])
        assert status == 200, listing
        listed = {(card["id"], card["owned_by"]) for card in listing["data"]}
        for engine in routes:
            assert (engine["model"], engine["owned_by"]) in listed
            asks = [{"model": engine["model"], "owned_by": engine["owned_by"]}]
            asks += [{"model": engine["model"]}] if engine.get("default") else []
            for ask in asks:
                status, headers, answer = call(chat, {**body, **ask}, key=CLIENT_KEYS["team-a"])
                assert status == 200, f"{ask}: {answer}\n{gateway.log()}"
                assert headers.get(ENGINE_HEADER) == engine["name"]

        # team-b's 2 requests per minute, counted in the chart's Redis with the chart's password
        statuses = [call(chat, body, key=CLIENT_KEYS["team-b"])[0] for _ in range(3)]
        assert statuses == [200, 200, 429], gateway.log()
        assert b"{team-b}" in redis_keys(redis_port, REDIS_PASSWORD, "llm-gateway:rl:*")

        # the `helm test` script passes: with a key it finds every route, without one it checks the 401
        assert "ok: " in run_helm_test_script(rendered, gateway.url + "/v1/models", CLIENT_KEYS["team-a"])
        assert "refuses a call without a key" in run_helm_test_script(rendered, gateway.url + "/v1/models", None)
    finally:
        for process in [*engines.values(), *([gateway] if gateway else [])]:
            process.stop()
        redis_process.terminate()
        redis_process.wait(timeout=10)
