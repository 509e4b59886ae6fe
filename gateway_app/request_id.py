"""Every answer carries `x-request-id`: the client's own when it is usable, else a new one."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from starlette.types import Message, Send

REQUEST_ID_HEADER = b"x-request-id"
_SAFE_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:@/+=-]{1,128}$")
# Ids must be unique, not secret: a seeded generator, without a system call per request.
_RANDOM = random.Random()


@dataclass(slots=True)
class RequestIds:
    own: str  # on the answer and in the log line
    for_engine: str  # sent to the engine as its request id

    @property
    def header(self) -> tuple[bytes, bytes]:
        """The answer's `x-request-id` header."""
        return (REQUEST_ID_HEADER, self.own.encode())


def request_ids(headers: list[tuple[bytes, bytes]]) -> RequestIds:
    """The client's `x-request-id` when it is short and plain, else a new random one.

    vLLM keys its running requests by this id and refuses a duplicate: a client's id gets a random
    suffix on its way to the engine, so two clients (or retries) never collide.
    """
    for name, value in headers:
        if name == REQUEST_ID_HEADER:
            if _SAFE_REQUEST_ID.match(value):
                own = value.decode("ascii")
                return RequestIds(own, f"{own}-{_hex(4)}")
            break
    own = _hex(12)
    return RequestIds(own, own)


def _hex(size: int) -> str:
    """`size` random bytes in lower-case hex (what `f"{bits:0{2 * size}x}"` writes, in a third of its time)."""
    return _RANDOM.getrandbits(8 * size).to_bytes(size, "big").hex()


def with_request_id(send: Send, request_id: str) -> Send:
    """`send`, adding the request id to the answer's headers."""
    header = (REQUEST_ID_HEADER, request_id.encode())

    async def send_with_id(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), header]
        await send(message)

    return send_with_id
