"""Each engine replica's own load, read from its Prometheus `/metrics` in the background.

The gateway knows only the requests it sent itself; an engine also serves other gateways' requests (or
other clients'). vLLM and SGLang report their running and waiting requests and their KV-cache use; the
`EngineLoadReader` reads them every `settings.engine_metrics.interval` seconds, never on the request
path, at most `max_bytes` of an answer within `timeout`, and keeps only the three series it needs before
handing them to prometheus_client's parser. A replica that answers 404 or anything but Prometheus text
with those series has no metrics to read: it is asked again only after `absent_retry` seconds. A reading
is believed for three intervals; after that the replica's load is again what this gateway sent it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import aiohttp
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from gateway_app.background import PeriodicTask
from gateway_app.config import EngineMetricsSettings
from gateway_app.replicas import Replica
from gateway_app.route_table import RouteTable
from gateway_app.upstream import read_capped

log = logging.getLogger("llm_gateway.engine_load")

METRICS_PATH = "/metrics"
# The series each engine names its load by (vLLM's KV-cache gauge was `gpu_cache_usage_perc` before v1).
SERIES_KINDS = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_cache_usage",
    "vllm:gpu_cache_usage_perc": "kv_cache_usage",
    "sglang:num_running_reqs": "running",
    "sglang:num_queue_reqs": "waiting",
    "sglang:token_usage": "kv_cache_usage",
}
_WANTED_LINES = tuple(name.encode() for name in SERIES_KINDS) + tuple(
    f"# TYPE {name} ".encode() for name in SERIES_KINDS
)
FRESH_INTERVALS = 3  # a reading older than this many intervals says nothing about the replica now
IDLE_SECONDS = 5.0  # how often a switched-off reader looks whether a reload switched it on


@dataclass(frozen=True, slots=True)
class EngineLoad:
    running: float  # requests, summed over the engine's series (data-parallel ranks report apart)
    waiting: float
    kv_cache_usage: float  # 0 to 1, the fullest rank's


MAX_SAMPLES = 1000  # lines of the known series parsed per read


def parse_engine_load(text: bytes) -> EngineLoad | None:
    """The load in an engine's Prometheus text, or None when it holds none of the known series.
    ValueError when those lines are not Prometheus text."""
    wanted = [line for line in text.splitlines() if line.startswith(_WANTED_LINES)]
    if not wanted:
        return None
    lines = b"\n".join(wanted[:MAX_SAMPLES])  # a few per rank; thousands would only cost loop time
    totals = {"running": 0.0, "waiting": 0.0, "kv_cache_usage": 0.0}
    found = False
    for family in text_string_to_metric_families(lines.decode("utf-8", errors="replace") + "\n"):
        kind = SERIES_KINDS.get(family.name)
        if kind is None:
            continue
        for sample in family.samples:
            if sample.name != family.name or not math.isfinite(sample.value) or sample.value < 0:
                continue  # a broken reading must never make a replica look idle (NaN never compares)
            found = True
            if kind == "kv_cache_usage":
                totals[kind] = max(totals[kind], sample.value)
            else:
                totals[kind] += sample.value
    return EngineLoad(totals["running"], totals["waiting"], totals["kv_cache_usage"]) if found else None


class EngineLoadReader(PeriodicTask):
    """Reads the `/metrics` of the replicas of the engines that use them (`engine_metrics.scrape`)."""

    def __init__(
        self,
        routes: Callable[[], RouteTable],
        session: aiohttp.ClientSession,
        headers: Callable[[Replica], dict[str, str]],
    ) -> None:
        super().__init__(lambda: routes().settings.engine_metrics.interval or IDLE_SECONDS)
        self._routes = routes
        self._session = session
        self._headers = headers

    def targets(self) -> Iterator[tuple[str, Replica]]:
        """(engine name, replica) for every replica whose metrics are read; a replica of several engines
        appears once per engine."""
        routes = self._routes()
        settings = routes.settings.engine_metrics
        if settings.interval is None:
            return
        for engine in routes.engines:
            if engine.base_url:  # a hosted provider: its metrics, if any, are not ours to read
                continue
            if settings.scrape == "all" or engine.policy.name == "cache_aware":
                for replica in engine.pool.replicas:
                    yield engine.name, replica

    async def step(self) -> None:
        settings = self._routes().settings.engine_metrics
        if settings.interval is None:
            return
        now = time.monotonic()
        replicas = {replica.url: replica for _, replica in self.targets()}
        await asyncio.gather(
            *(self.read(replica, settings) for replica in replicas.values() if replica.metrics_absent_until <= now)
        )

    async def read(self, replica: Replica, settings: EngineMetricsSettings) -> None:
        try:
            async with self._session.get(
                replica.url + METRICS_PATH,
                headers=self._headers(replica),
                timeout=aiohttp.ClientTimeout(total=settings.timeout),
            ) as response:
                if response.status >= 500:
                    return  # a replica in trouble: its last reading expires, health checks judge it
                if response.status != 200:
                    self._absent(replica, settings, f"{METRICS_PATH} answered {response.status}")
                    return
                raw = await read_capped(response, settings.max_bytes)
        except (aiohttp.ClientError, TimeoutError):
            return  # unreachable now: the same
        if raw is None:
            self._absent(replica, settings, f"{METRICS_PATH} is larger than {settings.max_bytes} bytes")
            return
        try:
            load = parse_engine_load(raw)
        except ValueError:
            load = None
        if load is None:
            self._absent(replica, settings, f"{METRICS_PATH} holds no vLLM or SGLang load series")
            return
        interval = settings.interval or IDLE_SECONDS
        replica.engine_reported(
            load.running, load.waiting, load.kv_cache_usage, time.monotonic() + FRESH_INTERVALS * interval
        )

    @staticmethod
    def _absent(replica: Replica, settings: EngineMetricsSettings, reason: str) -> None:
        log.info("replica %s: %s; asked again in %.0f s", replica.url, reason, settings.absent_retry)
        replica.metrics_absent_until = time.monotonic() + settings.absent_retry
        replica.engine_load_until = 0.0


class EngineLoadMetrics:
    """`llm_gateway_engine_load` and `llm_gateway_engine_metrics_read`, made from the replicas' last
    readings when Prometheus asks (a collector, registered in the gateway's registry)."""

    def __init__(self, reader: EngineLoadReader) -> None:
        self._reader = reader

    def describe(self) -> list[Metric]:
        return [Metric("llm_gateway_engine_load", "", "gauge"), Metric("llm_gateway_engine_metrics_read", "", "gauge")]

    def collect(self) -> Iterator[Metric]:
        load = GaugeMetricFamily(
            "llm_gateway_engine_load",
            "An engine replica's load as its own /metrics last reported it, by kind (running, waiting: requests; "
            "kv_cache_usage: 0 to 1); only replicas whose reading is fresh.",
            labels=("engine", "endpoint", "kind"),
        )
        read = GaugeMetricFamily(
            "llm_gateway_engine_metrics_read",
            "1 while an engine replica's /metrics reading is fresh; 0 when reading failed or it has none (then "
            "asked again only after settings.engine_metrics.absent_retry seconds).",
            labels=("engine", "endpoint"),
        )
        now = time.monotonic()
        for engine, replica in self._reader.targets():
            fresh = now < replica.engine_load_until
            read.add_metric((engine, replica.url), 1.0 if fresh else 0.0)
            if fresh:
                load.add_metric((engine, replica.url, "running"), replica.engine_running)
                load.add_metric((engine, replica.url, "waiting"), replica.engine_waiting)
                load.add_metric((engine, replica.url, "kv_cache_usage"), replica.kv_cache_usage)
        yield load
        yield read
