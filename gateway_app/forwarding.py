"""Getting one request answered by an engine: replicas, retries, fallback, and the relay back.

Given the engine that routing chose, try its replicas (then its fallback engine) until one takes the
request, and relay the answer: whole answers at once, streams chunk by chunk as they arrive. A watcher
on the client connection cancels the work the moment the client goes away, which closes the engine
connection so that the engine stops generating. Failures are told honestly: a JSON error before any
byte went out, an SSE error event inside a stream, a cut connection inside any other answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import aiohttp
from starlette.types import Receive, Scope, Send

from gateway_app.balancer import choose
from gateway_app.concurrency import EngineBusy
from gateway_app.endpoints import Endpoint
from gateway_app.errors import (
    EngineBadAnswer,
    EngineTimeout,
    EngineUnreachable,
    GatewayError,
    InternalError,
    sse_error_event,
)
from gateway_app.log_setup import ThrottledWarning
from gateway_app.request_body import EnginePayload
from gateway_app.responses import send_error
from gateway_app.route_table import Engine, RouteTable
from gateway_app.stream_usage import UsageChunkFilter
from gateway_app.upstream import headers_for_client, headers_for_engine, read_capped
from gateway_app.usage import USAGE_KEY, find_usage

if TYPE_CHECKING:
    from gateway_app.state import GatewayState

log = logging.getLogger("llm_gateway.forwarding")
# A failing engine fails every request sent to it: once a minute per engine and kind of failure is enough
# to tell (every request still has its line in the request log, and the metrics count them all).
ENGINE_WARNINGS = ThrottledWarning(log)

ENGINE_HEADER = b"x-gateway-engine"
# An engine's 502/503 is read (to be relayed if no retry does better) up to this many bytes.
RETRYABLE_ANSWER_CAP = 64 * 1024
CLIENT_CLOSED = 499  # nginx's status for "client closed the request", used in metrics only
# Answers that mean "this replica cannot take it now": the request may go to another one.
RETRYABLE_STATUSES = frozenset({502, 503})


class RequestProgress:
    """What the relay has done so far; read by the disconnect watcher and by error handling."""

    __slots__ = (
        "response_started",
        "finished",
        "disconnected",
        "first_byte_at",
        "sse",
        "at_event_boundary",
        "extra_headers",
        "strip_usage",
        "usage",
        "table",
        "started",
        "affinity_key",
        "error_kind",
        "bytes_sent",
        "served_by",
        "endpoint_url",
        "served_engine",
    )

    def __init__(
        self,
        table: RouteTable,
        started: float,
        affinity_key: str | None,
        extra_headers: list[tuple[bytes, bytes]],
        strip_usage: bool,
    ) -> None:
        self.table = table  # the table the request started with, for its whole life
        self.started = started
        self.affinity_key = affinity_key
        self.error_kind: str | None = None  # for the request log
        self.bytes_sent = 0
        self.served_by: str | None = None
        self.served_engine: Engine | None = None  # differs from the routed engine after a fallback
        self.endpoint_url: str | None = None
        self.extra_headers = extra_headers  # e.g. x-ratelimit-*, added to the engine's answer
        self.strip_usage = strip_usage  # the gateway asked for the usage chunk, the client did not
        self.usage: tuple[int, int] | None = None
        self.response_started = False
        self.finished = False
        self.disconnected = False
        self.first_byte_at: float | None = None
        self.sse = False  # the answer is an SSE stream, so a late error can still be told in-band
        self.at_event_boundary = True


async def _watch_disconnect(receive: Receive, handler: asyncio.Task, progress: RequestProgress) -> None:
    """After the body is read, the only message left to come is `http.disconnect`."""
    while (await receive())["type"] != "http.disconnect":
        pass
    if not progress.finished:
        progress.disconnected = True
        handler.cancel()


class Forwarder:
    """Forwards requests of one OpenAI path (the `endpoint` label of the metrics)."""

    def __init__(self, state: GatewayState, endpoint: str) -> None:
        self.state = state
        self.endpoint = endpoint

    async def forward(
        self,
        engine: Engine,
        payload: EnginePayload,
        scope: Scope,
        receive: Receive,
        send: Send,
        progress: RequestProgress,
    ) -> int:
        metrics = self.state.metrics
        started = progress.started
        in_flight = metrics.in_flight.labels(engine.model, engine.name)
        in_flight.inc()
        handler = asyncio.current_task()
        assert handler is not None
        watcher = asyncio.get_running_loop().create_task(_watch_disconnect(receive, handler, progress))
        status = 500
        gate = engine.gate
        admitted = False
        try:
            if gate is not None:
                waited = await gate.acquire(engine.name)
                admitted = True
                metrics.queue_wait.labels(engine.name).observe(waited)
            if engine.timeouts.total is None:
                status = await self._exchange(engine, payload, scope, send, progress)
            else:
                try:
                    async with asyncio.timeout(engine.timeouts.total):
                        status = await self._exchange(engine, payload, scope, send, progress)
                except TimeoutError:
                    status = await self._fail(
                        engine,
                        send,
                        progress,
                        "timeout_total",
                        EngineTimeout(f"The engine `{engine.name}` did not finish within {engine.timeouts.total} s."),
                    )
        except asyncio.CancelledError:
            if not progress.disconnected:
                raise
            handler.uncancel()
            metrics.client_disconnects.labels(engine.model, engine.name).inc()
            progress.error_kind = "client_disconnect"
            status = CLIENT_CLOSED
        except EngineBusy as error:
            metrics.rejected.labels("engine_overloaded", "").inc()
            progress.error_kind = "engine_overloaded"
            await send_error(send, error, [(ENGINE_HEADER, engine.name_header), *progress.extra_headers])
            status = error.status
        except Exception:  # a bug of ours: log it, answer 500 without details
            log.exception("unexpected error while forwarding to engine %s", engine.name)
            status = await self._fail(engine, send, progress, "internal", InternalError("Internal gateway error."))
        finally:
            progress.finished = True
            watcher.cancel()
            in_flight.dec()
            if admitted:
                gate.release()
        served = progress.served_engine or engine  # metrics credit the engine that answered
        labels = (served.model, served.name, self.endpoint)
        metrics.requests.labels(*labels, str(status)).inc()
        stream = "true" if progress.sse else "false"
        metrics.duration.labels(*labels, stream).observe(time.perf_counter() - started)
        if progress.first_byte_at is not None:
            metrics.first_byte.labels(*labels, stream).observe(progress.first_byte_at - started)
        return status

    async def _exchange(
        self, engine: Engine, payload: EnginePayload, scope: Scope, send: Send, progress: RequestProgress
    ) -> int:
        """Try the engine's replicas, then its fallback engine, until one takes the request; relay its answer.

        Only failures before any byte went to the client are retried: a connection that could not be
        made and a 502/503 answer. A bounded number of attempts, within a deadline.
        """
        table, retries = progress.table, progress.table.settings.retries
        deadline = progress.started + retries.deadline
        current, tried, visited = engine, [], {engine.name}
        last: tuple[str, GatewayError] | _EngineAnswer | None = None
        held: list = []  # the fallback engines' concurrency gates entered on the way
        try:
            for attempt in range(retries.max_attempts):
                endpoint = choose(
                    current.pool, time.monotonic(), progress.affinity_key, tried, table.settings.balancing
                )
                while endpoint is None:  # every replica of this engine was tried: on to its fallback
                    fallback = table.engine_named(current.fallback) if current.fallback else None
                    if fallback is None or fallback.name in visited:
                        break
                    if fallback.gate is not None:  # a fallback is bound by its own limit (EngineBusy: 429)
                        await fallback.gate.acquire(fallback.name)
                        held.append(fallback.gate)
                    current, tried = fallback, []
                    visited.add(fallback.name)
                    self.state.metrics.fallbacks.labels(engine.name, fallback.name).inc()
                    endpoint = choose(
                        current.pool, time.monotonic(), progress.affinity_key, (), table.settings.balancing
                    )
                if endpoint is None or (attempt and time.perf_counter() > deadline):
                    break
                if attempt:
                    self.state.metrics.retries.labels(engine.name).inc()
                tried.append(endpoint)
                outcome = await self._attempt(current, endpoint, payload, scope, send, progress)
                if isinstance(outcome, int):
                    return outcome
                last = outcome
        finally:
            for gate in held:
                gate.release()
        if isinstance(last, _EngineAnswer):  # the engine's own 502/503, relayed as it said it
            return await last.relay(send, progress)
        kind, error = last or ("connect", EngineUnreachable(f"The engine `{engine.name}` has no endpoint to try."))
        return await self._fail(current, send, progress, kind, error)

    async def _attempt(
        self,
        engine: Engine,
        endpoint: Endpoint,
        payload: EnginePayload,
        scope: Scope,
        send: Send,
        progress: RequestProgress,
    ) -> int | tuple[str, GatewayError] | _EngineAnswer:
        """One try on one replica: a status once answered, or what went wrong when it may be retried."""
        timeouts = engine.timeouts
        health = progress.table.settings.health
        response: aiohttp.ClientResponse | None = None
        complete = False
        endpoint.outstanding += 1
        progress.served_by, progress.endpoint_url, progress.served_engine = engine.name, endpoint.url, engine
        try:
            try:
                async with asyncio.timeout(timeouts.first_byte):
                    sent_at = time.perf_counter()
                    response = await self._send_request(engine, endpoint, payload, scope)
                    answered_at = time.perf_counter()
                    if response.status in RETRYABLE_STATUSES:
                        endpoint.failed(health)
                        return await self._retryable_answer(engine, response)
                    sse = response.content_type == "text/event-stream"
                    streaming = response.content_length is None or sse
                    first = await response.content.readany()
                    progress.first_byte_at = time.perf_counter() if streaming else answered_at
                    endpoint.observe_latency(progress.first_byte_at - sent_at, time.monotonic())
            except aiohttp.ConnectionTimeoutError:
                endpoint.failed(health)
                return "timeout_connect", EngineTimeout(
                    f"Timed out connecting to the engine `{engine.name}` after {timeouts.connect} s."
                )
            except TimeoutError:  # the engine took the request: sending it again would double the work
                endpoint.failed(health)
                return await self._fail(
                    engine,
                    send,
                    progress,
                    "timeout_first_byte",
                    EngineTimeout(f"The engine `{engine.name}` did not answer within {timeouts.first_byte} s."),
                )
            except aiohttp.ClientError as exc:
                endpoint.failed(health)
                ENGINE_WARNINGS.warn(
                    f"{engine.name}:connect",
                    "engine %s at %s: request failed: %s",
                    engine.name,
                    endpoint.url,
                    _reason(exc),
                )
                return "connect", EngineUnreachable(f"The engine `{engine.name}` is unreachable.")
            status = response.status
            endpoint.failed(health) if status >= 500 else endpoint.succeeded()
            headers = headers_for_client(response.raw_headers)
            headers.append((ENGINE_HEADER, engine.name_header))
            headers.extend(progress.extra_headers)
            if streaming:
                headers = _with_stream_headers(headers)
            else:  # relayed as it arrives all the same: never held whole, whatever its size
                headers.append((b"content-length", str(response.content_length).encode()))
            progress.sse = sse
            await send({"type": "http.response.start", "status": status, "headers": headers})
            progress.response_started = True
            payload.release()  # no retry from here on: the body need not outlive a long answer
            complete = await self._relay(engine, response, first, send, progress, streaming, status)
            if not complete:
                endpoint.failed(health)
            return status
        finally:
            endpoint.outstanding -= 1
            if response is not None:
                # A finished answer returns its connection to the pool; anything else closes it,
                # which is how an engine learns that nobody waits for its tokens any more.
                response.release() if complete else response.close()

    async def _send_request(
        self, engine: Engine, endpoint: Endpoint, payload: EnginePayload, scope: Scope
    ) -> aiohttp.ClientResponse:
        """POST to the engine, once more on a fresh connection if a pooled one turned out to be closed.

        An engine closes idle keep-alive connections on its own schedule; a request that meets such a
        connection fails before the engine has read it, so sending it again is safe.
        """
        headers = headers_for_engine(scope["headers"], engine.headers + self.state.engine_auth)
        headers.append(("X-Request-Id", scope["engine_request_id"]))  # vLLM takes it as its own request id
        traceparent = scope.get("traceparent")
        if traceparent is not None:  # tracing on: the engine's spans become children of ours
            headers = [(n, v) for n, v in headers if n.lower() not in ("traceparent", "tracestate")]
            headers.append(("traceparent", traceparent))
        url = endpoint.url + scope["path"]
        try:
            return await self.state.session.post(
                url, data=payload.for_model(engine.model), headers=headers, timeout=engine.client_timeout
            )
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            if isinstance(exc, aiohttp.ClientConnectorError):
                raise  # a fresh connection failed: the engine is down, not a stale pool entry
            return await self.state.session.post(
                url, data=payload.for_model(engine.model), headers=headers, timeout=engine.client_timeout
            )

    async def _retryable_answer(
        self, engine: Engine, response: aiohttp.ClientResponse
    ) -> _EngineAnswer | tuple[str, GatewayError]:
        """A 502/503 is read to be relayed if no other replica can do better, but only up to a small
        size: an engine that sends an endless error body costs the gateway at most that much."""
        body = await read_capped(response, RETRYABLE_ANSWER_CAP)
        if body is None:
            return "bad_answer", EngineBadAnswer(
                f"The engine `{engine.name}` answered {response.status} with an error body of more than "
                f"{RETRYABLE_ANSWER_CAP} bytes."
            )
        return _EngineAnswer(engine, response.status, response.raw_headers, body)

    async def _relay(
        self,
        engine: Engine,
        response: aiohttp.ClientResponse,
        chunk: bytes,
        send: Send,
        progress: RequestProgress,
        streaming: bool,
        status: int,
    ) -> bool:
        """Chunks go out as they come in, streams and whole answers alike; only the last two are kept, to
        find the usage (it closes a stream, and ends a JSON answer).

        Returns True when the engine's answer was relayed to its end. The idle timer runs only while
        waiting for the engine, never while a slow client takes its time to read.
        """
        if not streaming and len(chunk) == response.content_length:  # the usual JSON answer: all in one read
            await send({"type": "http.response.body", "body": chunk})
            progress.bytes_sent = len(chunk)
            if status == 200 and USAGE_KEY in chunk:
                self._count_tokens(engine, find_usage(chunk), progress)
            return True
        idle = engine.timeouts.idle
        loop = asyncio.get_running_loop()
        older = previous = b""
        sse = progress.sse
        events = 0  # SSE events relayed: a token count when the engine reports no usage
        usage_filter = UsageChunkFilter() if progress.strip_usage and streaming else None
        try:
            async with asyncio.timeout(None) as idle_deadline:
                while chunk:
                    if usage_filter is not None:
                        chunk = usage_filter.feed(chunk)
                    if chunk:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                        progress.bytes_sent += len(chunk)
                        if sse:
                            events += chunk.count(b"data:")
                            progress.at_event_boundary = chunk.endswith(b"\n\n")
                    older, previous = previous, chunk
                    if idle is not None:
                        idle_deadline.reschedule(loop.time() + idle)
                        chunk = await response.content.readany()
                        idle_deadline.reschedule(None)
                    else:
                        chunk = await response.content.readany()
        except TimeoutError:
            await self._fail(
                engine,
                send,
                progress,
                "timeout_idle",
                EngineTimeout(f"The engine `{engine.name}` sent nothing for {idle} s in the middle of its answer."),
            )
            return False
        except aiohttp.ClientError as exc:
            ENGINE_WARNINGS.warn(f"{engine.name}:broke", "engine %s: answer broke off: %s", engine.name, _reason(exc))
            await self._fail(
                engine,
                send,
                progress,
                "broken_stream",
                EngineUnreachable(f"The answer from the engine `{engine.name}` broke off."),
            )
            return False
        if usage_filter is not None:
            await send({"type": "http.response.body", "body": usage_filter.flush(), "more_body": False})
            self._count_tokens(engine, usage_filter.usage, progress)
        else:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            tail = older + previous
            if (sse or status == 200) and USAGE_KEY in tail:
                self._count_tokens(engine, find_usage(tail), progress)
        if sse:
            self._observe_token_pace(engine, progress, events)
        return True

    def _observe_token_pace(self, engine: Engine, progress: RequestProgress, events: int) -> None:
        """One observation per stream, not per token: the mean gap between output tokens."""
        tokens = progress.usage[1] if progress.usage else events
        if progress.first_byte_at is not None and tokens > 1:
            elapsed = time.perf_counter() - progress.first_byte_at
            self.state.metrics.time_per_output_token.labels(engine.model, engine.name).observe(elapsed / (tokens - 1))

    async def _fail(self, engine: Engine, send: Send, progress: RequestProgress, kind: str, error: GatewayError) -> int:
        """Answer an upstream failure the only honest way left at this point.

        Before any byte went out: a JSON error with the right status. In an SSE stream: an error event
        and `[DONE]`. In any other answer already under way: stop without finishing it, so the client
        sees a cut connection rather than a body with an error glued to it.
        """
        self.state.metrics.upstream_errors.labels(engine.name, kind).inc()
        progress.error_kind = kind
        ENGINE_WARNINGS.warn(f"{engine.name}:{kind}", "engine %s: %s", engine.name, error.message)
        if not progress.response_started:
            await send_error(send, error, [(ENGINE_HEADER, engine.name_header), *progress.extra_headers])
            progress.response_started = True
        elif progress.sse:
            event = sse_error_event(error)
            if not progress.at_event_boundary:
                event = b"\n\n" + event  # end the event the engine left half-written
            await send({"type": "http.response.body", "body": event, "more_body": False})
        return error.status

    def _count_tokens(self, engine: Engine, usage: tuple[int, int] | None, progress: RequestProgress) -> None:
        progress.usage = usage
        if usage is not None:
            metrics = self.state.metrics
            metrics.prompt_tokens.labels(engine.model, engine.name).inc(usage[0])
            metrics.completion_tokens.labels(engine.model, engine.name).inc(usage[1])


class _EngineAnswer:
    """A retryable answer (502/503) kept in case no other replica or engine can do better."""

    __slots__ = ("engine", "status", "headers", "body")

    def __init__(self, engine: Engine, status: int, headers: tuple[tuple[bytes, bytes], ...], body: bytes) -> None:
        self.engine, self.status, self.headers, self.body = engine, status, headers, body

    async def relay(self, send: Send, progress: RequestProgress) -> int:
        headers = headers_for_client(self.headers)
        headers += [(ENGINE_HEADER, self.engine.name_header), (b"content-length", str(len(self.body)).encode())]
        headers.extend(progress.extra_headers)
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        progress.response_started = True
        await send({"type": "http.response.body", "body": self.body})
        return self.status


def _with_stream_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Stop proxies and ingress controllers from buffering a stream: `X-Accel-Buffering: no` (nginx),
    and `Cache-Control: no-cache` unless the engine sent a Cache-Control of its own (once, not twice)."""
    headers = [(name, value) for name, value in headers if name != b"x-accel-buffering"]
    if not any(name == b"cache-control" for name, _ in headers):
        headers.append((b"cache-control", b"no-cache"))
    headers.append((b"x-accel-buffering", b"no"))
    return headers


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.rstrip(".")
