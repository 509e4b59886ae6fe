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

from gateway_app.adapters import DiscoveredAdapters
from gateway_app.balancer import available, choose
from gateway_app.route_table import Engine, RouteTable
from gateway_app.snapshot import Snapshot
from gateway_app.upstream import read_capped

log = logging.getLogger("llm_gateway.models")


# An engine's model list is read up to this size (thousands of LoRA adapters fit); past it, left out.
MAX_LIST_BYTES = 8 * 1024 * 1024
# Replicas asked at once in one reading (each answer up to MAX_LIST_BYTES, parsed whole): with discovered
# adapters every replica of every engine is asked, and 1,000 of them at once would be gigabytes.
MAX_LISTS_AT_ONCE = 32


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
        self._collects = 0  # collects started: `refresh` waits for one that started after it was asked
        self._sglang_warned: set[str] = set()  # engines warned about (SGLang adapters, no `api`)
        # Why each engine's list was last left out; a failure is logged when it starts or changes, and
        # its end once, not on every call (with 1,000 engines, one down, that would be 999 lines a call).
        self._failing: dict[str, str] = {}
        self._asking = asyncio.Semaphore(MAX_LISTS_AT_ONCE)

    async def cards(self) -> list[dict[str, Any]]:
        """The current list, fetched at most once per TTL however many clients ask at once."""
        table = self._snapshot().routes
        if self._cached_for is table and time.monotonic() < self._expires_at:
            return self._cards
        async with self._lock:
            table = self._snapshot().routes
            if self._cached_for is table and time.monotonic() < self._expires_at:
                return self._cards
            return await self._collect_now(table)

    async def refresh(self) -> list[dict[str, Any]]:
        """Ask the engines now, whatever the cache holds (after an adapter was loaded or unloaded): a
        collect already under way when this is called read the lists before, so another one follows."""
        asked = self._collects
        async with self._lock:
            if self._collects > asked:  # one started after the call: it read the lists after the change
                return self._cards
            return await self._collect_now(self._snapshot().routes)

    async def _collect_now(self, table: RouteTable) -> list[dict[str, Any]]:
        """Collect under the lock, and cache what was collected."""
        self._collects += 1
        cards = await self._collect(table)
        self._cards, self._cached_for = cards, table
        self._expires_at = time.monotonic() + table.settings.models_cache_ttl
        return cards

    async def _collect(self, table: RouteTable) -> list[dict[str, Any]]:
        lists = await asyncio.gather(*(self._engine_lists(engine, table) for engine in table.engines))
        settings = table.settings
        # A reload while the lists were read: they are not recorded under the old map's rules (it may have
        # dropped an engine, or made a listed adapter its own); the next reading, under the new map, will.
        reloaded = self._snapshot().routes is not table
        if self._discovered is not None and settings.discover_adapters and not reloaded:
            for engine, (engine_cards, by_replica) in zip(table.engines, lists, strict=False):
                if engine.base_url or (engine.pool.waker is not None and engine.pool.waker.asleep):
                    continue  # asleep: listed from the map, not asked; what it loaded before it slept is kept
                replicas = [replica.url for replica in engine.pool.replicas]
                self._discovered.update(
                    engine.name,
                    engine.model,
                    by_replica,
                    replicas,
                    engine.adapters,
                    table.model_names,
                    settings,
                    table.adapter_bases,
                )
                self._check_api(engine, engine_cards)
            # Here, not on a request: the routes of the adapters whose engines' lists changed.
            table.sync_adapters()
        cards: list[dict[str, Any]] = []
        failing: dict[str, str] = {}
        for engine, (engine_cards, by_replica) in zip(table.engines, lists, strict=False):
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
                own = {
                    c.get("id"): c
                    for listed in (*by_replica.values(), engine_cards)
                    for c in listed
                    if isinstance(c, dict) and c.get("parent") == engine.model
                }
                adapter_cards = [_adapter_card(own.get(name), name, engine) for name in adapters]
                if waker is not None:
                    for adapter_card in adapter_cards:
                        adapter_card["state"] = waker.state
                cards.extend(adapter_cards)
        self._log_changes(failing)
        return cards

    def _check_api(self, engine: Engine, engine_cards: list[Any] | str) -> None:
        """Warn once about an engine that calls itself SGLang and lists adapters, with no `api: sglang` in
        the map: it gets bare adapter names, which SGLang runs as the base model."""
        if engine.api is not None or engine.name in self._sglang_warned or isinstance(engine_cards, str):
            return
        card = next((c for c in engine_cards if isinstance(c, dict) and c.get("id") == engine.model), None)
        if card is None or card.get("owned_by") != "sglang" or self._discovered is None:
            return
        listed = self._discovered.of(engine.name, engine.model)
        if listed is not None and listed.holders:
            self._sglang_warned.add(engine.name)
            log.warning(
                "engine %s says it is SGLang (owned_by: sglang) and lists LoRA adapters, but the routing map "
                "gives it no `api: sglang`: it gets bare adapter names, which SGLang serves with the base "
                "model; set `api: sglang` on it",
                engine.name,
            )

    def _log_changes(self, failing: dict[str, str]) -> None:
        for name, reason in failing.items():
            if self._failing.get(name) != reason:
                log.warning("engine %s left out of /v1/models: %s", name, reason)
        for name in self._failing.keys() - failing.keys():
            log.info("engine %s lists its models again", name)
        self._failing = failing

    async def _engine_lists(self, engine: Engine, table: RouteTable) -> tuple[list[Any] | str, dict[str, list[Any]]]:
        """The engine's own cards, or why there are none; with `discover_adapters`, also every available
        replica's cards by URL (a replica that restarted, or was added, may lack adapters the others
        hold). An engine scaled to zero is listed from the routing map (asking it would find no replica,
        and must not wake it)."""
        if engine.pool.waker is not None and engine.pool.waker.asleep:
            card = {"id": engine.model, "object": "model", "created": 0, "root": engine.model, "parent": None}
            return [card], {}
        now = time.monotonic()
        if table.settings.discover_adapters and not engine.base_url:
            replicas = available(engine.pool.replicas, now)
        else:
            replica = choose(engine.pool, now)
            replicas = [replica] if replica is not None else []
        if not replicas:
            return "no replica", {}
        answers = await asyncio.gather(*(self._bounded_cards(engine, replica.url, table) for replica in replicas))
        by_replica = {r.url: a for r, a in zip(replicas, answers, strict=True) if not isinstance(a, str)}
        return next(iter(by_replica.values()), answers[0]), by_replica

    async def _bounded_cards(self, engine: Engine, url: str, table: RouteTable) -> list[Any] | str:
        async with self._asking:
            return await self._replica_cards(engine, url, table)

    async def _replica_cards(self, engine: Engine, url: str, table: RouteTable) -> list[Any] | str:
        """One replica's own cards, or why there are none."""
        timeout = aiohttp.ClientTimeout(total=table.settings.models_timeout)
        try:
            async with self._session.get(
                url + engine.path_on_engine("/v1/models"),
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
