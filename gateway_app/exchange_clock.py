"""One clock per forwarded request: its time limits and its client leaving, on a single timer.

A request to an engine goes through phases with their own limit (the first byte, then each silence in
the middle of the answer) and may end early because its client went away. `asyncio.timeout` per phase
and a second task watching the client cost a timer, a task and a few loop turns each, for every request
and every chunk; this clock does the same job as a cancel scope, the way `asyncio.timeout` does it
(cancel the task, then turn the cancellation into an exception where it belongs), with one timer that is
only moved when it would fire too late, and no task at all when the server tells of a client leaving
(client_connections.py, `CLIENT_GONE_EXTENSION`). Even that one timer is spared when the limit is
further away than the next look of the loop's `DeadlineSweep` (the usual case: minutes), which arms it
only once the limit comes near: arming and cancelling a timer cost more than the rest of the clock.

    clock = ExchangeClock(deadlines)  # one DeadlineSweep per event loop
    try:
        with clock, watch_client(scope, receive, clock):
            with clock.limit(first_byte, Failure.TIMEOUT_FIRST_BYTE):  # TimeoutError at its end when late
                ...
    except ClientGone:
        ...
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any

from starlette.types import Receive, Scope

from gateway_app.failures import Failure

# An ASGI extension our server (client_connections.GuardedHttpProtocol) puts in each request's scope:
# `{"watch": watch(callback) -> unwatch}`; the callback runs when the client's connection is lost.
CLIENT_GONE_EXTENSION = "llm_gateway.client_gone"
# How often the open clocks are looked over: a limit further away than this needs no timer yet.
SWEEP_SECONDS = 1.0


class ClientGone(Exception):
    """The client closed its connection before its answer was complete."""


class DeadlineSweep:
    """The open clocks of one event loop, looked over every `SWEEP_SECONDS` while there are any.

    A clock arms a timer of its own only for a limit that falls before the next look (`horizon`); each
    look arms those whose limit falls before the look after it. So a request whose limits are minutes
    away, as they usually are, never arms one, and the limits still fire on time."""

    __slots__ = ("loop", "_open", "_next_look", "horizon")

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._open: dict[ExchangeClock, None] = {}
        self._next_look: asyncio.TimerHandle | None = None
        # Limits before this need a timer of their own; the next look sees the others. While no look is
        # coming (no clock open, or stopped), every limit does.
        self.horizon = math.inf

    def opened(self, clock: ExchangeClock) -> None:
        self._open[clock] = None
        if self._next_look is None:
            self.horizon = self.loop.time() + SWEEP_SECONDS
            self._next_look = self.loop.call_at(self.horizon, self._look)

    def closed(self, clock: ExchangeClock) -> None:
        self._open.pop(clock, None)

    def stop(self) -> None:
        """No more looks: the clocks still open arm their own timers."""
        if self._next_look is not None:
            self._next_look.cancel()
            self._next_look = None
        self.horizon = math.inf
        for clock in list(self._open):
            clock.arm_before(self.horizon)

    def _look(self) -> None:
        if not self._open:  # nothing to look after: no timer until a clock opens again
            self._next_look = None
            self.horizon = math.inf
            return
        self.horizon = self.loop.time() + SWEEP_SECONDS
        for clock in list(self._open):
            clock.arm_before(self.horizon)
        self._next_look = self.loop.call_at(self.horizon, self._look)


class ExchangeClock:
    """A cancel scope for the task that enters it, with one moving deadline and a 'client left' trigger."""

    __slots__ = (
        "_loop", "_sweep", "_task", "_deadline", "_reason", "_timer", "_timer_at", "_cancelling", "_open", "fired",
    )  # fmt: skip

    def __init__(self, sweep: DeadlineSweep) -> None:
        # The loop of the sweep, not asyncio.get_running_loop() again: each call of that is a getpid()
        # system call.
        self._loop = sweep.loop
        self._sweep = sweep
        task = asyncio.current_task(self._loop)
        assert task is not None, "an ExchangeClock runs inside a task"
        self._task = task
        self._deadline: float | None = None  # the limit of the phase under way (loop time)
        self._reason: Failure | None = None  # what passing it means
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._cancelling = 0
        self._open = False
        self.fired: Failure | None = None  # why this clock cancelled its task, once it did

    def __enter__(self) -> ExchangeClock:
        self._cancelling = self._task.cancelling()
        self._open = True
        self._sweep.opened(self)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._open = False
        self._sweep.closed(self)
        self._deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.fired is Failure.CLIENT_DISCONNECT and self._uncancelled(exc_type):
            raise ClientGone from exc

    def limit(self, seconds: float | None, reason: Failure) -> _Limit:
        """A phase that may last `seconds` (None: no limit): TimeoutError at its end when it lasted longer."""
        if seconds is not None:
            self.expire_at(self._loop.time() + seconds, reason)
        return _Limit(self, reason)

    def expire_at(self, deadline: float, reason: Failure) -> None:
        """Set (or move) the current phase's limit. Cheap enough for every chunk: a limit beyond the
        sweep's horizon needs no timer yet, and a timer is only moved when it would fire after the new
        deadline; firing early, it sets itself again."""
        self._deadline, self._reason = deadline, reason
        if deadline < self._sweep.horizon:
            self._arm(deadline)

    def arm_before(self, horizon: float) -> None:
        """The sweep's look: a limit that falls before `horizon` gets its timer now."""
        deadline = self._deadline
        if deadline is not None and deadline < horizon:
            self._arm(deadline)

    def _arm(self, deadline: float) -> None:
        if self._timer is None or self._timer_at > deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = deadline
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def pause(self) -> None:
        """No limit until the next `expire_at` (e.g. while a slow client reads: not the engine's time)."""
        self._deadline = None

    def client_left(self) -> None:
        """The client's connection is gone: cancel the request, unless it is already over."""
        if self._open and self.fired is None:
            self._fire(Failure.CLIENT_DISCONNECT)

    def _on_timer(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None or self.fired is not None or not self._open:
            return
        if self._loop.time() >= deadline:
            assert self._reason is not None
            self._fire(self._reason)
        elif deadline < self._sweep.horizon:  # the deadline moved on since the timer was set
            self._arm(deadline)

    def _fire(self, reason: Failure) -> None:
        self.fired = reason
        self._task.cancel()

    def _uncancelled(self, exc_type: type[BaseException] | None) -> bool:
        """Take back this clock's cancellation; True when the CancelledError was this clock's alone (so
        it is to become the clock's own exception), as `asyncio.timeout` decides."""
        return self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError


class _Limit:
    """The end of one phase: its deadline is dropped; when the clock fired for it, TimeoutError."""

    __slots__ = ("_clock", "_reason")

    def __init__(self, clock: ExchangeClock, reason: Failure) -> None:
        self._clock, self._reason = clock, reason

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        clock = self._clock
        clock._deadline = None
        if clock.fired is self._reason:
            clock.fired = None  # taken back: the exchange goes on (to tell the client of the timeout)
            if clock._uncancelled(exc_type):
                raise TimeoutError from exc


def watch_client(scope: Scope, receive: Receive, clock: ExchangeClock) -> AbstractContextManager[Any]:
    """While in this context, a client that leaves fires `clock.client_left()`; entering it raises
    ClientGone when our server knows the client left already.

    Our server says so itself (a callback, no task); under another ASGI server a small task waits for
    `http.disconnect` (after the body, the only message left to come)."""
    extension = scope.get("extensions", {}).get(CLIENT_GONE_EXTENSION)
    if extension is not None:
        return _ServerWatch(extension["watch"], clock.client_left)
    return _TaskWatch(receive, clock.client_left)


class _ServerWatch:
    __slots__ = ("_watch", "_callback", "_unwatch")

    def __init__(
        self, watch: Callable[[Callable[[], None]], Callable[[], None] | None], callback: Callable[[], None]
    ) -> None:
        self._watch, self._callback = watch, callback
        self._unwatch: Callable[[], None] | None = None

    def __enter__(self) -> None:
        self._unwatch = self._watch(self._callback)
        if self._unwatch is None:  # gone already: the exchange must not open an engine request for nobody
            raise ClientGone

    def __exit__(self, *exc_info: object) -> None:
        if self._unwatch is not None:
            self._unwatch()


class _TaskWatch:
    __slots__ = ("_receive", "_callback", "_task")

    def __init__(self, receive: Receive, callback: Callable[[], None]) -> None:
        self._receive, self._callback = receive, callback
        self._task: asyncio.Task[None] | None = None

    def __enter__(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._wait())
        self._task.add_done_callback(_retrieve)

    def __exit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _wait(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self._callback()


def _retrieve(task: asyncio.Task[None]) -> None:
    """A watch that failed (its `receive()` raised) has nothing to say: read its exception so that
    asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()
