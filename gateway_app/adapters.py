"""LoRA adapters loaded at run time: what each replica of each engine lists in its own `/v1/models`.

vLLM and SGLang list an adapter as a card whose `parent` is the base model. The model catalog reads
every replica's list (at least every `models_cache_ttl` seconds while `settings.discover_adapters` is on,
see `AdapterWatch`) and records here which replicas hold which adapter: a replica that restarted, or was
added later, holds only the adapters of its command line, so a discovered adapter is sent only to the
replicas that list it. The route table routes them. This outlives reloads (like discovered pods), and a
reload keeps the engines it still has with the model they had.

Each discovered adapter also gets its `model` metric label here: its own name for the first
`max_adapter_metric_labels` of an engine, its base model past them; when it is no longer listed, the
series under its name are removed, so what engines load never grows the metrics without bound.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from gateway_app.background import PeriodicTask
from gateway_app.config import Settings, adapter_name_problem

log = logging.getLogger("llm_gateway.adapters")

# Discovered adapters are asked for at least this often, even with a shorter models_cache_ttl.
MIN_INTERVAL = 1.0
# Names already warned about (refused, or past the limit) are remembered up to this many, then forgotten.
MAX_WARNED = 10_000
# An unlisted adapter's series are removed again at this many readings after the first with nothing under
# way: a request that chose it just before is still being admitted (its series come back when it ends).
GRACE_READINGS = 2


@dataclass(frozen=True, slots=True)
class EngineAdapters:
    """The adapters one engine's replicas listed, for the model the engine served then. A new object
    whenever anything in it changes: the route table rebuilds an engine's adapter routes only then."""

    model: str
    by_replica: Mapping[str, tuple[str, ...]]  # replica URL → the adapters it listed
    holders: Mapping[str, frozenset[str]]  # adapter → the replicas listing it, in the order first listed
    labels: Mapping[str, str]  # adapter → its `model` label in the metrics


class AdapterSeries(Protocol):
    """An adapter's metric series on one engine, by its `model` label (metrics.GatewayMetrics)."""

    def forget_model(self, model: str, engine: str) -> bool:
        """Remove them; False while a request under the label is still under way (it would count under it
        again when it ends), so it must be asked again later."""

    def keep_model(self, model: str, engine: str) -> None:
        """The label is in use again (listed again, or made an adapter of the map): stop removing them."""


class DiscoveredAdapters:
    """The adapters each engine's replicas listed when last asked."""

    def __init__(self, series: AdapterSeries | None = None) -> None:
        self._by_engine: dict[str, EngineAdapters] = {}
        self._series = series  # where an unlisted adapter's metric series are removed
        # Per engine, unlisted adapters whose series are removed again at its next readings (a request
        # routed just before the unload ends after the first removal): each with the readings left once
        # nothing is under way under it (GRACE_READINGS).
        self._forgetting: dict[str, dict[str, int]] = {}
        self._over_limit: set[str] = set()  # engines whose lists are past max_discovered_adapters (warned)
        self._warned: set[tuple[str, str]] = set()  # (engine, name) refused and warned about

    def of(self, engine: str, model: str) -> EngineAdapters | None:
        """What the engine listed while it served `model` (a reload may have changed it since)."""
        found = self._by_engine.get(engine)
        return found if found is not None and found.model == model else None

    def update(
        self,
        engine: str,
        model: str,
        answers: Mapping[str, list[Any]],
        replicas: Iterable[str],
        static: Collection[str],
        reserved: Collection[str],
        settings: Settings,
        bases: Mapping[str, str] | None = None,
    ) -> None:
        """Record what the replicas that answered (`answers`, their cards by URL) listed. A replica of
        the engine's that did not answer keeps its last list (a missed answer is not an unload); one the
        engine no longer has is forgotten. The routing map's own adapters (`static`) are not discovered
        (they go to every replica), and names that are model ids or aliases (`reserved`), adapters of
        another base model in the map (`bases`: the map's adapters → their base model) or break the
        adapter name rules are refused."""
        self._forget_again(engine, static)
        previous = self.of(engine, model)
        stale = self._by_engine.get(engine)
        if stale is not None and previous is None:  # listed for the model the engine served before a reload
            del self._by_engine[engine]
            self._forget(engine, [name for name, label in stale.labels.items() if label == name], static)
        limit = settings.max_discovered_adapters
        # Each replica's list is kept up to the limit (what is past it is never routed), and a name the
        # replicas share is one string: 20 replicas listing 50,000 names keep 100 names, not a million.
        names: dict[str, str] = {name: name for name in previous.holders} if previous is not None else {}
        over = False
        by_replica: dict[str, tuple[str, ...]] = {}
        for url in replicas:
            if url in answers:
                listed = listed_adapters(answers[url], model)
                accepted, cut = self._accepted(engine, model, listed, static, reserved, bases or {}, limit)
                by_replica[url] = tuple(names.setdefault(name, name) for name in accepted)
                over = over or cut
            elif previous is not None and url in previous.by_replica:
                by_replica[url] = previous.by_replica[url]
        holders: dict[str, set[str]] = {}
        for url, listed_by_url in by_replica.items():
            for name in listed_by_url:
                holders.setdefault(name, set()).add(url)
        if len(holders) > limit or over:
            if engine not in self._over_limit:
                self._over_limit.add(engine)
                log.warning(
                    "engine %s lists more than %d adapters; the rest are not routed (settings.max_discovered_adapters)",
                    engine,
                    limit,
                )
            holders = dict(list(holders.items())[:limit])
        else:
            self._over_limit.discard(engine)
        old_labels = previous.labels if previous is not None else {}
        budget = settings.max_adapter_metric_labels
        own = sum(1 for name, label in old_labels.items() if label == name)
        if (
            previous is not None
            and previous.by_replica == by_replica
            and previous.holders.keys() == holders.keys()
            and own <= budget  # else a reload lowered the budget: the labels past it go
        ):
            return  # nothing changed: the route table keeps what it built
        labels = self._labels(model, holders, old_labels, budget)
        # Unlisted, or past a lowered budget: its series under its own name go.
        lost = [name for name, label in old_labels.items() if label == name and labels.get(name) != name]
        self._forget(engine, lost, static)
        if engine in self._forgetting:  # listed again with its own label: its series are its own again
            self._keep(engine, [name for name, label in labels.items() if label == name])
        shared: dict[frozenset[str], frozenset[str]] = {}  # most adapters are on the same replicas: one set
        frozen: dict[str, frozenset[str]] = {}
        for name, urls in holders.items():
            held = frozenset(urls)
            frozen[name] = shared.setdefault(held, held)
        self._by_engine[engine] = EngineAdapters(model, by_replica, frozen, labels)

    def retain(self, engines: Iterable[tuple[str, str, Collection[str]]]) -> None:
        """Forget the engines a new routing map no longer has, or whose model it changed: `(name, model,
        the map's adapters of it)`. An adapter the map now lists is no longer a discovered one: it keeps
        its series (it shares their label), which are not removed."""
        kept = {name: (model, frozenset(static)) for name, model, static in engines}
        for name, entry in list(self._by_engine.items()):
            model, static = kept.get(name, (None, frozenset()))
            if model != entry.model:
                del self._by_engine[name]
                self._forget(name, [adapter for adapter, label in entry.labels.items() if label == adapter], static)
            elif static & entry.holders.keys():
                self._by_engine[name] = _without(entry, static)
        for name, (_, static) in kept.items():
            self._keep(name, static)
        self._forgetting = {name: names for name, names in self._forgetting.items() if name in kept}
        self._over_limit &= kept.keys()
        self._warned = {(engine, name) for engine, name in self._warned if engine in kept}

    def _accepted(
        self,
        engine: str,
        model: str,
        names: Iterable[str],
        static: Collection[str],
        reserved: Collection[str],
        bases: Mapping[str, str],
        limit: int,
    ) -> tuple[list[str], bool]:
        """The names that may route, up to `limit` of them, and whether more were listed."""
        accepted: list[str] = []
        for name in names:
            if name in static:
                continue
            problem = adapter_name_problem(name)
            if problem is None and name in reserved:
                problem = f"{name!r} is a model id or alias of the routing map"
            if problem is None and bases.get(name, model) != model:
                problem = f"{name!r} is an adapter of the routing map's model {bases[name]!r}"
            if problem is None:
                if len(accepted) == limit:
                    return accepted, True
                accepted.append(name)
            elif (engine, name) not in self._warned:
                if len(self._warned) >= MAX_WARNED:
                    self._warned.clear()
                self._warned.add((engine, name))
                log.warning("engine %s lists an adapter that is not routed: %s", engine, problem)
        return accepted, False

    @staticmethod
    def _labels(model: str, names: Iterable[str], old: Mapping[str, str], budget: int) -> dict[str, str]:
        """Each adapter's `model` label: the one it had, else its own name while fewer than `budget` of the
        engine's adapters have theirs, else the base model. Past a budget a reload lowered, the last ones
        with their own name are counted under the base model."""
        names = list(names)
        kept: set[str] = set()
        for name in names:
            if old.get(name) == name and len(kept) < budget:
                kept.add(name)
        own = len(kept)
        labels: dict[str, str] = {}
        for name in names:
            label = old.get(name)
            if label == name and name not in kept:
                label = model
            elif label is None:
                if own < budget:
                    label, own = name, own + 1
                else:
                    label = model
            labels[name] = label
        return labels

    def _forget(self, engine: str, names: Iterable[str], static: Collection[str]) -> None:
        """Remove the metric series of adapters no longer listed that had a label of their own, now and
        again at the engine's next readings; never those of the map's adapters (`static`), which share
        their label."""
        if self._series is None:
            return
        forgetting = self._forgetting.setdefault(engine, {})
        for name in names:
            if name not in static:
                self._series.forget_model(name, engine)
                forgetting[name] = GRACE_READINGS

    def _forget_again(self, engine: str, static: Collection[str]) -> None:
        forgetting = self._forgetting.get(engine)
        if not forgetting or self._series is None:
            return
        for name in list(forgetting):
            if name in static:
                del forgetting[name]
            elif not self._series.forget_model(name, engine):
                forgetting[name] = GRACE_READINGS  # under way: it counts under the label again when it ends
            elif forgetting[name] > 1:
                forgetting[name] -= 1
            else:
                del forgetting[name]
        if not forgetting:
            del self._forgetting[engine]

    def _keep(self, engine: str, names: Iterable[str]) -> None:
        """These labels are in use again (listed again, or made adapters of the map): their series stay."""
        forgetting = self._forgetting.get(engine, {})
        for name in names:
            if forgetting.pop(name, None) is not None and self._series is not None:
                self._series.keep_model(name, engine)


def _without(entry: EngineAdapters, names: frozenset[str]) -> EngineAdapters:
    """An engine's adapters less these (made adapters of the map by a reload)."""
    by_replica = {url: tuple(n for n in listed if n not in names) for url, listed in entry.by_replica.items()}
    holders = {name: urls for name, urls in entry.holders.items() if name not in names}
    labels = {name: label for name, label in entry.labels.items() if name not in names}
    return EngineAdapters(entry.model, by_replica, holders, labels)


def listed_adapters(cards: list[Any], base_model: str) -> Iterator[str]:
    """The adapters among an engine's own cards, as they come: those whose `parent` is the model it
    serves, each once (read lazily: the reader stops at its limit)."""
    seen: set[str] = set()
    for card in cards:
        if not isinstance(card, dict) or card.get("parent") != base_model:
            continue
        name = card.get("id")
        if isinstance(name, str) and name != base_model and name not in seen:
            seen.add(name)
            yield name


class AdapterWatch(PeriodicTask):
    """Asks the engines for their lists while `settings.discover_adapters` is on, so that an adapter
    loaded (or unloaded) on an engine is routed (or not) within `models_cache_ttl` seconds, whether or not
    anyone lists the models meanwhile."""

    def __init__(self, settings: Callable[[], Settings], refresh: Callable[[], Awaitable[object]]) -> None:
        super().__init__(lambda: max(settings().models_cache_ttl, MIN_INTERVAL))
        self._settings = settings
        self._refresh = refresh

    async def step(self) -> None:
        if self._settings().discover_adapters:
            await self._refresh()
