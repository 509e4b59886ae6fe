"""`llm-gateway demo`: the tutorial's topology on one machine with no GPU.

Three simulated engines (vLLM and SGLang serving Llama-3.2-1B-Instruct, vLLM serving
Phi-tiny-MoE-instruct) and the gateway, all in one process and one event loop; Ctrl-C stops them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import sys
from collections.abc import Iterator

import uvicorn
import yaml
from starlette.types import ASGIApp

from gateway_app.app import GatewayApp
from gateway_app.client_connections import ConnectionGuard, raise_fd_limit
from gateway_app.config import parse_routing_map
from gateway_app.listener import bind_listener
from gateway_app.log_setup import configure_logging
from gateway_app.request_log import RequestLog
from gateway_app.runtime import Setup
from gateway_app.server import KEEP_ALIVE_SECONDS, uvicorn_config
from gateway_app.simulator import build_simulator_app

LLAMA = "meta-llama/Llama-3.2-1B-Instruct"
PHI = "/models/Phi-tiny-MoE-instruct"
# (engine name, simulated engine, model, default for its model)
DEMO_ENGINES = (
    ("vllm-llama-32-1b", "vllm", LLAMA, True),
    ("sglang-llama-32-1b", "sglang", LLAMA, False),
    ("vllm-phi-tiny-moe", "vllm", PHI, True),
)


class _InProcessServer(uvicorn.Server):
    """A uvicorn server that leaves signals to the demo, which stops every server at once."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _server(app: ASGIApp) -> _InProcessServer:
    return _InProcessServer(
        uvicorn.Config(
            app,
            loop="none",
            http="httptools",
            lifespan="auto",
            access_log=False,
            log_level="warning",
            server_header=False,
            timeout_keep_alive=KEEP_ALIVE_SECONDS,
        )
    )


def _curl_examples(base: str) -> str:
    def chat(**fields: object) -> str:
        return f"  curl {base}/v1/chat/completions -H 'Content-Type: application/json' -d '{json.dumps(fields)}'"

    def ask(text: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": text}]

    return "\n".join(
        [
            f"  curl {base}/v1/models",
            chat(model=LLAMA, messages=ask("What is machine learning?"), max_tokens=100),
            chat(model=LLAMA, owned_by="sglang", messages=ask("What is machine learning?"), max_tokens=100),
            chat(model=PHI, messages=ask("What is a mixture of experts?"), max_tokens=100),
            chat(model=LLAMA, messages=ask("Explain quantum computing"), stream=True),
        ]
    )


async def _run(host: str, port: int, ttft_ms: float, itl_ms: float) -> None:
    gateway_socket = bind_listener(host, port)  # first, so a busy port fails before anything starts
    servers: list[tuple[_InProcessServer, socket.socket]] = []
    engines = []
    for name, kind, model, default in DEMO_ENGINES:
        sock = bind_listener("127.0.0.1", 0)
        servers.append((_server(build_simulator_app(kind, model, ttft_ms=ttft_ms, itl_ms=itl_ms)), sock))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        engines.append({"name": name, "model": model, "owned_by": kind, "url": url, "default": default})
    routing_yaml = yaml.safe_dump({"engines": engines}, sort_keys=False)
    app = GatewayApp(Setup(parse_routing_map(routing_yaml), request_log=RequestLog(fmt="text")))
    guard = ConnectionGuard(app.client_limits, app.setup.metrics, raise_fd_limit())
    gateway = _InProcessServer(uvicorn_config(app, lambda port: guard, "warning", shutdown_grace=5.0, loop="none"))
    servers.append((gateway, gateway_socket))

    loop = asyncio.get_running_loop()

    def stop_all() -> None:
        for server, _ in servers:
            server.should_exit = True

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop_all)
    tasks = [asyncio.create_task(server.serve(sockets=[sock])) for server, sock in servers]
    while not all(server.started for server, _ in servers):
        if any(task.done() for task in tasks):
            break
        await asyncio.sleep(0.05)
    shown_host = "localhost" if host in ("0.0.0.0", "127.0.0.1", "::", "::1") else host  # what a browser can open
    print(f"llm-gateway demo: gateway on http://{shown_host}:{port}", flush=True)
    for name, kind, model, default in DEMO_ENGINES:
        print(f"  engine {name}: simulated {kind} serving {model}{' (default)' if default else ''}")
    print("Try:\n" + _curl_examples(f"http://{shown_host}:{port}") + "\nCtrl-C stops everything.", flush=True)
    await asyncio.gather(*tasks)


def run_demo(host: str = "127.0.0.1", port: int = 8000, ttft_ms: float = 50.0, itl_ms: float = 20.0) -> int:
    configure_logging("warning", "text")
    try:
        import uvloop

        uvloop.run(_run(host, port, ttft_ms, itl_ms))
    except OSError as error:
        print(f"llm-gateway demo: cannot listen on {host}:{port}: {error.strerror or error}", file=sys.stderr)
        return 1
    print("llm-gateway demo: stopped.")
    return 0
