"""What lives as long as the gateway process, built together at start-up and stopped together.

The runtime owns the engine session, the replicas (health, discovered pods, queues), the rate limiter,
the model catalog, the request-body budget, the forwarder, the metrics, the request log, the tracer and
the background services (health checks, reading the engines' own load, discovery, waking engines scaled
to zero and putting idle ones to sleep, hot reload of mounted files, the log writer). It
holds the snapshot in service, which a reload replaces whole (`snapshot.py`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from gateway_app.adapters import AdapterWatch, DiscoveredAdapters
from gateway_app.auth import KeyStore, load_engine_key, load_keys_file
from gateway_app.background import Service, ServiceGroup
from gateway_app.concurrency import ConcurrencyGate
from gateway_app.config import RoutingMap, load_routing_map
from gateway_app.config_watcher import WatchedFile
from gateway_app.discovery import DiscoveryManager
from gateway_app.engine_credentials import EngineCredentials, bearer
from gateway_app.engine_load import EngineLoadMetrics, EngineLoadReader
from gateway_app.exchange_clock import DeadlineSweep
from gateway_app.forwarding import Forwarder
from gateway_app.kube_api import KubernetesAPI, KubernetesClient
from gateway_app.lora_admin import AdapterAdmin
from gateway_app.metrics import GatewayMetrics
from gateway_app.models_catalog import ModelCatalog
from gateway_app.rate_limit import Limiter, MemoryLimiter, RedisLimiter
from gateway_app.replicas import HealthChecker, Replica, ReplicaRegistry
from gateway_app.request_body import BodyMemoryBudget
from gateway_app.request_log import RequestLog
from gateway_app.route_table import build_routes
from gateway_app.snapshot import Snapshot
from gateway_app.upstream import create_session
from gateway_app.wake import WakeService
from gateway_app.waker import Waker

if TYPE_CHECKING:  # imported only when tracing is on: its packages are an optional extra
    from gateway_app.tracing import RequestTracer


@dataclass(frozen=True, slots=True)
class MountedFile:
    """A file kept in service by hot reload, and the bytes it held when it was loaded."""

    path: Path
    loaded: bytes


@dataclass(slots=True)
class Setup:
    """What `serve` (or the demo) loaded and chose before start-up."""

    routing_map: RoutingMap
    keys: KeyStore | None = None  # None: authentication is off
    engine_key: str | None = None
    routing_file: MountedFile | None = None  # None: no hot reload (the demo)
    keys_file: MountedFile | None = None
    engine_key_file: MountedFile | None = None
    redis_url: str | None = None
    redis_password: str | None = None
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    request_log: RequestLog = field(default_factory=lambda: RequestLog(enabled=False))
    tracer: RequestTracer | None = None  # None: tracing off, and nothing of it on the request path


class Runtime:
    """Build with `await Runtime.start(setup)`, inside the running event loop; end with `stop()`."""

    def __init__(self, setup: Setup, session: aiohttp.ClientSession) -> None:
        self.session = session
        self.metrics = setup.metrics
        self.request_log = setup.request_log
        self.tracer = setup.tracer
        self.replicas = ReplicaRegistry()
        self.credentials = EngineCredentials()
        self.adapters = DiscoveredAdapters(self.metrics)
        self.snapshot = Snapshot(
            build_routes(setup.routing_map, self.replicas, self.credentials, self.adapters),
            setup.keys,
            bearer(setup.engine_key),
        )
        self.limiter: Limiter = (
            RedisLimiter(
                setup.redis_url,
                setup.redis_password,
                setup.routing_map.settings.limits.fail_open,
                on_store_error=self.metrics.limiter_store_errors.inc,
            )
            if setup.redis_url
            else MemoryLimiter()
        )
        self.body_budget = BodyMemoryBudget(self.snapshot.settings.client_limits.max_body_memory)
        self.catalog = ModelCatalog(session, lambda: self.snapshot, self.adapters)
        self.adapter_watch = AdapterWatch(lambda: self.snapshot.settings, self.catalog.cards)
        self.lora_admin = AdapterAdmin(session, self.catalog.refresh)
        self.forwarder = Forwarder(session, self.metrics)
        self.deadlines = DeadlineSweep()  # the time limits of the exchanges under way
        kubernetes = KubernetesAPI.from_environment()
        self.discovery = DiscoveryManager(kubernetes, session, self.replicas, self._describe_replicas)
        self.wake = WakeService(KubernetesClient(kubernetes, session) if kubernetes else None, self.metrics)
        self.health = HealthChecker(self.replicas, session, lambda: self.snapshot.settings.health, self._health_headers)
        self.engine_load = EngineLoadReader(lambda: self.snapshot.routes, session, self._health_headers)
        self.metrics.show_engine_load(EngineLoadMetrics(self.engine_load))
        self.services = ServiceGroup()
        self._files = self._watched_files(setup)
        for watched, label in self._files:
            self.metrics.config_file_refused.labels(label).set_function(functools.partial(_refused, watched))
        self.metrics.config_file_refused.labels("api_key_files").set_function(self.credentials.any_refused)
        self.metrics.request_body_bytes.set_function(lambda: self.body_budget.held)

    @classmethod
    async def start(cls, setup: Setup) -> Runtime:
        session = create_session()
        try:
            runtime = cls(setup, session)
        except BaseException:
            await session.close()
            raise
        services: list[Service] = [
            runtime.health,
            runtime.engine_load,
            runtime.discovery,
            runtime.wake,
            runtime.request_log,
            runtime.credentials,
            runtime.adapter_watch,
            *(watched for watched, _ in runtime._files),
        ]
        for service in services:
            runtime.services.start(service)
        runtime.discovery.sync(runtime.snapshot.routes)
        runtime.wake.sync(runtime.snapshot.routes)
        runtime._describe_routes()
        return runtime

    async def stop(self) -> None:
        await self.services.stop()
        self.deadlines.stop()
        await self.limiter.close()
        if self.tracer is not None:
            await asyncio.to_thread(self.tracer.shutdown)
        await self.session.close()

    # What a reload changes: one new snapshot, swapped whole.

    def apply_routing_map(self, routing_map: RoutingMap) -> None:
        self.adapters.retain((spec.name, spec.model, spec.adapters) for spec in routing_map.engines)
        routes = build_routes(routing_map, self.replicas, self.credentials, self.adapters)
        self.credentials.retain(spec.api_key_file for spec in routing_map.engines if spec.api_key_file)
        self.snapshot = dataclasses.replace(self.snapshot, routes=routes)
        self.body_budget.limit = routing_map.settings.client_limits.max_body_memory
        self.limiter.configure(routing_map.settings.limits)
        self.discovery.sync(routes)
        self.wake.sync(routes)
        self._describe_routes()

    def apply_keys(self, keys: KeyStore) -> None:
        self.snapshot = dataclasses.replace(self.snapshot, keys=keys)

    def apply_engine_key(self, key: str) -> None:
        self.snapshot = dataclasses.replace(self.snapshot, engine_auth=bearer(key))

    def _health_headers(self, replica: Replica) -> dict[str, str]:
        """The credential a replica's health check carries: that of the (first) engine it serves."""
        shared = self.snapshot.engine_auth
        for engine in self.snapshot.routes.engines:
            if replica in engine.pool.replicas:
                return dict(engine.auth_headers(shared))
        return dict(shared)

    def _watched_files(self, setup: Setup) -> list[tuple[WatchedFile[Any], str]]:
        """The mounted files to keep in service, each with its `file` label."""

        def count(file: str) -> Callable[[str], None]:
            return lambda result: self.metrics.config_reloads.labels(file, result).inc()

        mounted: list[tuple[MountedFile | None, str, str, Callable[[Path], tuple[Any, bytes]], Callable[[Any], None]]]
        mounted = [
            (setup.routing_file, "routing map", "routing_map", load_routing_map, self.apply_routing_map),
            (setup.keys_file, "API keys", "api_keys", load_keys_file, self.apply_keys),
            (setup.engine_key_file, "engine API key", "engine_api_key", load_engine_key, self.apply_engine_key),
        ]
        return [
            (WatchedFile(file.path, what, load, apply, count(label), file.loaded), label)
            for file, what, label, load, apply in mounted
            if file is not None
        ]

    def _describe_routes(self) -> None:
        """After a routing map went into service: the gauges that describe it (read at scrape time, so
        the hot path pays nothing for them)."""
        routes, metrics = self.snapshot.routes, self.metrics
        metrics.config_engines.set(len(routes.engines))
        metrics.config_last_reload.set(time.time())
        metrics.queue_length.clear()
        metrics.engine_info.clear()
        metrics.engine_balancing.clear()
        metrics.wake_held.clear()
        wakers = {engine.pool.waker: engine.name for engine in routes.engines if engine.pool.waker is not None}
        for waker, name in wakers.items():
            metrics.wake_held.labels(name).set_function(functools.partial(_held, waker))
        metrics.engines_asleep.set_function(functools.partial(_asleep, tuple(wakers)))
        for engine in routes.engines:
            metrics.engine_info.labels(engine.name, engine.model, engine.owned_by).set(1)
            metrics.engine_balancing.labels(engine.name, engine.policy.name).set(1)
            if engine.gate is not None:
                metrics.queue_length.labels(engine.name).set_function(functools.partial(_queued, engine.gate))
        self._describe_replicas()

    def _describe_replicas(self) -> None:
        """After the routes or a set of discovered pods changed: forget what no engine uses any more, and
        label each replica's availability gauge."""
        routes, metrics = self.snapshot.routes, self.metrics
        self.replicas.retain(
            routes.replica_urls(),
            (engine.discovery for engine in routes.engines if engine.discovery is not None),
            (engine.name for engine in routes.engines),
        )
        metrics.endpoint_available.clear()
        for engine in routes.engines:
            for replica in engine.pool.replicas:
                metrics.endpoint_available.labels(engine.name, replica.url).set_function(
                    functools.partial(_available, replica)
                )


def _refused(watched: WatchedFile[Any]) -> float:
    return float(watched.refused)


def _queued(gate: ConcurrencyGate) -> float:
    return float(gate.waiting)


def _available(replica: Replica) -> float:
    return float(replica.available(time.monotonic()))


def _held(waker: Waker) -> float:
    return float(waker.held)


def _asleep(wakers: tuple[Waker, ...]) -> float:
    return float(sum(waker.asleep for waker in wakers))
