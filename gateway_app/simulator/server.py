"""Running one simulator as a process: `llm-gateway simulate`."""

from __future__ import annotations

import socket
import sys

import uvicorn

from gateway_app.listener import bind_listener, http_url
from gateway_app.shutdown import quiet_after_shutdown
from gateway_app.simulator.app import build_simulator_app
from gateway_app.simulator.engine_model import GpuProfile


class _AnnouncingServer(uvicorn.Server):
    """A uvicorn server that prints one line once it accepts connections."""

    def __init__(self, config: uvicorn.Config, ready_line: str) -> None:
        super().__init__(config)
        self.ready_line = ready_line

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            print(self.ready_line, flush=True)


def serve_simulator(
    engine: str,
    model: str,
    host: str,
    port: int,
    ttft_ms: float = 0.0,
    itl_ms: float = 0.0,
    log_level: str = "warning",
    api_key: str | None = None,
    gpu: GpuProfile | None = None,
    lora_modules: dict[str, str] | None = None,
    runtime_lora: bool = False,
) -> int:
    """Serve a simulated `engine` on host:port until SIGINT or SIGTERM; the exit code is 0, or 1 if the
    address cannot be bound (a busy port, an unknown host). With `gpu`, the engine model sets the pace
    instead of `ttft_ms`/`itl_ms`."""
    try:
        sock = bind_listener(host, port)
    except OSError as error:
        print(f"llm-gateway simulate: cannot listen on {host}:{port}: {error.strerror or error}", file=sys.stderr)
        return 1
    bound_port = sock.getsockname()[1]
    app = build_simulator_app(
        engine,
        model,
        ttft_ms=ttft_ms,
        itl_ms=itl_ms,
        api_key=api_key,
        gpu=gpu,
        lora_modules=lora_modules,
        runtime_lora=runtime_lora,
    )
    config = uvicorn.Config(
        app,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level=log_level,
    )
    ready_line = f"llm-gateway simulate: simulated {engine} engine serving {model} on {http_url(host, bound_port)}"
    with sock, quiet_after_shutdown():
        _AnnouncingServer(config, ready_line).run(sockets=[sock])
    return 0
