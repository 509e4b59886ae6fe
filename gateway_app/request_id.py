"""Every answer carries `x-request-id`: the client's own when it is usable, else a new one."""

from __future__ import annotations

import os
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = b"x-request-id"
_SAFE_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:@/+=-]{1,128}$")


def request_id_from(headers: list[tuple[bytes, bytes]]) -> tuple[str, bool]:
    """The client's `x-request-id` when it is short and plain, else a new random one; and which it is."""
    for name, value in headers:
        if name == REQUEST_ID_HEADER:
            if _SAFE_REQUEST_ID.match(value):
                return value.decode("ascii"), True
            break
    return os.urandom(12).hex(), False


class RequestIdMiddleware:
    """Puts the id in `scope["request_id"]` (the proxy forwards and logs it) and on every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id, from_client = request_id_from(scope["headers"])
        scope["request_id"] = request_id
        # vLLM keys its running requests by this id and refuses a duplicate: a client's id gets a
        # random suffix on its way to the engine, so two clients (or retries) never collide.
        scope["engine_request_id"] = f"{request_id}-{os.urandom(4).hex()}" if from_client else request_id
        header = (REQUEST_ID_HEADER, request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        await self.app(scope, receive, send_with_id)
