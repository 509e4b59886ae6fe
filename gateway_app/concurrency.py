"""Per-engine overload protection: a concurrency limit with a bounded wait queue.

A GPU engine queues internally without bound; a bounded queue in front of it turns overload into a fast,
honest 429 with `Retry-After` instead of requests that time out after minutes.
"""

from __future__ import annotations

import asyncio
import collections
import time

from gateway_app.errors import GatewayError


class EngineBusy(GatewayError):
    status = 429
    error_type = "rate_limit_error"
    code = "engine_overloaded"


class ConcurrencyGate:
    """At most `limit` holders; up to `queue` waiters for at most `queue_timeout` seconds each."""

    def __init__(self, limit: int, queue: int, queue_timeout: float) -> None:
        self.limit = limit
        self.queue = queue
        self.queue_timeout = queue_timeout
        self.active = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self, engine_name: str) -> float:
        """Enter, waiting if needed; returns the seconds waited, or raises EngineBusy."""
        if self.active < self.limit and not self._waiters:
            self.active += 1
            return 0.0
        if len(self._waiters) >= self.queue:
            raise self._busy(engine_name, "its queue is full")
        started = time.monotonic()
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self.queue_timeout):
                await waiter
        except BaseException as exc:
            # Leaving (timed out, or the client went away): a place handed over in the same instant
            # must be passed on, never kept and never lost.
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            if waiter.done() and not waiter.cancelled():
                self.release()
            if isinstance(exc, TimeoutError):
                raise self._busy(engine_name, f"no place became free within {self.queue_timeout} s") from None
            raise
        return time.monotonic() - started

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the place goes straight to the next waiter
                return
        self.active -= 1

    def _busy(self, engine_name: str, why: str) -> EngineBusy:
        error = EngineBusy(f"The engine `{engine_name}` is at capacity ({self.limit} requests at once) and {why}.")
        error.retry_after = max(1, round(self.queue_timeout / 4))
        return error
