"""Scale to zero: an engine nobody uses sleeps at zero replicas, and a request wakes it and waits for it.

An engine with `wake` in the routing map is watched through its Service's EndpointSlices (discovery.py),
which tell asleep (no ready pod) from awake. A request that finds it asleep is held, sending nothing to
the client, while one task per engine asks the API server to scale its Deployment up (the `scale`
subresource, only from zero, so many requests make one scale-up); the held requests go on as soon as a
pod is ready, and get 503 `engine_waking` past `wake.timeout` or `wake.queue`. A client that leaves while
held cancels its request, which leaves the queue at once.

Going to sleep is decided by whichever gateway replica notices first that nobody has sent the engine a
request for `wake.idle_after` seconds. Each gateway knows only its own traffic, so they share the time of
the engine's last request in a Lease (`spec.renewTime`), which each writes at most once a tick per
engine, and only when it has sent a request since its last write; a gateway reads the Lease before it
scales an engine to zero. The record lives in Kubernetes itself: no store is added for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from gateway_app.background import TasksByKey
from gateway_app.kube_api import KubernetesClient, KubernetesError
from gateway_app.log_setup import ThrottledWarning
from gateway_app.metrics import GatewayMetrics
from gateway_app.route_table import RouteTable
from gateway_app.waker import Waker, tick_seconds

log = logging.getLogger("llm_gateway.wake")
API_WARNINGS = ThrottledWarning(log)  # an API server that keeps refusing: a line a minute per engine and call

RETRY_SECONDS = 2.0  # after a scale-up the API server could not take
CONFLICT_RETRIES = 3  # reads and patches of a Scale that keeps changing under a wake


class WakeService:
    """A service: for each engine with `wake`, a task that scales its Deployment up when a request wants
    it, records the engine's activity in its Lease, and scales it to zero once idle."""

    def __init__(self, client: KubernetesClient | None, metrics: GatewayMetrics, holder: str | None = None) -> None:
        self._client = client
        self._metrics = metrics
        self._holder = holder or os.environ.get("HOSTNAME") or socket.gethostname()  # the pod's name
        self._tending: TasksByKey[Waker] = TasksByKey()

    def sync(self, routes: RouteTable) -> None:
        """Tend the wakers of these routes and no others (call from the event loop); a Waker no longer in
        service is retired, so that requests it held go on."""
        if self._client is None:  # not in a pod: discovery does not run, so no engine is ever asleep
            return
        wanted: dict[Waker, str] = {}
        for engine in routes.engines:
            if engine.pool.waker is not None:
                wanted.setdefault(engine.pool.waker, engine.name)
        for waker, name in wanted.items():
            if waker not in self._tending:
                waker.on_awake = self._awake_callback(name)
                waker.tended = True
                self._tending.start(waker, self._tend(name, waker, self._client))
        for waker in self._tending.keep_only(wanted.keys()):
            waker.retire()

    async def run(self) -> None:
        await self._tending.run()

    def stop(self) -> None:
        self._tending.stop()

    def _awake_callback(self, name: str) -> Callable[[float], None]:
        def awake(seconds: float) -> None:
            self._metrics.wake_duration.labels(name).observe(seconds)
            log.info("engine %s awake: a replica is ready %.1f s after the request that woke it", name, seconds)

        return awake

    async def _tend(self, name: str, waker: Waker, client: KubernetesClient) -> None:
        """Until cancelled: wake when asked, record activity, sleep when idle. Never raises."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waker.attention.wait(), timeout=tick_seconds(waker.spec))
            waker.attention.clear()
            try:
                self._check_wake_expired(name, waker)
                if waker.wake_requested:
                    waker.wake_requested = False
                    if waker.asleep and waker.waking_since is not None:
                        await self._wake(name, waker, client)
                await self._record_activity(name, waker, client)
                await self._sleep_if_idle(name, waker, client)
            except KubernetesError as error:
                waking = waker.waking_since is not None and waker.asleep
                if waking and error.lasting:  # retrying will not help: the held requests are told now
                    log.warning("engine %s cannot be woken: %s", name, error)
                    waker.wake_failed(str(error))
                    continue
                if waking:  # the API server may be back in a moment: try the scale-up again (until timeout)
                    waker.wake_requested = True
                    waker.attention.set()
                API_WARNINGS.warn(f"{name}:{error.status}", "engine %s: Kubernetes API: %s", name, error)
                await asyncio.sleep(RETRY_SECONDS)
            except Exception:  # a bug of ours must not end the engine's tending
                log.exception("engine %s: scale to zero failed", name)
                await asyncio.sleep(RETRY_SECONDS)

    async def _wake(self, name: str, waker: Waker, client: KubernetesClient) -> None:
        """Scale the Deployment up, only from zero: another gateway, or a person, may have done it. The
        patch holds only for the version read; a conflict (another gateway's wake, or only the
        Deployment's status moving) is read again."""
        path = scale_path(waker)
        where = f"{waker.namespace}/{waker.spec.deployment}"
        for _ in range(CONFLICT_RETRIES):
            scale = await client.get(path)
            current = replicas_of(scale)
            if current:
                log.info(
                    "engine %s waking: deployment %s already at %d replica(s), waiting for one to be ready",
                    name,
                    where,
                    current,
                )
                break
            if await self._scale(client, path, scale, waker.spec.replicas):
                self._metrics.wakeups.labels(name).inc()
                log.info(
                    "engine %s waking: deployment %s scaled 0 -> %d (a request came while no replica was ready)",
                    name,
                    where,
                    waker.spec.replicas,
                )
                break
        else:
            raise KubernetesError(409, f"the Scale of deployment {where} kept changing while it was being woken")
        waker.last_request = time.monotonic()
        await self._record_activity(name, waker, client)  # at once: no other gateway may put it back to sleep

    @staticmethod
    async def _scale(client: KubernetesClient, path: str, read: dict[str, Any], replicas: int) -> bool:
        """Set the replicas if the Scale is still the version read; False on a conflict (it changed)."""
        patch: dict[str, Any] = {"spec": {"replicas": replicas}}
        metadata = read.get("metadata")
        version = metadata.get("resourceVersion") if isinstance(metadata, dict) else None
        if isinstance(version, str) and version:
            patch["metadata"] = {"resourceVersion": version}
        try:
            await client.merge_patch(path, patch)
        except KubernetesError as error:
            if error.status == 409:  # Conflict: changed since read
                return False
            raise
        return True

    def _check_wake_expired(self, name: str, waker: Waker) -> None:
        since = waker.waking_since
        if since is not None and waker.asleep and time.monotonic() - since > waker.spec.timeout:
            log.warning(
                "engine %s: no replica ready %.0f s after its wake; the next request wakes it again",
                name,
                time.monotonic() - since,
            )
            waker.wake_expired()

    async def _record_activity(self, name: str, waker: Waker, client: KubernetesClient) -> None:
        """Write the engine's last request to its Lease, if this gateway sent one since its last write.
        Only engines that may be put to sleep need it; a failed write is told and tried again next tick."""
        now = time.monotonic()
        if waker.active or waker.held:
            waker.last_request = now
        last = waker.last_request
        if waker.spec.idle_after is None or last <= waker.recorded:
            return
        renewed = micro_time(time.time() - (now - last))
        patch = {"spec": {"holderIdentity": self._holder, "renewTime": renewed}}
        try:
            await client.merge_patch(lease_path(waker), patch)
        except KubernetesError as error:
            API_WARNINGS.warn(
                f"{name}:lease-write",
                "engine %s: cannot record its activity in Lease %s/%s (%s); other gateway replicas may not "
                "see this one's traffic",
                name,
                waker.namespace,
                waker.spec.lease_name,
                error,
            )
            return
        waker.recorded = last

    async def _sleep_if_idle(self, name: str, waker: Waker, client: KubernetesClient) -> None:
        """Scale to zero when neither this gateway nor, by the Lease, any other sent the engine a request
        for `idle_after` seconds: an engine with ready pods, or one whose last wake brought none (a pod
        that cannot start must not hold its GPU for ever)."""
        idle_after = waker.spec.idle_after
        if idle_after is None or waker.held or waker.active or waker.stopping is not None:
            return
        if not (waker.ready_pods or (waker.wake_stuck and waker.waking_since is None)):
            return
        if time.monotonic() - waker.last_request < idle_after:
            return
        try:
            lease = await client.get(lease_path(waker))
        except KubernetesError as error:  # without the shared record, another gateway's traffic is unseen
            API_WARNINGS.warn(
                f"{name}:lease-read",
                "engine %s: idle here, but not scaled to zero: cannot read Lease %s/%s (%s)",
                name,
                waker.namespace,
                waker.spec.lease_name,
                error,
            )
            return
        spec = lease.get("spec")
        renewed = parse_micro_time(spec.get("renewTime") if isinstance(spec, dict) else None)
        if renewed is not None and time.time() - renewed < idle_after:
            return  # another gateway sent it a request lately
        path = scale_path(waker)
        scale = await client.get(path)
        current = replicas_of(scale)
        # Look again: a request may have come in while the API answered.
        if not current or waker.held or waker.active or time.monotonic() - waker.last_request < idle_after:
            waker.wake_stuck = waker.wake_stuck and bool(current)
            return
        waker.begin_stopping()  # requests from now on are held, and wake it again, rather than cut
        try:
            scaled = await self._scale(client, path, scale, 0)
        except BaseException:
            waker.stopping_failed()
            raise
        if not scaled:
            waker.stopping_failed()
            return  # changed since it was read (another gateway woke it, or put it to sleep): leave it
        waker.wake_stuck = False
        self._metrics.scale_downs.labels(name).inc()
        idle = time.time() - renewed if renewed is not None else time.monotonic() - waker.last_request
        log.info(
            "engine %s asleep: deployment %s/%s scaled %d -> 0 after %.0f s without requests (idle_after %g s)",
            name,
            waker.namespace,
            waker.spec.deployment,
            current,
            min(idle, time.monotonic() - waker.last_request),
            idle_after,
        )


def scale_path(waker: Waker) -> str:
    return (
        f"/apis/apps/v1/namespaces/{quote(waker.namespace, safe='')}/deployments/"
        f"{quote(waker.spec.deployment, safe='')}/scale"
    )


def lease_path(waker: Waker) -> str:
    return (
        f"/apis/coordination.k8s.io/v1/namespaces/{quote(waker.namespace, safe='')}/leases/"
        f"{quote(waker.spec.lease_name, safe='')}"
    )


def replicas_of(scale: dict[str, Any]) -> int:
    spec = scale.get("spec")
    replicas = spec.get("replicas") if isinstance(spec, dict) else None
    return replicas if isinstance(replicas, int) else 0


def micro_time(epoch_seconds: float) -> str:
    """Kubernetes' MicroTime: RFC 3339 in UTC with microseconds, e.g. 2026-12-02T04:05:06.123456Z."""
    return datetime.fromtimestamp(epoch_seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_micro_time(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None
