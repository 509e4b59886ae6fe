"""A stand-in for the Kubernetes API server's EndpointSlice list and watch, over real HTTP.

It speaks the API's wire format (a list with a resourceVersion; a watch as a stream of JSON lines
`{"type", "object"}`), and lets a test push events as a controller would. It stands in for Kubernetes,
not for any part of the gateway.
"""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from tests.background_server import BackgroundServer


def endpoint_slice(name: str, service: str, port: int, endpoints: list[tuple[str, bool]]) -> dict:
    return {
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": [{"addresses": [address], "conditions": {"ready": ready}} for address, ready in endpoints],
    }


class FakeKubeAPI:
    def __init__(self) -> None:
        self.slices: dict[str, dict] = {}
        self.version = 1
        self.watches = 0
        self.requests: list[str] = []
        self._queues: list[asyncio.Queue] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.url = ""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(str(request.rel_url))
        if request.query.get("watch") != "1":
            return web.json_response(
                {
                    "kind": "EndpointSliceList",
                    "metadata": {"resourceVersion": str(self.version)},
                    "items": list(self.slices.values()),
                }
            )
        self.watches += 1
        queue: asyncio.Queue = asyncio.Queue()
        self._queues.append(queue)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        try:
            while True:
                event = await queue.get()
                await response.write(json.dumps(event).encode() + b"\n")
        finally:
            self._queues.remove(queue)

    def push(self, kind: str, item: dict) -> None:
        """Change the world and tell every open watch, as the API server would."""

        def apply() -> None:
            self.version += 1
            if kind == "DELETED":
                self.slices.pop(item["metadata"]["name"], None)
            else:
                self.slices[item["metadata"]["name"]] = item
            for queue in self._queues:
                queue.put_nowait({"type": kind, "object": item})

        self._loop.call_soon_threadsafe(apply)

    def start(self) -> FakeKubeAPI:
        app = web.Application()
        app.router.add_get("/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices", self._handle)
        self._server = BackgroundServer(app).start()
        self._loop, self.url = self._server.loop, self._server.url
        return self

    def stop(self) -> None:
        self._server.stop()
