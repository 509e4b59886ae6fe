"""The routing map: the one definition of its format, and its loader.

The Helm chart writes this file into a ConfigMap; the gateway loads it at start and on every change.
Validation happens here, once, and every message names the offending field so that an operator can
fix a bad ConfigMap without reading code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENGINE_NAME_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$"
HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# Headers the gateway owns on the way to an engine; a map may not override them.
RESERVED_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})


# libyaml's loader when PyYAML was built with it: several times faster on large files.
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class ConfigError(ValueError):
    """A routing map that must not be served; the message names the field at fault."""


class _Strict(BaseModel):
    # Unknown keys are typos until proven otherwise: reject them, naming the key.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Timeouts(_Strict):
    """Upstream timeouts in seconds; `None` means no limit."""

    connect: float | None = Field(default=5.0, gt=0)
    # Time until the engine's first body byte. A non-streaming answer arrives whole after generation,
    # so this bounds a whole non-streaming request: keep it long.
    first_byte: float | None = Field(default=600.0, gt=0)
    # Longest silence between two chunks of a stream once it has started.
    idle: float | None = Field(default=120.0, gt=0)
    # Whole request; off by default so that long streams are never cut.
    total: float | None = Field(default=None, gt=0)


class TimeoutOverrides(_Strict):
    """Per-engine overrides; a field left out keeps the map-wide value."""

    connect: float | None = Field(default=None, gt=0)
    first_byte: float | None = Field(default=None, gt=0)
    idle: float | None = Field(default=None, gt=0)
    total: float | None = Field(default=None, gt=0)


class LimitSettings(_Strict):
    """Default per-key rate limits (a key may override them); `None` means unlimited."""

    requests_per_minute: int | None = Field(default=None, ge=0)
    tokens_per_minute: int | None = Field(default=None, ge=0)
    # Admission charges the prompt's size plus `max_tokens`; without `max_tokens`, this many.
    completion_tokens_estimate: int = Field(default=256, ge=0)
    # With Redis unreachable: serve without limits (True) or refuse with 503 (False).
    fail_open: bool = True


class HealthSettings(_Strict):
    """How endpoints are judged: active `/health` checks plus what real requests experience."""

    interval: float = Field(default=5.0, gt=0)  # seconds between two checks of an endpoint
    timeout: float = Field(default=2.0, gt=0)
    # A failing endpoint is left out for `ejection_base` seconds, doubled at each failure in a row,
    # at most `ejection_max`; a successful check brings it back at once.
    ejection_base: float = Field(default=1.0, gt=0)
    ejection_max: float = Field(default=60.0, gt=0)


class RetrySettings(_Strict):
    """Retries happen only before any byte went to the client: on a failed connection or a 502/503."""

    max_attempts: int = Field(default=3, ge=1, le=10)
    deadline: float = Field(default=10.0, gt=0)  # no new attempt this long after the request arrived


class AffinitySettings(_Strict):
    """Optional session affinity: requests with the same key go to the same replica while it is healthy."""

    header: str | None = Field(default=None, pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
    body_user: bool = False  # use the OpenAI `user` field of the body


BalancingPolicyName = Literal["power_of_two", "round_robin", "cache_aware"]
# The HTTP API an engine speaks where vLLM and SGLang differ: the `<base>:<adapter>` model form (SGLang
# only) and the paths of LoRA loading and unloading (`/v1/load_lora_adapter` on vLLM, `/load_lora_adapter`
# on SGLang).
EngineApi = Literal["vllm", "sglang"]


def adapter_name_problem(name: str) -> str | None:
    """Why `name` cannot name a LoRA adapter, or None. One rule for the routing map, the adapters engines
    list and those loaded through the gateway: SGLang's `<base>:<adapter>` and an access list's
    `<model>:*` must mean one thing only."""
    if not name or any(char.isspace() for char in name):
        return f"an adapter name must not be empty or contain whitespace, got {name!r}"
    if ":" in name:
        return f"an adapter name must not contain ':' (SGLang's <base>:<adapter>), got {name!r}"
    if "*" in name:
        return f"an adapter name must not contain '*' (an access list's <model>:*), got {name!r}"
    return None


class CacheAwareSettings(_Strict):
    """How `cache_aware` balancing weighs a likely cached prefix against load (see balancer.py).

    The replica that most likely holds the prompt's prefix is preferred unless it is overloaded: its load
    exceeds the least loaded replica's by more than `balance_abs_threshold` requests *and* by more than
    `balance_rel_threshold` times (SGLang's router uses the same two conditions, on its whole pool); by more
    than `history_abs_threshold` for a later turn of a conversation. The request then moves only where it
    costs less, each prompt block the other replica would compute again counted as `recompute_weight`
    requests (an idle replica always takes it)."""

    # Below this share of the prompt's blocks found on a replica, the prefix is not worth following.
    min_match: float = Field(default=0.3, ge=0, le=1)
    balance_abs_threshold: float = Field(default=4.0, ge=0)
    balance_rel_threshold: float = Field(default=1.5, ge=1)
    # The absolute threshold for a request that continues a conversation (its prompt goes on, past the part
    # shared with other prompts, on blocks only its replica was sent): moving it computes its history again.
    history_abs_threshold: float = Field(default=16.0, ge=0)
    # Requests of load that one prompt block (256 characters, ~64 tokens) to compute again is worth when an
    # overloaded replica's request would move: 0.2 makes a 2,000-token system prompt worth ~6 requests.
    recompute_weight: float = Field(default=0.2, ge=0)
    # Prompt blocks (256 characters each) remembered per engine, least recently used forgotten first.
    # About 400 bytes of gateway memory each once the table is full: 40 MB per cache_aware engine.
    table_blocks: int = Field(default=100_000, ge=1000, le=1_000_000)

    @model_validator(mode="after")
    def _history_bound_not_below_the_usual_one(self) -> CacheAwareSettings:
        """A later turn is held at least as long as any request: a lower bound would never apply."""
        if self.history_abs_threshold < self.balance_abs_threshold:
            raise ValueError(
                f"@history_abs_threshold: must be at least balance_abs_threshold ({self.balance_abs_threshold:g}): "
                "a later turn of a conversation moves no sooner than any other request"
            )
        return self


class EngineMetricsSettings(_Strict):
    """Reading each replica's own load from its Prometheus `/metrics` (vLLM, SGLang), in the background."""

    interval: float | None = Field(default=5.0, gt=0)  # seconds between two reads; null: never read
    timeout: float = Field(default=1.0, gt=0)
    max_bytes: int = Field(default=1024 * 1024, ge=16 * 1024)  # a larger answer is not read
    # An engine answering 404 or something that is not Prometheus text is asked again only this late.
    absent_retry: float = Field(default=300.0, gt=0)
    # Whose replicas are read: the engines balanced `cache_aware` (default), or every engine with an URL
    # of its own (`power_of_two` then weighs the engines' own queues too).
    scrape: Literal["cache_aware", "all"] = "cache_aware"


class Concurrency(_Strict):
    """Per-engine admission: at most `limit` requests at once, then a bounded wait queue, then 429."""

    limit: int | None = Field(default=None, ge=1)
    queue: int = Field(default=100, ge=0)
    queue_timeout: float = Field(default=30.0, gt=0)


class Discovery(_Strict):
    """Reach an engine pod by pod: the ready pods behind a Kubernetes Service, from its EndpointSlices.

    `url`/`urls` stay in use until the first answer from the API, and whenever no pod is ready.
    """

    service: str = Field(min_length=1)
    namespace: str = Field(min_length=1)
    port: int = Field(default=8000, ge=1, le=65535)  # the pods' port (the Service's targetPort)


class Wake(_Strict):
    """Scale to zero: the engine's Deployment sleeps at zero replicas and a request wakes it (wake.py).

    Needs `discovery`: the gateway tells an engine asleep (no ready pod) from one that is up by its
    EndpointSlices, and forwards a held request as soon as one pod is ready.
    """

    deployment: str = Field(min_length=1, max_length=253)  # in the discovery namespace
    replicas: int = Field(default=1, ge=1)  # what a wake scales it to
    timeout: float = Field(default=900.0, gt=0)  # seconds a request may be held
    idle_after: float | None = Field(default=None, gt=0)  # seconds without requests, then zero; None: never
    queue: int = Field(default=100, ge=0)  # requests held at once; past it, 503 engine_waking
    fallback_while_waking: bool = False  # with a `fallback`: it serves while this engine wakes
    # The Lease in which the gateways record the engine's last request (default: <deployment>-activity).
    lease: str | None = Field(default=None, min_length=1, max_length=253)

    @property
    def lease_name(self) -> str:
        return self.lease or f"{self.deployment}-activity"


class ClientLimits(_Strict):
    """What one client, or all of them together, may make the gateway hold: the front door's bounds.

    Past a bound the client gets an OpenAI-shaped error (431, 408, 503) and the connection is closed;
    nothing past a bound is parsed, buffered or forwarded.
    """

    # The whole request head (request line and headers). No OpenAI client comes near these.
    max_header_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    max_headers: int = Field(default=100, ge=10, le=10_000)
    # Seconds to receive a whole request head, counted from the connection's start or from the first
    # byte of the next request on a kept-alive connection.
    head_timeout: float = Field(default=10.0, gt=0)
    # Longest pause between two chunks of a request body; and past that first stretch, a body must keep
    # coming at `body_min_rate` bytes a second on average, so that a trickle cannot hold memory for hours.
    body_timeout: float = Field(default=30.0, gt=0)
    body_min_rate: int = Field(default=32 * 1024, ge=1)
    # Longest time an answer may wait for a client that does not read it; then the connection is closed.
    send_timeout: float = Field(default=60.0, gt=0)
    # Client connections at once; None: sized from the open-file limit, keeping one descriptor per
    # client connection for its engine connection and some for files, Redis and the Kubernetes API.
    # At the limit, a connection that has not sent a complete request head makes room for a new one.
    max_connections: int | None = Field(default=None, ge=1)
    # Bytes of request bodies held at once, all requests together; past it, 503 with Retry-After.
    max_body_memory: int = Field(default=128 * 1024 * 1024, ge=1024 * 1024)


class Settings(_Strict):
    """Map-wide gateway settings, all optional with safe defaults."""

    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    client_limits: ClientLimits = ClientLimits()
    list_aliases: bool = True
    models_cache_ttl: float = Field(default=5.0, ge=0)
    models_timeout: float = Field(default=2.0, gt=0)
    timeouts: Timeouts = Timeouts()
    limits: LimitSettings = LimitSettings()
    health: HealthSettings = HealthSettings()
    retries: RetrySettings = RetrySettings()
    affinity: AffinitySettings = AffinitySettings()
    # How a replica is picked: the less loaded of two at random, plain rotation (for comparison), or by
    # the prompt's prefix, bounded by load (an engine may override it).
    balancing: BalancingPolicyName = "power_of_two"
    cache_aware: CacheAwareSettings = CacheAwareSettings()
    engine_metrics: EngineMetricsSettings = EngineMetricsSettings()
    # LoRA adapters loaded at run time: an adapter an engine lists in its own /v1/models with `parent` set
    # to the engine's model becomes routable to that engine, and stops being when the engine stops listing
    # it (read every models_cache_ttl seconds, at least every second).
    discover_adapters: bool = False
    # At most this many adapters per engine are taken from its /v1/models (the first listed); the rest are
    # left out with a warning. Adapters listed in the routing map do not count.
    max_discovered_adapters: int = Field(default=1000, ge=0, le=100_000)
    # Discovered adapters per engine counted under their own name as the `model` label of the metrics;
    # the others under their base model (the metrics' series stay bounded whatever engines load).
    max_adapter_metric_labels: int = Field(default=100, ge=0, le=10_000)
    # /readyz fails while no endpoint of any engine is healthy. Off by default: with every gateway pod
    # unready, clients get refused connections instead of an explanatory 502.
    ready_requires_engine: bool = False

    @model_validator(mode="after")
    def _one_body_fits_the_budget(self) -> Settings:
        if self.client_limits.max_body_memory < self.max_body_bytes:
            raise ValueError(
                f"@client_limits.max_body_memory: must be at least max_body_bytes ({self.max_body_bytes}), "
                "or no request of the largest allowed size could ever be read"
            )
        return self


def read_engine_key(path: str | Path) -> str:
    """An engine credential file: the whole file, surrounding whitespace removed; ValueError when it
    cannot be read or does not hold one key on one line."""
    try:
        key = Path(path).read_bytes().decode("utf-8", errors="replace").strip()
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror or error}") from None
    if not key or any(char in key for char in "\r\n\0"):
        raise ValueError(f"{path} must hold one key on one line")
    return key


def _checked_url(url: str, base: bool = False) -> str:
    """An engine URL as the gateway uses it, or ValueError saying what is wrong with it."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL with a host, got {url!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"must not have a query or fragment, got {url!r}")
    if parts.username or parts.password:
        raise ValueError("must not carry a user or password (they would show in logs and metrics)")
    try:
        _ = parts.port  # urlsplit checks the port only when asked
    except ValueError:
        raise ValueError(f"has a bad port, got {url!r}") from None
    if not base and parts.path.rstrip("/").endswith("/v1"):
        raise ValueError(
            f"is the engine's root, where /health and /v1/... live: drop the trailing /v1 from {url!r} "
            "(or give an OpenAI-compatible provider's base URL as `base_url`)"
        )
    return url.rstrip("/")


class EngineSpec(_Strict):
    """One engine: a base URL that serves one model for one `owned_by`."""

    name: str = Field(pattern=ENGINE_NAME_PATTERN)
    model: str = Field(min_length=1)
    owned_by: str = Field(min_length=1)
    url: str | None = None
    urls: tuple[str, ...] = ()  # several replicas of the engine, balanced request by request
    # An OpenAI-compatible provider's base URL, as the OpenAI SDK takes it (https://host/v1, or a root
    # without /v1): a client's /v1/chat/completions goes to <base_url>/chat/completions.
    base_url: str | None = None
    # Checked for health on each replica; null: no active checks (failed requests still eject a replica).
    # Default: /health, and none for a base_url (hosted providers seldom have one).
    health_path: str | None = Field(default="/health", pattern=r"^/[^\s?#]*$")
    # This engine's own credential (a mounted Secret), sent as `Authorization: Bearer` instead of the
    # shared engine key; re-read when the file changes.
    api_key_file: str | None = None
    default: bool = False
    aliases: tuple[str, ...] = ()
    headers: dict[str, str] = Field(default_factory=dict)
    timeouts: TimeoutOverrides = TimeoutOverrides()
    fallback: str | None = None  # the engine to try when none of this one's replicas can take a request
    concurrency: Concurrency = Concurrency()
    discovery: Discovery | None = None
    wake: Wake | None = None  # scale to zero (needs discovery)
    balancing: BalancingPolicyName | None = None  # this engine's own; default: settings.balancing
    # LoRA adapters this engine serves (started with --lora-modules / --lora-paths): each is a model id
    # of its own, forwarded unchanged; routable even before the engine was asked.
    adapters: tuple[str, ...] = ()
    # Which engine's API it speaks, where vLLM and SGLang differ (null: an OpenAI-compatible one, taken
    # as vLLM's).
    api: EngineApi | None = None

    @model_validator(mode="after")
    def _one_way_to_reach_it(self) -> EngineSpec:
        given = [name for name in ("url", "urls", "base_url") if getattr(self, name)]
        if not given:
            raise ValueError(
                "@url: required field is missing (or give `urls`, a list of replica URLs, or `base_url`, "
                "an OpenAI-compatible provider's base URL)"
            )
        if len(given) > 1:
            raise ValueError(f"@{given[1]}: give one of url, urls and base_url, not {' and '.join(given)}")
        if self.discovery is not None and self.base_url is not None:
            raise ValueError("@discovery: an engine reached by base_url has no pods to discover")
        if self.wake is not None and self.discovery is None:
            raise ValueError(
                "@wake: needs `discovery` (the gateway sees the engine wake through its Service's EndpointSlices)"
            )
        return self

    @property
    def checked_health_path(self) -> str | None:
        """The path of the active health check, or None. A base_url engine is checked only when asked:
        a hosted provider seldom has /health, and is judged by its answers alone."""
        if self.base_url is not None and "health_path" not in self.model_fields_set:
            return None
        return self.health_path

    @property
    def endpoints(self) -> tuple[str, ...]:
        if self.base_url is not None:
            return (self.base_url,)
        return (self.url,) if self.url is not None else self.urls

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, url: str | None) -> str | None:
        return None if url is None else _checked_url(url, base=True)

    @field_validator("api_key_file")
    @classmethod
    def _check_api_key_file(cls, path: str | None) -> str | None:
        if path is not None:
            read_engine_key(path)  # a file that cannot be read, or holds no key, is refused now
        return path

    @field_validator("urls")
    @classmethod
    def _check_urls(cls, urls: tuple[str, ...]) -> tuple[str, ...]:
        checked = tuple(_checked_url(url) for url in urls)
        if len(set(checked)) != len(checked):
            raise ValueError("lists the same URL twice")
        return checked

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str | None) -> str | None:
        return None if url is None else _checked_url(url)

    @field_validator("aliases")
    @classmethod
    def _check_aliases(cls, aliases: tuple[str, ...]) -> tuple[str, ...]:
        for alias in aliases:
            if not alias:
                raise ValueError("an alias must not be empty")
        return aliases

    @field_validator("adapters")
    @classmethod
    def _check_adapters(cls, adapters: tuple[str, ...]) -> tuple[str, ...]:
        seen: set[str] = set()
        for adapter in adapters:
            problem = adapter_name_problem(adapter)
            if problem is not None:
                raise ValueError(problem)
            if adapter in seen:
                raise ValueError(f"lists the adapter {adapter!r} twice")
            seen.add(adapter)
        return adapters

    @field_validator("headers")
    @classmethod
    def _check_headers(cls, headers: dict[str, str]) -> dict[str, str]:
        for name in headers:
            if not HEADER_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid header name")
            if name.lower() in RESERVED_HEADERS:
                raise ValueError(f"{name!r} is set by the gateway and cannot be overridden")
            if name.lower() in ("authorization", "x-api-key"):
                raise ValueError(
                    f"{name!r}: a credential does not belong in the routing map (a ConfigMap); "
                    "give the engine key with api_key_file (this engine's) or --engine-api-key-file (every "
                    "engine's), files mounted from a Secret"
                )
            if any(char in headers[name] for char in "\r\n\0"):
                raise ValueError(f"the value of {name!r} must not contain line breaks")
        return headers

    def effective_timeouts(self, defaults: Timeouts) -> Timeouts:
        """The map-wide timeouts with this engine's overrides applied."""
        overrides = self.timeouts.model_dump(exclude_none=True)
        return defaults.model_copy(update=overrides) if overrides else defaults


class RoutingMap(_Strict):
    """The whole file. Cross-engine rules are checked here."""

    settings: Settings = Settings()
    engines: list[EngineSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _check_across_engines(self) -> RoutingMap:
        names: dict[str, int] = {}
        pairs: dict[tuple[str, str], int] = {}
        defaults: dict[str, int] = {}
        for index, engine in enumerate(self.engines):
            where = f"engines[{index}]"
            if engine.name in names:
                raise ValueError(
                    f"{where}.name: duplicate engine name {engine.name!r} (also engines[{names[engine.name]}])"
                )
            names[engine.name] = index
            pair = (engine.model, engine.owned_by)
            if pair in pairs:
                raise ValueError(
                    f"{where}.owned_by: model {engine.model!r} is already served by owned_by "
                    f"{engine.owned_by!r} at engines[{pairs[pair]}]"
                )
            pairs[pair] = index
            if engine.default:
                if engine.model in defaults:
                    raise ValueError(
                        f"{where}.default: model {engine.model!r} already has a default engine "
                        f"(engines[{defaults[engine.model]}]); mark only one"
                    )
                defaults[engine.model] = index
        for index, engine in enumerate(self.engines):
            if engine.fallback is not None:
                if engine.fallback not in names:
                    raise ValueError(f"engines[{index}].fallback: there is no engine named {engine.fallback!r}")
                if engine.fallback == engine.name:
                    raise ValueError(f"engines[{index}].fallback: an engine cannot be its own fallback")
        models = {engine.model for engine in self.engines}
        alias_owner: dict[str, str] = {}
        for index, engine in enumerate(self.engines):
            for alias in engine.aliases:
                where = f"engines[{index}].aliases"
                if alias in models:
                    raise ValueError(f"{where}: alias {alias!r} collides with the model id {alias!r}")
                owner = alias_owner.setdefault(alias, engine.model)
                if owner != engine.model:
                    raise ValueError(
                        f"{where}: alias {alias!r} already names model {owner!r}; an alias names one model"
                    )
        adapter_base: dict[str, str] = {}
        for index, engine in enumerate(self.engines):
            for adapter in engine.adapters:
                where = f"engines[{index}].adapters"
                if adapter in models or adapter in alias_owner:
                    kind = "model id" if adapter in models else "alias"
                    raise ValueError(f"{where}: adapter {adapter!r} collides with the {kind} {adapter!r}")
                base = adapter_base.setdefault(adapter, engine.model)
                if base != engine.model:
                    raise ValueError(
                        f"{where}: adapter {adapter!r} is already an adapter of model {base!r}; an adapter "
                        "name belongs to one base model (the engines serving it share that model)"
                    )
            if engine.api == "sglang" and ":" in engine.model and (engine.adapters or self.settings.discover_adapters):
                raise ValueError(
                    f"engines[{index}].model: {engine.model!r} contains ':', and SGLang reads `<base>:<adapter>` up to "
                    "the first ':', so its adapters cannot be named; serve it under a name without ':' "
                    "(--served-model-name) or route it without adapters (no `adapters`, `discover_adapters` off)"
                )
            if engine.adapters and engine.base_url is not None:
                raise ValueError(
                    f"engines[{index}].adapters: a provider reached by base_url lists its fine-tunes as models; "
                    "route them as engines of their own"
                )
        return self


def describe_validation_error(error: ValidationError) -> str:
    """Turn pydantic's report into one line per problem, each starting with the field's path."""
    lines = []
    for item in error.errors():
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in item["loc"]).lstrip(".")
        message = item["msg"].removeprefix("Value error, ")
        if message.startswith("@"):  # "@field: text" from an object-level rule that is about one field
            field, _, message = message[1:].partition(": ")
            path = f"{path}.{field}" if path else field
        if item["type"] == "extra_forbidden":
            message = "unknown field (check the spelling)"
        elif item["type"] == "missing":
            message = "required field is missing"
        lines.append(f"{path}: {message}" if path else message)
    return "; ".join(lines)


def parse_routing_map(text: str, source: str = "routing map") -> RoutingMap:
    """Parse YAML (or JSON) text into a validated map, or raise ConfigError naming the field."""
    try:
        data: Any = yaml.load(text, Loader=SAFE_LOADER)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with an 'engines' list at the top")
    try:
        return RoutingMap.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {describe_validation_error(exc)}") from None


def read_config_file(path: str | Path, what: str) -> bytes:
    """A mounted file's bytes, or ConfigError naming the file and what it was meant to be."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None


def load_routing_map(path: str | Path) -> tuple[RoutingMap, bytes]:
    """Read and validate the file; return the map and the raw bytes (to notice real changes)."""
    raw = read_config_file(path, "routing map")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the routing map is not UTF-8 text") from None
    return parse_routing_map(text, str(path)), raw
