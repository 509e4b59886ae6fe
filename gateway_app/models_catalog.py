"""`GET /v1/models` across all engines: one card per (model, owned_by), from the engines' own lists.

Engines are asked concurrently with a short timeout and the result is cached briefly, so a busy
`/v1/models` never multiplies into engine traffic; an engine that does not answer is left out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson

from gateway_app.balancer import choose
from gateway_app.route_table import Engine, RouteTable

if TYPE_CHECKING:
    from gateway_app.state import GatewayState

log = logging.getLogger("llm_gateway.models")


class ModelCatalog:
    def __init__(self, state: "GatewayState") -> None:
        self._state = state
        self._lock = asyncio.Lock()
        self._cached_for: RouteTable | None = None
        self._cards: list[dict[str, Any]] = []
        self._expires_at = 0.0

    async def cards(self) -> list[dict[str, Any]]:
        """The current list, fetched at most once per TTL however many clients ask at once."""
        table = self._state.table
        if self._cached_for is table and time.monotonic() < self._expires_at:
            return self._cards
        async with self._lock:
            if self._cached_for is table and time.monotonic() < self._expires_at:
                return self._cards
            cards = await self._collect(table)
            self._cards, self._cached_for = cards, table
            self._expires_at = time.monotonic() + table.settings.models_cache_ttl
            return cards

    async def _collect(self, table: RouteTable) -> list[dict[str, Any]]:
        answers = await asyncio.gather(*(self._engine_cards(engine, table) for engine in table.engines))
        cards: list[dict[str, Any]] = []
        for engine, engine_cards in zip(table.engines, answers):
            if engine_cards is None:
                continue
            card = next((c for c in engine_cards if isinstance(c, dict) and c.get("id") == engine.model), None)
            if card is None:
                log.warning("engine %s answers /v1/models without the model %r it is mapped to", engine.name, engine.model)
                continue
            cards.append(_card(card, engine.model, engine.owned_by))
            if table.settings.list_aliases:
                cards.extend(_card(card, alias, engine.owned_by) for alias in table.aliases_of(engine.model))
        return cards

    async def _engine_cards(self, engine: Engine, table: RouteTable) -> list[Any] | None:
        timeout = aiohttp.ClientTimeout(total=table.settings.models_timeout)
        endpoint = choose(engine.pool, time.monotonic())
        if endpoint is None:
            return None
        try:
            async with self._state.session.get(
                endpoint.url + "/v1/models", headers=dict(engine.headers + self._state.engine_auth), timeout=timeout
            ) as response:
                if response.status != 200:
                    log.warning("engine %s answered /v1/models with %s", engine.name, response.status)
                    return None
                data = orjson.loads(await response.read())
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
            log.warning("engine %s did not list its models: %s", engine.name, str(exc) or type(exc).__name__)
            return None
        listed = data.get("data") if isinstance(data, dict) else None
        return listed if isinstance(listed, list) else None


def _card(engine_card: dict[str, Any], model_id: str, owned_by: str) -> dict[str, Any]:
    """The engine's own card (it carries `max_model_len`, `root`...) under the id and owner we route by."""
    card = {"id": model_id, "object": "model", "created": engine_card.get("created", 0), "owned_by": owned_by}
    for key, value in engine_card.items():
        card.setdefault(key, value)
    return card
