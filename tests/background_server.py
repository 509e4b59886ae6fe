"""An aiohttp server in a thread of the test process: for the stand-ins of third parties (an engine,
the Kubernetes API, an OTLP collector) that tests need on a real socket."""

from __future__ import annotations

import asyncio
import threading

from aiohttp import web


class BackgroundServer:
    """`ports` > 1 serves the one app on that many ports (`urls`): several replicas of one stand-in."""

    def __init__(self, app: web.Application, ports: int = 1) -> None:
        self._app = app
        self._ports = ports
        self.url = ""
        self.urls: list[str] = []
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> BackgroundServer:
        ready = threading.Event()

        def run() -> None:
            self.loop = asyncio.new_event_loop()
            # Handlers stop when the client hangs up, as an engine stops generating.
            self._runner = web.AppRunner(self._app, handler_cancellation=True, shutdown_timeout=1)
            self.loop.run_until_complete(self._runner.setup())
            for _ in range(self._ports):
                self.loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", 0).start())
            self.urls = [f"http://127.0.0.1:{address[1]}" for address in self._runner.addresses]
            self.url = self.urls[0]
            ready.set()
            self.loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("background server did not start")
        return self

    def stop(self) -> None:
        if self.loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
        self.loop = None
