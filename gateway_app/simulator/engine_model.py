"""The engine model (`--timing gpu`): a small model on one GPU, so that routing choices have consequences.

- Scheduling: at most `max_running` requests run; more wait in a FIFO queue. A request is admitted when
  a slot is free and its prompt's new blocks fit in the KV cache without touching blocks that running
  requests hold (vLLM's scheduler checks both); when nothing runs, it is admitted whatever its size.
- Prefill: on admission, the request's cached prefix is looked up (`PrefixCache`), then its uncached
  tokens are computed at `prefill_tokens_per_s`. Prefills are serialized, as the GPU runs one forward
  pass at a time: a burst of new requests queues behind each other's prefill. Time to first token is
  thus queueing + waiting for earlier prefills + this prefill, as on a real engine.
- Decode: every later token costs `decode_ms + decode_ms_per_running × (running − 1)`, the batch size
  read when the token is scheduled (per token in a stream, per block of tokens in a plain answer).
  Prefill does not slow running decodes down; a real engine's would, a little.

Everything is timers on the event loop: a request costs a few sleeps per token, never a busy loop.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from gateway_app.simulator.prefix_cache import PrefixCache, block_hashes
from gateway_app.simulator.timing import EngineLoad, TokenSchedule, sleep_until


@dataclass(frozen=True)
class GpuProfile:
    """The engine model's knobs; the defaults resemble a ~1B model on one mid-range GPU."""

    prefill_tokens_per_s: float = 20_000.0
    decode_ms: float = 8.0
    decode_ms_per_running: float = 0.3
    max_running: int = 32
    cache_blocks: int = 2048
    block_tokens: int = 16

    def __post_init__(self) -> None:
        if self.prefill_tokens_per_s <= 0:
            raise ValueError("prefill_tokens_per_s must be positive")
        if self.decode_ms < 0 or self.decode_ms_per_running < 0:
            raise ValueError("decode times must not be negative")
        if self.max_running < 1 or self.cache_blocks < 1 or self.block_tokens < 1:
            raise ValueError("max_running, cache_blocks and block_tokens must be at least 1")


class GpuEngine:
    """One simulated engine process: its scheduler, its KV cache and the counters /metrics reports."""

    instant = False

    def __init__(self, profile: GpuProfile) -> None:
        self.profile = profile
        self.cache = PrefixCache(profile.cache_blocks)
        self._running = 0
        self._waiting: deque[_Sequence] = deque()
        self._prefill_busy_until = 0.0
        # vLLM's counters, in tokens: prompt tokens looked up, and those found cached.
        self._queries = 0
        self._hits = 0
        # SGLang's gauge: the hit rate of the last prefill.
        self._last_hit_rate = 0.0

    @property
    def load(self) -> EngineLoad:
        return self

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def kv_cache_usage(self) -> float:
        return self.cache.usage

    @property
    def prefix_cache_queries(self) -> int:
        return self._queries

    @property
    def prefix_cache_hits(self) -> int:
        return self._hits

    @property
    def last_cache_hit_rate(self) -> float:
        return self._last_hit_rate

    @contextmanager
    def schedule(self, prompt_text: str, prompt_tokens: int) -> Iterator[TokenSchedule]:
        sequence = _Sequence(self, block_hashes(prompt_text, self.profile.block_tokens), prompt_tokens)
        try:
            yield sequence
        finally:
            self._leave(sequence)

    def token_seconds(self) -> float:
        """The time one decode step takes at the current batch size."""
        profile = self.profile
        return (profile.decode_ms + profile.decode_ms_per_running * max(self._running - 1, 0)) / 1000.0

    # --- scheduling -----------------------------------------------------------------------------

    async def _enter(self, sequence: _Sequence) -> None:
        """Return once `sequence` runs, after waiting its turn in the FIFO queue if need be."""
        if not self._waiting and self._fits(sequence):
            self._start(sequence)
            return
        sequence.admitted = asyncio.get_running_loop().create_future()
        self._waiting.append(sequence)
        await sequence.admitted

    def _fits(self, sequence: _Sequence) -> bool:
        if self._running >= self.profile.max_running:
            return False
        return self._running == 0 or self.cache.can_hold(sequence.hashes, sequence.private_blocks)

    def _start(self, sequence: _Sequence) -> None:
        self._running += 1
        sequence.running = True
        # The last prompt token is always computed (its logits give the first output token), so a
        # prompt can hit at most its blocks before that token, as in vLLM.
        matchable = sequence.hashes[: (sequence.tokens - 1) // self.profile.block_tokens]
        cached = self.cache.cached_prefix(matchable) * self.profile.block_tokens
        self.cache.acquire(sequence.hashes, sequence.private_blocks)
        sequence.cached_tokens = cached
        self._queries += sequence.tokens
        self._hits += cached
        self._last_hit_rate = cached / sequence.tokens

    def _leave(self, sequence: _Sequence) -> None:
        if sequence.running:
            sequence.running = False
            self._running -= 1
            self.cache.release(sequence.hashes, sequence.private_blocks)
        elif sequence in self._waiting:
            self._waiting.remove(sequence)  # its client left while it waited
        self._admit_waiting()

    def _admit_waiting(self) -> None:
        while self._waiting and self._fits(self._waiting[0]):
            sequence = self._waiting.popleft()
            if sequence.admitted is None or sequence.admitted.cancelled():
                continue  # its client left; its task has not run its cleanup yet, and has nothing to give back
            self._start(sequence)
            sequence.admitted.set_result(None)

    async def _prefill(self, uncached_tokens: int) -> float:
        """Compute `uncached_tokens` after the prefills already under way; return when it ended.

        A prefill abandoned by its client gives its time back when it is the last one booked, as a real
        engine drops an aborted request at its next step (earlier ones are left: their successors are
        already scheduled behind them)."""
        start = max(time.monotonic(), self._prefill_busy_until)
        self._prefill_busy_until = end = start + uncached_tokens / self.profile.prefill_tokens_per_s
        try:
            await sleep_until(end)
        except asyncio.CancelledError:
            if self._prefill_busy_until == end:
                self._prefill_busy_until = max(time.monotonic(), start)
            raise
        return end


class _Sequence:
    """One request inside the engine model (vLLM calls it a sequence)."""

    __slots__ = ("engine", "hashes", "tokens", "private_blocks", "cached_tokens", "admitted", "running", "_due")

    def __init__(self, engine: GpuEngine, hashes: list[int], prompt_tokens: int) -> None:
        self.engine = engine
        self.hashes = hashes
        self.tokens = prompt_tokens  # tokens whose KV the request holds: its prompt, then what it generated
        # The partial last prompt block, if any, is the request's own.
        self.private_blocks = _blocks(prompt_tokens, engine.profile.block_tokens) - len(hashes)
        self.cached_tokens: int | None = None
        self.admitted: asyncio.Future[None] | None = None
        self.running = False
        self._due = 0.0

    async def prefill(self) -> None:
        await self.engine._enter(self)
        assert self.cached_tokens is not None  # set on admission
        self._due = await self.engine._prefill(self.tokens - self.cached_tokens)

    async def decode(self, count: int) -> None:
        # A long run is priced a block at a time, so that a change in the batch size shows up in it.
        engine, block_tokens = self.engine, self.engine.profile.block_tokens
        while count > 0:
            step = min(count, block_tokens)
            count -= step
            self._hold(self.tokens + step)
            self._due += step * engine.token_seconds()
            await sleep_until(self._due)

    def _hold(self, tokens: int) -> None:
        """Grow the request's KV to `tokens` tokens, taking a new block whenever one fills up."""
        block_tokens = self.engine.profile.block_tokens
        extra = _blocks(tokens, block_tokens) - _blocks(self.tokens, block_tokens)
        if extra:
            self.engine.cache.grow(extra)
            self.private_blocks += extra
        self.tokens = tokens


def _blocks(tokens: int, block_tokens: int) -> int:
    return -(-tokens // block_tokens)
