"""The route table: which engine serves a `(model, owned_by)` pair.

Built once per routing map and never mutated, so a reload swaps a whole table and a request in flight
keeps the table it started with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import aiohttp

from gateway_app.auth import may_use
from gateway_app.concurrency import ConcurrencyGate
from gateway_app.config import RoutingMap, Settings, Timeouts
from gateway_app.endpoints import EndpointPool, EndpointRegistry
from gateway_app.errors import ModelNotFound

MAX_NAMES_IN_MESSAGE = 50


class ForbiddenModel(ModelNotFound):
    """A model the client's key may not use: answered exactly as an unknown one, counted apart."""


@dataclass(frozen=True, slots=True)
class Engine:
    """One engine as the proxy needs it: where it is and how to talk to it."""

    name: str
    model: str
    owned_by: str
    pool: EndpointPool  # the replicas; with discovery, shared with later tables and updated in place
    aliases: tuple[str, ...]
    headers: tuple[tuple[str, str], ...]
    timeouts: Timeouts
    fallback: str | None = None
    gate: ConcurrencyGate | None = None
    discovery: tuple | None = None  # (namespace, service, port, configured URLs) when pods are discovered
    # Derived once here rather than on every request.
    client_timeout: aiohttp.ClientTimeout = field(init=False)
    name_header: bytes = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "client_timeout", aiohttp.ClientTimeout(total=None, connect=self.timeouts.connect))
        object.__setattr__(self, "name_header", self.name.encode())


@dataclass(frozen=True, slots=True)
class ModelRoute:
    """The engines that serve one model, by `owned_by`, and the one used when none is named."""

    model: str
    by_owner: dict[str, Engine]
    default: Engine


@dataclass(frozen=True, slots=True)
class Resolution:
    engine: Engine
    # True when the client named the model by an alias: the body must then carry the real id.
    via_alias: bool


def discovery_key(spec) -> tuple[str, str, int, tuple[str, ...]]:
    """Engines that watch the same Service share one pool and one watch."""
    return (spec.discovery.namespace, spec.discovery.service, spec.discovery.port, tuple(spec.endpoints))


def _gate(gates: dict[str, ConcurrencyGate], name: str, settings) -> ConcurrencyGate | None:
    """The engine's gate, the same object as before a reload unless its settings changed."""
    if settings.limit is None:
        gates.pop(name, None)
        return None
    gate = gates.get(name)
    if gate is None or (gate.limit, gate.queue, gate.queue_timeout) != (
        settings.limit,
        settings.queue,
        settings.queue_timeout,
    ):
        gate = gates[name] = ConcurrencyGate(settings.limit, settings.queue, settings.queue_timeout)
    return gate


def _listing(names: list[str]) -> str:
    shown = ", ".join(f"`{name}`" for name in names[:MAX_NAMES_IN_MESSAGE])
    more = len(names) - MAX_NAMES_IN_MESSAGE
    return shown + (f" and {more} more" if more > 0 else "")


class RouteTable:
    """Immutable lookup from the names clients use to engines."""

    def __init__(
        self,
        routing_map: RoutingMap,
        registry: EndpointRegistry | None = None,
        gates: dict[str, ConcurrencyGate] | None = None,
        pools: dict[tuple, EndpointPool] | None = None,
    ) -> None:
        """`registry`, `gates` and `pools` carry replica health, queues and discovered pods over from
        the previous table."""
        self.settings: Settings = routing_map.settings
        defaults = routing_map.settings.timeouts
        registry = registry if registry is not None else EndpointRegistry()
        gates = gates if gates is not None else {}
        pools = pools if pools is not None else {}

        def pool_for(spec) -> EndpointPool:
            configured = tuple(registry.get(url) for url in spec.endpoints)
            if spec.discovery is None:
                return EndpointPool(configured)
            key = discovery_key(spec)
            pool = pools.get(key)
            if pool is None or pool.configured != configured:
                pool = pools[key] = EndpointPool(configured)
            return pool

        self.engines: tuple[Engine, ...] = tuple(
            Engine(
                name=spec.name,
                model=spec.model,
                owned_by=spec.owned_by,
                pool=pool_for(spec),
                aliases=spec.aliases,
                headers=tuple(spec.headers.items()),
                timeouts=spec.effective_timeouts(defaults),
                fallback=spec.fallback,
                gate=_gate(gates, spec.name, spec.concurrency),
                discovery=discovery_key(spec) if spec.discovery is not None else None,
            )
            for spec in routing_map.engines
        )
        self._by_name = {engine.name: engine for engine in self.engines}
        grouped: dict[str, list[Engine]] = {}
        for engine, spec in zip(self.engines, routing_map.engines, strict=False):
            group = grouped.setdefault(engine.model, [])
            # The engine marked default goes first; otherwise the first listed is the default.
            group.insert(0, engine) if spec.default else group.append(engine)
        self._routes: dict[str, ModelRoute] = {
            model: ModelRoute(model=model, by_owner={e.owned_by: e for e in group}, default=group[0])
            for model, group in grouped.items()
        }
        self._aliases: dict[str, ModelRoute] = {
            alias: self._routes[engine.model] for engine in self.engines for alias in engine.aliases
        }

    @property
    def models(self) -> list[str]:
        return list(self._routes)

    def engine_named(self, name: str) -> Engine | None:
        return self._by_name.get(name)

    def endpoint_urls(self) -> set[str]:
        return {
            endpoint.url for engine in self.engines for endpoint in (*engine.pool.configured, *engine.pool.endpoints)
        }

    def aliases_of(self, model: str) -> list[str]:
        """Every alias of a model, whichever engine entry declared it: aliases belong to the model."""
        return [alias for alias, route in self._aliases.items() if route.model == model]

    @property
    def aliases(self) -> dict[str, str]:
        """Alias → model id."""
        return {alias: route.model for alias, route in self._aliases.items()}

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
        if route is None or not may_use(allowed, model, route.model):
            error_type = ModelNotFound if route is None else ForbiddenModel
            models, aliases = self.names_visible_to(allowed)
            raise error_type(
                f"The model `{model}` does not exist. Available models: {_listing(models) or 'none'}"
                + (f"; aliases: {_listing(aliases)}" if aliases else "")
                + ".",
                param="model",
            )
        if owned_by is None:
            return Resolution(route.default, via_alias)
        engine = route.by_owner.get(owned_by)
        if engine is None:
            raise ModelNotFound(
                f"The model `{route.model}` is not served by owned_by `{owned_by}`. "
                f"It is served by: {_listing(list(route.by_owner))}.",
                param="owned_by",
                code="engine_not_found",
            )
        return Resolution(engine, via_alias)

    def names_visible_to(self, allowed: frozenset[str] | None) -> tuple[list[str], list[str]]:
        """The model ids and aliases a client with this access list may use."""
        models = [model for model in self._routes if may_use(allowed, model, model)]
        aliases = [alias for alias, route in self._aliases.items() if may_use(allowed, alias, route.model)]
        return models, aliases
