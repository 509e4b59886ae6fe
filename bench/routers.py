"""What stands in front of the replicas in prefix_routing.py: our gateway with one balancing policy, or a
Rust router (SGLang's, vLLM's) installed from PyPI into this interpreter's environment."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
from dataclasses import dataclass

from processes import REPO_ROOT, Pinning, ProcessGroup, free_port, http_ok, start_gateway


@dataclass(frozen=True)
class RustRouter:
    key: str  # as --targets names it
    package: str  # on PyPI
    module: str  # `python -m <module>.launch_router`
    log_level: str  # their --log-level choices differ


RUST_ROUTERS = {
    "sglang": RustRouter("sglang", "sglang-router", "sglang_router", "warn"),
    "vllm-router": RustRouter("vllm-router", "vllm-router", "vllm_router", "warning"),
}
GATEWAY_POLICIES = ("round_robin", "power_of_two", "cache_aware")
RUST_POLICY = "cache_aware"


@dataclass(frozen=True)
class Target:
    name: str  # in the tables: the gateway's policy, or "<router> cache_aware"
    router: RustRouter | None  # None: our gateway
    policy: str


def gateway_policies() -> tuple[str, ...]:
    """The `settings.balancing` values this tree's gateway accepts (from its config model)."""
    code = "import typing; from gateway_app.config import Settings; print(*typing.get_args(Settings.model_fields['balancing'].annotation))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    return tuple(done.stdout.split())


def router_version(router: RustRouter) -> str | None:
    if importlib.util.find_spec(router.module) is None:
        return None
    return importlib.metadata.version(router.package)


def ensure_router(router: RustRouter, install: bool) -> tuple[str | None, str]:
    """The router's version when it can run here, else None; and a line saying what happened."""
    version = router_version(router)
    if version is not None:
        return version, f"{router.package} {version} installed"
    if not install:
        return (
            None,
            f"{router.package} is not installed: {sys.executable} -m pip install {router.package} (or --install-routers)",
        )
    print(f"installing {router.package} into {sys.prefix} ...", flush=True)
    done = subprocess.run([sys.executable, "-m", "pip", "install", router.package], capture_output=True, text=True)
    importlib.invalidate_caches()
    version = router_version(router)
    if done.returncode != 0 or version is None:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return None, f"pip install {router.package} failed: {' / '.join(tail)}"
    return version, f"{router.package} {version} installed just now"


def start_front(
    group: ProcessGroup, pinning: Pinning, target: Target, model: str, replica_urls: list[str]
) -> tuple[subprocess.Popen[bytes], str]:
    """The target in front of `replica_urls`, on a free loopback port, ready when this returns."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    if target.router is None:
        urls = ", ".join(f'"{u}"' for u in replica_urls)
        routes = (
            f"settings: {{balancing: {target.policy}}}\n"
            f"engines:\n  - {{name: chat, model: {model}, owned_by: vllm, urls: [{urls}]}}\n"
        )
        return start_gateway(group, "gateway", pinning, routes, port), url
    router = target.router
    argv = [
        sys.executable,
        "-m",
        f"{router.module}.launch_router",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--worker-urls",
        *replica_urls,
        "--policy",
        target.policy,
        "--prometheus-host",
        "127.0.0.1",
        "--prometheus-port",
        str(free_port()),
        "--log-level",
        router.log_level,
    ]
    proc = group.start(router.key, argv, pinning.gateway)
    group.wait_ready(router.key, proc, http_ok(f"{url}/health"))
    return proc, url
