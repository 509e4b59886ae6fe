"""Background services: what runs beside the requests for the life of the process.

A service has `run()` (until stopped, never raising) and `stop()`. The runtime starts them all at
start-up and stops them all at shutdown; a new kind of background work (a metrics scraper, say) is a
new service, and nothing else changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Collection, Coroutine, Hashable
from typing import Any, Generic, Protocol, TypeVar

log = logging.getLogger("llm_gateway.background")

K = TypeVar("K", bound=Hashable)


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


class TasksByKey(Generic[K]):
    """A service's tasks, one per key (a watched Service, an engine to tend), started and cancelled as
    the routing map's needs change, and all cancelled when the service stops. Its `run()` and `stop()`
    are the service's."""

    def __init__(self) -> None:
        self._tasks: dict[K, asyncio.Task[None]] = {}
        self._stopped = asyncio.Event()

    def __contains__(self, key: K) -> bool:
        return key in self._tasks

    def start(self, key: K, work: Coroutine[Any, Any, None]) -> None:
        self._tasks[key] = asyncio.get_running_loop().create_task(work)

    def keep_only(self, wanted: Collection[K]) -> list[K]:
        """Cancel the tasks of keys no longer wanted; their keys."""
        dropped = [key for key in self._tasks if key not in wanted]
        for key in dropped:
            self._tasks.pop(key).cancel()
        return dropped

    async def run(self) -> None:
        await self._stopped.wait()
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self) -> None:
        self._stopped.set()
