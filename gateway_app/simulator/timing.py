"""When the simulated model's tokens are due: the fixed pace (`--timing fixed`) and the protocol that the
engine model (`--timing gpu`, in `engine_model.py`) implements too.

The HTTP app asks a `Timing` for one `TokenSchedule` per request and awaits it: `prefill()` until the
first token is due, `decode(count)` until `count` more are. Leaving the `schedule()` block, whether the
request finished, failed or was abandoned by its client, gives back what the request held.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AbstractContextManager
from typing import Protocol


class EngineLoad(Protocol):
    """What the engine model reports at `/metrics` (the fixed pace reports its in-flight count instead)."""

    @property
    def running(self) -> int: ...

    @property
    def waiting(self) -> int: ...

    @property
    def kv_cache_usage(self) -> float: ...

    @property
    def prefix_cache_queries(self) -> int: ...

    @property
    def prefix_cache_hits(self) -> int: ...

    @property
    def last_cache_hit_rate(self) -> float: ...


class TokenSchedule(Protocol):
    """One request's way through the engine."""

    # Prompt tokens found in the prefix cache, known once prefill() returns; None: the timing has no cache.
    cached_tokens: int | None

    async def prefill(self) -> None:
        """Wait until the first token is due."""

    async def decode(self, count: int) -> None:
        """Wait until `count` more tokens are due."""


class Timing(Protocol):
    # True when no token ever waits: the app then skips watching for disconnects.
    instant: bool

    @property
    def load(self) -> EngineLoad | None:
        """The engine state /metrics reports, or None for the fixed pace."""

    def schedule(self, prompt_text: str, prompt_tokens: int) -> AbstractContextManager[TokenSchedule]:
        """A request's schedule for the duration of the `with` block; `prompt_text` feeds the prefix cache."""
        ...


class Pacing:
    """The fixed pace: the first token after `ttft_s`, then one every `itl_s`, whatever the load.

    Kept for overhead benchmarks, where the engine must cost the same for every request. Deadlines are
    computed from the request's start, not chained from the previous sleep, so a long stream does not
    drift by the event loop's per-sleep overshoot.
    """

    load: EngineLoad | None = None

    def __init__(self, ttft_s: float, itl_s: float) -> None:
        if ttft_s < 0 or itl_s < 0:
            raise ValueError("ttft and itl must not be negative")
        self.ttft_s = ttft_s
        self.itl_s = itl_s
        # At zero latency nothing sleeps and nothing waits for a disconnect: the answer is immediate.
        self.instant = ttft_s == 0 and itl_s == 0

    def schedule(self, prompt_text: str, prompt_tokens: int) -> AbstractContextManager[TokenSchedule]:
        return _FixedSchedule(self)


class _FixedSchedule(AbstractContextManager["_FixedSchedule"]):
    """Its own context manager, holding nothing: the cheapest thing on the benchmarks' hot path."""

    __slots__ = ("pacing", "start", "tokens", "cached_tokens")

    def __init__(self, pacing: Pacing) -> None:
        self.pacing = pacing
        # Not `loop.time()`: uvloop's is cached per loop iteration, at millisecond resolution.
        self.start = time.monotonic()
        self.tokens = 0
        self.cached_tokens: int | None = None

    async def prefill(self) -> None:
        self.tokens = 1
        await self._until(self.pacing.ttft_s)

    async def decode(self, count: int) -> None:
        self.tokens += count
        await self._until(self.pacing.ttft_s + (self.tokens - 1) * self.pacing.itl_s)

    def __exit__(self, *exc_info: object) -> None:
        return None

    async def _until(self, offset_s: float) -> None:
        if self.pacing.instant:
            return
        await sleep_until(self.start + offset_s)


async def sleep_until(deadline: float) -> None:
    """Sleep until `deadline`, a `time.monotonic()` reading; return at once if it has passed."""
    delay = deadline - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
