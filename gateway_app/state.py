"""What the gateway's endpoints share: the current route table, the engine session, access control,
the metrics. Everything that a reload replaces is replaced by one assignment."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import aiohttp

from gateway_app.auth import ANONYMOUS, Client, KeyStore
from gateway_app.config import RoutingMap
from gateway_app.discovery import DiscoveryManager, KubernetesAPI
from gateway_app.endpoints import EndpointRegistry
from gateway_app.metrics import GatewayMetrics
from gateway_app.models_catalog import ModelCatalog
from gateway_app.rate_limit import Limiter, Limits, MemoryLimiter, RedisLimiter
from gateway_app.request_body import BodyMemoryBudget
from gateway_app.request_log import RequestLog
from gateway_app.route_table import RouteTable

if TYPE_CHECKING:
    from gateway_app.tracing import RequestTracer


class GatewayState:
    def __init__(
        self,
        routing_map: RoutingMap,
        metrics: GatewayMetrics | None = None,
        keys: KeyStore | None = None,
        engine_api_key: str | None = None,
        redis_url: str | None = None,
        redis_password: str | None = None,
        request_log: RequestLog | None = None,
        tracer: RequestTracer | None = None,
    ) -> None:
        self.tracer = tracer  # None: tracing off, and nothing of it on the request path
        self.metrics = metrics or GatewayMetrics()
        self.request_log = request_log or RequestLog(enabled=False)
        self.endpoints = EndpointRegistry()
        self._gates: dict = {}
        self.pools: dict = {}  # discovered replicas by Service, shared by successive tables
        self.table = RouteTable(routing_map, self.endpoints, self._gates, self.pools)
        self.discovery: DiscoveryManager | None = None  # started with the event loop
        self.session: aiohttp.ClientSession = None  # type: ignore[assignment]  # opened at start-up
        self.keys = keys  # None: authentication is off
        self.engine_auth: tuple[tuple[str, str], ...] = ()
        self.set_engine_api_key(engine_api_key)
        self.limiter: Limiter = (
            RedisLimiter(
                redis_url,
                redis_password,
                routing_map.settings.limits.fail_open,
                on_store_error=self.metrics.limiter_store_errors.inc,
            )
            if redis_url
            else MemoryLimiter()
        )
        self._record_load()
        self.catalog = ModelCatalog(self)
        self.body_budget = BodyMemoryBudget(lambda: self.table.settings.client_limits.max_body_memory)
        self.metrics.request_body_bytes.set_function(lambda: self.body_budget.held)

    def swap_table(self, routing_map: RoutingMap) -> None:
        """Replace the whole table in one assignment: requests in flight keep the one they took."""
        self.table = RouteTable(routing_map, self.endpoints, self._gates, self.pools)
        if isinstance(self.limiter, RedisLimiter):
            self.limiter.fail_open = routing_map.settings.limits.fail_open
        if self.discovery is not None:
            self.discovery.sync(self.table)
        self._record_load()

    def start_discovery(self, api: KubernetesAPI | None) -> None:
        self.discovery = DiscoveryManager(api, lambda: self.session, self.endpoints, self.pools, self.refresh_endpoints)
        self.discovery.sync(self.table)

    def set_keys(self, keys: KeyStore) -> None:
        self.keys = keys

    def set_engine_api_key(self, key: str | None) -> None:
        """The gateway's own credential towards engines (their `--api-key`), sent as a Bearer token."""
        self.engine_auth = (("Authorization", f"Bearer {key}"),) if key else ()

    def authenticate(self, headers: list[tuple[bytes, bytes]]) -> Client:
        keys = self.keys
        return ANONYMOUS if keys is None else keys.authenticate(headers)

    def limits_for(self, client: Client) -> Limits:
        defaults = self.table.settings.limits
        return Limits(
            client.requests_per_minute if client.requests_per_minute is not None else defaults.requests_per_minute,
            client.tokens_per_minute if client.tokens_per_minute is not None else defaults.tokens_per_minute,
        )

    def _record_load(self) -> None:
        metrics = self.metrics
        metrics.config_engines.set(len(self.table.engines))
        metrics.config_last_reload.set(time.time())
        metrics.queue_length.clear()
        metrics.engine_info.clear()
        for engine in self.table.engines:
            metrics.engine_info.labels(engine.name, engine.model, engine.owned_by).set(1)
            if engine.gate is not None:  # read at scrape time: the hot path pays nothing for it
                metrics.queue_length.labels(engine.name).set_function(lambda gate=engine.gate: gate.waiting)
        self.refresh_endpoints()

    def refresh_endpoints(self) -> None:
        """After the table or a discovered set of pods changed: forget unused replicas, relabel gauges."""
        self.endpoints.retain(self.table.endpoint_urls())
        metrics = self.metrics
        metrics.endpoint_available.clear()
        for engine in self.table.engines:
            for endpoint in engine.pool.endpoints:
                metrics.endpoint_available.labels(engine.name, endpoint.url).set_function(
                    lambda endpoint=endpoint: float(endpoint.available(time.monotonic()))
                )
