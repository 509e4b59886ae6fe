"""Hot reload of mounted files: the routing map, the API keys, the engine credential.

A Kubernetes ConfigMap or Secret volume updates by writing a new timestamped folder and swapping the
`..data` symlink, so the file's own inode never changes: watch the folder, re-read the path on any
event, and act only when the bytes differ. A bad new file is refused, once, and what is in service stays.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

import watchfiles

from gateway_app.config import ConfigError

log = logging.getLogger("llm_gateway.config")

Loaded = TypeVar("Loaded")


class WatchedFile(Generic[Loaded]):
    """One file kept in service: `load` validates it, `apply` puts it to use, `count` records outcomes."""

    def __init__(
        self,
        path: Path,
        what: str,
        load: Callable[[Path], tuple[Loaded, bytes]],
        apply: Callable[[Loaded], None],
        count: Callable[[str], None],
        loaded: bytes,
    ) -> None:
        self.path = path
        self.what = what
        self._load = load
        self._apply = apply
        self._count = count
        self._loaded = loaded
        self._refused: bytes | None = None  # so a bad file is reported once, not on every event
        self._refusing = False  # the file on disk is not the one in service
        self._stop = asyncio.Event()

    async def reload(self) -> bool | None:
        """Re-read the file: True if the new content went into service, False if refused, None if unchanged.

        Reading and validating happen in a thread (a keys file may be large); putting the result into
        service happens on the event loop, in one step."""
        try:
            value, raw = await asyncio.to_thread(self._load, self.path)
        except ConfigError as error:
            try:
                current = self.path.read_bytes()
            except OSError:
                current = None
            if current is not None and current in (self._loaded, self._refused):
                return None  # unchanged, or already refused
            self._refused = current
            self._refusing = True  # an unreadable file (current None) is refused all the same
            self._count("failure")
            log.error("%s change refused, still serving the previous one: %s", self.what, error)
            return False
        if raw == self._loaded:
            self._refused, self._refusing = None, False  # back to the content in service
            return None
        try:
            self._apply(value)
        except Exception:  # valid, yet putting it into service failed: keep serving the previous one
            self._refused, self._refusing = raw, True
            self._count("failure")
            log.exception("%s change could not be put into service, still serving the previous one", self.what)
            return False
        self._loaded, self._refused, self._refusing = raw, None, False
        self._count("success")
        log.info("%s reloaded from %s", self.what, self.path)
        return True

    @property
    def refused(self) -> bool:
        """Whether the file on disk is one that was refused: the previous content is still in service."""
        return self._refusing

    async def run(self) -> None:
        """Watch until `stop()`; never raises, so a watcher problem cannot take the gateway down."""
        folder = self.path.absolute().parent
        try:
            async for _changes in watchfiles.awatch(
                folder, watch_filter=self._concerns_us, stop_event=self._stop, debounce=300, recursive=False
            ):
                await self.reload()
        except Exception:  # e.g. the folder vanished; keep serving what we have
            log.exception("watching %s stopped; changes to the %s will not be picked up", folder, self.what)

    def _concerns_us(self, change: watchfiles.Change, path: str) -> bool:
        """The file itself, or the volume's `..data` link and `..<timestamp>` folders; not the other
        files of its folder (a log written next to the routing map must not make it reload)."""
        name = Path(path).name
        return name == self.path.name or name.startswith("..")

    def stop(self) -> None:
        self._stop.set()
