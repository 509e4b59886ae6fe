"""Running one simulator as a process: `llm-gateway simulate`."""

from __future__ import annotations

import uvicorn

from gateway_app.shutdown import quiet_after_shutdown
from gateway_app.simulator.app import build_simulator_app


def serve_simulator(
    engine: str,
    model: str,
    host: str,
    port: int,
    ttft_ms: float = 0.0,
    itl_ms: float = 0.0,
    log_level: str = "warning",
    api_key: str | None = None,
) -> int:
    """Serve a simulated `engine` on host:port until SIGINT or SIGTERM; the exit code is 0."""
    app = build_simulator_app(engine, model, ttft_ms=ttft_ms, itl_ms=itl_ms, api_key=api_key)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level=log_level,
    )
    with quiet_after_shutdown():
        uvicorn.Server(config).run()
    return 0
