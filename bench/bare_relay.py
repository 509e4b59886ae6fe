"""The least the gateway's stack can do: a bare uvicorn + aiohttp relay, the baseline of bench/bench.py.

The gateway's CPU per request over this relay's is what our own code costs.

    .venv/bin/python bench/bare_relay.py --upstream http://127.0.0.1:8001 --port 8002

A raw ASGI app: no Starlette, no routing, no JSON parsing, no access log, no metrics. Any POST goes to
the one upstream, same path, with the client's body as is and only a content-type header; the answer's
status, content-type and content-length (when the upstream sent one) come back, then its body chunk by
chunk as it arrives (`readany()`). GET /healthz answers 200; anything else 404.

It runs on the gateway's stack, set up as the gateway sets it up: uvicorn with uvloop and httptools, access
log off, the same keep-alive (gateway_app/server.py `uvicorn_config`), and one aiohttp session for the
process with the same connector and session settings (gateway_app/upstream.py `create_session`), created
and closed in the lifespan. The values are copied, not imported, so the baseline does not move when
gateway_app/ does.

A client that leaves mid-answer is not watched for: uvicorn drops what is sent after, and the relay reads
the upstream answer to its end and returns the connection to the pool. (The gateway runs a second task per
request to notice, and closes the engine connection so that the engine stops; that is part of its cost.)
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import uvicorn

KEEP_ALIVE_SECONDS = 75  # as gateway_app/server.py
TO_UPSTREAM = {"Content-Type": "application/json"}

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def create_session() -> aiohttp.ClientSession:
    """The gateway's session (gateway_app/upstream.py), with its default 5 s connect timeout."""
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=10, keepalive_timeout=4)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None, connect=5),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
    )


class BareRelay:
    """Relays every POST to `upstream` + its path; the session lives as long as the server."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
        elif scope["type"] != "http":
            return
        elif scope["method"] == "POST":
            await self.relay(scope, receive, send)
        elif scope["path"] == "/healthz":
            await answer(send, 200, b"ok\n")
        else:
            await answer(send, 404, b"not found\n")

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._session = create_session()  # inside the running loop, as aiohttp wants
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._session is not None:
                    await self._session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def relay(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self._session is not None, "requests come only after the lifespan's startup"
        body = await read_body(receive)
        try:
            upstream = await self._session.post(self.upstream + scope["path"], data=body, headers=TO_UPSTREAM)
        except aiohttp.ClientError as error:
            await answer(send, 502, f"upstream: {error}\n".encode())
            return
        try:
            headers = [(b"content-type", upstream.headers.get("Content-Type", "application/octet-stream").encode())]
            if upstream.content_length is not None:
                headers.append((b"content-length", str(upstream.content_length).encode()))
            await send({"type": "http.response.start", "status": upstream.status, "headers": headers})
            more_body = True
            while more_body:  # a whole JSON answer usually arrives in one read, and goes out in one send
                chunk = await upstream.content.readany()
                more_body = not upstream.content.at_eof()
                await send({"type": "http.response.body", "body": chunk, "more_body": more_body})
        finally:
            upstream.release()  # back to the pool when read to its end; closed otherwise


async def read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def answer(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="base URL every POST goes to, e.g. http://127.0.0.1:8001")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    config = uvicorn.Config(
        BareRelay(args.upstream),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        ws="none",
        lifespan="on",
        access_log=False,
        log_level="warning",
        server_header=False,
        proxy_headers=False,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
