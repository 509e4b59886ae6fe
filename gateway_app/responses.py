"""Small ASGI response senders shared by the gateway's own endpoints."""

from __future__ import annotations

from starlette.types import Send

from gateway_app.errors import GatewayError

JSON = (b"content-type", b"application/json")


async def send_bytes(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | tuple = (), content_type=JSON
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [content_type, (b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, error: GatewayError, headers: list[tuple[bytes, bytes]] | tuple = ()) -> None:
    """An OpenAI-shaped error answer; never a stack trace."""
    if error.retry_after is not None:
        headers = [*headers, (b"retry-after", str(error.retry_after).encode())]
    await send_bytes(send, error.status, error.body(), headers)
