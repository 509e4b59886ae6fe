"""LoRA adapters loaded at run time: what each engine lists in its own `/v1/models`.

vLLM and SGLang list an adapter as a card whose `parent` is the base model. The model catalog reads the
engines' lists (at least every `models_cache_ttl` seconds while `settings.discover_adapters` is on, see
`AdapterWatch`) and records each engine's adapters here; the route table routes them. This outlives
reloads (like discovered pods), and a reload keeps the engines it still has.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from gateway_app.background import PeriodicTask
from gateway_app.config import Settings

log = logging.getLogger("llm_gateway.adapters")

# Discovered adapters are asked for at least this often, even with a shorter models_cache_ttl.
MIN_INTERVAL = 1.0


class DiscoveredAdapters:
    """The adapters each engine listed when last asked; `version` changes whenever any list does, so
    that a route table rebuilds what it derived from them only then."""

    def __init__(self) -> None:
        self._by_engine: dict[str, tuple[str, ...]] = {}
        self.version = 0

    def of(self, engine: str) -> tuple[str, ...]:
        return self._by_engine.get(engine, ())

    def update(self, engine: str, adapters: tuple[str, ...]) -> None:
        if self._by_engine.get(engine, ()) != adapters:
            self._by_engine[engine] = adapters
            self.version += 1

    def retain(self, engines: Iterable[str]) -> None:
        """Forget the engines a new routing map no longer has."""
        kept = set(engines)
        gone = [name for name in self._by_engine if name not in kept]
        for name in gone:
            del self._by_engine[name]
        if gone:
            self.version += 1


def listed_adapters(cards: list[Any], base_model: str, limit: int, engine: str) -> tuple[str, ...]:
    """The adapters among an engine's own cards (those whose `parent` is the model it serves), at most
    `limit` of them, the first listed."""
    found: list[str] = []
    seen: set[str] = set()
    for card in cards:
        if not isinstance(card, dict) or card.get("parent") != base_model:
            continue
        name = card.get("id")
        if not isinstance(name, str) or not name or name == base_model or name in seen:
            continue
        if len(found) == limit:
            log.warning(
                "engine %s lists more than %d adapters; the rest are not routed (settings.max_discovered_adapters)",
                engine,
                limit,
            )
            break
        seen.add(name)
        found.append(name)
    return tuple(found)


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
