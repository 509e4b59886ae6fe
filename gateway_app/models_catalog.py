"""`GET /v1/models` across all engines: one card per (model, owned_by) and per (adapter, owned_by), from
the engines' own lists.

Engines are asked concurrently with a short timeout and the result is cached briefly, so a busy
`/v1/models` never multiplies into engine traffic; an engine that does not answer is left out. An engine
scaled to zero (wake.py) is listed from the routing map, its card's `state` saying `asleep` or `waking`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson

from gateway_app.adapters import DiscoveredAdapters, listed_adapters
from gateway_app.balancer import choose
from gateway_app.route_table import Engine, RouteTable
from gateway_app.snapshot import Snapshot
from gateway_app.upstream import read_capped

log = logging.getLogger("llm_gateway.models")


# An engine's model list is read up to this size (thousands of LoRA adapters fit); past it, left out.
MAX_LIST_BYTES = 8 * 1024 * 1024


class ModelCatalog:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        snapshot: Callable[[], Snapshot],
        discovered: DiscoveredAdapters | None = None,
    ) -> None:
        self._session = session
        self._snapshot = snapshot
        self._discovered = discovered  # where the adapters the engines list are recorded
        self._lock = asyncio.Lock()
        self._cached_for: RouteTable | None = None
        self._cards: list[dict[str, Any]] = []
        self._expires_at = 0.0
        # Why each engine's list was last left out; a failure is logged when it starts or changes, and
        # its end once, not on every call (with 1,000 engines, one down, that would be 999 lines a call).
        self._failing: dict[str, str] = {}

    async def cards(self) -> list[dict[str, Any]]:
        """The current list, fetched at most once per TTL however many clients ask at once."""
        table = self._snapshot().routes
        if self._cached_for is table and time.monotonic() < self._expires_at:
            return self._cards
        async with self._lock:
            if self._cached_for is table and time.monotonic() < self._expires_at:
                return self._cards
            cards = await self._collect(table)
            self._cards, self._cached_for = cards, table
            self._expires_at = time.monotonic() + table.settings.models_cache_ttl
            return cards

    async def refresh(self) -> list[dict[str, Any]]:
        """Ask the engines now, whatever the cache holds (after an adapter was loaded or unloaded)."""
        self._expires_at = 0.0
        return await self.cards()

    async def _collect(self, table: RouteTable) -> list[dict[str, Any]]:
        answers = await asyncio.gather(*(self._engine_cards(engine, table) for engine in table.engines))
        settings = table.settings
        if self._discovered is not None and settings.discover_adapters:
            # An engine that did not answer keeps the adapters it listed last: a missed answer is not an unload.
            for engine, engine_cards in zip(table.engines, answers, strict=False):
                if engine.pool.waker is not None and engine.pool.waker.asleep:
                    continue  # listed from the map, not asked: what it loaded before it slept is kept
                if not isinstance(engine_cards, str) and not engine.base_url:
                    found = listed_adapters(engine_cards, engine.model, settings.max_discovered_adapters, engine.name)
                    self._discovered.update(engine.name, found)
        cards: list[dict[str, Any]] = []
        failing: dict[str, str] = {}
        for engine, engine_cards in zip(table.engines, answers, strict=False):
            if isinstance(engine_cards, str):
                failing[engine.name] = engine_cards
                continue
            card = next((c for c in engine_cards if isinstance(c, dict) and c.get("id") == engine.model), None)
            if card is None:
                failing[engine.name] = f"its /v1/models does not list the model {engine.model!r} it is mapped to"
                continue
            waker = engine.pool.waker
            if waker is not None:  # scale to zero: the card says whether the first request will wait
                card = {**card, "state": waker.state}
            cards.append(_card(card, engine.model, engine.owned_by))
            if settings.list_aliases:
                cards.extend(_card(card, alias, engine.owned_by) for alias in table.aliases_of(engine.model))
            adapters = table.adapters_of(engine)
            if adapters:
                own = {c.get("id"): c for c in engine_cards if isinstance(c, dict) and c.get("parent") == engine.model}
                adapter_cards = [_adapter_card(own.get(name), name, engine) for name in adapters]
                if waker is not None:
                    for adapter_card in adapter_cards:
                        adapter_card["state"] = waker.state
                cards.extend(adapter_cards)
        self._log_changes(failing)
        return cards

    def _log_changes(self, failing: dict[str, str]) -> None:
        for name, reason in failing.items():
            if self._failing.get(name) != reason:
                log.warning("engine %s left out of /v1/models: %s", name, reason)
        for name in self._failing.keys() - failing.keys():
            log.info("engine %s lists its models again", name)
        self._failing = failing

    async def _engine_cards(self, engine: Engine, table: RouteTable) -> list[Any] | str:
        """The engine's own cards, or why there are none; an engine scaled to zero, from the routing map
        (asking it would find no replica, and must not wake it)."""
        if engine.pool.waker is not None and engine.pool.waker.asleep:
            return [{"id": engine.model, "object": "model", "created": 0, "root": engine.model, "parent": None}]
        timeout = aiohttp.ClientTimeout(total=table.settings.models_timeout)
        replica = choose(engine.pool, time.monotonic())
        if replica is None:
            return "no replica"
        try:
            async with self._session.get(
                replica.url + engine.path_on_engine("/v1/models"),
                headers=dict(engine.headers + engine.auth_headers(self._snapshot().engine_auth)),
                timeout=timeout,
            ) as response:
                if response.status != 200:
                    return f"its /v1/models answered {response.status}"
                raw = await read_capped(response, MAX_LIST_BYTES)
                if raw is None:
                    return f"its /v1/models answer is larger than {MAX_LIST_BYTES} bytes"
                data = orjson.loads(raw)
        except (aiohttp.ClientError, TimeoutError) as exc:
            return f"it did not answer /v1/models ({str(exc) or type(exc).__name__})"
        except orjson.JSONDecodeError:
            return "its /v1/models answer is not JSON"
        listed = data.get("data") if isinstance(data, dict) else None
        return listed if isinstance(listed, list) else "its /v1/models answer has no `data` list"


def _adapter_card(engine_card: dict[str, Any] | None, adapter: str, engine: Engine) -> dict[str, Any]:
    """An adapter's card as vLLM shows it (`root`: where it was loaded from, `parent`: the base model),
    from the engine's own card when it lists the adapter; a static adapter it does not list yet still
    routes, and is shown with its name as `root`."""
    own = engine_card or {}
    card = {
        "id": adapter,
        "object": "model",
        "created": own.get("created", 0),
        "owned_by": engine.owned_by,
        "root": own.get("root") or adapter,
        "parent": engine.model,
    }
    for key, value in own.items():
        card.setdefault(key, value)
    return card


def _card(engine_card: dict[str, Any], model_id: str, owned_by: str) -> dict[str, Any]:
    """The engine's own card (it carries `max_model_len`, `root`...) under the id and owner we route by."""
    card = {"id": model_id, "object": "model", "created": engine_card.get("created", 0), "owned_by": owned_by}
    for key, value in engine_card.items():
        card.setdefault(key, value)
    return card
