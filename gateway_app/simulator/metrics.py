"""The simulated engine's Prometheus metrics, under that engine's real names.

A custom collector over plain numbers rather than prometheus_client's Gauge/Counter/Histogram: those
take a lock on every update, which per streamed token costs more than generating the token, and a
simulator is only ever updated from its event loop. Each simulator registers in its own
`CollectorRegistry`, so several can share a process (the demo runs them in one event loop).
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Iterator
from types import TracebackType

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from gateway_app.simulator.engines import MAX_MODEL_LEN, EngineBehaviour
from gateway_app.simulator.timing import EngineLoad

float_to_go: Callable[[float], str] = floatToGoString  # Prometheus's own float format ("+Inf"); untyped

METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST.encode()
# Tokens the fixed timing's notional KV cache holds; a running request reserves its prompt plus its max_tokens.
KV_CACHE_TOKENS = 8 * MAX_MODEL_LEN


class Histogram:
    """Bucket counts and a sum; `observe` can record several equal values in one call."""

    __slots__ = ("upper_bounds", "counts", "sum")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.upper_bounds = (*sorted(buckets), math.inf)
        self.counts = [0] * len(self.upper_bounds)
        self.sum = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        # Prometheus buckets are "less than or equal": the first bound >= value.
        self.counts[bisect.bisect_left(self.upper_bounds, value)] += count
        self.sum += value * count

    def family(self, name: str, documentation: str, labelnames: list[str], labelvalues: list[str]) -> Metric:
        family = HistogramMetricFamily(name, documentation, labels=labelnames)
        cumulative, buckets = 0, []
        for bound, count in zip(self.upper_bounds, self.counts, strict=False):
            cumulative += count
            buckets.append((float_to_go(bound), cumulative))
        family.add_metric(labelvalues, buckets, self.sum)
        return family


class EngineMetrics:
    """Load and latency series a load-aware gateway scrapes, updated by `RequestTracker`s.

    With the engine model (`load`), running and waiting requests, KV-cache usage and the prefix cache's
    series are the model's own; with the fixed timing, every request in flight runs, nothing waits and
    nothing is cached.
    """

    def __init__(self, engine: EngineBehaviour, model: str, load: EngineLoad | None = None) -> None:
        self.names = engine.metric_names
        labels = engine.metric_labels(model)
        self._labelnames = list(labels)
        self._labelvalues = list(labels.values())
        self.load = load
        self.running = 0  # requests in flight
        self.reserved_tokens = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.time_to_first_token = Histogram(self.names.ttft_buckets)
        self.inter_token_latency = Histogram(self.names.itl_buckets)
        self.e2e_latency = Histogram(self.names.e2e_buckets)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def track(self, prompt_tokens: int, max_tokens: int) -> RequestTracker:
        return RequestTracker(self, prompt_tokens, max_tokens)

    def collect(self) -> Iterator[Metric]:
        """The collector protocol: called by the registry on every scrape."""
        names, labelnames, values, load = self.names, self._labelnames, self._labelvalues, self.load
        if load is None:
            running, waiting, kv_usage = self.running, 0, min(self.reserved_tokens / KV_CACHE_TOKENS, 1.0)
            queries = hits = 0
            hit_rate = 0.0
        else:
            running, waiting, kv_usage = load.running, load.waiting, load.kv_cache_usage
            queries, hits, hit_rate = load.prefix_cache_queries, load.prefix_cache_hits, load.last_cache_hit_rate
        gauges = [
            (names.running, "Number of requests being generated.", running),
            (names.waiting, "Number of requests waiting to be scheduled.", waiting),
            (names.kv_cache_usage, "KV-cache usage; 1 means full.", kv_usage),
        ]
        if names.cache_hit_rate is not None:
            gauges.append((names.cache_hit_rate, "The prefix cache hit rate.", hit_rate))
        for name, documentation, value in gauges:
            gauge = GaugeMetricFamily(name, documentation, labels=labelnames)
            gauge.add_metric(values, value)
            yield gauge
        counters = [
            (names.prompt_tokens, "Number of prefill tokens processed.", self.prompt_tokens),
            (names.generation_tokens, "Number of generation tokens processed.", self.generation_tokens),
        ]
        if names.prefix_cache_queries is not None and names.prefix_cache_hits is not None:
            counters.append(
                (names.prefix_cache_queries, "Prefix cache queries, in terms of number of queried tokens.", queries)
            )
            counters.append((names.prefix_cache_hits, "Prefix cache hits, in terms of number of cached tokens.", hits))
        for name, documentation, value in counters:
            counter = CounterMetricFamily(name, documentation, labels=labelnames)
            counter.add_metric(values, value)
            yield counter
        histograms = (
            (names.time_to_first_token, "Time to first token in seconds.", self.time_to_first_token),
            (names.inter_token_latency, "Inter-token latency in seconds.", self.inter_token_latency),
            (names.e2e_latency, "End-to-end request latency in seconds.", self.e2e_latency),
        )
        for name, documentation, histogram in histograms:
            yield histogram.family(name, documentation, labelnames, values)


class RequestTracker:
    """One request's life in the metrics.

    Leaving the `with` block, whether the request finished, failed or was cancelled because its
    client went away, takes it out of the running gauge at once.
    """

    __slots__ = ("metrics", "prompt_tokens", "reserved_tokens", "start", "generated", "finished", "_last_token")

    def __init__(self, metrics: EngineMetrics, prompt_tokens: int, max_tokens: int) -> None:
        self.metrics = metrics
        self.prompt_tokens = prompt_tokens
        self.reserved_tokens = prompt_tokens + max_tokens
        self.start = 0.0
        self.generated = 0
        self.finished = False
        self._last_token = 0.0

    def __enter__(self) -> RequestTracker:
        self.start = self._last_token = time.monotonic()
        metrics = self.metrics
        metrics.running += 1
        metrics.prompt_tokens += self.prompt_tokens
        metrics.reserved_tokens += self.reserved_tokens
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        metrics = self.metrics
        metrics.running -= 1
        metrics.reserved_tokens -= self.reserved_tokens
        metrics.generation_tokens += self.generated
        if self.finished:
            metrics.e2e_latency.observe(time.monotonic() - self.start)

    def tokens_done(self, count: int = 1) -> None:
        """Record `count` tokens produced now; the time since the previous token is spread evenly."""
        now = time.monotonic()
        gaps = count
        if self.generated == 0:
            self.metrics.time_to_first_token.observe(now - self.start)
            gaps -= 1
        if gaps:
            self.metrics.inter_token_latency.observe((now - self._last_token) / gaps, gaps)
        self.generated += count
        self._last_token = now

    def finish(self) -> None:
        self.finished = True
