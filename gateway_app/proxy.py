"""The hot path's front door: one OpenAI request in, admitted, routed, handed to the forwarder.

Written as a plain ASGI endpoint so that each step is visible and the body is parsed once: authenticate,
read the body, resolve `(model, owned_by)` to an engine, check the key's model access and rate limits,
then forward; afterwards, settle the rate-limit estimate, end the trace span, write the log line.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from starlette.types import Receive, Scope, Send

from gateway_app.auth import Client, Unauthorized
from gateway_app.errors import GatewayError, GatewayOverloaded, InternalError
from gateway_app.forwarding import CLIENT_CLOSED, Forwarder, RequestProgress
from gateway_app.rate_limit import Decision, LimiterUnavailable, Limits, RateLimited
from gateway_app.request_body import (
    Body,
    EnginePayload,
    RoutingFields,
    body_for_engine,
    parse_routing_fields,
    read_body,
)
from gateway_app.responses import send_error
from gateway_app.route_table import ForbiddenModel, Resolution, RouteTable
from gateway_app.stream_usage import request_usage_chunk

if TYPE_CHECKING:
    from gateway_app.state import GatewayState

STATUS_CLASSES = {2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}
# Endpoints whose streams take `stream_options.include_usage` (the Responses API reports usage anyway).
STREAM_OPTIONS_ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/completions"})
log = logging.getLogger("llm_gateway.proxy")

# Endpoints whose cost includes generated tokens (the others only read their input).
GENERATING_ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses"})
REFUSAL_REASONS: dict[type, str] = {
    Unauthorized: "auth",
    ForbiddenModel: "forbidden_model",
    LimiterUnavailable: "limiter_unavailable",
    GatewayOverloaded: "body_memory",
}


class ProxyEndpoint:
    """ASGI endpoint for one OpenAI path (`/v1/chat/completions`, ...)."""

    def __init__(self, state: GatewayState, endpoint: str) -> None:
        self.state = state
        self.endpoint = endpoint
        self.forwarder = Forwarder(state, endpoint)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = self.state
        table = state.table  # one table for the whole request, even if a reload swaps it meanwhile
        started = time.perf_counter()
        client_name = ""
        decision: Decision | None = None
        body: Body | None = None
        try:
            client = state.authenticate(scope["headers"])
            client_name = client.name
            settings = table.settings
            body = await read_body(scope, receive, settings.max_body_bytes, state.body_budget)
            fields = parse_routing_fields(body.data)
            # What a key may not use does not exist for it: same answer as an unknown model.
            resolution = table.resolve(fields.model, fields.owned_by, client.allowed_models)
            limits = state.limits_for(client)
            if limits.active:
                estimate = self._token_estimate(body.data, fields, settings.limits.completion_tokens_estimate)
                decision = await state.limiter.admit(client.name, limits, estimate)
                if not decision.allowed:
                    raise decision.error()
        except ConnectionAbortedError:
            if body is not None:
                body.release()
            return
        except Exception as exc:  # a bug of ours, or a GatewayError: an OpenAI-shaped answer either way
            error = exc if isinstance(exc, GatewayError) else InternalError("Internal gateway error.")
            if not isinstance(exc, GatewayError):
                log.exception("unexpected error while admitting a request")
            if body is not None:
                body.release()
            await self._refuse(error, client_name, decision, send, body_read=body is not None)
            self._log(scope, started, error.status, client_name, error_kind=error.code or error.error_type)
            return
        try:
            await self._forward(
                scope, receive, send, table, started, client, body, fields, resolution, limits, decision
            )
        finally:
            body.release()

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        table: RouteTable,
        started: float,
        client: Client,
        body: Body,
        fields: RoutingFields,
        resolution: Resolution,
        limits: Limits,
        decision: Decision | None,
    ) -> None:
        """Forward an admitted request and account for it: settle its rate-limit estimate, end its span,
        write its log line."""
        state = self.state
        engine = resolution.engine
        client_name = client.name
        strip_usage = False
        if (
            decision is not None
            and limits.tokens_per_minute is not None
            and self.endpoint in STREAM_OPTIONS_ENDPOINTS
            and fields.document.get("stream") is True
        ):
            strip_usage = request_usage_chunk(fields.document)
        stream = fields.document.get("stream") is True
        progress = RequestProgress(
            table,
            started,
            self._affinity_key(scope, fields, table),
            decision.headers() if decision is not None else [],
            strip_usage,
        )
        payload = EnginePayload(
            body,
            fields,
            engine.model,
            body_for_engine(body.data, fields, engine.model, resolution.via_alias, changed=strip_usage),
        )
        tracer, span = state.tracer, None
        if tracer is not None:
            span = tracer.start(self.endpoint, fields.model, scope["headers"])
            scope["traceparent"] = tracer.traceparent(span)
        status = await self.forwarder.forward(engine, payload, scope, receive, send, progress)
        if decision is not None and decision.counted:
            await state.limiter.settle(
                client.name, limits, decision.tokens_charged, _tokens_used(status, decision, progress)
            )
        usage = progress.usage
        if span is not None:
            tracer.end(
                span,
                {
                    "gen_ai.response.model": engine.model,
                    "gen_ai.provider.name": engine.owned_by,
                    "gen_ai.usage.input_tokens": usage[0] if usage else None,
                    "gen_ai.usage.output_tokens": usage[1] if usage else None,
                    "http.response.status_code": status,
                    "server.address": progress.endpoint_url,
                    "llm_gateway.engine": progress.served_by or engine.name,
                },
                progress.error_kind,
            )
        self._log(
            scope,
            started,
            status,
            client_name,
            model=engine.model,
            owned_by=engine.owned_by,
            engine=progress.served_by or engine.name,
            endpoint=progress.endpoint_url,
            stream=stream,
            ttfb_ms=round((progress.first_byte_at - started) * 1000, 2) if progress.first_byte_at else None,
            prompt_tokens=usage[0] if usage else None,
            completion_tokens=usage[1] if usage else None,
            bytes=progress.bytes_sent,
            error_kind=progress.error_kind,
        )

    def _log(self, scope: Scope, started: float, status: int, client: str, **fields: object) -> None:
        """One line per request (never the prompt, the completion or a key), and who sent it."""
        self.state.metrics.client_requests.labels(client, STATUS_CLASSES.get(status // 100, "other")).inc()
        self.state.request_log.record(
            {
                "request_id": scope.get("request_id"),
                "path": self.endpoint,
                "status": status,
                "client": client or None,
                "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                **fields,
            }
        )

    @staticmethod
    def _affinity_key(scope: Scope, fields: RoutingFields, table: RouteTable) -> str | None:
        affinity = table.settings.affinity
        if affinity.header:
            wanted = affinity.header.lower().encode()
            for name, value in scope["headers"]:
                if name == wanted:
                    return value.decode("latin-1")
        if affinity.body_user:
            user = fields.document.get("user")
            if isinstance(user, str) and user:
                return user
        return None

    def _token_estimate(self, body: bytes | bytearray, fields: RoutingFields, completion_default: int) -> int:
        """What admission charges before the engine says: about 4 bytes of JSON per prompt token, plus
        the completion the client allows (or a default) on the endpoints that generate."""
        prompt = len(body) // 4
        if self.endpoint not in GENERATING_ENDPOINTS:
            return prompt
        document = fields.document
        completion = (
            document.get("max_completion_tokens") or document.get("max_tokens") or document.get("max_output_tokens")
        )
        return prompt + (completion if isinstance(completion, int) and completion > 0 else completion_default)

    async def _refuse(
        self, error: GatewayError, client: str, decision: Decision | None, send: Send, body_read: bool
    ) -> None:
        metrics = self.state.metrics
        metrics.requests.labels("", "", self.endpoint, str(error.status)).inc()
        reason = REFUSAL_REASONS.get(type(error)) or (error.code if isinstance(error, RateLimited) else None)
        if reason:
            metrics.rejected.labels(reason, client).inc()
        headers = decision.headers() if decision is not None else []
        if isinstance(error, Unauthorized):
            headers.append((b"www-authenticate", b"Bearer"))
        if not body_read:  # the rest of the body is not wanted: the connection closes after this answer
            headers.append((b"connection", b"close"))
        await send_error(send, error, headers)


def _tokens_used(status: int, decision: Decision, progress: RequestProgress) -> int:
    """What a request really cost, to settle the admission estimate against."""
    if progress.usage is not None:
        return progress.usage[0] + progress.usage[1]
    if status >= 400 and status != CLIENT_CLOSED:
        return 0  # refused or failed: nothing was generated
    return decision.tokens_charged  # no usage reported (e.g. a client that left): keep the estimate
