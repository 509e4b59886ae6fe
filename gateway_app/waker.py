"""One engine's sleep as this gateway sees it, and the hold of a request until the engine is awake.

The service that wakes engines and puts them to sleep through the Kubernetes API is in wake.py; this is
the part the request path touches: a few counters and one wait.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from gateway_app.config import Wake
from gateway_app.errors import EngineWaking

RETRY_AFTER_UNKNOWN = 30  # Retry-After of an engine_waking answer, when no wake was timed yet


class Waker:
    """What this gateway knows of one engine's sleep: its ready pods, the requests held for it and those
    in flight, when it last sent it a request, and the wake under way. Shared by the route tables of
    successive reloads (the replica registry keeps it), so a reload neither drops held requests nor
    forgets the engine's activity."""

    def __init__(self, spec: Wake, namespace: str) -> None:
        self.spec = spec
        self.namespace = namespace
        self.ready_pods: int | None = None  # None: discovery has not answered yet
        self.held = 0
        self.active = 0  # requests of this gateway in flight to it (or to its fallback while it wakes)
        self.last_request = time.monotonic()  # a gateway that starts counts as activity: no sleep at once
        self.recorded = self.last_request  # the last request written to the Lease
        self.waking_since: float | None = None  # monotonic time of the request that woke it
        self.last_wake_seconds: float | None = None
        self.wake_error: str | None = None  # why the last wake failed for good (no right to scale, ...)
        self.wake_wanted = asyncio.Event()  # for the WakeService: a request found the engine asleep
        self.on_awake: Callable[[float], None] | None = None  # the WakeService's: a wake's duration
        self._changed = asyncio.Event()  # set, then replaced, when the pods or the wake's fate change

    @property
    def asleep(self) -> bool:
        """Known to have no ready pod (asleep, or waking)."""
        return self.ready_pods == 0

    @property
    def state(self) -> str:
        """As /v1/models shows it: awake, asleep, or waking."""
        if not self.asleep:
            return "awake"
        return "waking" if self.waking_since is not None else "asleep"

    def pods_ready(self, count: int) -> None:
        """Discovery's news: how many of the engine's pods are ready now."""
        self.ready_pods = count
        if count and self.waking_since is not None:
            self.last_wake_seconds = time.monotonic() - self.waking_since
            self.waking_since = None
            if self.on_awake is not None:
                self.on_awake(self.last_wake_seconds)
        self._notify()

    def want_wake(self) -> None:
        """Ask for a wake (one, however many requests ask)."""
        if self.waking_since is None:
            self.waking_since = time.monotonic()
            self.wake_error = None
        self.wake_wanted.set()

    def wake_failed(self, reason: str) -> None:
        """The wake cannot happen (e.g. no right to scale): held requests are told at once."""
        self.wake_error, self.waking_since = reason, None
        self._notify()

    def wake_expired(self) -> None:
        """No pod came within `timeout` of the wake: the next request starts a new one."""
        self.waking_since = None

    async def hold(self, engine: str) -> None:
        """Wait until the engine has a ready pod; raise EngineWaking past the queue, the timeout, or a
        wake that failed. Cancelled when the client leaves, which takes the request out of the queue."""
        self.want_wake()
        if self.held >= self.spec.queue:
            raise EngineWaking(
                f"The engine `{engine}` is waking up and {self.spec.queue} requests are already waiting for it; "
                "retry later.",
                retry_after=self.retry_after(),
            )
        self.held += 1
        try:
            async with asyncio.timeout(self.spec.timeout):
                while self.asleep:
                    if self.wake_error is not None:
                        raise EngineWaking(
                            f"The engine `{engine}` is asleep (scaled to zero) and could not be woken: "
                            f"{self.wake_error}.",
                            retry_after=RETRY_AFTER_UNKNOWN,
                        )
                    await self._changed.wait()
        except TimeoutError:
            raise EngineWaking(
                f"The engine `{engine}` is waking up and was not ready within {self.spec.timeout:g} s; retry later.",
                retry_after=self.retry_after(),
            ) from None
        finally:
            self.held -= 1
            self.last_request = time.monotonic()

    def retry_after(self) -> int:
        """Seconds until the engine is likely up: what is left of a wake as long as the last one, within
        [5, 60]; 30 when no wake was timed yet."""
        if self.last_wake_seconds is None:
            return RETRY_AFTER_UNKNOWN
        elapsed = time.monotonic() - self.waking_since if self.waking_since is not None else 0.0
        return int(min(max(self.last_wake_seconds - elapsed, 5.0), 60.0))

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
