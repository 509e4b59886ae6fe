"""Small ASGI response senders shared by the gateway's own endpoints."""

from __future__ import annotations

from collections.abc import Sequence

from starlette.types import Send

from gateway_app.errors import GatewayError

Header = tuple[bytes, bytes]
JSON: Header = (b"content-type", b"application/json")


async def send_bytes(
    send: Send, status: int, body: bytes, headers: Sequence[Header] = (), content_type: Header | None = JSON
) -> None:
    """A whole answer in two ASGI messages (`content_type` None: the answer has none)."""
    start = [(b"content-length", str(len(body)).encode()), *headers]
    if content_type is not None:
        start.insert(0, content_type)
    await send({"type": "http.response.start", "status": status, "headers": start})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, error: GatewayError, headers: Sequence[Header] = ()) -> None:
    """An OpenAI-shaped error answer; never a stack trace."""
    extra = [(name.encode(), value.encode()) for name, value in error.extra_headers().items()]
    await send_bytes(send, error.status, error.body(), [*headers, *extra])
