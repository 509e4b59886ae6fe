"""The route table: which engine serves a `(model, owned_by)` pair.

Built once per routing map and never mutated, so a reload swaps a whole table and a request in flight
keeps the table it started with.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import aiohttp

from gateway_app.adapters import DiscoveredAdapters, EngineAdapters
from gateway_app.auth import may_use, may_use_adapter
from gateway_app.balancer import POWER_OF_TWO, BalancingPolicy, policy_named
from gateway_app.concurrency import ConcurrencyGate
from gateway_app.config import EngineSpec, RoutingMap, Settings, Timeouts
from gateway_app.engine_credentials import Credential, EngineCredentials
from gateway_app.errors import ModelNotFound
from gateway_app.replicas import DiscoveryKey, ReplicaPool, ReplicaRegistry, discovery_key

MAX_NAMES_IN_MESSAGE = 50


class ForbiddenModel(ModelNotFound):
    """A model the client's key may not use: answered exactly as an unknown one, counted apart."""


@dataclass(frozen=True, slots=True)
class Engine:
    """One engine as the proxy needs it: where it is and how to talk to it."""

    name: str
    model: str
    owned_by: str
    pool: ReplicaPool  # the replicas; with discovery, shared with later tables and updated in place
    aliases: tuple[str, ...]
    headers: tuple[tuple[str, str], ...]
    timeouts: Timeouts
    fallback: str | None = None
    gate: ConcurrencyGate | None = None
    discovery: DiscoveryKey | None = None  # when the engine's pods are discovered
    default: bool = False  # serves requests for its model that name no owned_by
    credential: Credential | None = None  # its own key (api_key_file), instead of the shared one
    base_url: bool = False  # its replica URL is an OpenAI base URL: /v1/x is sent to <url>/x
    policy: BalancingPolicy = POWER_OF_TWO  # how one of its replicas is picked (balancer.py)
    adapters: tuple[str, ...] = ()  # the LoRA adapters the routing map lists for it
    api: str | None = None  # "vllm", "sglang", or None (OpenAI-compatible, taken as vLLM)
    # Set on an engine as it serves one of its LoRA adapters (`model` is then the adapter's id): the
    # model the adapter runs on.
    base_model: str | None = None
    # The `model` the engine gets: the model id, or for an adapter the form its engine understands (SGLang
    # takes `<base>:<adapter>`; vLLM the adapter's name). Default: `model`.
    request_model: str = ""
    # For an adapter discovered at run time: the URLs of the replicas that list it (None: every replica),
    # a filter of the balancer's (`balancer.holding`: any replica when none in service lists it).
    holders: frozenset[str] | None = None
    # The `model` label of its metrics: `model`, or the base model for a discovered adapter past the
    # engine's budget of labels (adapters.py). Default: `model`.
    metric_model: str = ""
    # Derived once here rather than on every request.
    client_timeout: aiohttp.ClientTimeout = field(init=False)
    name_header: bytes = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "client_timeout", aiohttp.ClientTimeout(total=None, connect=self.timeouts.connect))
        object.__setattr__(self, "name_header", self.name.encode())
        if not self.request_model:
            object.__setattr__(self, "request_model", self.model)
        if not self.metric_model:
            object.__setattr__(self, "metric_model", self.model)

    def auth_headers(self, shared: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
        """The credential this engine gets: its own (`api_key_file`), else the shared engine key, which
        never leaves for a provider reached by `base_url` (it is this cluster's key, not theirs)."""
        if self.credential is not None:
            return self.credential.headers
        return () if self.base_url else shared

    def path_on_engine(self, path: str) -> str:
        """Where a client's path is on this engine's replica URL."""
        return path[3:] if self.base_url and path.startswith("/v1/") else path

    def serving_adapter(
        self, adapter: str, holders: frozenset[str] | None = None, metric_model: str | None = None
    ) -> Engine:
        """This engine as it serves one of its adapters: metrics and logs name the adapter; vLLM gets its
        name, SGLang `<base>:<adapter>` (given a bare adapter name, SGLang would run the base model). No
        fallback: another engine may not hold the adapter. `holders`: for a discovered adapter, the
        replicas that list it."""
        request_model = f"{self.model}:{adapter}" if self.api == "sglang" else adapter
        return dataclasses.replace(
            self,
            model=adapter,
            base_model=self.model,
            request_model=request_model,
            aliases=(),
            adapters=(),
            fallback=None,
            holders=holders,
            metric_model=metric_model or adapter,
        )


@dataclass(frozen=True, slots=True)
class ModelRoute:
    """The engines that serve one model, by `owned_by`, and the one used when none is named."""

    model: str
    by_owner: dict[str, Engine]
    default: Engine
    base_model: str | None = None  # for a LoRA adapter: the model it runs on


@dataclass(frozen=True, slots=True)
class AdapterRoutes:
    """The routes of the LoRA adapters, static and discovered, and what each engine serves."""

    routes: dict[str, ModelRoute]
    by_engine: dict[str, list[str]]


# One engine's adapters as it serves them: (adapter, the engine serving it).
AdapterViews = list[tuple[str, Engine]]


@dataclass(slots=True)
class Resolution:
    engine: Engine
    # True when the client named the model by an alias: the body must then carry the real id.
    via_alias: bool


def _listing(names: list[str]) -> str:
    shown = ", ".join(f"`{name}`" for name in names[:MAX_NAMES_IN_MESSAGE])
    more = len(names) - MAX_NAMES_IN_MESSAGE
    return shown + (f" and {more} more" if more > 0 else "")


def build_routes(
    routing_map: RoutingMap,
    registry: ReplicaRegistry | None = None,
    credentials: EngineCredentials | None = None,
    discovered: DiscoveredAdapters | None = None,
) -> RouteTable:
    """The route table of a routing map. The registry carries what outlives a reload (replica health,
    discovered pods, engine queues) into the new table's engines; `credentials`, the engines' own keys;
    `discovered`, the adapters the engines list (used with `settings.discover_adapters`)."""
    registry = registry if registry is not None else ReplicaRegistry()
    credentials = credentials if credentials is not None else EngineCredentials()
    settings = routing_map.settings
    defaults = settings.timeouts
    engines = tuple(
        Engine(
            name=spec.name,
            model=spec.model,
            owned_by=spec.owned_by,
            pool=registry.pool_for(spec),
            aliases=spec.aliases,
            headers=tuple(spec.headers.items()),
            timeouts=spec.effective_timeouts(defaults),
            fallback=spec.fallback,
            gate=registry.gate_for(spec.name, spec.concurrency),
            discovery=discovery_key(spec),
            default=spec.default,
            credential=credentials.credential_for(spec.api_key_file) if spec.api_key_file else None,
            base_url=spec.base_url is not None,
            policy=_policy(spec, settings, registry),
            adapters=spec.adapters,
            api=spec.api,
        )
        for spec in routing_map.engines
    )
    return RouteTable(routing_map.settings, engines, discovered)


def _policy(spec: EngineSpec, settings: Settings, registry: ReplicaRegistry) -> BalancingPolicy:
    name = spec.balancing or settings.balancing
    capacity = settings.cache_aware.table_blocks if name == "cache_aware" else None
    return policy_named(name, registry.prefix_table_for(spec.name, capacity), settings.cache_aware)


class RouteTable:
    """Immutable lookup from the names clients use to engines."""

    def __init__(
        self, settings: Settings, engines: tuple[Engine, ...], discovered: DiscoveredAdapters | None = None
    ) -> None:
        self.settings = settings
        self.engines = engines
        self._by_name = {engine.name: engine for engine in engines}
        grouped: dict[str, list[Engine]] = {}
        for engine in engines:
            group = grouped.setdefault(engine.model, [])
            # The engine marked default goes first; otherwise the first listed is the default.
            group.insert(0, engine) if engine.default else group.append(engine)
        self._routes: dict[str, ModelRoute] = {
            model: ModelRoute(model=model, by_owner={e.owned_by: e for e in group}, default=group[0])
            for model, group in grouped.items()
        }
        self._aliases: dict[str, ModelRoute] = {
            alias: self._routes[engine.model] for engine in engines for alias in engine.aliases
        }
        self._model_names = frozenset(self._routes) | frozenset(self._aliases)
        self._adapter_bases = {name: engine.model for engine in engines for name in engine.adapters}
        # Discovered adapters count only with settings.discover_adapters. Their routes are derived from
        # the engines' lists by `sync_adapters`, which the model catalog calls after reading them (never
        # a request): only an engine whose list changed has its adapters' views built again.
        self._discovered = discovered if settings.discover_adapters else None
        self._static_views = {e.name: [(name, e.serving_adapter(name)) for name in e.adapters] for e in engines}
        self._discovered_views: dict[str, tuple[EngineAdapters | None, AdapterViews]] = {}
        self._adapter_routes = AdapterRoutes({}, {})
        self.sync_adapters()

    @property
    def models(self) -> list[str]:
        return list(self._routes)

    def engine_named(self, name: str) -> Engine | None:
        return self._by_name.get(name)

    def replica_urls(self) -> set[str]:
        return {replica.url for engine in self.engines for replica in (*engine.pool.configured, *engine.pool.replicas)}

    def aliases_of(self, model: str) -> list[str]:
        """Every alias of a model, whichever engine entry declared it: aliases belong to the model."""
        return [alias for alias, route in self._aliases.items() if route.model == model]

    @property
    def aliases(self) -> dict[str, str]:
        """Alias → model id."""
        return {alias: route.model for alias, route in self._aliases.items()}

    # LoRA adapters: static ones from the map, and those the engines list (with discover_adapters).

    @property
    def model_names(self) -> frozenset[str]:
        """The model ids and aliases: names no adapter may take."""
        return self._model_names

    @property
    def adapter_bases(self) -> dict[str, str]:
        """The map's own adapters → the model they run on: an adapter name belongs to one base model."""
        return self._adapter_bases

    def sync_adapters(self) -> None:
        """Bring the discovered adapters' routes up to date with the engines' lists: views are built
        again for the engines whose list changed, then all the routes are put together (dict work only)."""
        discovered = self._discovered
        changed = False
        for engine in self.engines:
            listed = None
            if discovered is not None and not engine.base_url:
                listed = discovered.of(engine.name, engine.model)
            cached = self._discovered_views.get(engine.name)
            if cached is not None and cached[0] is listed:
                continue
            views: AdapterViews = []
            if listed is not None:
                views = [
                    (name, engine.serving_adapter(name, holders, listed.labels.get(name)))
                    for name, holders in listed.holders.items()
                ]
            self._discovered_views[engine.name] = (listed, views)
            changed = True
        if changed:
            self._adapter_routes = self._merge_adapter_routes()

    def _merge_adapter_routes(self) -> AdapterRoutes:
        serving: dict[str, list[Engine]] = {}
        base_of: dict[str, str] = {}
        by_engine: dict[str, list[str]] = {}
        # The map's own adapters first (checked on load, they always route), then those the engines list.
        passes = [self._static_views[engine.name] for engine in self.engines]
        passes += [self._discovered_views[engine.name][1] for engine in self.engines]
        taken: set[tuple[str, str]] = set()  # (engine, adapter)
        for views in passes:
            for name, view in views:
                engine_name, base = view.name, view.base_model
                assert base is not None
                # A model id or alias of the map wins; an adapter name belongs to one base model.
                if name in self._model_names or (engine_name, name) in taken:
                    continue
                if base_of.setdefault(name, base) != base:
                    continue
                group = serving.setdefault(name, [])
                group.insert(0, view) if view.default else group.append(view)
                by_engine.setdefault(engine_name, []).append(name)
                taken.add((engine_name, name))
        routes = {
            name: ModelRoute(name, {e.owned_by: e for e in group}, group[0], base_of[name])
            for name, group in serving.items()
        }
        return AdapterRoutes(routes, by_engine)

    def adapter_routes(self) -> AdapterRoutes:
        return self._adapter_routes

    def adapters_of(self, engine: Engine) -> list[str]:
        """The adapters an engine serves now (the map's, then those it listed)."""
        return self.adapter_routes().by_engine.get(engine.name, [])

    def _adapter_route(self, model: str, allowed: frozenset[str] | None) -> ModelRoute | None:
        """The route of an adapter named `model` (`<adapter>`, or SGLang's `<base>:<adapter>`) that the
        client may use, or None."""
        routes = self.adapter_routes().routes
        route = routes.get(model)
        if route is not None:
            assert route.base_model is not None
            return route if may_use_adapter(allowed, model, route.base_model) else None
        base, colon, adapter = model.rpartition(":")
        route = routes.get(adapter) if colon and base in self._routes else None
        if route is None or route.base_model != base:
            return None
        # SGLang's `<base>:<adapter>` names the same adapter (each engine then gets the form it understands).
        if may_use_adapter(allowed, adapter, base) or (allowed is not None and model in allowed):
            return route
        return None

    def resolve(self, model: str, owned_by: str | None, allowed: frozenset[str] | None = None) -> Resolution:
        """Pick the engine for a request, or raise ModelNotFound with what the client could use instead.

        `allowed` is the client's model access list (None: everything). A model the client may not use
        gets the answer an unknown one gets, and lists only what the client may use: authorization
        before disclosure.
        """
        route = self._routes.get(model)
        via_alias = False
        if route is None:
            route = self._aliases.get(model)
            via_alias = True
        if route is None:
            adapter_route = self._adapter_route(model, allowed)
            if adapter_route is not None:
                return self._pick(adapter_route, model, owned_by, False)
        if route is None or not may_use(allowed, model, route.model):
            error_type = ModelNotFound if route is None and not self._is_adapter(model) else ForbiddenModel
            models, aliases, adapters = self.names_visible_to(allowed)
            raise error_type(
                f"The model `{model}` does not exist. Available models: {_listing(models) or 'none'}"
                + (f"; aliases: {_listing(aliases)}" if aliases else "")
                + (f"; adapters: {_listing(adapters)}" if adapters else "")
                + ".",
                param="model",
            )
        return self._pick(route, model, owned_by, via_alias)

    def _is_adapter(self, model: str) -> bool:
        """Whether `model` names an adapter someone may use (for counting a refusal as forbidden)."""
        return self._adapter_route(model, None) is not None

    def _pick(self, route: ModelRoute, requested: str, owned_by: str | None, via_alias: bool) -> Resolution:
        """The engine of `owned_by` (or the default) for `route`; an error names the model as the client
        did (`requested`): a key allowed only an alias must not learn the model id behind it."""
        if owned_by is None:
            return Resolution(route.default, via_alias)
        engine = route.by_owner.get(owned_by)
        if engine is None:
            raise ModelNotFound(
                f"The model `{requested}` is not served by owned_by `{owned_by}`. "
                f"It is served by: {_listing(list(route.by_owner))}.",
                param="owned_by",
                code="engine_not_found",
            )
        return Resolution(engine, via_alias)

    def names_visible_to(self, allowed: frozenset[str] | None) -> tuple[list[str], list[str], list[str]]:
        """The model ids, aliases and adapters a client with this access list may use."""
        models = [model for model in self._routes if may_use(allowed, model, model)]
        aliases = [alias for alias, route in self._aliases.items() if may_use(allowed, alias, route.model)]
        adapters = [
            name
            for name, route in self.adapter_routes().routes.items()
            if route.base_model is not None and may_use_adapter(allowed, name, route.base_model)
        ]
        return models, aliases, adapters
