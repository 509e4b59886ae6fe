"""`llm-gateway serve`: load the routing map (refusing to start on a bad one) and run uvicorn."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import uvicorn

from gateway_app.app import create_app
from gateway_app.config import ConfigError, load_routing_map
from gateway_app.state import GatewayState

# Longer than the idle timeout of common load balancers and ingress controllers (60 s), so that the
# gateway never closes a kept-alive connection that a proxy in front is about to reuse.
KEEP_ALIVE_SECONDS = 75


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    # watchfiles logs every file event at INFO; the reload itself is logged by the watcher.
    logging.getLogger("watchfiles").setLevel(logging.WARNING)


def serve_gateway(config: str, host: str, port: int, log_level: str = "info") -> int:
    configure_logging(log_level)
    path = Path(config)
    try:
        routing_map, raw = load_routing_map(path)
    except ConfigError as error:
        print(f"llm-gateway: refusing to start: {error}", file=sys.stderr)
        return 2
    state = GatewayState(routing_map)
    logging.getLogger("llm_gateway").info(
        "serving %d engines for %d models from %s", len(state.table.engines), len(state.table.models), path
    )
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(state, config_path=path, loaded=raw),
            host=host,
            port=port,
            loop="uvloop",
            http="httptools",
            lifespan="on",
            access_log=False,
            log_level=log_level,
            server_header=False,
            proxy_headers=False,  # the client address is not used; skip parsing X-Forwarded-For per request
            timeout_keep_alive=KEEP_ALIVE_SECONDS,
        )
    )
    server.run()
    return 0
