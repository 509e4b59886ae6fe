"""Reading the client's body and the two fields routing needs from it.

Only `model` and `owned_by` matter to the gateway; everything else is forwarded as the client sent it.
The body is re-encoded only when it must change (an alias to replace, `owned_by` to strip).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.types import Receive, Scope

from gateway_app.errors import GatewayOverloaded, InvalidRequest, PayloadTooLarge


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

    def __init__(self, limit: int) -> None:
        self.limit = limit  # set again when a reload changes client_limits.max_body_memory
        self.held = 0

    def could_hold(self, size: int) -> bool:
        """Whether `size` more bytes fit now (checked before a body is read; held only as they arrive)."""
        return self.held + size <= self.limit

    def reserve(self, size: int) -> bool:
        if not self.could_hold(size):
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
        """Give the budget back and drop the bytes (safe to call twice)."""
        self.budget.release(self.held)
        self.held = 0
        self.data = b""


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                raise InvalidRequest("The Content-Length header is not a number.") from None
    return None


# What parsing a body adds to it, at most, per element of an array or object (each but the last is
# followed by a comma; nesting without commas is bounded by the parser's depth limit). Python's objects
# for `[{}, {}, ...]` take about 90 bytes for each 3 bytes of JSON.
PARSED_BYTES_PER_ELEMENT = 100


def parsed_size_estimate(data: bytes | bytearray) -> int:
    """An upper estimate of the memory the parsed body takes, from one scan at C speed (about 7 ms for
    15 MB): 16 MB of `[{},{},...]` would take 470 MB parsed, and must be refused before, not after."""
    return len(data) + PARSED_BYTES_PER_ELEMENT * data.count(b",")


async def read_body(scope: Scope, receive: Receive, max_bytes: int, budget: BodyMemoryBudget) -> Body:
    """The whole request body, refusing early (413) once it is known to exceed `max_bytes`.

    Memory is reserved from the budget as bytes arrive (a slow client holds only what it sent), then for
    parsing; past the budget, 503. How long a body may take is the connection's business
    (client_connections.py): a late one ends here as a disconnect.
    """
    declared = _declared_length(scope)
    if declared is not None and declared > max_bytes:
        raise PayloadTooLarge(f"The request body is {declared} bytes; the limit is {max_bytes} bytes.")
    if declared is not None and not budget.could_hold(declared):
        raise _overloaded()  # refused before its bytes are read, not after: reading them costs CPU too
    body = Body(b"", budget, 0)
    received: bytearray | None = None
    size = 0
    try:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ConnectionAbortedError("client went away while sending the body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > max_bytes:
                raise PayloadTooLarge(f"The request body is larger than the limit of {max_bytes} bytes.")
            _reserve(body, len(chunk))
            if not message.get("more_body", False):
                if received is None:
                    body.data = chunk  # the usual case: the whole body in one message, no copy
                else:
                    received += chunk
                    body.data = received
                _reserve(body, parsed_size_estimate(body.data) - len(body.data))
                return body
            if received is None:
                received = bytearray(chunk)
            else:
                received += chunk
    except BaseException:
        body.release()
        raise


def _reserve(body: Body, size: int) -> None:
    if not body.budget.reserve(size):
        raise _overloaded()
    body.held += size


def _overloaded() -> GatewayOverloaded:
    return GatewayOverloaded(
        "The gateway is holding as many request bodies as its memory allows; retry shortly.",
        retry_after=1,
    )


class EnginePayload:
    """The bytes engines get for one request, held only until an answer has started to flow back.

    After that no retry can happen, so the body, its parsed form and the bytes sent are dropped and their
    share of the memory budget given back: a long stream does not keep a multi-megabyte prompt alive.
    """

    __slots__ = ("_body", "_fields", "_model", "_payload")

    def __init__(self, body: Body, fields: RoutingFields, model: str, payload: bytes | bytearray) -> None:
        self._body, self._fields, self._model, self._payload = body, fields, model, payload

    def for_model(self, model: str) -> bytes | bytearray:
        """The body for the routed engine's model, or re-addressed to a fallback engine's."""
        if model == self._model:
            return self._payload
        return body_for_engine(self._body.data, self._fields, model, True, changed=True)

    def release(self) -> None:
        self._payload = b""
        self._fields.document = {}
        self._body.release()


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
