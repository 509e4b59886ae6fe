"""Hot reload of the routing map.

A Kubernetes ConfigMap volume updates by writing a new timestamped folder and swapping the `..data`
symlink, so the file's own inode never changes: watch the folder, re-read the path on any event, and
act only when the bytes differ. A bad new file is refused and the table in service stays.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import watchfiles

from gateway_app.config import ConfigError, load_routing_map
from gateway_app.state import GatewayState

log = logging.getLogger("llm_gateway.config")


class RoutingMapWatcher:
    def __init__(self, path: Path, state: GatewayState, loaded: bytes) -> None:
        self.path = path
        self.state = state
        self._loaded = loaded
        self._refused: bytes | None = None  # so a bad file is reported once, not on every event
        self._stop = asyncio.Event()

    def reload(self) -> bool | None:
        """Re-read the file: True if a new map went into service, False if refused, None if unchanged."""
        try:
            routing_map, raw = load_routing_map(self.path)
        except ConfigError as error:
            try:
                current = self.path.read_bytes()
            except OSError:
                current = None
            if current is not None and current in (self._loaded, self._refused):
                return None  # unchanged, or already refused
            self._refused = current
            self.state.metrics.config_reloads.labels("failure").inc()
            log.error("routing map change refused, still serving the previous one: %s", error)
            return False
        if raw == self._loaded:
            return None
        self.state.swap_table(routing_map)
        self._loaded, self._refused = raw, None
        self.state.metrics.config_reloads.labels("success").inc()
        log.info("routing map reloaded: %d engines", len(self.state.table.engines))
        return True

    async def run(self) -> None:
        """Watch until `stop()`; never raises, so a watcher problem cannot take the gateway down."""
        folder = self.path.absolute().parent
        try:
            async for _changes in watchfiles.awatch(
                folder, watch_filter=None, stop_event=self._stop, debounce=300, recursive=False
            ):
                self.reload()
        except Exception:  # pragma: no cover - e.g. the folder vanished; keep serving the table we have
            log.exception("watching %s stopped; routing-map changes will not be picked up", folder)

    def stop(self) -> None:
        self._stop.set()
