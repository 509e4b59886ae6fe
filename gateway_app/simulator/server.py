"""Running one simulator as a process: `llm-gateway simulate`."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import uvicorn

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
    with _quiet_after_shutdown():
        uvicorn.Server(config).run()
    return 0


@contextmanager
def _quiet_after_shutdown() -> Iterator[None]:
    """Let uvicorn's graceful shutdown be the whole response to a signal.

    uvicorn catches SIGINT/SIGTERM, shuts down, restores the handlers it found and raises the signal
    again so that they run. With the default handlers that would kill the process (or raise
    KeyboardInterrupt) after a clean shutdown; these handlers make the re-raise a no-op instead.
    """

    def already_handled(signum: int, frame: FrameType | None) -> None:
        pass

    previous = {sig: signal.signal(sig, already_handled) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
