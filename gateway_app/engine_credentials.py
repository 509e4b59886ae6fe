"""Engines' own credentials (`api_key_file` in the routing map), kept current as their Secrets rotate.

Kubelet replaces a mounted Secret's file when the Secret changes, without touching the routing map, so
each file is checked again every few seconds and a changed key is put to use in place: the engines of
the route table hold the `Credential` object, not the key.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

from gateway_app.background import PeriodicTask
from gateway_app.config import read_engine_key

RECHECK_SECONDS = 5.0
log = logging.getLogger("llm_gateway.credentials")


def bearer(key: str | None) -> tuple[tuple[str, str], ...]:
    """The headers that carry a key to an engine (its `--api-key`): a Bearer token; none without a key."""
    return (("Authorization", f"Bearer {key}"),) if key else ()


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return (status.st_ino, status.st_mtime_ns, status.st_size)


class Credential:
    """One engine's key, as the headers sent with each of its requests."""

    __slots__ = ("path", "headers", "stamp", "refused")

    def __init__(self, path: str) -> None:
        self.path = path
        self.stamp: tuple[int, int, int] | None = None
        self.headers: tuple[tuple[str, str], ...] = ()
        self.refused = False  # the file holds no usable key now (the last good one stays in use)
        self.refresh()  # the routing map's check read it already; it may have gone since

    def refresh(self) -> None:
        """Read the file again if it changed; a file that went bad keeps the last good key in use."""
        stamp = _stamp(self.path)
        if stamp is not None and stamp == self.stamp:
            return
        self.stamp = stamp
        try:
            self.headers = bearer(read_engine_key(self.path))
        except ValueError as error:
            if not self.refused:
                log.warning("engine credential %s: %s; the previous key stays in use", self.path, error)
            self.refused = True
            return
        if self.refused or stamp is not None:
            log.info("engine credential %s read; its key is in use", self.path)
        self.refused = False


class EngineCredentials(PeriodicTask):
    """The credentials of the routing map in service, by file, re-read when their files change."""

    def __init__(self) -> None:
        super().__init__(lambda: RECHECK_SECONDS)
        self._by_path: dict[str, Credential] = {}

    def credential_for(self, path: str) -> Credential:
        credential = self._by_path.get(path)
        if credential is None:
            credential = self._by_path[path] = Credential(path)
        else:
            credential.refresh()
        return credential

    def any_refused(self) -> float:
        """1 while some engine's key file holds no usable key (for `llm_gateway_config_file_refused`)."""
        return float(any(credential.refused for credential in self._by_path.values()))

    def retain(self, paths: Iterable[str]) -> None:
        """Forget the files no engine names any more."""
        keep = set(paths)
        self._by_path = {path: credential for path, credential in self._by_path.items() if path in keep}

    async def step(self) -> None:
        for credential in list(self._by_path.values()):
            credential.refresh()
