"""Per-key rate limits: requests per minute and tokens per minute, as token buckets.

A bucket holds up to `limit` units and refills at `limit` per minute. A request needs one unit of the
requests bucket and an estimate of its tokens (prompt size plus `max_tokens`) from the tokens bucket;
when it ends, the estimate is settled against the `usage` the engine reported. Buckets live in process
memory, or in Redis so that several gateway replicas enforce one limit together. When a call to Redis
fails, that request is served uncounted (fail open) or refused (fail closed); the next one tries again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway_app.config import LimitSettings
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
    def configure(self, settings: LimitSettings) -> None:
        """Take the settings of a new routing map."""

    async def admit(self, client: str, limits: Limits, token_cost: int) -> Decision: ...

    def settle(self, client: str, limits: Limits, charged: int, used: int) -> None:
        """Correct the admission estimate with what the request used; never waits (in Redis, the
        difference rides along with a later call)."""

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

    def settle(self, client: str, limits: Limits, charged: int, used: int) -> None:
        if limits.tokens_per_minute is None or charged == used:
            return
        now = time.monotonic()
        key = (client, "t")
        level = self._level(key, limits.tokens_per_minute, now) + charged - used
        self._buckets[key] = (min(float(limits.tokens_per_minute), level), now)

    def configure(self, settings: LimitSettings) -> None:
        return None

    async def close(self) -> None:
        return None


class LuaScript:
    """A script Redis runs by its SHA1 (EVALSHA): the source crosses the network only to load it."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()


@dataclass(slots=True)
class _ScriptCall:
    script: LuaScript
    keys: list[str]
    args: list[int | float]
    answer: asyncio.Future[Any]  # the caller awaits it


class ResponsiveDeadline:
    """`async with`: TimeoutError after `seconds` of ticks of the event loop, not of the wall clock.

    A wall-clock timeout mistakes a busy loop for a dead store: during a burst the loop can spend over a
    second on other requests while the reply sits unread in the socket. The deadline is a number of
    TICKs, each counted when its timer runs, however late; so a busy loop stretches the deadline, and an
    idle one keeps it to `seconds`.
    """

    TICK = 0.1

    def __init__(self, seconds: float) -> None:
        self._ticks_left = max(1, round(seconds / self.TICK))
        self._timeout = asyncio.timeout(None)

    async def __aenter__(self) -> None:
        await self._timeout.__aenter__()
        self._next_tick = asyncio.get_running_loop().call_later(self.TICK, self._tick)

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        self._next_tick.cancel()
        await self._timeout.__aexit__(*exc_info)  # raises TimeoutError when the deadline passed
        return None

    def _tick(self) -> None:
        self._ticks_left -= 1
        loop = asyncio.get_running_loop()
        if self._ticks_left == 0:
            self._timeout.reschedule(loop.time())
        else:
            self._next_tick = loop.call_later(self.TICK, self._tick)


class ScriptPipeline:
    """Script calls from every request, queued in memory and sent to Redis in batches.

    A batch is a pipeline without MULTI: one write and one round trip for every call that queued while
    the batches before it were out, each call still one atomic EVALSHA with its own reply or error. At
    most `in_flight` batches are out at once, each on one connection, so a burst of hundreds of
    admissions costs a few round trips and never more connections than that. A batch that Redis keeps
    waiting `timeout` seconds (connecting, sending, reading; see `ResponsiveDeadline`) fails with
    TimeoutError, and so does every call in it.
    """

    def __init__(self, redis: aioredis.Redis, in_flight: int, timeout: float) -> None:
        self._redis = redis
        self._in_flight = in_flight
        self._timeout = timeout
        self._queue: list[_ScriptCall] = []
        self._senders: set[asyncio.Task[None]] = set()
        self._sending = 0  # senders between start and finish; a set's size would lag behind by a callback

    async def call(self, script: LuaScript, keys: list[str], args: list[int | float]) -> Any:
        """The script's reply; raises the store's error if this call failed."""
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        self._queue.append(_ScriptCall(script, keys, args, answer))
        if self._sending < self._in_flight:
            self._sending += 1
            sender = loop.create_task(self._send_queued())
            self._senders.add(sender)
            sender.add_done_callback(self._senders.discard)
        return await answer

    async def _send_queued(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                await self._send(batch)
        finally:
            self._sending -= 1

    async def _send(self, batch: list[_ScriptCall]) -> None:
        batch = [call for call in batch if not call.answer.done()]  # a request cancelled while queued
        if not batch:
            return
        try:
            async with ResponsiveDeadline(self._timeout):
                replies = await self._replies(batch)
        except TimeoutError:
            replies = [redis.exceptions.TimeoutError(f"no answer from Redis within {self._timeout:g}s")] * len(batch)
        except Exception as error:  # the batch as a whole failed: every call in it did
            replies = [error] * len(batch)
        except BaseException:
            for call in batch:
                call.answer.cancel()
            raise
        for call, reply in zip(batch, replies, strict=False):
            if call.answer.done():
                continue
            if isinstance(reply, Exception):
                call.answer.set_exception(reply)
            else:
                call.answer.set_result(reply)

    async def _replies(self, batch: list[_ScriptCall]) -> list[Any]:
        replies = await self._execute(batch)
        missing = [index for index, reply in enumerate(replies) if isinstance(reply, redis.exceptions.NoScriptError)]
        if missing:
            # Redis lost its scripts (restarted, SCRIPT FLUSH): those calls did not run; load, send them again.
            for script in {batch[index].script for index in missing}:
                await self._redis.script_load(script.source)
            for index, reply in zip(missing, await self._execute([batch[index] for index in missing]), strict=False):
                replies[index] = reply
        return replies

    async def _execute(self, calls: list[_ScriptCall]) -> list[Any]:
        """One pipeline; a call's error (ResponseError) is its reply, a broken connection raises."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for call in calls:
                pipe.execute_command("EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.args)
            return await pipe.execute(raise_on_error=False)

    async def close(self) -> None:
        """Wait for the batches in flight; their callers get their replies."""
        while self._senders:
            await asyncio.gather(*self._senders, return_exceptions=True)


# The token bucket in Lua, for both scripts (`_refilled` above is the same rule in Python): a bucket's
# level now is what it held, refilled at `limit` per `window` seconds, at most `limit`; a limit < 0 is
# none. A bucket left alone for a window is full again, so it expires after two. The clock is Redis's,
# shared by all replicas.
_BUCKET = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function level(key, limit, window)
  if limit < 0 then return 0 end
  local v = redis.call('HMGET', key, 'l', 't')
  if not v[1] then return limit end
  return math.min(limit, tonumber(v[1]) + (now - tonumber(v[2])) * limit / window)
end
local function store(key, l, window)
  redis.call('HSET', key, 'l', l, 't', now); redis.call('EXPIRE', key, math.ceil(2 * window))
end
"""

# KEYS: requests bucket, tokens bucket. ARGV: rpm, tpm (-1 = unlimited), token cost, the tokens still to
# give back (or take) from this client's earlier requests, settled here rather than in a call of their own,
# and the window in seconds. Returns {allowed, requests left, tokens left}.
_ADMIT = LuaScript(
    _BUCKET
    + """
local rpm, tpm, cost, owed = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local window = tonumber(ARGV[5])
local r, k = level(KEYS[1], rpm, window), level(KEYS[2], tpm, window)
if tpm >= 0 and owed ~= 0 then
  k = math.min(tpm, k + owed)
  store(KEYS[2], k, window)
end
if tpm >= 0 and cost > tpm then cost = tpm end
if (rpm >= 0 and r < 1) or (tpm >= 0 and k < cost) then
  return {0, tostring(r), tostring(k)}
end
if rpm >= 0 then r = r - 1; store(KEYS[1], r, window) end
if tpm >= 0 then k = k - cost; store(KEYS[2], k, window) end
return {1, tostring(r), tostring(k)}
"""
)

# KEYS: tokens bucket. ARGV: tpm, tokens to give back (negative: to take), the window in seconds.
_SETTLE = LuaScript(
    _BUCKET
    + """
local limit, delta, window = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local l = math.min(limit, level(KEYS[1], limit, window) + delta)
store(KEYS[1], l, window)
return tostring(l)
"""
)

# Any failure of the store (unreachable, read-only replica after a failover, out of memory, busy script):
# the same answer, fail open or closed, never a 500.
STORE_ERRORS = (redis.exceptions.RedisError, OSError, asyncio.TimeoutError)


class RedisLimiter:
    """Buckets in Redis, shared by all replicas; one atomic script call per admission.

    The calls of all requests go to Redis in batches over a couple of connections (`ScriptPipeline`).
    When a call fails, that admission alone is let through uncounted (fail open) or refused (fail closed);
    the next one tries Redis again. Settling a request's estimate against its real usage is not a call
    of its own: the difference waits in memory and rides along with the client's next admission, or is
    flushed within a second.
    """

    PIPELINES = 2  # batches in flight at once, hence connections to Redis
    # Seconds Redis may keep a batch waiting (connecting included) before its calls count as failed: an
    # unreachable Redis is noticed within about this long; a busy gateway's own delays are not counted
    # (3,000 requests at once on each of two gateways, 2 CPUs: batches took up to 2 s, 0.5 s of ticks).
    STORE_TIMEOUT = 1.0
    FLUSH_SECONDS = 1.0

    def __init__(
        self,
        url: str,
        password: str | None,
        fail_open: bool,
        on_store_error: Callable[[], None] | None = None,
    ) -> None:
        pool = aioredis.BlockingConnectionPool.from_url(
            # No socket timeouts: the batch's deadline is the one timeout (ScriptPipeline).
            url,
            password=password,
            max_connections=self.PIPELINES,
            timeout=None,
            socket_connect_timeout=None,
            socket_timeout=None,
            health_check_interval=0,
            # Never sent twice: an admission that Redis ran before the connection broke would count twice.
            retry=Retry(NoBackoff(), retries=0),
        )
        self._redis = aioredis.Redis.from_pool(pool)
        self._scripts = ScriptPipeline(self._redis, self.PIPELINES, self.STORE_TIMEOUT)
        self.fail_open = fail_open  # set again by configure() on each reload
        self._down = False  # only to log the store going down and coming back once each
        self._on_store_error = on_store_error or (lambda: None)
        self._owed: dict[str, tuple[int, int]] = {}  # client -> (tokens to give back, its tokens per minute)
        self._flush: asyncio.TimerHandle | None = None
        self._flushing: asyncio.Task[None] | None = None  # kept referenced until done

    def configure(self, settings: LimitSettings) -> None:
        self.fail_open = settings.fail_open

    @staticmethod
    def _keys(client: str) -> list[str]:
        # The {client} hash tag keeps both buckets of a client on one Redis Cluster slot.
        return [f"llm-gateway:rl:{{{client}}}:r", f"llm-gateway:rl:{{{client}}}:t"]

    def _store_failed(self, error: BaseException) -> None:
        self._on_store_error()
        if not self._down:
            self._down = True
            log.error(
                "rate-limit store unreachable (%s); requests it cannot count are %s",
                str(error) or type(error).__name__,
                "served without limits" if self.fail_open else "refused",
            )

    def _store_ok(self) -> None:
        if self._down:
            self._down = False
            log.warning("rate-limit store reachable again; limits enforced")

    def _unavailable(self, limits: Limits) -> Decision:
        if self.fail_open:
            return Decision(True, limits, counted=False)
        raise LimiterUnavailable("Rate limits cannot be checked right now; try again shortly.", retry_after=1)

    async def admit(self, client: str, limits: Limits, token_cost: int) -> Decision:
        rpm = limits.requests_per_minute if limits.requests_per_minute is not None else -1
        tpm = limits.tokens_per_minute if limits.tokens_per_minute is not None else -1
        owed = self._owed.pop(client, (0, 0))[0]
        try:
            allowed, requests, tokens = await self._scripts.call(
                _ADMIT,
                self._keys(client),
                [rpm, tpm, token_cost, owed, WINDOW_SECONDS],
            )
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

    def settle(self, client: str, limits: Limits, charged: int, used: int) -> None:
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
        outcomes = await asyncio.gather(
            *(
                self._scripts.call(_SETTLE, self._keys(client)[1:], [tpm, tokens, WINDOW_SECONDS])
                for client, (tokens, tpm) in owed.items()
            ),
            return_exceptions=True,
        )
        for (client, (tokens, tpm)), outcome in zip(owed.items(), outcomes, strict=False):
            if isinstance(outcome, STORE_ERRORS):
                self._store_failed(outcome)
                self._owe(client, tokens, tpm)  # tried again in a second
            elif isinstance(outcome, BaseException):
                log.error("settling rate-limit tokens failed", exc_info=outcome)
            else:
                self._store_ok()

    async def close(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
        if self._flushing is not None:
            await self._flushing
        if self._owed:
            await self._flush_owed()  # the last chance: what fails now is not counted
        if self._flush is not None:
            self._flush.cancel()
        await self._scripts.close()
        await self._redis.aclose()
