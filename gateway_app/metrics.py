"""The gateway's Prometheus metrics, prefix `llm_gateway_`.

Labels only ever carry names from the routing map (model ids, engine names, endpoints) and status
codes, so cardinality is bounded by the map. A request for an unknown model is counted with empty
model and engine labels: a client-chosen string never becomes a label. The one exception, LoRA adapters
discovered at run time, is bounded apart (adapters.py): a budget of labels per engine, and the series of
an adapter no longer listed removed (`forget_model`).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from gateway_app.plain_metrics import CounterChild, HistogramChild, PlainCounter, PlainHistogram

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
CONNECTION_CLOSE_REASONS = (
    "head_too_large",
    "too_many_headers",
    "head_timeout",
    "idle",
    "bad_request",
    "evicted",
    "over_capacity",
    "body_timeout",
    "send_timeout",
)
STATUS_CLASSES = {2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}
WAKE_BUCKETS = (1, 5, 10, 20, 30, 60, 120, 180, 300, 600, 900, 1800)
FIRST_BYTE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class InFlight:
    """Requests being forwarded to one engine right now."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0

    def read(self) -> float:
        return float(self.count)


class RouteStats:
    """The per-request metrics of one (model, engine, path), resolved once and kept: a request moves
    them without building label tuples. A child is made at its first use, as `labels()` would (no zero
    series for a stream that never happened)."""

    __slots__ = ("_metrics", "_labels", "_by_status", "_duration", "_first_byte", "_prompt", "_completion")

    def __init__(self, metrics: GatewayMetrics, model: str, engine: str, path: str) -> None:
        self._metrics = metrics
        self._labels = (model, engine, path)
        self._by_status: dict[int, CounterChild] = {}
        self._duration: dict[bool, HistogramChild] = {}  # by stream
        self._first_byte: dict[bool, HistogramChild] = {}
        self._prompt: CounterChild | None = None
        self._completion: CounterChild | None = None

    def answered(self, status: int) -> CounterChild:
        """The `llm_gateway_requests_total` child of this status."""
        child = self._by_status.get(status)
        if child is None:
            child = self._by_status[status] = self._metrics.requests.labels(*self._labels, str(status))
        return child

    def duration(self, stream: bool) -> HistogramChild:
        child = self._duration.get(stream)
        if child is None:
            child = self._duration[stream] = self._metrics.duration.labels(*self._labels, _STREAM[stream])
        return child

    def first_byte(self, stream: bool) -> HistogramChild:
        child = self._first_byte.get(stream)
        if child is None:
            child = self._first_byte[stream] = self._metrics.first_byte.labels(*self._labels, _STREAM[stream])
        return child

    def tokens(self) -> tuple[CounterChild, CounterChild]:
        """The prompt and completion token counters of this model and engine."""
        if self._prompt is None or self._completion is None:
            model, engine = self._labels[0], self._labels[1]
            self._prompt = self._metrics.prompt_tokens.labels(model, engine)
            self._completion = self._metrics.completion_tokens.labels(model, engine)
        return self._prompt, self._completion


_STREAM = {False: "false", True: "true"}


class GatewayMetrics:
    """All gateway metrics in their own registry (the app may be built more than once in a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._children: dict[tuple[MetricWrapperBase, tuple[str, ...]], Any] = {}
        self._in_flight: dict[tuple[str, str], InFlight] = {}
        # Counts of labels removed (forget_model) while requests under them were still being forwarded.
        self._draining: dict[tuple[str, str], list[InFlight]] = {}
        # By (model, engine), then path (or base model and status): one adapter's are dropped at once.
        self._route_stats: dict[tuple[str, str], dict[str, RouteStats]] = {}
        self._client_requests: dict[tuple[str, int], CounterChild] = {}
        self._adapter_requests: dict[tuple[str, str], dict[tuple[str, int], CounterChild]] = {}
        self._engine_load: Collector | None = None
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        route = ("model", "engine", "endpoint")
        self.requests = PlainCounter(
            "llm_gateway_requests",
            "Requests answered, by the engine that served them and the HTTP status.",
            (*route, "status"),
            registry=self.registry,
        )
        # `stream` keeps apart what differs by nature: a non-streaming answer's first byte comes with
        # the whole generation, a stream's with its first token.
        self.duration = PlainHistogram(
            "llm_gateway_request_duration_seconds",
            "Time from the request to the last byte of the answer.",
            (*route, "stream"),
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.first_byte = PlainHistogram(
            "llm_gateway_time_to_first_byte_seconds",
            "Time from the request to the engine's first chunk for streams, to its response headers otherwise.",
            (*route, "stream"),
            buckets=FIRST_BYTE_BUCKETS,
            registry=self.registry,
        )
        self.engine_info = Gauge(
            "llm_gateway_engine_info",
            "1 for each engine of the routing map in service: which model it serves.",
            ("engine", "model", "owned_by"),
            registry=self.registry,
        )
        # LoRA adapters are counted under their own id as `model` everywhere; this one adds the base model
        # they ran on, to sum a GPU deployment's traffic over its fine-tunes.
        self.adapter_requests = PlainCounter(
            "llm_gateway_adapter_requests",
            "Requests for LoRA adapters, by adapter (model), the base model it runs on, engine and status.",
            ("model", "base_model", "engine", "status"),
            registry=self.registry,
        )
        self.client_requests = PlainCounter(
            "llm_gateway_client_requests",
            "Requests by API key name (`anonymous` with authentication off, empty without a valid key) and "
            "status class: who sends the traffic.",
            ("client", "status_class"),
            registry=self.registry,
        )
        self.time_per_output_token = PlainHistogram(
            "llm_gateway_time_per_output_token_seconds",
            "For streams: time from the first chunk to the last, divided by the output tokens after the first "
            "(the inter-token latency clients see through the gateway).",
            ("model", "engine"),
            buckets=(0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5),
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "llm_gateway_requests_in_flight",
            "Requests being forwarded right now.",
            ("model", "engine"),
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            "llm_gateway_upstream_errors",
            "Failures talking to an engine, by kind (connect, engine_not_found, timeout_first_byte, timeout_idle, "
            "timeout_total, broken_stream).",
            ("engine", "kind"),
            registry=self.registry,
        )
        self.client_disconnects = Counter(
            "llm_gateway_client_disconnects",
            "Requests whose client went away before the answer was complete; the engine request was closed.",
            ("model", "engine"),
            registry=self.registry,
        )
        self.retries = Counter(
            "llm_gateway_retries",
            "Requests sent again to another replica or engine before any byte was relayed.",
            ("engine",),
            registry=self.registry,
        )
        self.fallbacks = Counter(
            "llm_gateway_fallbacks",
            "Requests that went to a fallback engine because no replica of theirs could take them.",
            ("engine", "fallback"),
            registry=self.registry,
        )
        self.queue_length = Gauge(
            "llm_gateway_engine_queue_length",
            "Requests waiting for a place at an engine with a concurrency limit.",
            ("engine",),
            registry=self.registry,
        )
        self.queue_wait = PlainHistogram(
            "llm_gateway_engine_queue_wait_seconds",
            "Time requests waited for a place at an engine.",
            ("engine",),
            buckets=FIRST_BYTE_BUCKETS,
            registry=self.registry,
        )
        self.endpoint_available = Gauge(
            "llm_gateway_endpoint_available",
            "1 when a replica is healthy and not ejected, else 0.",
            ("engine", "endpoint"),
            registry=self.registry,
        )
        self.prompt_tokens = PlainCounter(
            "llm_gateway_prompt_tokens",
            "Prompt tokens, from the usage the engines report.",
            ("model", "engine"),
            registry=self.registry,
        )
        self.completion_tokens = PlainCounter(
            "llm_gateway_completion_tokens",
            "Completion tokens, from the usage the engines report.",
            ("model", "engine"),
            registry=self.registry,
        )
        self.config_reloads = Counter(
            "llm_gateway_config_reloads",
            "Reloads of mounted files by file (routing_map, api_keys, engine_api_key) and result (success, failure).",
            ("file", "result"),
            registry=self.registry,
        )
        self.config_file_refused = Gauge(
            "llm_gateway_config_file_refused",
            "1 while a mounted file (routing_map, api_keys, engine_api_key; api_key_files: any engine's own key "
            "file) holds content the gateway refused: it serves the last good one.",
            ("file",),
            registry=self.registry,
        )
        self.rejected = Counter(
            "llm_gateway_rejected_requests",
            "Requests refused before reaching an engine, by reason (auth, forbidden_model, rate_limit_requests, "
            "rate_limit_tokens, limiter_unavailable, engine_overloaded, engine_waking) and API key name (empty "
            "when no valid key was given).",
            ("reason", "client"),
            registry=self.registry,
        )
        self.limiter_store_errors = Counter(
            "llm_gateway_rate_limit_store_errors",
            "Failed calls to the shared rate-limit store (Redis); while it fails, limits fail open or closed.",
            registry=self.registry,
        )
        self.client_connections = Gauge(
            "llm_gateway_client_connections",
            "Client connections open now.",
            registry=self.registry,
        )
        self.client_connections_limit = Gauge(
            "llm_gateway_client_connections_limit",
            "Most client connections at once (settings.client_limits.max_connections, or sized from the "
            "open-file limit).",
            registry=self.registry,
        )
        self.client_connections_closed = Counter(
            "llm_gateway_client_connections_closed",
            "Client connections closed by the gateway's bounds, by reason (head_too_large, too_many_headers, "
            "head_timeout, body_timeout, idle, bad_request, evicted, over_capacity, send_timeout).",
            ("reason",),
            registry=self.registry,
        )
        self.request_body_bytes = Gauge(
            "llm_gateway_request_body_bytes",
            "Bytes of request bodies held now, all requests together (bounded by client_limits.max_body_memory).",
            registry=self.registry,
        )
        self.balancing_decisions = PlainCounter(
            "llm_gateway_balancing_decisions",
            "Replica choices by engine, policy and decision: least_loaded (power_of_two), in_turn (round_robin), "
            "affinity (an affinity key), prefix_hit (cache_aware: the replica likely holding the prompt's "
            "prefix), load_override (that replica was overloaded: the request went elsewhere), load_kept (it was "
            "overloaded but moving would have cost more: the prompt computed again), history_kept (overloaded, but a "
            "later turn of a conversation: its history is on that replica), prefix_miss (no replica held "
            "enough of it), no_prefix (no prompt text). Retries choose again.",
            ("engine", "policy", "decision"),
            registry=self.registry,
        )
        self.engine_balancing = Gauge(
            "llm_gateway_engine_balancing",
            "1 for each engine of the routing map in service: the balancing policy it uses.",
            ("engine", "policy"),
            registry=self.registry,
        )
        self.config_engines = Gauge(
            "llm_gateway_config_engines",
            "Engines in the routing map being served.",
            registry=self.registry,
        )
        self.config_last_reload = Gauge(
            "llm_gateway_config_last_reload_success_timestamp_seconds",
            "When the routing map now served was loaded.",
            registry=self.registry,
        )
        # Scale to zero (wake.py): read at scrape time or counted per wake and sleep, never per request.
        self.wake_held = Gauge(
            "llm_gateway_wake_held_requests",
            "Requests held now until their engine, scaled to zero, has a ready replica (engines with `wake`).",
            ("engine",),
            registry=self.registry,
        )
        self.wakeups = Counter(
            "llm_gateway_engine_wakeups",
            "Wakes this gateway started: the engine's Deployment scaled from zero because a request came.",
            ("engine",),
            registry=self.registry,
        )
        self.wake_duration = Histogram(
            "llm_gateway_engine_wake_duration_seconds",
            "From the request that woke an engine to its first ready replica.",
            ("engine",),
            buckets=WAKE_BUCKETS,
            registry=self.registry,
        )
        self.scale_downs = Counter(
            "llm_gateway_engine_scale_downs",
            "Engines this gateway scaled to zero after `wake.idle_after` seconds without requests.",
            ("engine",),
            registry=self.registry,
        )
        self.engines_asleep = Gauge(
            "llm_gateway_engines_asleep",
            "Engines with `wake` that have no ready replica now (asleep, or waking).",
            registry=self.registry,
        )
        # The plain metrics labelled by model and engine: what `forget_model` removes from.
        self._by_model = (
            self.requests,
            self.duration,
            self.first_byte,
            self.time_per_output_token,
            self.prompt_tokens,
            self.completion_tokens,
            self.adapter_requests,
        )
        for result in ("success", "failure"):
            self.config_reloads.labels("routing_map", result)
        for reason in CONNECTION_CLOSE_REASONS:  # zero from the start, so that rates and alerts see them
            self.client_connections_closed.labels(reason)

    def child(self, metric: MetricWrapperBase | PlainCounter | PlainHistogram, *labels: str) -> Any:
        """`metric.labels(*labels)`, remembered: the hot path asks for the same few children again and
        again, and `labels()` validates and locks each time. (Not for metrics that are cleared.) The
        per-request metrics are plain ones (plain_metrics.py), whose children are plain numbers."""
        if isinstance(metric, (PlainCounter, PlainHistogram)):
            return metric.labels(*labels)
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def client_request(self, client: str, status: int) -> CounterChild:
        """The `llm_gateway_client_requests_total` child of a client and a status' class."""
        key = (client, status // 100)
        child = self._client_requests.get(key)
        if child is None:
            status_class = STATUS_CLASSES.get(status // 100, "other")
            child = self._client_requests[key] = self.client_requests.labels(client, status_class)
        return child

    def adapter_request(self, model: str, base_model: str, engine: str, status: int) -> CounterChild:
        """The `llm_gateway_adapter_requests_total` child of an adapter request's answer."""
        by_status = self._adapter_requests.get((model, engine))
        if by_status is None:
            by_status = self._adapter_requests[(model, engine)] = {}
        child = by_status.get((base_model, status))
        if child is None:
            child = by_status[(base_model, status)] = self.adapter_requests.labels(
                model, base_model, engine, str(status)
            )
        return child

    def forget_model(self, model: str, engine: str) -> bool:
        """Remove every series of one `model` label on one engine: a LoRA adapter discovered at run time
        that its engine no longer lists (adapters.py), so that adapters loaded and unloaded over time do
        not pile up series. False when requests under it are still being forwarded: they count under it
        again when they end, so it must be asked again later. Its work is that label's own series (an
        index per metric), never every series: an engine's 100 adapters may go at once."""
        key = (model, engine)
        for metric in self._by_model:
            metric.remove_model(model, engine)
        self._route_stats.pop(key, None)
        self._adapter_requests.pop(key, None)
        in_flight = self._in_flight.pop(key, None)
        if in_flight is not None:
            self.in_flight.remove(model, engine)
            if in_flight.count:  # beside those of an earlier removal, which may still be under way
                self._draining.setdefault(key, []).append(in_flight)
        if self._children.pop((self.client_disconnects, key), None) is not None:
            self.client_disconnects.remove(model, engine)
        draining = [count for count in self._draining.pop(key, ()) if count.count]
        if draining:
            self._draining[key] = draining
            return False
        return True

    def keep_model(self, model: str, engine: str) -> None:
        """The label is in use again (its adapter listed again, or made one of the map's): its series are
        no longer being removed, and requests from before the removal may count under it."""
        self._draining.pop((model, engine), None)

    def show_engine_load(self, collector: Collector) -> None:
        """The collector of the engines' own load (engine_load.py), in place of a previous runtime's."""
        if self._engine_load is not None:
            self.registry.unregister(self._engine_load)
        self.registry.register(collector)
        self._engine_load = collector

    def balancing_decision(self, engine: str, policy: str, decision: str) -> CounterChild:
        return self.balancing_decisions.labels(engine, policy, decision)

    def route_stats(self, model: str, engine: str, path: str) -> RouteStats:
        by_path = self._route_stats.get((model, engine))
        if by_path is None:
            by_path = self._route_stats[(model, engine)] = {}
        stats = by_path.get(path)
        if stats is None:
            stats = by_path[path] = RouteStats(self, model, engine, path)
        return stats

    def in_flight_of(self, model: str, engine: str) -> InFlight:
        """The count behind `llm_gateway_requests_in_flight{model, engine}`: a plain number the hot path
        moves, read when Prometheus scrapes."""
        key = (model, engine)
        count = self._in_flight.get(key)
        if count is None:
            count = self._in_flight[key] = InFlight()
            self.in_flight.labels(model, engine).set_function(count.read)
        return count

    def render(self) -> bytes:
        return generate_latest(self.registry)
