"""A stand-in for the Kubernetes API server, over real HTTP: EndpointSlice list and watch, the `scale`
subresource of Deployments, and Leases.

It speaks the API's wire format (a list with a resourceVersion; a watch as a stream of JSON lines
`{"type", "object"}`; a Scale; a Lease; merge patches; Status objects for errors), and lets a test push
events as a controller would. It stands in for Kubernetes, not for any part of the gateway.
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


def status(code: int, message: str) -> web.Response:
    body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "code": code}
    return web.json_response(body, status=code)


class FakeKubeAPI:
    def __init__(self) -> None:
        self.deployments: dict[tuple[str, str], int] = {}  # (namespace, name) -> spec.replicas
        self.leases: dict[tuple[str, str], dict] = {}  # (namespace, name) -> the Lease
        self.calls: list[tuple[str, str, dict | None, str]] = []  # scale and lease calls: method, path, body, type
        self.refuse: dict[str, int] = {}  # "scale" or "lease" -> the status every such call gets
        self.scale_versions: dict[tuple[str, str], int] = {}  # resourceVersion of each Deployment
        self.beaten_to_it = False  # the next scale PATCH finds the Deployment scaled to 1 by someone else
        self.status_moved = False  # the next scale PATCH finds the Deployment changed (its status), still at 0
        self.first_list_delay = 0.0  # seconds the first EndpointSlice list takes (an API server slow to answer)
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
            delay, self.first_list_delay = self.first_list_delay, 0.0
            await asyncio.sleep(delay)
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

    async def _scale(self, request: web.Request) -> web.Response:
        key = (request.match_info["namespace"], request.match_info["name"])
        body = await self._record(request)
        refused = self._refusal(request, "scale", "deployments.apps", key, self.deployments)
        if refused is not None:
            return refused
        if request.method == "PATCH":
            if self.beaten_to_it:
                self.beaten_to_it = False
                self.deployments[key] = 1
                self.scale_versions[key] = self.scale_versions.get(key, 1) + 1
            if self.status_moved:
                self.status_moved = False
                self.scale_versions[key] = self.scale_versions.get(key, 1) + 1
            expected = (body.get("metadata") or {}).get("resourceVersion")
            if expected is not None and expected != str(self.scale_versions.get(key, 1)):
                return status(409, "the object has been modified; please apply your changes to the latest version")
            self.deployments[key] = body["spec"]["replicas"]
            self.scale_versions[key] = self.scale_versions.get(key, 1) + 1
        replicas = self.deployments[key]
        version = str(self.scale_versions.get(key, 1))
        return web.json_response(
            {
                "kind": "Scale",
                "apiVersion": "autoscaling/v1",
                "metadata": {"name": key[1], "namespace": key[0], "resourceVersion": version},
                "spec": {"replicas": replicas},
                "status": {"replicas": replicas},
            }
        )

    async def _lease(self, request: web.Request) -> web.Response:
        key = (request.match_info["namespace"], request.match_info["name"])
        body = await self._record(request)
        refused = self._refusal(request, "lease", "leases.coordination.k8s.io", key, self.leases)
        if refused is not None:
            return refused
        lease = self.leases[key]
        if request.method == "PATCH":
            lease["spec"].update(body.get("spec") or {})
        return web.json_response(lease)

    def _refusal(
        self, request: web.Request, kind: str, resource: str, key: tuple[str, str], existing: dict
    ) -> web.Response | None:
        """What the API server answers before looking at the change: no right, no such object, or a
        patch that is not a merge patch."""
        if kind in self.refuse:
            return status(self.refuse[kind], f'{resource} "{key[1]}" is forbidden')
        if key not in existing:
            return status(404, f'{resource} "{key[1]}" not found')
        if request.method == "PATCH" and request.content_type != "application/merge-patch+json":
            return status(415, f"unsupported media type {request.content_type}")
        return None

    async def _record(self, request: web.Request) -> dict | None:
        body = await request.json() if request.can_read_body else None
        self.calls.append((request.method, request.path, body, request.content_type))
        return body

    def add_deployment(self, namespace: str, name: str, replicas: int, lease: str | None = None) -> None:
        """A Deployment at `replicas`, and the Lease the chart creates beside it (spec left to the gateway)."""
        self.deployments[(namespace, name)] = replicas
        if lease is not None:
            metadata = {"name": lease, "namespace": namespace}
            self.leases[(namespace, lease)] = {
                "kind": "Lease",
                "apiVersion": "coordination.k8s.io/v1",
                "metadata": metadata,
                "spec": {},
            }

    def scale_patches(self, name: str) -> list[int]:
        """The replica counts the gateways asked for, in order."""
        return [
            body["spec"]["replicas"]
            for method, path, body, _ in list(self.calls)
            if method == "PATCH" and path.endswith(f"/deployments/{name}/scale") and body
        ]

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
        scale = "/apis/apps/v1/namespaces/{namespace}/deployments/{name}/scale"
        lease = "/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{name}"
        for method in ("GET", "PATCH"):
            app.router.add_route(method, scale, self._scale)
            app.router.add_route(method, lease, self._lease)
        self._server = BackgroundServer(app).start()
        self._loop, self.url = self._server.loop, self._server.url
        return self

    def stop(self) -> None:
        self._server.stop()
