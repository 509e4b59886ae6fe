"""Getting one request answered by an engine: replicas, retries, fallback, and the relay back.

`Forwarder.exchange` takes a `ForwardRequest` (what routing and admission decided) and returns a
`ForwardResult` (what happened, for metrics, limits, traces and the log). Given the engine that routing
chose, it tries its replicas (then its fallback engine) until one takes the request, and relays the
answer chunk by chunk as it arrives. Its time limits and its client leaving are kept by the request's
`ExchangeClock` (exchange_clock.py): when the client goes away the exchange is cancelled, which closes
the engine connection so that the engine stops generating. Failures are told honestly: a JSON error
before any byte went out, an SSE error event inside a stream, a cut connection inside any other answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import aiohttp
from starlette.types import Send

from gateway_app.balancer import pick_replica
from gateway_app.concurrency import ConcurrencyGate, EngineBusy
from gateway_app.errors import EngineWaking, GatewayError, sse_error_event
from gateway_app.exchange_clock import ExchangeClock
from gateway_app.failures import Failure, failure_error
from gateway_app.log_setup import ThrottledWarning
from gateway_app.metrics import GatewayMetrics
from gateway_app.prefix import Blocks
from gateway_app.replicas import Replica
from gateway_app.request_body import EnginePayload
from gateway_app.responses import send_error
from gateway_app.route_table import Engine, RouteTable
from gateway_app.stream_usage import UsageChunkFilter
from gateway_app.upstream import headers_for_client, headers_for_engine, is_event_stream, read_capped
from gateway_app.usage import USAGE_KEY, find_usage
from gateway_app.waker import Waker

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


@dataclass(slots=True)  # not frozen: built for every request, and a frozen dataclass is slow to build
class ForwardRequest:
    """An admitted request, as the forwarder needs it (read-only by convention)."""

    path: str  # the OpenAI path, e.g. /v1/chat/completions
    engine: Engine  # the engine routing chose
    routes: RouteTable  # of the snapshot the request started with: fallbacks and settings
    payload: EnginePayload
    client_headers: list[tuple[bytes, bytes]]
    engine_auth: tuple[tuple[str, str], ...]
    engine_request_id: str
    traceparent: str | None  # tracing on: the engine's spans join ours
    affinity_key: str | None
    extra_headers: list[tuple[bytes, bytes]]  # added to the answer, e.g. x-ratelimit-*
    strip_usage: bool  # the gateway asked for the usage chunk, the client did not
    started: float  # perf_counter() when the request arrived
    client: str  # the API key's name (`anonymous` with keys off), for refusals counted while forwarding
    prefix: Blocks | None = None  # the prompt's block hashes, for a cache_aware engine (prefix.py)


@dataclass(slots=True)
class ForwardResult:
    status: int  # 499 when the client went away
    engine: Engine  # the engine that answered: the fallback after a fallback
    replica_url: str | None
    failure: Failure | None
    usage: tuple[int, int] | None  # (prompt, completion) tokens as the engine reported them
    first_byte_at: float | None
    bytes_sent: int
    stream: bool  # the answer was an SSE stream
    held: float | None = None  # seconds held while its engine, scaled to zero, woke up


class Forwarder:
    """Gets admitted requests answered by engines: one per process, over the process's engine session."""

    def __init__(self, session: aiohttp.ClientSession, metrics: GatewayMetrics) -> None:
        self.session = session
        self.metrics = metrics

    def exchange(self, request: ForwardRequest, send: Send) -> Exchange:
        """The exchange for one request: `await run()`, then `result()` (or `client_left()` first, when
        the client went away)."""
        return Exchange(self, request, send)


@dataclass(frozen=True, slots=True)
class _EngineAnswer:
    """A retryable answer (502/503) kept in case no other replica or engine can do better."""

    engine: Engine
    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes


@dataclass(slots=True)
class _Retryable:
    """An attempt that failed before any byte went to the client: another replica may do better."""

    failure: Failure
    error: GatewayError
    answer: _EngineAnswer | None = None  # the engine's own 502/503, relayed if nothing does better


@dataclass(slots=True)
class _Opened:
    """An answer under way: its head went to the client, its first chunk is in hand, its replica busy."""

    replica: Replica
    response: aiohttp.ClientResponse
    first: bytes
    streaming: bool  # relayed chunk by chunk to its end (SSE, or no Content-Length)


class Exchange:
    """One request's way to an engine and back. Its state is its own; `result()` is what it tells."""

    __slots__ = (
        "forwarder", "request", "send", "engine", "replica", "status", "failure", "response_started",
        "sse", "at_event_boundary", "bytes_sent", "first_byte_at", "usage", "finished", "clock", "held",
        "held_for_wake",
    )  # fmt: skip

    def __init__(self, forwarder: Forwarder, request: ForwardRequest, send: Send) -> None:
        self.forwarder, self.request, self.send = forwarder, request, send
        self.engine = request.engine  # the engine being tried; a fallback replaces it
        self.replica: Replica | None = None
        self.status = 500
        self.failure: Failure | None = None
        self.response_started = False
        self.sse = False  # the answer is an SSE stream, so a late error can still be told in-band
        self.at_event_boundary = True
        self.bytes_sent = 0
        self.first_byte_at: float | None = None
        self.usage: tuple[int, int] | None = None
        self.finished = False  # the exchange ran to its end (the client may have left right after)
        self.held_for_wake: float | None = None

    def client_left(self) -> None:
        """The client went away (the run was cancelled): 499, unless the answer had been given."""
        if self.finished:
            return
        engine = self.engine
        self.forwarder.metrics.child(self.forwarder.metrics.client_disconnects, engine.metric_model, engine.name).inc()
        self.status, self.failure = CLIENT_CLOSED, Failure.CLIENT_DISCONNECT
        self.finished = True
        self.count()

    def result(self) -> ForwardResult:
        return ForwardResult(
            self.status,
            self.engine,
            self.replica.url if self.replica is not None else None,
            self.failure,
            self.usage,
            self.first_byte_at,
            self.bytes_sent,
            self.sse,
            self.held_for_wake,
        )

    async def run(self, clock: ExchangeClock) -> None:
        """The whole exchange, behind the routed engine's concurrency gate and total timeout; never
        raises but for cancellation (the client went away). `clock` keeps its time limits."""
        engine, metrics = self.request.engine, self.forwarder.metrics
        in_flight = metrics.in_flight_of(engine.metric_model, engine.name)
        in_flight.count += 1
        gate = engine.gate
        admitted = False
        self.clock = clock
        self.held: list[ConcurrencyGate] = []  # fallback engines' gates entered on the way, held to the end
        waker = engine.pool.waker  # scale to zero: None for most engines
        since = self.request.started  # the retries' deadline counts from here
        try:
            if waker is not None:
                waker.request_started()
                if waker.tended and not waker.serving:  # asleep, stopping, or not known yet: held
                    if waker.asleep and waker.spec.fallback_while_waking and engine.fallback is not None:
                        waker.want_wake()  # the fallback serves meanwhile
                    else:
                        since = await self._hold(waker)
            if gate is not None:
                waited = await gate.acquire(engine.name)
                admitted = True
                metrics.child(metrics.queue_wait, engine.name).observe(waited)
            # The relay runs here rather than inside the attempt that opened the answer: every chunk
            # resumes each coroutine between the event loop and `readany()`, the fewer the cheaper.
            total = engine.timeouts.total
            if total is None:
                opened = await self._try_replicas(since)
                if opened is not None:
                    await self._relay(opened)
            else:
                try:
                    async with asyncio.timeout(total):
                        opened = await self._try_replicas(since)
                        if opened is not None:
                            await self._relay(opened)
                except TimeoutError:
                    await self._fail(Failure.TIMEOUT_TOTAL)
        except (EngineBusy, EngineWaking) as error:
            kind = Failure.ENGINE_OVERLOADED if isinstance(error, EngineBusy) else Failure.ENGINE_WAKING
            metrics.child(metrics.rejected, kind, self.request.client).inc()
            self.failure = kind
            await send_error(self.send, error, [(ENGINE_HEADER, engine.name_header), *self.request.extra_headers])
            self.status = error.status
        except Exception:  # a bug of ours: log it, answer 500 without details
            log.exception("unexpected error while forwarding to engine %s", self.engine.name)
            await self._fail(Failure.INTERNAL)
        finally:
            in_flight.count -= 1
            if waker is not None:
                waker.request_ended()
            for held in self.held:
                held.release()
            if admitted and gate is not None:
                gate.release()
        self.finished = True  # not when cancelled: the client left first
        self.count()  # at once: a client that asks /metrics next must see this request

    async def _hold(self, waker: Waker) -> float:
        """Wait while the engine wakes (waker.py); when it cannot be held or does not wake in time, its
        fallback serves, if it has one, as for any engine that cannot take a request. Returns when the
        wait ended: the retries' deadline counts from then (the wake is not the engine's slowness)."""
        engine = self.engine
        held_at = time.perf_counter()
        try:
            await waker.hold(engine.name)
        except EngineWaking:
            if engine.fallback is None:
                raise
        finally:
            self.held_for_wake = time.perf_counter() - held_at
        return time.perf_counter()

    def count(self) -> None:
        """The request's metrics, credited to the engine that answered."""
        request, engine = self.request, self.engine
        stats = self.forwarder.metrics.route_stats(engine.metric_model, engine.name, request.path)
        stats.answered(self.status).inc()
        stats.duration(self.sse).observe(time.perf_counter() - request.started)
        if self.first_byte_at is not None:
            stats.first_byte(self.sse).observe(self.first_byte_at - request.started)

    async def _try_replicas(self, since: float) -> _Opened | None:
        """Try the engine's replicas, then its fallback engine, until one takes the request: the answer
        opened, or None when the request was answered otherwise (an error, or nothing left to relay).

        Only failures before any byte went to the client are retried: a connection that could not be
        made and a 502/503 answer. A bounded number of attempts, within a deadline counted from `since`.
        """
        request, metrics = self.request, self.forwarder.metrics
        routes, retries = request.routes, request.routes.settings.retries
        routed = request.engine
        deadline = since + retries.deadline
        tried: list[Replica] = []
        visited = {routed.name}
        last: _Retryable | None = None
        for attempt in range(retries.max_attempts):
            replica = self._choose(tried)
            while replica is None:  # every replica of this engine was tried: on to its fallback
                fallback = routes.engine_named(self.engine.fallback) if self.engine.fallback else None
                if fallback is None or fallback.name in visited:
                    break
                if fallback.gate is not None:  # a fallback is bound by its own limit (EngineBusy: 429)
                    await fallback.gate.acquire(fallback.name)
                    self.held.append(fallback.gate)
                self.engine, tried = fallback, []
                visited.add(fallback.name)
                metrics.child(metrics.fallbacks, routed.name, fallback.name).inc()
                replica = self._choose(tried)
            if replica is None or (attempt and time.perf_counter() > deadline):
                break
            if attempt:
                metrics.child(metrics.retries, routed.name).inc()
            tried.append(replica)
            outcome = await self._attempt(replica)
            if not isinstance(outcome, _Retryable):
                return outcome
            last = outcome
        if last is not None and last.answer is not None:  # the engine's own 502/503, relayed as it said it
            await self._relay_error_answer(last.answer)
        elif last is not None:
            await self._fail(last.failure, last.error)
        else:
            await self._fail(Failure.CONNECT, message=f"The engine `{routed.name}` has no endpoint to try.")
        return None

    def _choose(self, tried: list[Replica]) -> Replica | None:
        request, engine = self.request, self.engine
        policy = engine.policy
        # A discovered adapter goes only to the replicas that list it, its `holders` (route_table.py).
        now = time.monotonic()
        pick = pick_replica(engine.pool, now, policy, request.affinity_key, request.prefix, tried, engine.holders)
        if pick is None:
            return None
        self.forwarder.metrics.balancing_decision(engine.name, policy.name, pick.decision).inc()
        return pick.replica

    async def _attempt(self, replica: Replica) -> _Opened | _Retryable | None:
        """One try on one replica: the answer opened (its head sent, the replica held until it is
        relayed), None once answered otherwise (or failed for good), or what went wrong when the request
        may go to another replica."""
        engine = self.engine
        timeouts = engine.timeouts
        health = self.request.routes.settings.health
        response: aiohttp.ClientResponse | None = None
        opened = False
        replica.outstanding += 1
        self.replica = replica
        try:
            try:
                with self.clock.limit(timeouts.first_byte, Failure.TIMEOUT_FIRST_BYTE):
                    sent_at = time.perf_counter()
                    response = await self._send_request(replica)
                    answered_at = time.perf_counter()
                    if response.status in RETRYABLE_STATUSES:
                        replica.failed(health)
                        return await self._retryable_answer(response)
                    sse = is_event_stream(response.headers.get("Content-Type"))
                    streaming = response.content_length is None or sse
                    first = await response.content.readany()
                    self.first_byte_at = time.perf_counter() if streaming else answered_at
                    replica.observe_latency(self.first_byte_at - sent_at, time.monotonic())
            except aiohttp.ConnectionTimeoutError:
                replica.failed(health)
                return _Retryable(
                    Failure.TIMEOUT_CONNECT, failure_error(Failure.TIMEOUT_CONNECT, engine.name, timeouts)
                )
            except TimeoutError:  # the engine took the request: sending it again would double the work
                replica.failed(health)
                await self._fail(Failure.TIMEOUT_FIRST_BYTE)
                return None
            except aiohttp.ClientError as exc:
                replica.failed(health)
                kind = Failure.NOT_FOUND if isinstance(exc, aiohttp.ClientConnectorDNSError) else Failure.CONNECT
                ENGINE_WARNINGS.warn(
                    f"{engine.name}:{kind}",
                    "engine %s at %s: request failed: %s",
                    engine.name,
                    replica.url,
                    _reason(exc),
                )
                return _Retryable(kind, failure_error(kind, engine.name, timeouts))
            status = response.status
            replica.failed(health) if status >= 500 else replica.succeeded()
            headers = headers_for_client(response.raw_headers)
            headers.append((ENGINE_HEADER, engine.name_header))
            headers.extend(self.request.extra_headers)
            if streaming:
                headers = _with_stream_headers(headers)
            else:  # relayed as it arrives all the same: never held whole, whatever its size
                headers.append((b"content-length", str(response.content_length).encode()))
            self.sse = sse
            await self.send({"type": "http.response.start", "status": status, "headers": headers})
            self.response_started = True
            self.status = status
            self.request.payload.release()  # no retry from here on: the body need not outlive a long answer
            opened = True
            return _Opened(replica, response, first, streaming)
        finally:
            if not opened:
                replica.outstanding -= 1
                if response is not None:
                    response.close()

    async def _send_request(self, replica: Replica) -> aiohttp.ClientResponse:
        """POST to the engine, once more on a fresh connection if a pooled one turned out to be closed.

        An engine closes idle keep-alive connections on its own schedule; a request that meets such a
        connection fails before the engine has read it, so sending it again is safe. Once only: the same
        errors also mean an engine that read the request and then failed, and a generation must not be
        sent again and again.
        """
        request, engine = self.request, self.engine
        headers = headers_for_engine(request.client_headers, engine.headers + engine.auth_headers(request.engine_auth))
        headers.append(("X-Request-Id", request.engine_request_id))  # vLLM takes it as its own request id
        if request.traceparent is not None:  # tracing on: the engine's spans become children of ours
            headers = [(n, v) for n, v in headers if n.lower() not in ("traceparent", "tracestate")]
            headers.append(("traceparent", request.traceparent))
        url = replica.url + engine.path_on_engine(request.path)
        session = self.forwarder.session
        body = request.payload.for_model(engine.model)
        try:
            return await session.post(url, data=body, headers=headers, timeout=engine.client_timeout)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            if isinstance(exc, aiohttp.ClientConnectorError):
                raise  # a fresh connection failed: the engine is down, not a stale pool entry
            return await session.post(url, data=body, headers=headers, timeout=engine.client_timeout)

    async def _retryable_answer(self, response: aiohttp.ClientResponse) -> _Retryable:
        """A 502/503 is read to be relayed if no other replica can do better, but only up to a small
        size: an engine that sends an endless error body costs the gateway at most that much."""
        engine = self.engine
        body = await read_capped(response, RETRYABLE_ANSWER_CAP)
        if body is None:
            message = (
                f"The engine `{engine.name}` answered {response.status} with an error body of more than "
                f"{RETRYABLE_ANSWER_CAP} bytes."
            )
            return _Retryable(
                Failure.BAD_ANSWER, failure_error(Failure.BAD_ANSWER, engine.name, engine.timeouts, message)
            )
        answer = _EngineAnswer(engine, response.status, response.raw_headers, body)
        return _Retryable(Failure.CONNECT, failure_error(Failure.CONNECT, engine.name, engine.timeouts), answer)

    async def _relay_error_answer(self, answer: _EngineAnswer) -> None:
        self.engine = answer.engine
        headers = headers_for_client(answer.headers)
        headers += [(ENGINE_HEADER, answer.engine.name_header), (b"content-length", str(len(answer.body)).encode())]
        headers.extend(self.request.extra_headers)
        await self.send({"type": "http.response.start", "status": answer.status, "headers": headers})
        self.response_started = True
        await self.send({"type": "http.response.body", "body": answer.body})
        self.status = answer.status

    async def _relay(self, opened: _Opened) -> None:
        """Chunks go out as they come in, streams and whole answers alike; only the last two are kept, to
        find the usage (it closes a stream, and ends a JSON answer). Then the replica and the connection
        are given back: a finished answer returns its connection to the pool; anything else closes it,
        which is how an engine learns that nobody waits for its tokens any more.

        The idle timer runs only while waiting for the engine, never while a slow client takes its time
        to read. One function on purpose: each chunk resumes every coroutine between the event loop and
        `readany()`, and a stream has thousands.
        """
        replica, response, chunk, send = opened.replica, opened.response, opened.first, self.send
        complete = False
        try:
            if not opened.streaming and len(chunk) == response.content_length:  # a JSON answer in one read
                await send({"type": "http.response.body", "body": chunk})
                self.bytes_sent = len(chunk)
                complete = True
                if self.status == 200 and USAGE_KEY in chunk:
                    self._count_tokens(find_usage(chunk))
                return
            idle = self.engine.timeouts.idle
            clock = self.clock
            loop_time = asyncio.get_running_loop().time
            older = previous = b""
            sse = self.sse
            events = 0  # SSE events relayed: a token count when the engine reports no usage
            usage_filter = UsageChunkFilter() if self.request.strip_usage and opened.streaming else None
            try:
                with clock.limit(None, Failure.TIMEOUT_IDLE):
                    while chunk:
                        if usage_filter is not None:
                            chunk = usage_filter.feed(chunk)
                        if chunk:
                            await send({"type": "http.response.body", "body": chunk, "more_body": True})
                            self.bytes_sent += len(chunk)
                            if sse:
                                events += chunk.count(b"data:")
                                self.at_event_boundary = chunk.endswith(b"\n\n")
                        older, previous = previous, chunk
                        if idle is not None:
                            clock.expire_at(loop_time() + idle, Failure.TIMEOUT_IDLE)
                            chunk = await response.content.readany()
                            clock.pause()
                        else:
                            chunk = await response.content.readany()
            except TimeoutError:
                replica.failed(self.request.routes.settings.health)
                await self._fail(Failure.TIMEOUT_IDLE, keep_status=True)
                return
            except aiohttp.ClientError as exc:
                replica.failed(self.request.routes.settings.health)
                engine = self.engine
                ENGINE_WARNINGS.warn(
                    f"{engine.name}:broke", "engine %s: answer broke off: %s", engine.name, _reason(exc)
                )
                await self._fail(Failure.BROKEN_STREAM, keep_status=True)
                return
            complete = True
            if usage_filter is not None:
                await send({"type": "http.response.body", "body": usage_filter.flush(), "more_body": False})
                self._count_tokens(usage_filter.usage)
            else:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                tail = older + previous
                if (sse or self.status == 200) and USAGE_KEY in tail:
                    self._count_tokens(find_usage(tail))
            if sse:
                self._observe_token_pace(events)
        finally:
            replica.outstanding -= 1
            response.release() if complete else response.close()

    def _observe_token_pace(self, events: int) -> None:
        """One observation per stream, not per token: the mean gap between output tokens."""
        tokens = self.usage[1] if self.usage else events
        if self.first_byte_at is not None and tokens > 1:
            elapsed = time.perf_counter() - self.first_byte_at
            engine = self.engine
            self.forwarder.metrics.child(
                self.forwarder.metrics.time_per_output_token, engine.metric_model, engine.name
            ).observe(elapsed / (tokens - 1))

    async def _fail(
        self, kind: Failure, error: GatewayError | None = None, message: str | None = None, keep_status: bool = False
    ) -> None:
        """Answer an upstream failure the only honest way left at this point.

        Before any byte went out: a JSON error with the right status. In an SSE stream: an error event
        and `[DONE]`. In any other answer already under way: stop without finishing it, so the client
        sees a cut connection rather than a body with an error glued to it. The result's status becomes
        the error's, unless `keep_status` (a relay that broke keeps the status the engine answered).
        """
        engine = self.engine
        error = error or failure_error(kind, engine.name, engine.timeouts, message)
        self.forwarder.metrics.child(self.forwarder.metrics.upstream_errors, engine.name, kind).inc()
        self.failure = kind
        if not keep_status:
            self.status = error.status
        ENGINE_WARNINGS.warn(f"{engine.name}:{kind}", "engine %s: %s", engine.name, error.message)
        if not self.response_started:
            await send_error(self.send, error, [(ENGINE_HEADER, engine.name_header), *self.request.extra_headers])
            self.response_started = True
        elif self.sse:
            event = sse_error_event(error)
            if not self.at_event_boundary:
                event = b"\n\n" + event  # end the event the engine left half-written
            await self.send({"type": "http.response.body", "body": event, "more_body": False})

    def _count_tokens(self, usage: tuple[int, int] | None) -> None:
        self.usage = usage
        if usage is not None:
            engine = self.engine
            stats = self.forwarder.metrics.route_stats(engine.metric_model, engine.name, self.request.path)
            prompt, completion = stats.tokens()
            prompt.inc(usage[0])
            completion.inc(usage[1])


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
