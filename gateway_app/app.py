"""The gateway's HTTP surface: the proxied OpenAI paths plus the endpoints a vLLM server also has.

To a client the gateway is one vLLM server: `/v1/models`, `/health`, `/version` and `/metrics` answer
here, and every JSON route that names a `model` is forwarded to the engine serving it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence

import orjson
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway_app import __version__
from gateway_app.auth import Unauthorized, may_use
from gateway_app.config_watcher import WatchedFile
from gateway_app.discovery import KubernetesAPI
from gateway_app.endpoints import HealthChecker
from gateway_app.errors import GatewayError, InternalError, MethodNotAllowed, ModelNotFound, NotFound
from gateway_app.proxy import ProxyEndpoint
from gateway_app.request_id import RequestIdMiddleware
from gateway_app.state import GatewayState
from gateway_app.upstream import create_session

log = logging.getLogger("llm_gateway.app")

# JSON routes of vLLM and SGLang that carry `model` in their body.
PROXIED_PATHS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/rerank",
    "/v1/score",
    "/rerank",
    "/v2/rerank",
    "/score",
    "/pooling",
    "/classify",
    "/tokenize",
    "/detokenize",
)


def _json(data: object, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def _error(error: GatewayError, headers: dict[str, str] | None = None) -> Response:
    return Response(error.body(), status_code=error.status, media_type="application/json", headers=headers)


class MetricsPortDispatch:
    """Requests that arrive on the metrics port see only `/metrics`; everything else sees the API.

    One server and one event loop serve both ports: a separate port is what lets a NetworkPolicy and the
    Ingress keep `/metrics` (key names, traffic, engine URLs) away from API clients.
    """

    def __init__(self, api: ASGIApp, metrics: ASGIApp, metrics_port: int) -> None:
        self.api, self.metrics, self.metrics_port = api, metrics, metrics_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = scope.get("server")
        if scope["type"] == "http" and server is not None and server[1] == self.metrics_port:
            await self.metrics(scope, receive, send)
        else:
            await self.api(scope, receive, send)


def create_app(state: GatewayState, watched: Sequence[WatchedFile] = (), metrics_port: int | None = None) -> ASGIApp:
    """Build the app; the `watched` files (routing map, keys, engine credential) are hot-reloaded.

    With `metrics_port`, `/metrics` is served on that port only, and the API port answers it with 404.
    """

    async def visible_cards(request: Request) -> list[dict]:
        """The cards this client may use (all of them with authentication off)."""
        client = state.authenticate(request.scope["headers"])
        cards = await state.catalog.cards()
        allowed = client.allowed_models
        if allowed is None:
            return cards
        aliases = state.table.aliases
        return [card for card in cards if may_use(allowed, card["id"], aliases.get(card["id"], card["id"]))]

    async def list_models(request: Request) -> Response:
        try:
            return _json({"object": "list", "data": await visible_cards(request)})
        except Unauthorized as error:
            return _unauthorized(error)

    async def get_model(request: Request) -> Response:
        model_id = request.path_params["model_id"]
        try:
            cards = await visible_cards(request)
        except Unauthorized as error:
            return _unauthorized(error)
        for card in cards:
            if card["id"] == model_id:
                return _json(card)
        return _error(ModelNotFound(f"The model `{model_id}` does not exist.", param="model"))

    def _unauthorized(error: Unauthorized) -> Response:
        state.metrics.rejected.labels("auth", "").inc()
        return _error(error, {"WWW-Authenticate": "Bearer"})

    async def healthz(request: Request) -> Response:
        return Response(status_code=200)

    async def readyz(request: Request) -> Response:
        table = state.table
        now = time.monotonic()
        reachable = sum(1 for e in table.engines if any(p.available(now) for p in e.pool.endpoints))
        ready = reachable > 0 or not table.settings.ready_requires_engine
        return _json(
            {
                "status": "ready" if ready else "no engine reachable",
                "engines": len(table.engines),
                "engines_reachable": reachable,
            },
            status=200 if ready else 503,
        )

    async def version(request: Request) -> Response:
        return _json({"version": __version__})

    async def metrics(request: Request) -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 405:
            return _error(
                MethodNotAllowed(f"Method {request.method} is not allowed on {request.url.path}."), exc.headers
            )
        if exc.status_code == 404:
            return _error(NotFound(f"There is no route {request.method} {request.url.path}.", code="not_found"))
        error = GatewayError(str(exc.detail))
        error.status = exc.status_code
        return _error(error, exc.headers)

    async def unexpected_error(request: Request, exc: Exception) -> Response:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error(InternalError("Internal gateway error."))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state.session = create_session()
        health = HealthChecker(
            state.endpoints, lambda: state.session, lambda: state.table.settings.health, lambda: dict(state.engine_auth)
        )
        tasks = [asyncio.create_task(watcher.run()) for watcher in watched]
        tasks.append(asyncio.create_task(health.run()))
        tasks.append(asyncio.create_task(state.request_log.run()))
        state.start_discovery(KubernetesAPI.from_environment())
        try:
            yield
        finally:
            if state.discovery is not None:
                await state.discovery.stop()
            health.stop()
            state.request_log.stop()
            for watcher in watched:
                watcher.stop()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
                    await asyncio.wait_for(task, timeout=5)
            await state.limiter.close()
            if state.tracer is not None:
                await asyncio.to_thread(state.tracer.shutdown)
            await state.session.close()

    routes = [Route(path, ProxyEndpoint(state, path), methods=["POST"]) for path in PROXIED_PATHS]
    routes += [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/health", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/version", version, methods=["GET"]),
    ]
    metrics_route = Route("/metrics", metrics, methods=["GET"])
    handlers = {HTTPException: http_error, Exception: unexpected_error}
    api = Starlette(
        routes=routes if metrics_port is not None else [*routes, metrics_route],
        lifespan=lifespan,
        exception_handlers=handlers,
    )
    # A trailing slash gets a 404 like any unknown path: Starlette's redirect would send the client to a
    # URL built from its own Host header, before any authentication.
    api.router.redirect_slashes = False
    app: ASGIApp = api
    if metrics_port is not None:
        metrics_only = Starlette(routes=[metrics_route], exception_handlers=handlers)
        metrics_only.router.redirect_slashes = False
        app = MetricsPortDispatch(api, metrics_only, metrics_port)
    # Outermost, so that even the answer of Starlette's last-resort error handler carries the id.
    return RequestIdMiddleware(app)
