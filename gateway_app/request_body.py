"""Reading the client's body and the two fields routing needs from it.

Only `model` and `owned_by` matter to the gateway; everything else is forwarded as the client sent it.
The body is re-encoded only when it must change (an alias to replace, `owned_by` to strip).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.types import Receive, Scope

from gateway_app.errors import GatewayOverloaded, InvalidRequest, PayloadTooLarge, RequestTimeout


@dataclass(slots=True)
class RoutingFields:
    """What routing reads from a body, plus the parsed object in case it must be rewritten."""

    model: str
    owned_by: str | None
    has_owned_by: bool
    document: dict[str, Any]
    # Set when orjson could not read the body but the standard library could (huge integers):
    # re-encode with the same library so nothing is lost.
    needs_stdlib: bool = False


class BodyMemoryBudget:
    """Bytes of request bodies held at once, all requests together.

    The per-request limit alone lets forty clients hold forty maximal bodies at once; this budget turns
    that into a 503 for the newest, not an out-of-memory kill for everyone.
    """

    def __init__(self, limit: Callable[[], int]) -> None:
        self._limit = limit
        self.held = 0

    def reserve(self, size: int) -> bool:
        if self.held + size > self._limit():
            return False
        self.held += size
        return True

    def release(self, size: int) -> None:
        self.held -= size


@dataclass(slots=True)
class Body:
    """A request body read whole, and the share of the memory budget it holds until `release()`."""

    data: bytes | bytearray
    budget: BodyMemoryBudget
    held: int

    def release(self) -> None:
        self.budget.release(self.held)
        self.held = 0


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                raise InvalidRequest("The Content-Length header is not a number.") from None
    return None


async def read_body(scope: Scope, receive: Receive, limit: int, budget: BodyMemoryBudget, idle_timeout: float) -> Body:
    """The whole request body, refusing early (413) once it is known to exceed `limit` bytes, with 503
    when the bodies of all requests would pass the memory budget, and 408 after `idle_timeout` seconds
    without a byte. Memory is reserved as bytes arrive, so a slow client holds only what it sent."""
    declared = _declared_length(scope)
    if declared is not None and declared > limit:
        raise PayloadTooLarge(f"The request body is {declared} bytes; the limit is {limit} bytes.")
    body = Body(b"", budget, 0)
    received: bytearray | None = None
    try:
        while True:
            try:
                async with asyncio.timeout(idle_timeout):
                    message = await receive()
            except TimeoutError:
                raise RequestTimeout(f"No part of the request body arrived for {idle_timeout} s.") from None
            if message["type"] == "http.disconnect":
                raise ConnectionAbortedError("client went away while sending the body")
            chunk = message.get("body", b"")
            if body.held + len(chunk) > limit:
                raise PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")
            if not budget.reserve(len(chunk)):
                raise GatewayOverloaded(
                    "The gateway is holding as many request bodies as its memory allows; retry shortly.",
                    retry_after=1,
                )
            body.held += len(chunk)
            more = message.get("more_body", False)
            if received is None:
                if not more:
                    body.data = chunk  # the usual case: the whole body in one message, no copy
                    return body
                received = bytearray(chunk)
            else:
                received += chunk
            if not more:
                body.data = received
                return body
    except BaseException:
        body.release()
        raise


def parse_routing_fields(body: bytes | bytearray) -> RoutingFields:
    """Read `model` and `owned_by`, with a 400 that says what is wrong when they are unusable."""
    needs_stdlib = False
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        try:  # orjson refuses some valid JSON (integers beyond 64 bits); the stdlib reads it.
            document = json.loads(body)
            needs_stdlib = True
        except (ValueError, RecursionError):
            raise InvalidRequest("The request body is not valid JSON.") from None
    if not isinstance(document, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    model = document.get("model")
    if model is None:
        raise InvalidRequest("The request body has no `model` field.", param="model")
    if not isinstance(model, str):
        raise InvalidRequest("The `model` field must be a string.", param="model")
    has_owned_by = "owned_by" in document
    owned_by = document.get("owned_by")
    if owned_by is not None and not isinstance(owned_by, str):
        raise InvalidRequest("The `owned_by` field must be a string (an engine name such as `vllm`).", param="owned_by")
    return RoutingFields(model, owned_by or None, has_owned_by, document, needs_stdlib)


def body_for_engine(
    body: bytes | bytearray, fields: RoutingFields, engine_model: str, via_alias: bool, changed: bool = False
) -> bytes | bytearray:
    """The bytes the engine gets: the client's own, unless an alias or `owned_by` must go, or the
    caller already `changed` the parsed document."""
    if not via_alias and not fields.has_owned_by and not changed:
        return body
    document = fields.document
    document.pop("owned_by", None)
    document["model"] = engine_model
    if fields.needs_stdlib:
        return json.dumps(document).encode()  # ASCII escapes: lone surrogates stay valid
    return orjson.dumps(document)
