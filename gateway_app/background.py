"""Background services: what runs beside the requests for the life of the process.

A service has `run()` (until stopped, never raising) and `stop()`. The runtime starts them all at
start-up and stops them all at shutdown; a new kind of background work (a metrics scraper, say) is a
new service, and nothing else changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger("llm_gateway.background")


class Service(Protocol):
    async def run(self) -> None:
        """Work until `stop()`; never raise."""

    def stop(self) -> None:
        """Ask `run()` to return soon."""


class PeriodicTask:
    """A service that does `step()` every `interval()` seconds until stopped (the interval is read
    again each time, so a reload may change it)."""

    def __init__(self, interval: Callable[[], float]) -> None:
        self._interval = interval
        self._stopped = asyncio.Event()

    async def step(self) -> None:
        raise NotImplementedError

    async def run(self) -> None:
        while not self._stopped.is_set():
            try:
                await self.step()
            except Exception:  # one failed step must not end the service
                log.exception("%s: a step failed", type(self).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), timeout=self._interval())

    def stop(self) -> None:
        self._stopped.set()


class ServiceGroup:
    """Services started together and stopped together."""

    STOP_SECONDS = 5.0

    def __init__(self) -> None:
        self._services: list[Service] = []
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, service: Service) -> None:
        self._services.append(service)
        self._tasks.append(asyncio.get_running_loop().create_task(service.run()))

    async def stop(self) -> None:
        for service in self._services:
            service.stop()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(task, timeout=self.STOP_SECONDS)
        self._services.clear()
        self._tasks.clear()
