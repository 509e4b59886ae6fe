"""`llm-gateway serve`: load the routing map and the secrets (refusing to start on a bad one), run uvicorn."""

from __future__ import annotations

import ctypes
import functools
import gc
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn
from starlette.types import ASGIApp

from gateway_app.app import GatewayApp
from gateway_app.auth import load_engine_key, load_keys_file
from gateway_app.client_connections import ConnectionGuard, GuardedHttpProtocol, raise_fd_limit
from gateway_app.config import ClientLimits, ConfigError, load_routing_map
from gateway_app.listener import bind_listener
from gateway_app.log_setup import configure_logging
from gateway_app.request_log import RequestLog
from gateway_app.runtime import MountedFile, Setup
from gateway_app.shutdown import quiet_after_shutdown

# Longer than the idle timeout of common load balancers and ingress controllers (60 s), so that the
# gateway never closes a kept-alive connection that a proxy in front is about to reuse.
KEEP_ALIVE_SECONDS = 75
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
# Allocations (net of frees) of container objects between two young collections. Python's 700 is passed
# every few requests by what requests in flight hold for a moment, each time to find nothing to free;
# this many is reached only by objects that really outlive their request.
GC_YOUNG_THRESHOLD = 10_000
METRICS_LISTENER_LIMITS = ClientLimits(max_connections=32)
log = logging.getLogger("llm_gateway")

if TYPE_CHECKING:
    from gateway_app.tracing import RequestTracer


def load_setup(
    config: Path,
    keys_file: Path | None,
    engine_key_file: Path | None,
    redis_url: str | None,
    request_log: RequestLog,
    otlp_endpoint: str | None = None,
) -> Setup:
    """Load everything the gateway needs, raising ConfigError naming the file and field at fault."""
    routing_map, routing_raw = load_routing_map(config)
    setup = Setup(
        routing_map,
        routing_file=MountedFile(config, routing_raw),
        redis_url=redis_url,
        redis_password=os.environ.get("LLM_GATEWAY_REDIS_PASSWORD") or None,
        request_log=request_log,
        tracer=_tracer(otlp_endpoint) if otlp_endpoint else None,
    )
    if keys_file:
        setup.keys, raw = load_keys_file(keys_file)
        setup.keys_file = MountedFile(keys_file, raw)
    if engine_key_file:
        setup.engine_key, raw = load_engine_key(engine_key_file)
        setup.engine_key_file = MountedFile(engine_key_file, raw)
    return setup


def _tracer(endpoint: str) -> RequestTracer:
    try:
        from gateway_app.tracing import RequestTracer

        return RequestTracer(endpoint)
    except ImportError:
        raise ConfigError(
            "--otlp-endpoint needs the OpenTelemetry packages: install the gateway with its `tracing` extra "
            "from this repository's checkout, e.g. `.venv/bin/pip install -e '.[tracing]'`"
        ) from None


def give_large_buffers_back() -> None:
    """Have glibc return freed large buffers (request bodies) to the system at once.

    By default glibc raises its mmap threshold after the first large buffer is freed, so the next ones
    come from the heap, which it rarely shrinks: after a burst of big bodies the process would keep its
    peak size for good. A fixed threshold keeps every buffer over 128 KiB in its own mapping.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    except (OSError, AttributeError):  # not glibc: its allocator has its own policy
        pass


def keep_collector_off_hot_path() -> None:
    """Spare the requests most of the cyclic garbage collector's work, which they pay for and which finds
    almost nothing to free: reference counting frees what a request leaves behind.

    What is loaded at start-up (modules, the routing map's models: tens of thousands of objects) is
    moved out of the collector's sight (`gc.freeze`) instead of being walked by every full collection,
    and young collections run after `GC_YOUNG_THRESHOLD` allocations instead of 700.
    """
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, oldest)


def uvicorn_config(
    app: ASGIApp,
    guard_for: Callable[[int | None], ConnectionGuard],
    log_level: str,
    shutdown_grace: float,
    loop: str = "uvloop",
) -> uvicorn.Config:
    """How every gateway listener runs (`serve` and `demo`): the guarded httptools protocol, our logging.

    `guard_for(port)` is the connection guard of the listener on that port."""
    return uvicorn.Config(
        app,
        loop=loop,
        http=functools.partial(GuardedHttpProtocol, guard_for=guard_for),  # type: ignore[arg-type]
        ws="none",
        lifespan="on",
        access_log=False,
        log_level=log_level,
        log_config=None,  # keep the logging set up above (JSON or text) for uvicorn's own lines too
        server_header=False,
        proxy_headers=False,  # the client address is not used; skip parsing X-Forwarded-For per request
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        # On SIGTERM uvicorn closes the listening socket at once (so readiness fails and no new
        # connection is accepted) and lets requests in flight, streams included, run this long.
        timeout_graceful_shutdown=shutdown_grace,  # type: ignore[arg-type]  # hinted int; any number works
    )


def serve_gateway(
    config: str,
    host: str,
    port: int,
    log_level: str = "info",
    keys_file: str | None = None,
    engine_key_file: str | None = None,
    redis_url: str | None = None,
    shutdown_grace: float = 110.0,
    log_format: str | None = None,
    access_log: bool = True,
    otlp_endpoint: str | None = None,
    metrics_port: int | None = None,
) -> int:
    log_format = configure_logging(log_level, log_format)
    try:
        setup = load_setup(
            Path(config),
            Path(keys_file) if keys_file else None,
            Path(engine_key_file) if engine_key_file else None,
            redis_url,
            RequestLog(fmt=log_format, enabled=access_log),
            otlp_endpoint,
        )
    except ConfigError as error:
        print(f"llm-gateway: refusing to start: {error}", file=sys.stderr)
        return 2
    if metrics_port is not None and (metrics_port == port or not 1 <= metrics_port <= 65535):
        print(f"llm-gateway: --metrics-port must be a port from 1 to 65535 other than --port ({port})", file=sys.stderr)
        return 2
    sockets = []
    for listen_port in (port, metrics_port):
        if listen_port is None:
            continue
        try:
            sockets.append(bind_listener(host, listen_port))
        except OSError as error:
            print(
                f"llm-gateway serve: cannot listen on {host}:{listen_port}: {error.strerror or error}", file=sys.stderr
            )
            for sock in sockets:
                sock.close()
            return 1
    fd_limit = raise_fd_limit()
    give_large_buffers_back()
    keep_collector_off_hot_path()
    app = GatewayApp(setup, metrics_port)
    guard = ConnectionGuard(app.client_limits, setup.metrics, fd_limit)
    # The metrics port keeps a small budget of its own: a flood on the API port never locks out Prometheus.
    metrics_guard = ConnectionGuard(lambda: METRICS_LISTENER_LIMITS, setup.metrics, fd_limit, report=False)
    routing_map = setup.routing_map
    log.info(
        "serving %d engines for %d models from %s on %s:%d%s; API keys %s; rate limits in %s; "
        "at most %d client connections (open-file limit %d)",
        len(routing_map.engines),
        len({engine.model for engine in routing_map.engines}),
        config,
        host,
        port,
        f" (metrics on port {metrics_port})" if metrics_port else "",
        f"on ({len(setup.keys)} keys)" if setup.keys is not None else "off",
        "Redis" if redis_url else "process memory",
        guard.max_connections,
        fd_limit,
    )
    if setup.keys is not None and len(setup.keys) == 0:
        log.warning("the keys file %s lists no keys: every request will be refused with 401", keys_file)
    server = uvicorn.Server(
        uvicorn_config(
            app,
            lambda local_port: metrics_guard if local_port == metrics_port else guard,
            log_level,
            shutdown_grace,
        )
    )
    with quiet_after_shutdown():  # exit 0 after a clean shutdown on SIGTERM, as Kubernetes expects
        server.run(sockets=sockets)
    return 0
