"""Per-key rate limits: requests per minute and tokens per minute, as token buckets.

A bucket holds up to `limit` units and refills at `limit` per minute. A request needs one unit of the
requests bucket and an estimate of its tokens (prompt size plus `max_tokens`) from the tokens bucket;
when it ends, the estimate is settled against the `usage` the engine reported. Buckets live in process
memory, or in Redis so that several gateway replicas enforce one limit together. When Redis cannot be
reached the gateway keeps serving (fail open) or refuses (fail closed), and tries Redis again shortly.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as aioredis
import redis.exceptions

from gateway_app.errors import GatewayError

log = logging.getLogger("llm_gateway.limits")

WINDOW_SECONDS = 60.0


class RateLimited(GatewayError):
    status = 429
    error_type = "rate_limit_error"


class LimiterUnavailable(GatewayError):
    status = 503
    error_type = "server_error"
    code = "rate_limiter_unavailable"


@dataclass(frozen=True, slots=True)
class Limits:
    """The limits that apply to one client; None means unlimited."""

    requests_per_minute: int | None
    tokens_per_minute: int | None

    @property
    def active(self) -> bool:
        return self.requests_per_minute is not None or self.tokens_per_minute is not None


@dataclass(slots=True)
class Decision:
    """The outcome of admission, with what the x-ratelimit-* headers report."""

    allowed: bool
    limits: Limits
    requests_left: float = 0.0
    tokens_left: float = 0.0
    retry_after: float = 0.0
    exhausted: str = ""  # "requests" or "tokens" when refused
    tokens_charged: int = 0
    # False when the store was unreachable and the request was let through without counting.
    counted: bool = True

    def headers(self) -> list[tuple[bytes, bytes]]:
        if not self.counted:
            return []
        headers = []
        for kind, limit, left in (
            ("requests", self.limits.requests_per_minute, self.requests_left),
            ("tokens", self.limits.tokens_per_minute, self.tokens_left),
        ):
            if limit is None:
                continue
            left = max(0.0, left)
            reset = (limit - left) * WINDOW_SECONDS / limit if limit else 0.0
            headers += [
                (f"x-ratelimit-limit-{kind}".encode(), str(limit).encode()),
                (f"x-ratelimit-remaining-{kind}".encode(), str(int(left)).encode()),
                (f"x-ratelimit-reset-{kind}".encode(), format_duration(reset).encode()),
            ]
        if not self.allowed:
            headers.append((b"retry-after", str(max(1, math.ceil(self.retry_after))).encode()))
        return headers

    def error(self) -> RateLimited:
        limit = self.limits.requests_per_minute if self.exhausted == "requests" else self.limits.tokens_per_minute
        return RateLimited(
            f"Rate limit reached: {limit} {self.exhausted} per minute for this API key. "
            f"Try again in {format_duration(self.retry_after)}.",
            code=f"rate_limit_{self.exhausted}",
        )


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: `120ms`, `1.5s`, `6m0s`."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60)
    rest_text = f"{rest:.1f}".rstrip("0").rstrip(".")
    return f"{int(minutes)}m{rest_text}s" if minutes else f"{rest_text}s"


class Limiter(Protocol):
    async def admit(self, client: str, limits: Limits, token_cost: int) -> Decision: ...

    async def settle(self, client: str, limits: Limits, charged: int, used: int) -> None: ...

    async def close(self) -> None: ...


def _refilled(level: float, stamp: float, limit: int, now: float) -> float:
    return min(float(limit), level + (now - stamp) * limit / WINDOW_SECONDS)


def _decide(limits: Limits, requests: float, tokens: float, token_cost: int) -> Decision:
    """The admission rule, shared by both stores (the Redis script mirrors it)."""
    rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
    cost = min(token_cost, tpm) if tpm is not None else 0
    wait, exhausted = 0.0, ""
    if rpm is not None and requests < 1:
        wait, exhausted = ((1 - requests) * WINDOW_SECONDS / rpm if rpm else math.inf), "requests"
    if tpm is not None and tokens < cost:
        token_wait = (cost - tokens) * WINDOW_SECONDS / tpm if tpm else math.inf
        if token_wait > wait:
            wait, exhausted = token_wait, "tokens"
    if exhausted:
        return Decision(False, limits, requests, tokens, min(wait, WINDOW_SECONDS), exhausted)
    return Decision(True, limits, requests - (rpm is not None), tokens - cost, tokens_charged=cost)


class MemoryLimiter:
    """Buckets in this process: right for one replica, and the fallback with no Redis configured."""

    def __init__(self, max_clients: int = 100_000) -> None:
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}
        self._max_clients = max_clients

    def _level(self, key: tuple[str, str], limit: int | None, now: float) -> float:
        if limit is None:
            return 0.0
        level, stamp = self._buckets.get(key, (float(limit), now))
        return _refilled(level, stamp, limit, now)

    async def admit(self, client: str, limits: Limits, token_cost: int) -> Decision:
        now = time.monotonic()
        requests_key, tokens_key = (client, "r"), (client, "t")
        decision = _decide(
            limits,
            self._level(requests_key, limits.requests_per_minute, now),
            self._level(tokens_key, limits.tokens_per_minute, now),
            token_cost,
        )
        if decision.allowed:
            if len(self._buckets) > self._max_clients:
                # Bounded memory over exact limits: past this many clients, start every bucket afresh.
                self._buckets.clear()
            if limits.requests_per_minute is not None:
                self._buckets[requests_key] = (decision.requests_left, now)
            if limits.tokens_per_minute is not None:
                self._buckets[tokens_key] = (decision.tokens_left, now)
        return decision

    async def settle(self, client: str, limits: Limits, charged: int, used: int) -> None:
        if limits.tokens_per_minute is None or charged == used:
            return
        now = time.monotonic()
        key = (client, "t")
        level = self._level(key, limits.tokens_per_minute, now) + charged - used
        self._buckets[key] = (min(float(limits.tokens_per_minute), level), now)

    async def close(self) -> None:
        return None


# KEYS: requests bucket, tokens bucket. ARGV: rpm, tpm (-1 = unlimited), token cost, and the tokens
# still to give back (or take) from this client's earlier requests, settled here rather than in a call
# of their own. Returns {allowed, requests left, tokens left}; the clock is Redis's, shared by all replicas.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function level(key, limit)
  if limit < 0 then return 0 end
  local v = redis.call('HMGET', key, 'l', 't')
  if not v[1] then return limit end
  return math.min(limit, tonumber(v[1]) + (now - tonumber(v[2])) * limit / 60)
end
local rpm, tpm, cost, owed = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local r, k = level(KEYS[1], rpm), level(KEYS[2], tpm)
if tpm >= 0 and owed ~= 0 then
  k = math.min(tpm, k + owed)
  redis.call('HSET', KEYS[2], 'l', k, 't', now); redis.call('EXPIRE', KEYS[2], 120)
end
if tpm >= 0 and cost > tpm then cost = tpm end
if (rpm >= 0 and r < 1) or (tpm >= 0 and k < cost) then
  return {0, tostring(r), tostring(k)}
end
if rpm >= 0 then r = r - 1; redis.call('HSET', KEYS[1], 'l', r, 't', now); redis.call('EXPIRE', KEYS[1], 120) end
if tpm >= 0 then k = k - cost; redis.call('HSET', KEYS[2], 'l', k, 't', now); redis.call('EXPIRE', KEYS[2], 120) end
return {1, tostring(r), tostring(k)}
"""

# KEYS: tokens bucket. ARGV: tpm, tokens to give back (negative: to take).
_SETTLE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local limit, delta = tonumber(ARGV[1]), tonumber(ARGV[2])
local v = redis.call('HMGET', KEYS[1], 'l', 't')
local l = limit
if v[1] then l = math.min(limit, tonumber(v[1]) + (now - tonumber(v[2])) * limit / 60) end
l = math.min(limit, l + delta)
redis.call('HSET', KEYS[1], 'l', l, 't', now)
redis.call('EXPIRE', KEYS[1], 120)
return tostring(l)
"""

# Any failure of the store (unreachable, read-only replica after a failover, out of memory, busy script):
# the same answer, fail open or closed, never a 500.
STORE_ERRORS = (redis.exceptions.RedisError, OSError, asyncio.TimeoutError)


class RedisLimiter:
    """Buckets in Redis, shared by all replicas; one atomic script call per admission.

    Settling a request's estimate against its real usage is not a call of its own: the difference waits
    in memory and rides along with the client's next admission, or is flushed within a second.
    """

    RETRY_AFTER_FAILURE = 1.0  # seconds before Redis is tried again after it failed
    FLUSH_SECONDS = 1.0

    def __init__(self, url: str, password: str | None, fail_open: bool, on_store_error=None) -> None:
        self._redis = aioredis.Redis.from_url(
            url, password=password, socket_timeout=0.25, socket_connect_timeout=0.25, health_check_interval=0,
        )
        self._admit = self._redis.register_script(_ADMIT)
        self._settle = self._redis.register_script(_SETTLE)
        self.fail_open = fail_open
        self._down_until = 0.0
        self._down = False
        self._on_store_error = on_store_error or (lambda: None)
        self._owed: dict[str, tuple[int, int]] = {}  # client -> (tokens to give back, its tokens per minute)
        self._flush: asyncio.TimerHandle | None = None
        self._flushing: asyncio.Task | None = None  # kept referenced until done

    @staticmethod
    def _keys(client: str) -> list[str]:
        # The {client} hash tag keeps both buckets of a client on one Redis Cluster slot.
        return [f"llm-gateway:rl:{{{client}}}:r", f"llm-gateway:rl:{{{client}}}:t"]

    def _store_failed(self, error: BaseException) -> None:
        self._on_store_error()
        self._down_until = time.monotonic() + self.RETRY_AFTER_FAILURE
        if not self._down:
            self._down = True
            log.error(
                "rate-limit store unreachable (%s); %s until it is back", error or type(error).__name__,
                "serving without limits" if self.fail_open else "refusing requests",
            )

    def _store_ok(self) -> None:
        if self._down:
            self._down = False
            log.warning("rate-limit store reachable again; limits enforced")

    def _unavailable(self, limits: Limits) -> Decision:
        if self.fail_open:
            return Decision(True, limits, counted=False)
        error = LimiterUnavailable("Rate limits cannot be checked right now; try again shortly.")
        error.retry_after = 1
        raise error

    async def admit(self, client: str, limits: Limits, token_cost: int) -> Decision:
        if time.monotonic() < self._down_until:
            return self._unavailable(limits)
        rpm = limits.requests_per_minute if limits.requests_per_minute is not None else -1
        tpm = limits.tokens_per_minute if limits.tokens_per_minute is not None else -1
        owed = self._owed.pop(client, (0, 0))[0]
        try:
            allowed, requests, tokens = await self._admit(keys=self._keys(client), args=[rpm, tpm, token_cost, owed])
        except STORE_ERRORS as error:
            self._owe(client, owed, tpm)
            self._store_failed(error)
            return self._unavailable(limits)
        self._store_ok()
        requests, tokens = float(requests), float(tokens)
        if allowed:
            cost = min(token_cost, tpm) if tpm >= 0 else 0
            return Decision(True, limits, requests, tokens, tokens_charged=cost)
        return _decide(limits, requests, tokens, token_cost)

    async def settle(self, client: str, limits: Limits, charged: int, used: int) -> None:
        if limits.tokens_per_minute is None or charged == used:
            return
        self._owe(client, charged - used, limits.tokens_per_minute)

    def _owe(self, client: str, tokens: int, tpm: int) -> None:
        if tokens == 0 or tpm < 0:
            return
        self._owed[client] = (self._owed.get(client, (0, 0))[0] + tokens, tpm)
        if self._flush is None:
            loop = asyncio.get_running_loop()
            self._flush = loop.call_later(self.FLUSH_SECONDS, self._start_flush)

    def _start_flush(self) -> None:
        self._flushing = asyncio.get_running_loop().create_task(self._flush_owed())

    async def _flush_owed(self) -> None:
        """Settle what no admission took along, for clients that went quiet."""
        self._flush = None
        owed, self._owed = self._owed, {}
        if not owed or time.monotonic() < self._down_until:
            for client, (tokens, tpm) in owed.items():
                self._owe(client, tokens, tpm)
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for client, (tokens, tpm) in owed.items():
                    await self._settle(keys=self._keys(client)[1:], args=[tpm, tokens], client=pipe)
                await pipe.execute()
        except STORE_ERRORS as error:
            self._store_failed(error)
            for client, (tokens, tpm) in owed.items():
                self._owe(client, tokens, tpm)

    async def close(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
        if self._owed:
            self._flush = None
            await self._flush_owed()
            if self._flush is not None:
                self._flush.cancel()
        await self._redis.aclose()
