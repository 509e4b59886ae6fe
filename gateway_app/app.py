"""The gateway's HTTP surface: the proxied OpenAI paths plus the endpoints a vLLM server also has.

To a client the gateway is one vLLM server: `/v1/models`, `/health`, `/version` and `/metrics` answer
here, and every JSON route that names a `model` is forwarded to the engine serving it. `GatewayApp`
builds the runtime at start-up (ASGI lifespan) and then serves with it: the proxied paths go straight
to their handler, everything else through a small Starlette app. Every answer carries `x-request-id`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway_app import __version__
from gateway_app.auth import Unauthorized, may_use, may_use_adapter
from gateway_app.config import ClientLimits, Settings
from gateway_app.errors import (
    GatewayError,
    InternalError,
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
    PayloadTooLarge,
)
from gateway_app.lora_admin import (
    ADMIN_PATHS,
    MAX_REQUEST_BYTES,
    AdminRequired,
    check_adapter_name,
    check_admin,
    parse_admin_request,
    target_engine,
)
from gateway_app.proxy import ProxyEndpoint
from gateway_app.request_id import request_ids, with_request_id
from gateway_app.responses import send_error
from gateway_app.runtime import Runtime, Setup

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


class GatewayApp:
    """The ASGI application: starts its runtime with the server and stops it with the server.

    With `metrics_port`, `/metrics` is served on that port only, and the API port answers it with 404.
    """

    def __init__(self, setup: Setup, metrics_port: int | None = None) -> None:
        self.setup = setup
        self.metrics_port = metrics_port
        self._serve: ASGIApp = _not_started
        self._settings: Callable[[], Settings] = lambda: setup.routing_map.settings

    def client_limits(self) -> ClientLimits:
        """The client bounds in service (for the connection guard, which exists before start-up)."""
        return self._settings().client_limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        else:
            await self._serve(scope, receive, send)  # the router's handler itself (Router.__call__)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        try:
            runtime = await Runtime.start(self.setup)
        except Exception as exc:
            log.exception("the gateway could not start")
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
            return
        self._serve = Router(runtime, self.metrics_port)
        self._settings = lambda: runtime.snapshot.settings
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        await runtime.stop()
        await send({"type": "lifespan.shutdown.complete"})


async def _not_started(scope: Scope, receive: Receive, send: Send) -> None:
    """Before start-up completes (servers do not send requests then): a plain 503."""
    await send_error(send, GatewayError("The gateway is starting.", status=503))


class Router:
    """Once started: request ids on every answer, the proxied paths straight to their handlers (no
    routing table to walk on the hot path), the rest to Starlette.

    Requests that arrive on the metrics port see only `/metrics`: a separate port is what lets a
    NetworkPolicy and the Ingress keep `/metrics` (key names, traffic, engine URLs) away from API clients.
    """

    def __init__(self, runtime: Runtime, metrics_port: int | None) -> None:
        self.proxied = {path: ProxyEndpoint(runtime, path) for path in PROXIED_PATHS}
        self.others, self.metrics_only = _other_routes(runtime, metrics_port is None)
        self.metrics_port = metrics_port

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """The handler's coroutine, returned rather than awaited here: one coroutine less for every
        chunk of every stream to pass through."""
        if scope["type"] != "http":
            return self.others(scope, receive, send)
        server = scope.get("server")
        if self.metrics_port is not None and server is not None and server[1] == self.metrics_port:
            return self.metrics_only(scope, receive, with_request_id(send, request_ids(scope["headers"]).own))
        ids = request_ids(scope["headers"])
        handler = self.proxied.get(scope["path"])
        if handler is None:
            return self.others(scope, receive, with_request_id(send, ids.own))
        if scope["method"] == "POST":
            return handler(scope, receive, send, ids)  # puts the id on every answer it gives
        error = MethodNotAllowed(f"Method {scope['method']} is not allowed on {scope['path']}.")
        return send_error(send, error, [ids.header, (b"allow", b"POST")])


def _other_routes(runtime: Runtime, with_metrics: bool) -> tuple[ASGIApp, ASGIApp]:
    """Everything but the proxied paths: the model list, probes, version, metrics (on the API port when
    `with_metrics`), and the errors; and an app that serves only the metrics."""

    async def visible_cards(request: Request) -> list[dict[str, Any]]:
        """The cards this client may use (all of them with authentication off)."""
        snapshot = runtime.snapshot
        client = snapshot.authenticate(request.scope["headers"])
        cards = await runtime.catalog.cards()
        allowed = client.allowed_models
        if allowed is None:
            return cards
        routes = snapshot.routes
        aliases, models = routes.aliases, set(routes.models)

        def visible(card: dict[str, Any]) -> bool:
            name, parent = card["id"], card.get("parent")
            if isinstance(parent, str) and name not in models and name not in aliases:
                return may_use_adapter(allowed, name, parent)  # a LoRA adapter's card
            return may_use(allowed, name, aliases.get(name, name))

        return [card for card in cards if visible(card)]

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
        runtime.metrics.rejected.labels("auth", "").inc()
        return _error(error, {"WWW-Authenticate": "Bearer"})

    async def lora_update(request: Request) -> Response:
        """Load or unload a LoRA adapter on every replica of one engine; administrator keys only."""
        snapshot = runtime.snapshot
        try:
            client = snapshot.authenticate(request.scope["headers"])
        except Unauthorized as error:
            return _unauthorized(error)
        try:
            check_admin(client)  # before anything about engines or adapters is read or told
            document = parse_admin_request(await _read_small_body(request, MAX_REQUEST_BYTES))
            action = ADMIN_PATHS[request.url.path]
            if action == "load":  # an unload may still remove what an engine loaded under another name
                check_adapter_name(snapshot.routes, document["lora_name"])
            engine = target_engine(snapshot.routes, document)
            status, answer = await runtime.lora_admin.update(
                action, engine, document, snapshot.engine_auth, client.name
            )
        except GatewayError as error:
            if isinstance(error, AdminRequired):
                runtime.metrics.rejected.labels("admin_required", client.name).inc()
            return _error(error)
        return Response(answer, status_code=status, media_type="application/json")

    async def healthz(request: Request) -> Response:
        return Response(status_code=200)

    async def readyz(request: Request) -> Response:
        routes = runtime.snapshot.routes
        now = time.monotonic()
        reachable = sum(1 for e in routes.engines if any(r.available(now) for r in e.pool.replicas))
        # An engine asleep is not down: the next request wakes it, and it can only come through this gateway.
        asleep = sum(1 for e in routes.engines if e.pool.waker is not None and e.pool.waker.asleep)
        ready = reachable + asleep > 0 or not routes.settings.ready_requires_engine
        return _json(
            {
                "status": "ready" if ready else "no engine reachable",
                "engines": len(routes.engines),
                "engines_reachable": reachable,
                "engines_asleep": asleep,
            },
            status=200 if ready else 503,
        )

    async def version(request: Request) -> Response:
        return _json({"version": __version__})

    async def metrics(request: Request) -> Response:
        return Response(runtime.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}."
            return _error(MethodNotAllowed(message), exc.headers)
        if exc.status_code == 404:
            return _error(NotFound(f"There is no route {request.method} {request.url.path}.", code="not_found"))
        return _error(GatewayError(str(exc.detail), status=exc.status_code), exc.headers)

    async def unexpected_error(request: Request, exc: Exception) -> Response:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error(InternalError("Internal gateway error."))

    routes = [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
        *(Route(path, lora_update, methods=["POST"]) for path in ADMIN_PATHS),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/health", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/version", version, methods=["GET"]),
    ]
    metrics_route = Route("/metrics", metrics, methods=["GET"])
    handlers = {HTTPException: http_error, Exception: unexpected_error}
    api = Starlette(routes=[*routes, metrics_route] if with_metrics else routes, exception_handlers=handlers)
    metrics_only = Starlette(routes=[metrics_route], exception_handlers=handlers)
    for app in (api, metrics_only):
        # A trailing slash gets a 404 like any unknown path: Starlette's redirect would send the client
        # to a URL built from its own Host header, before any authentication.
        app.router.redirect_slashes = False
    return api, metrics_only


async def _read_small_body(request: Request, limit: int) -> bytes:
    """A body of at most `limit` bytes, or 413."""
    received = bytearray()
    async for chunk in request.stream():
        received += chunk
        if len(received) > limit:
            raise PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")
    return bytes(received)


def _json(data: object, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def _error(error: GatewayError, headers: Mapping[str, str] | None = None) -> Response:
    return Response(
        error.body(),
        status_code=error.status,
        media_type="application/json",
        headers={**error.extra_headers(), **(headers or {})},
    )
