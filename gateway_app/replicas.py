"""Engine replicas and what the gateway knows of them: health, load, and the per-engine queue.

A replica's load is what this gateway has outstanding on it, and, when its `/metrics` are read
(engine_load.py), what the engine itself reports: requests running and waiting, KV-cache use.

A *replica* is one running copy of an engine (a URL); an engine has one or several. What is known of a
replica is kept by URL in a registry that outlives reloads of the routing map, so a reload does not
forget that a replica is failing, and it is pruned to the URLs in use so that memory stays bounded. Two
sources judge a replica: active `/health` checks at an interval, and passive signals from real requests
(connection errors, timeouts, 5xx), which eject it for a cool-down that doubles while it keeps failing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Iterator

import aiohttp

from gateway_app.background import PeriodicTask
from gateway_app.concurrency import ConcurrencyGate
from gateway_app.config import Concurrency, EngineSpec, HealthSettings, Wake
from gateway_app.log_setup import ThrottledWarning
from gateway_app.prefix import PrefixTable
from gateway_app.waker import Waker

log = logging.getLogger("llm_gateway.replicas")
EJECTION_WARNINGS = ThrottledWarning(log)  # a replica failing every request: a line a minute, not one per request

# Engines that watch the same Service share one pool and one watch: (namespace, service, port, URLs).
DiscoveryKey = tuple[str, str, int, tuple[str, ...]]


class Replica:
    """One replica: its URL, requests outstanding on it, and its health."""

    __slots__ = (
        "url", "health_path", "outstanding", "failures", "ejected_until", "healthy", "latency", "latency_at",
        "engine_running", "engine_waiting", "kv_cache_usage", "engine_load_until", "metrics_absent_until",
    )  # fmt: skip

    LATENCY_WEIGHT = 0.2  # of a new sample in the moving average
    LATENCY_FRESH_SECONDS = 10.0  # older than this, the average says nothing about the replica now
    KV_CACHE_FULL = 0.9  # past this KV-cache use, an engine is about to queue or preempt
    KV_CACHE_PENALTY = 4.0  # requests a full KV cache counts as, added from KV_CACHE_FULL up to 1.0

    def __init__(self, url: str) -> None:
        self.url = url
        self.health_path: str | None = "/health"  # None: no active checks (the routing map's health_path)
        self.outstanding = 0
        self.latency = 0.0  # moving average of the time to the engine's first byte, seconds
        self.latency_at = -1e9  # monotonic time of the last sample
        self.failures = 0  # in a row
        self.ejected_until = 0.0  # monotonic time
        self.healthy = True  # the last active check's verdict (optimistic until the first one)
        # As the engine's own /metrics last said, believed until `engine_load_until` (monotonic time).
        self.engine_running = 0.0
        self.engine_waiting = 0.0
        self.kv_cache_usage = 0.0
        self.engine_load_until = 0.0
        self.metrics_absent_until = 0.0  # its /metrics answered no metrics: not asked again before then

    def available(self, now: float) -> bool:
        return self.healthy and now >= self.ejected_until

    def observe_latency(self, seconds: float, now: float) -> None:
        fresh = now - self.latency_at < self.LATENCY_FRESH_SECONDS
        self.latency = self.latency + self.LATENCY_WEIGHT * (seconds - self.latency) if fresh else seconds
        self.latency_at = now

    def expected_latency(self, now: float) -> float:
        """The recent average, or 0 when there is none: a replica not heard from lately gets a request
        again, so that a replica that recovered is noticed."""
        return self.latency if now - self.latency_at < self.LATENCY_FRESH_SECONDS else 0.0

    def engine_reported(self, running: float, waiting: float, kv_cache_usage: float, until: float) -> None:
        self.engine_running, self.engine_waiting, self.kv_cache_usage = running, waiting, kv_cache_usage
        self.engine_load_until = until

    def load(self, now: float) -> float:
        """Requests at the replica: this gateway's outstanding ones, or all those the engine last reported
        running and waiting when that is more (other gateways' traffic shows only there), plus its waiting
        ones once more (a queued request waits for a whole turn), plus up to `KV_CACHE_PENALTY` as its KV
        cache fills past `KV_CACHE_FULL`."""
        if now >= self.engine_load_until:
            return float(self.outstanding)
        waiting = self.engine_waiting
        load = max(float(self.outstanding), self.engine_running + waiting) + waiting
        full = self.KV_CACHE_FULL
        if self.kv_cache_usage > full:
            load += self.KV_CACHE_PENALTY * (min(self.kv_cache_usage, 1.0) - full) / (1 - full)
        return load

    def succeeded(self) -> None:
        self.failures = 0
        self.ejected_until = 0.0

    def failed(self, settings: HealthSettings) -> None:
        """Eject for a cool-down that grows while the replica keeps failing."""
        self.failures += 1
        # The exponent is capped: thousands of failures in a row must not overflow a float.
        cool_down = min(settings.ejection_base * 2.0 ** min(self.failures - 1, 64), settings.ejection_max)
        self.ejected_until = time.monotonic() + cool_down
        EJECTION_WARNINGS.warn(
            self.url, "replica %s ejected for %.1f s after %d failure(s) in a row", self.url, cool_down, self.failures
        )


class ReplicaPool:
    """The replicas one engine routes to right now. Discovery replaces `replicas` in one assignment;
    an engine without discovery keeps its configured list."""

    __slots__ = ("configured", "replicas", "turn", "health_path", "waker", "discovered")

    def __init__(
        self, configured: tuple[Replica, ...], health_path: str | None = "/health", waker: Waker | None = None
    ) -> None:
        self.configured = configured
        self.replicas = configured
        self.turn = 0  # for round-robin
        self.health_path = health_path  # the engine's, for the pods discovery adds too
        self.waker = waker  # scale to zero: the engine's sleep (waker.py)
        self.discovered: tuple[Replica, ...] | None = None  # discovery's last answer (None: none yet)
        for replica in configured:
            replica.health_path = health_path

    def update(self, discovered: tuple[Replica, ...]) -> None:
        for replica in discovered:
            replica.health_path = self.health_path
        self.discovered = discovered
        if self.waker is None:
            self.replicas = discovered or self.configured  # no ready pod: the Service URL is the best bet
        else:  # no ready pod: asleep or waking, and a request waits for one rather than trying the Service
            self.replicas = discovered
            self.waker.pods_ready(frozenset(replica.url for replica in discovered))

    def set_waker(self, spec: Wake | None, namespace: str) -> None:
        """Keep the engine's Waker across reloads (its held requests and activity), with the new settings;
        a Waker new to a pool whose pods are known learns them at once (discovery tells only changes)."""
        if spec is None:
            if self.waker is not None:
                self.waker.retire()
                self.waker = None
            self.replicas = self.discovered or self.configured
        elif self.waker is None:
            self.waker = Waker(spec, namespace)
            if self.discovered is not None:
                self.update(self.discovered)
        else:
            self.waker.spec = spec


class ReplicaRegistry:
    """Everything about replicas that outlives a reload: replicas by URL, the pools of discovered
    engines, and each engine's concurrency gate (its queue must survive a reload unless its limits
    changed)."""

    def __init__(self) -> None:
        self._by_url: dict[str, Replica] = {}
        self._pools: dict[DiscoveryKey, ReplicaPool] = {}
        self._gates: dict[str, ConcurrencyGate] = {}
        self._prefixes: dict[str, PrefixTable] = {}

    def replica(self, url: str) -> Replica:
        replica = self._by_url.get(url)
        if replica is None:
            replica = self._by_url[url] = Replica(url)
        return replica

    def pool_for(self, spec: EngineSpec) -> ReplicaPool:
        """A new pool of the configured URLs, or the shared pool of the Service it discovers."""
        configured = tuple(self.replica(url) for url in spec.endpoints)
        health_path = spec.checked_health_path
        key = discovery_key(spec)
        if key is None:
            return ReplicaPool(configured, health_path)
        pool = self._pools.get(key)
        if pool is None or pool.configured != configured:
            pool = self._pools[key] = ReplicaPool(configured, health_path)
        elif pool.health_path != health_path:  # the same Service, checked elsewhere from now on
            pool.health_path = health_path
            for replica in (*pool.configured, *pool.replicas):
                replica.health_path = health_path
        pool.set_waker(spec.wake, key[0])
        return pool

    def gate_for(self, name: str, settings: Concurrency) -> ConcurrencyGate | None:
        """The engine's gate: the same object as before a reload unless its settings changed."""
        if settings.limit is None:
            self._gates.pop(name, None)
            return None
        gate = self._gates.get(name)
        if gate is None or (gate.limit, gate.queue, gate.queue_timeout) != (
            settings.limit,
            settings.queue,
            settings.queue_timeout,
        ):
            gate = self._gates[name] = ConcurrencyGate(settings.limit, settings.queue, settings.queue_timeout)
        return gate

    def prefix_table_for(self, name: str, capacity: int | None) -> PrefixTable | None:
        """The engine's table of prompt prefixes (cache-aware balancing; None: not balanced so): the
        same object as before a reload unless its size changed, so that a reload forgets nothing."""
        if capacity is None:
            self._prefixes.pop(name, None)
            return None
        table = self._prefixes.get(name)
        if table is None or table.capacity != capacity:
            table = self._prefixes[name] = PrefixTable(capacity)
        return table

    def discovered(self, key: DiscoveryKey, urls: Iterable[str]) -> bool:
        """Put the ready pods of a Service in service; False when no engine uses that Service any more."""
        pool = self._pools.get(key)
        if pool is None:
            return False
        pool.update(tuple(self.replica(url) for url in urls))
        return True

    def retain(self, urls: Iterable[str], keys: Iterable[DiscoveryKey], engines: Iterable[str]) -> None:
        """Forget what no engine uses any more (requests in flight keep their objects)."""
        keep_urls, keep_keys, keep_engines = set(urls), set(keys), set(engines)
        self._by_url = {url: replica for url, replica in self._by_url.items() if url in keep_urls}
        self._pools = {key: pool for key, pool in self._pools.items() if key in keep_keys}
        self._gates = {name: gate for name, gate in self._gates.items() if name in keep_engines}
        self._prefixes = {name: table for name, table in self._prefixes.items() if name in keep_engines}

    def __iter__(self) -> Iterator[Replica]:
        return iter(list(self._by_url.values()))


def discovery_key(spec: EngineSpec) -> DiscoveryKey | None:
    if spec.discovery is None:
        return None
    return (spec.discovery.namespace, spec.discovery.service, spec.discovery.port, tuple(spec.endpoints))


class HealthChecker(PeriodicTask):
    """Checks every replica's `/health` at an interval, in the background, never on the request path."""

    def __init__(
        self,
        registry: ReplicaRegistry,
        session: aiohttp.ClientSession,
        settings: Callable[[], HealthSettings],
        headers: Callable[[Replica], dict[str, str]],
    ) -> None:
        super().__init__(lambda: settings().interval)
        self._registry = registry
        self._session = session
        self._settings = settings
        self._headers = headers

    async def check(self, replica: Replica, settings: HealthSettings) -> None:
        if replica.health_path is None:  # judged by its answers alone
            if not replica.healthy:
                replica.healthy = True
            return
        try:
            async with self._session.get(
                replica.url + replica.health_path,
                headers=self._headers(replica),
                timeout=aiohttp.ClientTimeout(total=settings.timeout),
            ) as response:
                healthy = response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            healthy = False
        if healthy and not replica.healthy:
            log.warning("replica %s is healthy again", replica.url)
        elif not healthy and replica.healthy:
            log.warning("replica %s failed its health check", replica.url)
        replica.healthy = healthy
        if healthy:
            # A passing check ends an ejection at once, but only a request that succeeds clears the
            # failure count: a replica whose /health passes while its requests fail stays on a growing
            # cool-down.
            replica.ejected_until = 0.0

    async def step(self) -> None:
        settings = self._settings()
        await asyncio.gather(*(self.check(replica, settings) for replica in self._registry))
