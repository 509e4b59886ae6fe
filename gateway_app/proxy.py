"""The hot path's front door: one OpenAI request in, admitted, routed, handed to the forwarder.

Written as a plain ASGI endpoint so that each step is visible and the body is parsed once: authenticate,
read the body, resolve `(model, owned_by)` to an engine the key may use, check its rate limits, then
forward; afterwards, settle the rate-limit estimate, end the trace span, write the log line.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from starlette.types import Receive, Scope, Send

from gateway_app.auth import Client, Unauthorized
from gateway_app.errors import GatewayError, GatewayOverloaded, InternalError, NotFound
from gateway_app.exchange_clock import ClientGone, ExchangeClock, watch_client
from gateway_app.forwarding import CLIENT_CLOSED, ForwardRequest, ForwardResult
from gateway_app.prefix import prefix_blocks
from gateway_app.rate_limit import Decision, LimiterUnavailable, Limits, RateLimited
from gateway_app.request_body import (
    Body,
    EnginePayload,
    RoutingFields,
    body_for_engine,
    parse_routing_fields,
    read_body,
)
from gateway_app.request_id import RequestIds
from gateway_app.responses import send_error
from gateway_app.route_table import ForbiddenModel, Resolution
from gateway_app.runtime import Runtime
from gateway_app.snapshot import Snapshot
from gateway_app.stream_usage import request_usage_chunk

# Paths whose streams take `stream_options.include_usage` (the Responses API reports usage anyway).
STREAM_OPTIONS_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
log = logging.getLogger("llm_gateway.proxy")

# Paths whose cost includes generated tokens (the others only read their input).
GENERATING_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses"})
REFUSAL_REASONS: dict[type, str] = {
    Unauthorized: "auth",
    ForbiddenModel: "forbidden_model",
    LimiterUnavailable: "limiter_unavailable",
    GatewayOverloaded: "body_memory",
}


@dataclass(slots=True)
class _Admitted:
    """A request that passed authentication, routing and limits."""

    client: Client
    body: Body
    fields: RoutingFields
    resolution: Resolution
    limits: Limits
    decision: Decision | None  # None: no limits apply to this client


class ProxyEndpoint:
    """The handler of one OpenAI path (`/v1/chat/completions`, ...)."""

    def __init__(self, runtime: Runtime, path: str) -> None:
        self.runtime = runtime
        self.path = path
        self.openai_path = path.startswith("/v1/")  # what a provider reached by `base_url` serves

    async def __call__(self, scope: Scope, receive: Receive, send: Send, ids: RequestIds) -> None:
        runtime = self.runtime
        snapshot = runtime.snapshot  # one snapshot for the whole request, even if a reload swaps it meanwhile
        started = time.perf_counter()
        client_name = ""
        decision: Decision | None = None
        body: Body | None = None
        try:
            client = snapshot.authenticate(scope["headers"])
            client_name = client.name
            settings = snapshot.settings
            body = await read_body(scope, receive, settings.max_body_bytes, runtime.body_budget)
            fields = parse_routing_fields(body.data)
            # What a key may not use does not exist for it: same answer as an unknown model.
            resolution = snapshot.routes.resolve(fields.model, fields.owned_by, client.allowed_models)
            if resolution.engine.base_url and not self.openai_path:
                raise NotFound(
                    f"The engine `{resolution.engine.name}` is an OpenAI-compatible provider (`base_url`): "
                    f"it serves the /v1/ paths, not {self.path}.",
                    code="not_found",
                )
            limits = snapshot.limits_for(client)
            if limits.active:
                estimate = self._token_estimate(body.data, fields, settings.limits.completion_tokens_estimate)
                decision = await runtime.limiter.admit(client.name, limits, estimate)
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
            await self._refuse(error, client_name, decision, send, ids, body_read=body is not None)
            self._log(ids, started, error.status, client_name, error_kind=error.code or error.error_type)
            return
        try:
            # Forward it, then account for it: settle its rate-limit estimate, end its span, write its
            # log line. (Here rather than in a coroutine of its own: every chunk of a stream resumes each
            # coroutine between the event loop and the engine's answer.)
            admitted = _Admitted(client, body, fields, resolution, limits, decision)
            request, stream, span = self._forward_request(scope, ids, snapshot, started, admitted)
            exchange = runtime.forwarder.exchange(request, send)
            clock = ExchangeClock(runtime.deadlines)
            try:
                with clock, watch_client(scope, receive, clock):
                    await exchange.run(clock)
            except ClientGone:
                exchange.client_left()
            self._account(exchange.result(), ids, started, admitted, stream, span)
        finally:
            body.release()

    def _forward_request(
        self, scope: Scope, ids: RequestIds, snapshot: Snapshot, started: float, admitted: _Admitted
    ) -> tuple[ForwardRequest, bool, Any]:
        """What the forwarder needs to know of an admitted request; whether the client asked for a
        stream; the request's trace span (None with tracing off)."""
        runtime = self.runtime
        fields, decision, limits = admitted.fields, admitted.decision, admitted.limits
        engine = admitted.resolution.engine
        strip_usage = False
        if (
            decision is not None
            and limits.tokens_per_minute is not None
            and self.path in STREAM_OPTIONS_PATHS
            and fields.document.get("stream") is True
        ):
            strip_usage = request_usage_chunk(fields.document)
        stream = fields.document.get("stream") is True
        affinity_key = self._affinity_key(scope, fields, snapshot)
        # Only for an engine balanced by prompt prefix (a fallback engine follows the routed one's choice).
        prefix = prefix_blocks(fields.document) if engine.policy.name == "cache_aware" else None
        # An alias becomes its model id; an adapter the form its engine understands (route_table.py).
        sent_model = engine.request_model
        rewrite = admitted.resolution.via_alias or sent_model != fields.model
        payload = EnginePayload(
            admitted.body,
            fields,
            engine.model,
            body_for_engine(admitted.body.data, fields, sent_model, rewrite, strip_usage),
        )
        tracer, span = runtime.tracer, None
        traceparent = None
        if tracer is not None:
            span = tracer.start(self.path, fields.model, scope["headers"])
            traceparent = tracer.traceparent(span)
        request = ForwardRequest(
            path=self.path,
            engine=engine,
            routes=snapshot.routes,
            payload=payload,
            client_headers=scope["headers"],
            engine_auth=snapshot.engine_auth,
            engine_request_id=ids.for_engine,
            traceparent=traceparent,
            affinity_key=affinity_key,
            extra_headers=[ids.header, *decision.headers()] if decision is not None else [ids.header],
            strip_usage=strip_usage,
            started=started,
            client=admitted.client.name,
            prefix=prefix,
        )
        return request, stream, span

    def _account(
        self,
        result: ForwardResult,
        ids: RequestIds,
        started: float,
        admitted: _Admitted,
        stream: bool,
        span: Any,
    ) -> None:
        """After the answer: settle the rate-limit estimate, end the trace span, write the log line.

        Synchronous on purpose: nothing (a client leaving, say) can interrupt it half-way."""
        runtime = self.runtime
        tracer = runtime.tracer
        decision, limits = admitted.decision, admitted.limits
        engine = admitted.resolution.engine
        if decision is not None and decision.counted:
            used = _tokens_used(result, decision)
            runtime.limiter.settle(admitted.client.name, limits, decision.tokens_charged, used)
        usage, served = result.usage, result.engine
        if tracer is not None:
            attributes: dict[str, Any] = {
                "gen_ai.response.model": engine.model,
                "gen_ai.provider.name": engine.owned_by,
                "gen_ai.usage.input_tokens": usage[0] if usage else None,
                "gen_ai.usage.output_tokens": usage[1] if usage else None,
                "http.response.status_code": result.status,
                "server.address": result.replica_url,
                "llm_gateway.engine": served.name,
            }
            tracer.end(span, attributes, result.failure)
        first_byte = result.first_byte_at
        if engine.base_model is not None:  # a LoRA adapter
            runtime.metrics.adapter_request(engine.metric_model, engine.base_model, served.name, result.status).inc()
        client = admitted.client.name
        runtime.metrics.client_request(client, result.status).inc()
        # One dict literal: built once, not from keyword arguments merged into another (the hot path).
        runtime.request_log.record(
            {
                "request_id": ids.own,
                "path": self.path,
                "status": result.status,
                "client": client or None,
                "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                "model": engine.model,
                "base_model": engine.base_model or engine.model,
                "owned_by": engine.owned_by,
                "engine": served.name,
                "endpoint": result.replica_url,
                "stream": stream,
                "ttfb_ms": round((first_byte - started) * 1000, 2) if first_byte else None,
                "prompt_tokens": usage[0] if usage else None,
                "completion_tokens": usage[1] if usage else None,
                "bytes": result.bytes_sent,
                "error_kind": result.failure,
                "wake_wait_ms": round(result.held * 1000, 2) if result.held is not None else None,
            }
        )

    def _log(self, ids: RequestIds, started: float, status: int, client: str, error_kind: str) -> None:
        """The line of a request refused before it was forwarded (never the prompt or a key), and who sent it."""
        self.runtime.metrics.client_request(client, status).inc()
        self.runtime.request_log.record(
            {
                "request_id": ids.own,
                "path": self.path,
                "status": status,
                "client": client or None,
                "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                "error_kind": error_kind,
            }
        )

    @staticmethod
    def _affinity_key(scope: Scope, fields: RoutingFields, snapshot: Snapshot) -> str | None:
        affinity = snapshot.settings.affinity
        if affinity.header:
            wanted = affinity.header.lower().encode()
            for name, value in scope["headers"]:
                if name == wanted:
                    return str(value.decode("latin-1"))
        if affinity.body_user:
            user = fields.document.get("user")
            if isinstance(user, str) and user:
                return user
        return None

    def _token_estimate(self, body: bytes | bytearray, fields: RoutingFields, completion_default: int) -> int:
        """What admission charges before the engine says: about 4 bytes of JSON per prompt token, plus
        the completion the client allows (or a default) on the paths that generate."""
        prompt = len(body) // 4
        if self.path not in GENERATING_PATHS:
            return prompt
        document = fields.document
        completion = (
            document.get("max_completion_tokens") or document.get("max_tokens") or document.get("max_output_tokens")
        )
        return prompt + (completion if isinstance(completion, int) and completion > 0 else completion_default)

    async def _refuse(
        self, error: GatewayError, client: str, decision: Decision | None, send: Send, ids: RequestIds, body_read: bool
    ) -> None:
        metrics = self.runtime.metrics
        metrics.child(metrics.requests, "", "", self.path, str(error.status)).inc()
        reason = REFUSAL_REASONS.get(type(error)) or (error.code if isinstance(error, RateLimited) else None)
        if reason:
            metrics.child(metrics.rejected, reason, client).inc()
        headers = [ids.header, *decision.headers()] if decision is not None else [ids.header]
        if isinstance(error, Unauthorized):
            headers.append((b"www-authenticate", b"Bearer"))
        if not body_read:  # the rest of the body is not wanted: the connection closes after this answer
            headers.append((b"connection", b"close"))
        await send_error(send, error, headers)


def _tokens_used(result: ForwardResult, decision: Decision) -> int:
    """What a request really cost, to settle the admission estimate against."""
    if result.usage is not None:
        return result.usage[0] + result.usage[1]
    if result.status >= 400 and result.status != CLIENT_CLOSED:
        return 0  # refused or failed: nothing was generated
    return decision.tokens_charged  # no usage reported (e.g. a client that left): keep the estimate
