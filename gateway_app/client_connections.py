"""The front door's bounds on client connections: request heads, time, and how many connections.

uvicorn's httptools protocol parses whatever arrives, for as long as it takes: a 100 MB header line is
accumulated and parsed (seconds of CPU, everyone else waits), a connection that sends half a head is
kept forever, and connections are accepted until file descriptors run out. This protocol adds the
bounds a public endpoint needs, before any parsing or application code runs:

- a request head larger than `max_header_bytes`, or with more than `max_headers` headers, gets 431 and
  the connection is closed; the size is checked on the raw bytes before they reach the parser;
- a head that is not complete within `head_timeout` seconds gets 408 (or a silent close when nothing
  was sent at all), and so does a body that pauses longer than `body_timeout` or, past that, comes
  slower than `body_min_rate`; an answer the client does not read for `send_timeout` seconds is
  abandoned. Timers start only when a head or a body does not arrive whole in one read, so the usual
  request costs none;
- at most `max_connections` client connections: at the limit, the connection that has waited longest
  without sending a complete request head makes room (a kept-alive idle connection, or a slow head),
  then the one whose request body has been silent longest, then one whose client stopped reading its
  answer; with none of those, the new one gets 503. Behind an Ingress every client shares the
  controller's few addresses, so the choice is by state, never by address;
- a response that completes before its request body was read closes the connection (after a short,
  bounded drain), so a client cannot keep feeding a body nobody reads;
- `Upgrade` is ignored (RFC 9110 §7.8): llhttp ends such a request at its head, so the head is parsed
  again without it, and the body and any later requests are read as plain HTTP/1.1.

Refusals are counted in metrics and logged at most once a minute per reason: an attacker must not be
able to fill the logs either.
"""

from __future__ import annotations

import asyncio
import http
import logging
import resource
import socket
import struct
from collections.abc import Callable
from typing import Any

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from gateway_app.config import ClientLimits
from gateway_app.errors import GatewayError, GatewayOverloaded, InvalidRequest, RequestHeaderTooLarge, RequestTimeout
from gateway_app.exchange_clock import CLIENT_GONE_EXTENSION
from gateway_app.log_setup import ThrottledWarning
from gateway_app.metrics import GatewayMetrics

log = logging.getLogger("llm_gateway.clients")

HEAD_END = b"\r\n\r\n"
# Descriptors kept for everything but client connections: the listening sockets, watched files and
# their reloads, Redis, the Kubernetes API, the log, a margin.
RESERVED_DESCRIPTORS = 64
# Each client connection may need one engine connection at the same time.
DESCRIPTORS_PER_CONNECTION = 2
# A default that a small pod's memory can hold (about 7 KiB per idle connection) whatever the file limit.
MAX_CONNECTIONS_CEILING = 10_000
# After a refusal, what the client still sends is read and dropped for this long (or this many bytes),
# so that it sees the answer rather than a reset.
DRAIN_SECONDS = 2.0
DRAIN_BYTES = 1 << 20
NOT_FORWARDED_ON_REPLAY = frozenset({b"upgrade", b"http2-settings"})


def connections_for_fd_limit(soft_limit: int) -> int:
    """How many client connections an open-file limit allows, keeping room for engines and files."""
    return max(16, min(MAX_CONNECTIONS_CEILING, (soft_limit - RESERVED_DESCRIPTORS) // DESCRIPTORS_PER_CONNECTION))


def raise_fd_limit() -> int:
    """Raise the soft open-file limit to the hard one (as Go and nginx do) and return it.

    Containers often start with a soft limit of 1,024 and a far higher hard one.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    return soft


def raw_error_response(error: GatewayError) -> bytes:
    """An OpenAI-shaped error as HTTP/1.1 bytes, for answers given before any request reached the app."""
    body = error.body()
    head = [
        f"HTTP/1.1 {error.status} {http.HTTPStatus(error.status).phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    head += [f"{name}: {value}" for name, value in error.extra_headers().items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class ConnectionGuard:
    """What the client connections of one listener share: the limits in service, the count, and who
    may be evicted.

    Three ordered sets, oldest first, in the order they give way: connections waiting for a request head
    (idle kept-alive ones and slow heads), connections whose request body is still arriving (least
    recently active first), and connections whose client stopped reading its answer. A connection whose
    request is being served and read is in none of them: it is never evicted.
    """

    def __init__(
        self, limits: Callable[[], ClientLimits], metrics: GatewayMetrics, fd_limit: int, report: bool = True
    ) -> None:
        self.limits = limits
        self.metrics = metrics
        self.auto_max_connections = connections_for_fd_limit(fd_limit)
        self.open = 0
        self.waiting_for_head: dict[GuardedHttpProtocol, None] = {}
        self.reading_body: dict[GuardedHttpProtocol, None] = {}
        self.not_reading: dict[GuardedHttpProtocol, None] = {}
        self.warnings = ThrottledWarning(log)
        if report:
            metrics.client_connections.set_function(lambda: self.open)
            metrics.client_connections_limit.set_function(lambda: self.max_connections)

    @property
    def max_connections(self) -> int:
        return self.limits().max_connections or self.auto_max_connections

    def opened(self) -> bool:
        """Count a new connection; make room by evicting one if at the limit. False: no room at all."""
        self.open += 1
        if self.open <= self.max_connections:
            return True
        victim = (
            next(iter(self.waiting_for_head), None)
            or next(iter(self.reading_body), None)
            or next(iter(self.not_reading), None)
        )
        self.warnings.warn(
            "budget",
            f"client connection limit ({self.max_connections}) reached: closing connections "
            "that have not sent a whole request",
        )
        if victim is None:
            return False
        victim.abandon("evicted")
        return True

    def forget(self, connection: GuardedHttpProtocol) -> None:
        self.waiting_for_head.pop(connection, None)
        self.reading_body.pop(connection, None)
        self.not_reading.pop(connection, None)

    def closed(self, connection: GuardedHttpProtocol) -> None:
        self.open -= 1
        self.forget(connection)

    def refused(self, reason: str, message: str) -> None:
        self.metrics.client_connections_closed.labels(reason).inc()
        self.warnings.warn(reason, message)


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the front door's bounds (see the module docstring).

    `guard_for(port)` gives the guard of the listener a connection arrived on: the API port and the
    metrics port keep separate budgets, so that a flood of API clients never locks out Prometheus.
    """

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        guard_for: Callable[[int | None], ConnectionGuard],
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.guard_for = guard_for
        self.awaiting_head = True  # no complete request head yet since the connection or the last request
        self.head_bytes = 0  # bytes of the current head received so far
        self.head_tail = b""  # its last bytes, to find a head end split between two reads
        self.head_measured = False  # the raw check saw where this head ends (not so for a second pipelined head)
        self.head_timer: asyncio.TimerHandle | None = None
        self.body_timer: asyncio.TimerHandle | None = None
        self.body_started = self.body_last_read = 0.0  # loop time: the body's clock, once it is on one
        self.body_bytes = 0  # received since its clock started
        self.send_timer: asyncio.TimerHandle | None = None
        self.closing_reason: str | None = None  # set once the connection is being refused or abandoned
        self.drained = 0
        # Told when the connection is lost: the requests being forwarded (exchange_clock.watch_client).
        self.gone_callbacks: dict[Callable[[], None], None] = {}
        self.client_gone_extension = {"watch": self.watch_client}

    # Connection life

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.guard = self.guard_for(self.server[1] if self.server else None)
        self.client_limits = self.guard.limits()
        if not self.guard.opened():
            self.refuse(
                "over_capacity",
                GatewayOverloaded(
                    "The gateway has no room for another connection right now; retry shortly.",
                    retry_after=1,
                ),
                drain=False,
            )
            return
        self.guard.waiting_for_head[self] = None
        self.head_timer = self.loop.call_later(self.client_limits.head_timeout, self.head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.closed(self)
        self.cancel_timers()
        super().connection_lost(exc)
        for callback in list(self.gone_callbacks):
            callback()
        self.gone_callbacks.clear()

    def watch_client(self, callback: Callable[[], None]) -> Callable[[], None] | None:
        """`callback()` when this connection is lost (before the returned function is called); None when
        it is lost already (the client may leave while its request waits to be admitted), so that the
        caller does not start what nobody waits for."""
        if self.transport.is_closing() or (self.cycle is not None and self.cycle.disconnected):
            return None
        self.gone_callbacks[callback] = None

        def unwatch() -> None:
            self.gone_callbacks.pop(callback, None)

        return unwatch

    def abandon(self, reason: str) -> None:
        """Close at once, dropping what is queued for a client that does not read (a plain close would
        wait for it to read, holding the descriptor and the place in the budget)."""
        self.guard.metrics.client_connections_closed.labels(reason).inc()
        self.guard.forget(self)
        self.closing_reason = reason
        self.stop_pending_requests()
        reset(self.transport)

    def request_in_progress(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    # Bytes in

    def data_received(self, data: bytes) -> None:
        if self.closing_reason is not None:
            self.drain(data)
            return
        if self.awaiting_head:
            if not self.head_fits(data):
                self.refuse(
                    "head_too_large",
                    RequestHeaderTooLarge(
                        f"The request head is larger than the limit of {self.client_limits.max_header_bytes} bytes."
                    ),
                )
                return
        elif self in self.guard.reading_body:
            self.guard.reading_body.pop(self, None)
            self.guard.reading_body[self] = None  # most recently active last
            self.body_bytes += len(data)
            self.body_last_read = self.loop.time()
        self._unset_keepalive_if_required()
        self.feed(data)
        self.start_clocks()

    def start_clocks(self) -> None:
        """After a read: a head or a body left incomplete goes on the clock (once)."""
        if self.closing_reason is not None:
            return
        if self.awaiting_head:
            # Part of the next head on a kept-alive connection (one that comes while an answer is under
            # way waits for it to end: see on_response_done).
            if self.head_bytes and self.head_timer is None and not self.request_in_progress():
                self.head_timer = self.loop.call_later(self.client_limits.head_timeout, self.head_timed_out)
        elif self.body_timer is None and self in self.guard.reading_body:
            self.body_started = self.body_last_read = self.loop.time()
            self.body_bytes = 0
            self.body_timer = self.loop.call_at(self.body_deadline(), self.body_timed_out)

    def body_deadline(self) -> float:
        """When the body is late: silent for body_timeout, or, after that first stretch, slower than
        body_min_rate on average."""
        limits = self.client_limits
        return min(
            self.body_last_read + limits.body_timeout,
            self.body_started + limits.body_timeout + self.body_bytes / limits.body_min_rate,
        )

    def feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.serve_as_plain_http(data[upgrade.args[0] :])
        except httptools.HttpParserError:
            if self.closing_reason is None:  # not one of ours, raised from a callback below
                self.refuse("bad_request", InvalidRequest("The request is not valid HTTP/1.1."))

    def head_fits(self, data: bytes) -> bool:
        """Whether the head being received stays within the limit, judged on raw bytes before parsing."""
        limit = self.client_limits.max_header_bytes
        start = 0
        if self.head_bytes == 0:
            while data.startswith(b"\r\n", start):  # empty lines before a request line are skipped, not its end
                start += 2
        in_this_read = -1
        if self.head_tail:  # the end of the head may straddle two reads
            joined = self.head_tail + data[:3]
            split = joined.find(HEAD_END)
            if split >= 0:
                in_this_read = split + 4 - len(self.head_tail)
        if in_this_read < 0:
            found = data.find(HEAD_END, start)
            in_this_read = found + 4 if found >= 0 else -1
        if in_this_read >= 0:
            self.head_measured = True
            return self.head_bytes + in_this_read <= limit
        self.head_bytes += len(data)
        self.head_tail = data[-3:] if len(data) >= 3 else (self.head_tail + data)[-3:]
        return self.head_bytes <= limit

    def serve_as_plain_http(self, rest: bytes) -> None:
        """Ignore an `Upgrade` (RFC 9110 §7.8), as clients that offer h2c on every request expect.

        llhttp ends such a request at its head, with no body, and stops parsing. Its request has only
        been scheduled, not run, so it is still time to reopen it: the head goes again, without the
        upgrade, to a fresh parser (its callbacks skipped), and the body and later requests follow as
        plain HTTP/1.1.
        """
        head = [f"{self.scope['method']} ".encode() + self.url + f" HTTP/{self.scope['http_version']}\r\n".encode()]
        for name, value in self.headers:
            if name in NOT_FORWARDED_ON_REPLAY:
                continue
            if name == b"connection":
                tokens = [t.strip() for t in value.split(b",") if t.strip().lower() not in NOT_FORWARDED_ON_REPLAY]
                if not tokens:
                    continue
                value = b", ".join(tokens)
            head.append(name + b": " + value + b"\r\n")
        head.append(b"\r\n")
        self.cycle.more_body = True
        self.awaiting_head = False
        self.guard.reading_body[self] = None
        self.parser = httptools.HttpRequestParser(_ReplayTarget(self))
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self.feed(b"".join(head) + rest)

    # Parser callbacks

    def on_headers_complete(self) -> None:
        self.cancel_head_timer()
        self.awaiting_head = False
        measured, self.head_measured = self.head_measured, False
        self.head_bytes, self.head_tail = 0, b""
        self.guard.waiting_for_head.pop(self, None)
        limits = self.client_limits
        if len(self.headers) > limits.max_headers:
            self.refuse(
                "too_many_headers",
                RequestHeaderTooLarge(
                    f"The request has {len(self.headers)} headers; the limit is {limits.max_headers}."
                ),
            )
            raise _Refused  # stops the parser: nothing of this request reaches the app
        if not measured and (
            len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers) > limits.max_header_bytes
        ):
            # A second pipelined head in the same read: the raw check saw only the first.
            self.refuse(
                "head_too_large",
                RequestHeaderTooLarge(f"The request head is larger than the limit of {limits.max_header_bytes} bytes."),
            )
            raise _Refused
        self.guard.reading_body[self] = None
        self.scope.setdefault("extensions", {})[CLIENT_GONE_EXTENSION] = self.client_gone_extension  # type: ignore[assignment]
        super().on_headers_complete()
        cycle = self.cycle
        cycle.on_response = lambda: self.on_response_done(cycle)

    def on_message_complete(self) -> None:
        self.awaiting_head = True  # what follows on this connection is the next request's head
        self.guard.reading_body.pop(self, None)
        if self.body_timer is not None:
            self.body_timer.cancel()
            self.body_timer = None
        super().on_message_complete()

    def on_response_done(self, cycle: RequestResponseCycle) -> None:
        """After each answer, knowing which request it answered (pipelining: not always `self.cycle`)."""
        next_in_line = bool(self.pipeline)
        self.on_response_complete()  # uvicorn's: starts the next pipelined request, or the keep-alive timer
        if self.transport.is_closing() or self.closing_reason is not None:
            return
        if cycle.more_body:
            # Answered before its body was read (401, 413, 404 ...): nobody will read the rest.
            self.closing_reason = "unread_body"
            self.guard.forget(self)
            self.stop_reading_soon()
            return
        if not next_in_line and not self.request_in_progress():
            self.client_limits = self.guard.limits()  # a reload applies from the next request on
            self.guard.waiting_for_head[self] = None  # idle, or a slow next head: evictable, oldest first
            if self.head_bytes and self.head_timer is None:  # the next head began during this answer
                self.head_timer = self.loop.call_later(self.client_limits.head_timeout, self.head_timed_out)

    # Bytes out

    def pause_writing(self) -> None:
        """The client is not reading as fast as its answer comes: give it `send_timeout` to catch up."""
        super().pause_writing()
        if self.send_timer is None and self.closing_reason is None:
            self.send_timer = self.loop.call_later(self.client_limits.send_timeout, self.abandon, "send_timeout")
            self.guard.not_reading[self] = None

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.send_timer is not None:
            self.send_timer.cancel()
            self.send_timer = None
        self.guard.not_reading.pop(self, None)

    # Refusing

    def body_timed_out(self) -> None:
        self.body_timer = None
        if self.closing_reason is not None or self not in self.guard.reading_body:
            return
        deadline = self.body_deadline()
        if self.loop.time() < deadline:  # bytes came meanwhile: the clock moves on
            self.body_timer = self.loop.call_at(deadline, self.body_timed_out)
            return
        limits = self.client_limits
        silent = self.body_last_read + limits.body_timeout <= deadline
        self.refuse(
            "body_timeout",
            RequestTimeout(
                f"No part of the request body arrived for {limits.body_timeout} s."
                if silent
                else f"The request body arrives slower than {limits.body_min_rate} bytes a second."
            ),
        )

    def head_timed_out(self) -> None:
        self.head_timer = None
        if self.closing_reason is not None or not self.awaiting_head or self.request_in_progress():
            return
        if self.head_bytes == 0:
            self.guard.metrics.client_connections_closed.labels("idle").inc()
            self.closing_reason = "idle"
            self.transport.close()  # nothing was sent: nobody to answer
            return
        self.refuse(
            "head_timeout",
            RequestTimeout(f"The request head was not received within {self.client_limits.head_timeout} s."),
            drain=False,
        )

    def refuse(self, reason: str, error: GatewayError, drain: bool = True) -> None:
        """Answer with an error and close, without parsing anything more of this connection."""
        self.closing_reason = reason
        self.cancel_head_timer()
        self.guard.forget(self)
        self.guard.refused(reason, f"refused a client connection: {error.message}")
        self.stop_pending_requests()
        if self.cycle is not None and self.cycle.response_started and not self.cycle.response_complete:
            reset(self.transport)  # an answer is under way: another one cannot be written into it
            return
        self.transport.write(raw_error_response(error))
        if drain:
            self.stop_reading_soon()
        else:
            self.transport.close()

    def stop_pending_requests(self) -> None:
        """Requests of this connection not yet answered stop at their next step (their answers go nowhere)."""
        for cycle in [self.cycle, *(queued for queued, _ in self.pipeline)]:
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
        self.pipeline.clear()

    def stop_reading_soon(self) -> None:
        """Send what is queued and a FIN, read and drop what the client still sends for a moment (so it
        sees the answer instead of a reset), then close for good."""
        self.stop_pending_requests()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(DRAIN_SECONDS, reset, self.transport)

    def drain(self, data: bytes) -> None:
        self.drained += len(data)
        if self.drained > DRAIN_BYTES:
            reset(self.transport)

    def cancel_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def cancel_timers(self) -> None:
        self.cancel_head_timer()
        for timer in (self.body_timer, self.send_timer):
            if timer is not None:
                timer.cancel()
        self.body_timer = self.send_timer = None


class _ReplayTarget:
    """The parser callbacks of a head parsed again without its Upgrade: that head's own callbacks are
    news to nobody and are dropped; from its body on, everything goes to the connection as usual."""

    def __init__(self, connection: GuardedHttpProtocol) -> None:
        self.connection = connection
        self.in_head = True

    def on_message_begin(self) -> None:
        if not self.in_head:
            self.connection.on_message_begin()

    def on_url(self, url: bytes) -> None:
        if not self.in_head:
            self.connection.on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_head:
            self.connection.on_header(name, value)

    def on_headers_complete(self) -> None:
        if self.in_head:
            self.in_head = False
        else:
            self.connection.on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self.connection.on_body(body)

    def on_message_complete(self) -> None:
        self.connection.on_message_complete()


def reset(transport: asyncio.Transport) -> None:
    """Close with a reset: what is still queued for the client is dropped, by us and by the kernel (a
    plain close, or an abort, leaves the kernel sending it to a client that may never read it)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except (OSError, ValueError):  # already closed (ValueError: its descriptor is gone)
            pass
    transport.abort()


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a request that was refused."""
