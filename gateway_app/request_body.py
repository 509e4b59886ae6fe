"""Reading the client's body and the two fields routing needs from it.

Only `model` and `owned_by` matter to the gateway; everything else is forwarded as the client sent it.
The body is re-encoded only when it must change (an alias to replace, `owned_by` to strip).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson

from gateway_app.errors import InvalidRequest, PayloadTooLarge

from starlette.types import Receive, Scope


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


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                raise InvalidRequest("The Content-Length header is not a number.") from None
    return None


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole request body, refusing early (413) once it is known to exceed `limit` bytes."""
    declared = _declared_length(scope)
    if declared is not None and declared > limit:
        raise PayloadTooLarge(f"The request body is {declared} bytes; the limit is {limit} bytes.")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionAbortedError("client went away while sending the body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")
        if not message.get("more_body", False):
            if not chunks:
                return chunk  # the usual case: the whole body in one message, no copy
            chunks.append(chunk)
            return b"".join(chunks)
        chunks.append(chunk)


def parse_routing_fields(body: bytes) -> RoutingFields:
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
    body: bytes, fields: RoutingFields, engine_model: str, via_alias: bool, changed: bool = False
) -> bytes:
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
