"""The Kubernetes API server, as the gateway talks to it: where it is, its credentials, and the few calls
made (discovery's list and watch of EndpointSlices, wake.py's reads and merge patches of a Deployment's
scale and of a Lease), over the aiohttp session the gateway already has. The official client is
synchronous and much larger than these calls need.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from gateway_app.upstream import read_capped

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
CALL_TIMEOUT = aiohttp.ClientTimeout(total=10)
MAX_ANSWER_BYTES = 1024 * 1024  # a Scale or a Lease is a few hundred bytes


@dataclass(frozen=True, slots=True)
class KubernetesAPI:
    """Where the API server is and how to authenticate to it."""

    base_url: str
    token_file: Path | None
    ssl_context: ssl.SSLContext | bool

    @classmethod
    def from_environment(cls) -> KubernetesAPI | None:
        """In a pod: the service account. `LLM_GATEWAY_KUBE_API` overrides the address (tests, proxies)."""
        override = os.environ.get("LLM_GATEWAY_KUBE_API")
        if override:
            return cls(override.rstrip("/"), None, True)
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
        if not host or not port:
            return None
        context = ssl.create_default_context(cafile=str(SERVICE_ACCOUNT / "ca.crt"))
        host = f"[{host}]" if ":" in host else host
        return cls(f"https://{host}:{port}", SERVICE_ACCOUNT / "token", context)

    def headers(self) -> dict[str, str]:
        # Re-read on every call: projected service-account tokens are rotated on disk.
        if self.token_file is None:
            return {}
        return {"Authorization": f"Bearer {self.token_file.read_text().strip()}"}


class KubernetesError(Exception):
    """A call the API server refused or could not take; `status` is 0 when there was no answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status

    @property
    def lasting(self) -> bool:
        """Refusals that retrying will not cure: no right to it (401, 403), no such object (404), invalid (422)."""
        return self.status in (401, 403, 404, 422)


class KubernetesClient:
    """GET and merge-PATCH of single objects, each answer read whole (bounded) and parsed."""

    def __init__(self, api: KubernetesAPI, session: aiohttp.ClientSession) -> None:
        self.api = api
        self._session = session

    async def get(self, path: str) -> dict[str, Any]:
        return await self._call("GET", path, None)

    async def merge_patch(self, path: str, patch: dict[str, Any]) -> dict[str, Any]:
        return await self._call("PATCH", path, patch)

    async def _call(self, method: str, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        headers = self.api.headers()
        if body is not None:
            headers["Content-Type"] = "application/merge-patch+json"
        try:
            async with self._session.request(
                method,
                self.api.base_url + path,
                data=None if body is None else orjson.dumps(body),
                headers=headers,
                ssl=self.api.ssl_context,
                timeout=CALL_TIMEOUT,
            ) as response:
                raw = await read_capped(response, MAX_ANSWER_BYTES)
                if raw is None:
                    raise KubernetesError(0, f"{method} {path}: the answer is larger than {MAX_ANSWER_BYTES} bytes")
                if response.status >= 400:
                    raise KubernetesError(response.status, _reason(response.status, raw))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise KubernetesError(0, f"{method} {path}: {str(exc) or type(exc).__name__}") from exc
        try:
            answer = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise KubernetesError(0, f"{method} {path}: the answer is not JSON") from exc
        return answer if isinstance(answer, dict) else {}


def _reason(status: int, raw: bytes) -> str:
    """The API server's own message (a Status object), else the status code."""
    try:
        message = orjson.loads(raw).get("message")
    except (orjson.JSONDecodeError, AttributeError):
        message = None
    return f"{status} {message}" if isinstance(message, str) and message else f"HTTP {status}"
