"""Finding an engine's ready pods: EndpointSlices from the Kubernetes API, listed then watched.

Why the API and not a headless Service's DNS: a watch reports a pod that turns ready or unready within
about a second, while DNS answers are cached for their TTL and resolvers differ in how they honour it;
the cost is a Role that may get, list and watch EndpointSlices in the release's namespace. The client is
a few calls over the aiohttp session the gateway already has (the official client is synchronous and
much larger than the two requests needed here).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from gateway_app.background import TasksByKey
from gateway_app.kube_api import KubernetesAPI
from gateway_app.replicas import DiscoveryKey, ReplicaRegistry
from gateway_app.route_table import RouteTable

log = logging.getLogger("llm_gateway.discovery")

SERVICE_NAME_LABEL = "kubernetes.io/service-name"


def ready_addresses(endpoint_slice: dict[str, Any], port: int) -> set[str]:
    """Ready pod addresses of one EndpointSlice that expose `port` ("ready" absent means ready)."""
    if not any(p.get("port") == port for p in endpoint_slice.get("ports") or ()):
        return set()
    found: set[str] = set()
    for endpoint in endpoint_slice.get("endpoints") or ():
        if (endpoint.get("conditions") or {}).get("ready") is False:
            continue
        found.update(endpoint.get("addresses") or ())
    return found


def endpoint_url(address: str, port: int, scheme: str = "http") -> str:
    return f"{scheme}://[{address}]:{port}" if ":" in address else f"{scheme}://{address}:{port}"


class EndpointSliceWatcher:
    """Keeps `on_change(urls)` informed of the ready pods behind one Service."""

    RETRY_SECONDS = 2.0

    def __init__(
        self,
        api: KubernetesAPI,
        session: aiohttp.ClientSession,
        namespace: str,
        service: str,
        port: int,
        on_change: Callable[[list[str]], None],
    ) -> None:
        self.api = api
        self._session = session
        self.namespace, self.service, self.port = namespace, service, port
        self._on_change = on_change
        self._slices: dict[str, set[str]] = {}
        self._published: list[str] | None = None
        self._path = (
            f"/apis/discovery.k8s.io/v1/namespaces/{quote(namespace)}/endpointslices"
            f"?labelSelector={quote(f'{SERVICE_NAME_LABEL}={service}')}"
        )

    def _publish(self) -> None:
        urls = sorted(endpoint_url(a, self.port) for addresses in self._slices.values() for a in addresses)
        if urls != self._published:
            self._published = urls
            log.info("service %s/%s: %d ready endpoint(s)", self.namespace, self.service, len(urls))
            self._on_change(urls)

    async def _list(self) -> str:
        async with self._session.get(
            self.api.base_url + self._path,
            headers=self.api.headers(),
            ssl=self.api.ssl_context,
            timeout=aiohttp.ClientTimeout(total=10),
        ) as response:
            response.raise_for_status()
            listing = orjson.loads(await response.read())
        self._slices = {
            item["metadata"]["name"]: ready_addresses(item, self.port) for item in listing.get("items") or ()
        }
        self._publish()
        return str(listing.get("metadata", {}).get("resourceVersion", ""))

    async def _watch(self, resource_version: str) -> None:
        """Apply watch events until the server ends the watch; return to relist."""
        url = (
            f"{self.api.base_url}{self._path}&watch=1&allowWatchBookmarks=true&timeoutSeconds=300"
            f"&resourceVersion={resource_version}"
        )
        async with self._session.get(
            url,
            headers=self.api.headers(),
            ssl=self.api.ssl_context,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=330),
        ) as response:
            response.raise_for_status()
            async for line in response.content:
                if not line.strip():
                    continue
                event = orjson.loads(line)
                kind, item = event.get("type"), event.get("object") or {}
                if kind == "ERROR":  # typically 410 Gone: our resourceVersion is too old
                    return
                if kind in ("ADDED", "MODIFIED"):
                    self._slices[item["metadata"]["name"]] = ready_addresses(item, self.port)
                elif kind == "DELETED":
                    self._slices.pop(item["metadata"]["name"], None)
                else:
                    continue  # BOOKMARK
                self._publish()

    async def run(self) -> None:
        """List, watch, and start over after any failure; never raises."""
        while True:
            try:
                await self._watch(await self._list())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the API may be briefly unreachable: keep the endpoints we have
                log.warning(
                    "watching service %s/%s: %s; retrying", self.namespace, self.service, exc or type(exc).__name__
                )
                await asyncio.sleep(self.RETRY_SECONDS)


class DiscoveryManager:
    """A service: one watch per Service that the routes in service discover; watches outlive reloads."""

    def __init__(
        self,
        api: KubernetesAPI | None,
        session: aiohttp.ClientSession,
        registry: ReplicaRegistry,
        on_change: Callable[[], None],
    ) -> None:
        self._api = api
        self._session = session
        self._registry = registry
        self._on_change = on_change
        self._watches: TasksByKey[DiscoveryKey] = TasksByKey()
        self._warned = False

    def sync(self, routes: RouteTable) -> None:
        """Start the watches the routes need and stop the others (call from the event loop)."""
        wanted = {engine.discovery for engine in routes.engines if engine.discovery is not None}
        if wanted and self._api is None:
            if not self._warned:
                log.warning("engines ask for discovery but the gateway is not in a Kubernetes pod; using their url")
                self._warned = True
            return
        api = self._api
        for key in wanted:
            if api is None:
                break
            if key in self._watches:
                continue
            namespace, service, port, _ = key
            watcher = EndpointSliceWatcher(
                api, self._session, namespace, service, port, functools.partial(self._update, key)
            )
            self._watches.start(key, watcher.run())
        self._watches.keep_only(wanted)

    def _update(self, key: DiscoveryKey, urls: list[str]) -> None:
        if self._registry.discovered(key, urls):
            self._on_change()

    async def run(self) -> None:
        await self._watches.run()

    def stop(self) -> None:
        self._watches.stop()
