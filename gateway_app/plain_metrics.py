"""Counters and histograms the hot path moves as plain numbers, exposed in Prometheus' format on scrape.

prometheus_client's own children take a lock on every `inc()` and on every bucket of an `observe()`, so
that threads may share them. The gateway moves its per-request metrics from the event loop's one thread
only, so a lock buys nothing there and costs several microseconds a request. These metrics keep their
numbers in plain attributes, and a collector (prometheus_client's documented extension point) turns them
into the same samples a `Counter` or `Histogram` would expose, `_created` included, when Prometheus asks.

Only for metrics moved from the event loop's thread: a thread that moved them could lose an update.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString


class CounterChild:
    """One label set of a `PlainCounter`."""

    __slots__ = ("value", "created")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class HistogramChild:
    """One label set of a `PlainHistogram`: counts per bucket (not cumulative until exposed) and the sum."""

    __slots__ = ("bounds", "counts", "sum", "created")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, amount)] += 1  # a value equal to a bound is in its bucket
        self.sum += amount


class _PlainMetric:
    """What a counter and a histogram share: a name, help, label names, and children by label values.

    A metric with `model` and `engine` labels also keeps its children's label values by (model, engine),
    so that removing one adapter's series (`remove_model`) touches those only, never every child."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        names = self.labelnames
        self._model_engine = (
            (names.index("model"), names.index("engine")) if {"model", "engine"} <= set(names) else None
        )
        self._by_model_engine: dict[tuple[str, str], list[tuple[str, ...]]] = {}
        registry.register(self)  # a Collector by its shape: collect() and describe()

    def describe(self) -> list[Metric]:
        """Names only, so that the registry can refuse a duplicate without collecting."""
        return [Metric(self.name, self.documentation, self._type)]

    def collect(self) -> Iterator[Metric]:
        raise NotImplementedError

    def _added(self, values: tuple[str, ...]) -> None:
        """Index a new child (once per label set, never on the hot path's later uses)."""
        if self._model_engine is not None:
            model, engine = self._model_engine
            self._by_model_engine.setdefault((values[model], values[engine]), []).append(values)

    def remove_model(self, model: str, engine: str) -> None:
        """Remove every child of one (model, engine): O(its own children)."""
        children: dict[tuple[str, ...], object] = self._children
        for values in self._by_model_engine.pop((model, engine), ()):
            children.pop(values, None)

    _children: dict[tuple[str, ...], Any]
    _type = ""


class PlainCounter(_PlainMetric):
    """A Prometheus counter (`<name>_total`, `<name>_created`) moved without locks."""

    _type = "counter"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry) -> None:
        super().__init__(name, documentation, labelnames, registry)
        self._children: dict[tuple[str, ...], CounterChild] = {}

    def labels(self, *values: str) -> CounterChild:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
            child = self._children[values] = CounterChild()
            self._added(values)
        return child

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._children.items()):
            family.add_metric(values, child.value, created=child.created)
        yield family


class PlainHistogram(_PlainMetric):
    """A Prometheus histogram (`_bucket`, `_count`, `_sum`, `_created`) moved without locks."""

    _type = "histogram"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
        buckets: Sequence[float],
    ) -> None:
        super().__init__(name, documentation, labelnames, registry)
        self.bounds = tuple(sorted(float(bound) for bound in buckets if bound != float("inf")))
        self._children: dict[tuple[str, ...], HistogramChild] = {}

    def labels(self, *values: str) -> HistogramChild:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
            child = self._children[values] = HistogramChild(self.bounds)
            self._added(values)
        return child

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        edges = [floatToGoString(bound) for bound in self.bounds]  # type: ignore[no-untyped-call]
        edges.append("+Inf")
        for values, child in list(self._children.items()):
            cumulative, buckets = 0, []
            for edge, count in zip(edges, child.counts, strict=True):
                cumulative += count
                buckets.append((edge, cumulative))
            family.add_metric(list(values), buckets, child.sum)
            labels = dict(zip(self.labelnames, values, strict=True))
            family.samples.append(Sample(f"{self.name}_created", labels, child.created))
        yield family
