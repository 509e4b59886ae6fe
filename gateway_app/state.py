"""What the gateway's endpoints share: the current route table, the engine session, the metrics."""

from __future__ import annotations

import time

import aiohttp

from gateway_app.config import RoutingMap
from gateway_app.metrics import GatewayMetrics
from gateway_app.models_catalog import ModelCatalog
from gateway_app.route_table import RouteTable


class GatewayState:
    def __init__(self, routing_map: RoutingMap, metrics: GatewayMetrics | None = None) -> None:
        self.metrics = metrics or GatewayMetrics()
        self.table = RouteTable(routing_map)
        self.session: aiohttp.ClientSession = None  # type: ignore[assignment]  # opened at start-up
        self._record_load()
        self.catalog = ModelCatalog(self)

    def swap_table(self, routing_map: RoutingMap) -> None:
        """Replace the whole table in one assignment: requests in flight keep the one they took."""
        self.table = RouteTable(routing_map)
        self._record_load()

    def _record_load(self) -> None:
        self.metrics.config_engines.set(len(self.table.engines))
        self.metrics.config_last_reload.set(time.time())
