"""Engine replicas (endpoints) and what the gateway knows of their health.

State is kept by URL in a registry that outlives route-table reloads, so a reload does not forget that
a replica is failing, and it is pruned to the URLs in use so that memory stays bounded. Two sources
judge an endpoint: active `/health` checks at an interval, and passive signals from real requests
(connection errors, timeouts, 5xx), which eject it for a cool-down that doubles while it keeps failing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

import aiohttp

from gateway_app.config import HealthSettings
from gateway_app.log_setup import ThrottledWarning

log = logging.getLogger("llm_gateway.endpoints")
EJECTION_WARNINGS = ThrottledWarning(log)  # a replica failing every request: a line a minute, not one per request


class Endpoint:
    """One replica: its URL, requests outstanding on it, and its health."""

    __slots__ = ("url", "outstanding", "failures", "ejected_until", "healthy", "latency", "latency_at")

    LATENCY_WEIGHT = 0.2  # of a new sample in the moving average
    LATENCY_FRESH_SECONDS = 10.0  # older than this, the average says nothing about the replica now

    def __init__(self, url: str) -> None:
        self.url = url
        self.outstanding = 0
        self.latency = 0.0  # moving average of the time to the engine's first byte, seconds
        self.latency_at = -1e9  # monotonic time of the last sample
        self.failures = 0  # in a row
        self.ejected_until = 0.0  # monotonic time
        self.healthy = True  # the last active check's verdict (optimistic until the first one)

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

    def succeeded(self) -> None:
        self.failures = 0
        self.ejected_until = 0.0

    def failed(self, settings: HealthSettings) -> None:
        """Eject for a cool-down that grows while the endpoint keeps failing."""
        self.failures += 1
        # The exponent is capped: thousands of failures in a row must not overflow a float.
        cool_down = min(settings.ejection_base * 2.0 ** min(self.failures - 1, 64), settings.ejection_max)
        self.ejected_until = time.monotonic() + cool_down
        EJECTION_WARNINGS.warn(
            self.url, "endpoint %s ejected for %.1f s after %d failure(s) in a row", self.url, cool_down, self.failures
        )


class EndpointRegistry:
    """Endpoint state by URL, shared by every route table."""

    def __init__(self) -> None:
        self._by_url: dict[str, Endpoint] = {}

    def get(self, url: str) -> Endpoint:
        endpoint = self._by_url.get(url)
        if endpoint is None:
            endpoint = self._by_url[url] = Endpoint(url)
        return endpoint

    def retain(self, urls: Iterable[str]) -> None:
        """Forget the URLs no table uses any more (their in-flight requests keep their objects)."""
        keep = set(urls)
        for url in [url for url in self._by_url if url not in keep]:
            del self._by_url[url]

    def __iter__(self):
        return iter(list(self._by_url.values()))


class HealthChecker:
    """Checks every endpoint's `/health` at an interval, in the background, never on the request path."""

    def __init__(
        self,
        registry: EndpointRegistry,
        session: Callable[[], aiohttp.ClientSession],
        settings: Callable[[], HealthSettings],
        headers: Callable[[], dict[str, str]],
    ) -> None:
        self._registry = registry
        self._session = session
        self._settings = settings
        self._headers = headers
        self._stop = asyncio.Event()

    async def check(self, endpoint: Endpoint, settings: HealthSettings) -> None:
        try:
            async with self._session().get(
                endpoint.url + "/health", headers=self._headers(), timeout=aiohttp.ClientTimeout(total=settings.timeout)
            ) as response:
                healthy = response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            healthy = False
        if healthy and not endpoint.healthy:
            log.warning("endpoint %s is healthy again", endpoint.url)
        elif not healthy and endpoint.healthy:
            log.warning("endpoint %s failed its health check", endpoint.url)
        endpoint.healthy = healthy
        if healthy:
            # A passing check ends an ejection at once, but only a request that succeeds clears the
            # failure count: a replica whose /health passes while its requests fail stays on a growing
            # cool-down.
            endpoint.ejected_until = 0.0

    async def run(self) -> None:
        while not self._stop.is_set():
            settings = self._settings()
            await asyncio.gather(*(self.check(endpoint, settings) for endpoint in self._registry))
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=settings.interval)
            except TimeoutError:
                pass

    def stop(self) -> None:
        self._stop.set()


class EndpointPool:
    """The replicas one engine routes to right now. Discovery replaces `endpoints` in one assignment;
    an engine without discovery keeps its configured list."""

    __slots__ = ("configured", "endpoints", "turn")

    def __init__(self, configured: tuple[Endpoint, ...]) -> None:
        self.configured = configured
        self.endpoints = configured
        self.turn = 0  # for round-robin

    def update(self, discovered: tuple[Endpoint, ...]) -> None:
        self.endpoints = discovered or self.configured  # no ready pod: the Service URL is the best bet
