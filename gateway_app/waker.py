"""One engine's sleep as this gateway sees it, and the hold of a request until the engine is awake.

The service that wakes engines and puts them to sleep through the Kubernetes API is in wake.py; this is
the part the request path touches: a few counters and one wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from gateway_app.config import Wake
from gateway_app.errors import EngineWaking

RETRY_AFTER_UNKNOWN = 30  # Retry-After of an engine_waking answer, when no wake was timed yet
TICK_SECONDS = 5.0  # at most this long between two looks at an engine (activity record, idleness)
# Discovery's first answer comes within moments of start-up; past this, a request goes to the engine's
# `url` as it would without `wake` (the API server may be down while the engine is up).
FIRST_ANSWER_WAIT = 10.0


def tick_seconds(spec: Wake) -> float:
    """How often an engine is looked at: every 5 s, or 4 times per `idle_after` when that is shorter, so
    that a gateway's activity reaches the Lease well before another gateway could find it idle."""
    return min(TICK_SECONDS, spec.idle_after / 4) if spec.idle_after is not None else TICK_SECONDS


class Waker:
    """What this gateway knows of one engine's sleep: its ready pods, the requests held for it and those
    in flight, when it last sent it a request, and the wake or the scale-down under way. Shared by the
    route tables of successive reloads (the replica registry keeps it), so a reload neither drops held
    requests nor forgets the engine's activity."""

    def __init__(self, spec: Wake, namespace: str) -> None:
        self.spec = spec
        self.namespace = namespace
        self.ready_urls: frozenset[str] | None = None  # None: discovery has not answered yet
        self.stopping: frozenset[str] | None = None  # the pods of a scale-down to zero under way
        self.tended = False  # a WakeService (an API server) looks after it: only then are requests held
        self.retired = False  # out of service (a reload dropped `wake`, or the engine): held requests go on
        self.held = 0
        self.active = 0  # requests of this gateway in flight to it (or to its fallback while it wakes)
        self.last_request = time.monotonic()  # a gateway that starts counts as activity: no sleep at once
        self.recorded = self.last_request  # the last request written to the Lease
        self.waking_since: float | None = None  # monotonic time of the request that woke it
        self.wake_requested = False  # for the WakeService: scale it up
        self.wake_stuck = False  # the last wake brought no ready pod within `timeout`
        self.last_wake_seconds: float | None = None
        self.wake_error: str | None = None  # why the last wake failed for good (no right to scale, ...)
        self.attention = asyncio.Event()  # for the WakeService: a wake, or activity to record, now
        self.on_awake: Callable[[float], None] | None = None  # the WakeService's: a wake's duration
        self._changed = asyncio.Event()  # set, then replaced, when the pods or the wake's fate change

    @property
    def ready_pods(self) -> int | None:
        return None if self.ready_urls is None else len(self.ready_urls)

    @property
    def asleep(self) -> bool:
        """Known to have no ready pod (asleep, or waking), or going to sleep (its pods are stopping)."""
        urls = self.ready_urls
        if urls is None:
            return False
        return not urls or (self.stopping is not None and urls <= self.stopping)

    @property
    def serving(self) -> bool:
        """Known to have a ready pod that is not stopping: requests go straight to it."""
        return self.ready_urls is not None and not self.asleep

    @property
    def state(self) -> str:
        """As /v1/models shows it: awake, asleep, or waking."""
        if not self.asleep:
            return "awake"
        return "waking" if self.waking_since is not None else "asleep"

    # The request path.

    def request_started(self) -> None:
        self.active += 1
        if self.spec.idle_after is not None:
            now = time.monotonic()
            self.last_request = now
            if now - self.recorded > tick_seconds(self.spec):  # after a quiet spell: in the Lease at once
                self.attention.set()

    def request_ended(self) -> None:
        self.active -= 1
        self.last_request = time.monotonic()

    async def hold(self, engine: str) -> None:
        """Wait until the engine has a ready pod; raise EngineWaking past the queue, the timeout, or a
        wake that failed. Cancelled when the client leaves, which takes the request out of the queue.
        Before discovery's first answer, wait for it (a little), then go on as if awake."""
        if self.asleep:
            self.want_wake()  # even when this request cannot be held: the next one will find it up
        if self.held >= self.spec.queue:
            raise EngineWaking(
                f"The engine `{engine}` is waking up and {self.spec.queue} requests are already waiting for it; "
                "retry later.",
                retry_after=self.retry_after(),
            )
        self.held += 1
        try:
            async with asyncio.timeout(self.spec.timeout):
                if self.ready_urls is None:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(FIRST_ANSWER_WAIT):
                            while self.ready_urls is None and not self.retired:
                                await self._changed.wait()
                while self.asleep and not self.retired:
                    if self.wake_error is not None:
                        raise EngineWaking(
                            f"The engine `{engine}` is asleep (scaled to zero) and could not be woken: "
                            f"{self.wake_error}.",
                            retry_after=RETRY_AFTER_UNKNOWN,
                        )
                    self.want_wake()  # asleep now (it was not known, or it was stopping when this came)
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

    # Discovery's and the WakeService's side.

    def pods_ready(self, urls: frozenset[str]) -> None:
        """Discovery's news: the engine's ready pods now."""
        self.ready_urls = urls
        if self.stopping is not None and (not urls or not urls <= self.stopping):
            self.stopping = None  # the scale-down is done, or new pods came (a wake after it)
        if urls:
            self.wake_stuck = False
        if not self.asleep and self.waking_since is not None:
            self.last_wake_seconds = time.monotonic() - self.waking_since
            self.waking_since = None
            if self.on_awake is not None:
                self.on_awake(self.last_wake_seconds)
        self._notify()

    def want_wake(self) -> None:
        """Ask for a wake: one, however many requests ask."""
        if self.waking_since is None:
            self.waking_since = time.monotonic()
            self.wake_error = None
            self.wake_requested = True
            self.attention.set()

    def wake_failed(self, reason: str) -> None:
        """The wake cannot happen (e.g. no right to scale): held requests are told at once."""
        self.wake_error, self.waking_since = reason, None
        self._notify()

    def wake_expired(self) -> None:
        """No pod came within `timeout` of the wake: the next request starts a new one."""
        self.waking_since = None
        self.wake_stuck = True

    def begin_stopping(self) -> None:
        """A scale-down to zero is being asked: from now on, requests are held (and wake it again) rather
        than sent to pods about to stop."""
        self.stopping = self.ready_urls or frozenset()

    def stopping_failed(self) -> None:
        self.stopping = None
        self._notify()

    def retire(self) -> None:
        """Out of service: held requests stop waiting and go on to whatever their engine has."""
        self.retired = True
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
