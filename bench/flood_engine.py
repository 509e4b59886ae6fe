"""A hostile engine for attacks.py: it answers every completion with a body that never ends.

It stands for a third-party engine gone wrong (or taken over), not for our simulator, so it runs in a
process of its own. Two ports, one per behaviour, so that the gateway sees two engines:

  length  200, `Content-Length: 4000000000`, then bytes as fast as the socket takes them;
  503     503 and an endless chunked body.

Both answer `/health` and `/v1/models` like an engine, so the gateway keeps routing to them. What it
sent is written to `--stats` (JSON) every half second and on SIGTERM, after which it exits at once.

    .venv/bin/python bench/flood_engine.py --length-port 9001 --unavailable-port 9002 --stats PATH
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time
from pathlib import Path

from aiohttp import web
from load import run_client

DECLARED_LENGTH = 4_000_000_000
CHUNK = b"x" * (1 << 20)
STATS_EVERY_S = 0.5


class Flood:
    """Both behaviours, and what they sent."""

    def __init__(self) -> None:
        self.stats = {"length": {"requests": 0, "bytes": 0}, "503": {"requests": 0, "bytes": 0}}

    async def answer(self, request: web.Request, mode: str) -> web.StreamResponse:
        await request.read()
        counts = self.stats[mode]
        counts["requests"] += 1
        response = web.StreamResponse(
            status=200 if mode == "length" else 503, headers={"Content-Type": "application/json"}
        )
        if mode == "length":
            response.content_length = DECLARED_LENGTH
        else:
            response.enable_chunked_encoding()
        await response.prepare(request)
        limit = DECLARED_LENGTH if mode == "length" else None
        sent = 0
        try:
            while limit is None or sent + len(CHUNK) <= limit:
                await response.write(CHUNK)
                sent += len(CHUNK)
                counts["bytes"] += len(CHUNK)
        except (ConnectionError, OSError):
            pass  # the gateway hung up: the point of the exercise
        return response

    def app(self, mode: str) -> web.Application:
        async def flood(request: web.Request) -> web.StreamResponse:
            return await self.answer(request, mode)

        async def health(request: web.Request) -> web.Response:
            return web.json_response({})

        async def models(request: web.Request) -> web.Response:
            return web.json_response(
                {"object": "list", "data": [{"id": f"flood-{mode}", "object": "model", "owned_by": "vllm"}]}
            )

        app = web.Application()
        app.router.add_get("/health", health)
        app.router.add_get("/v1/models", models)
        app.router.add_post("/{path:.*}", flood)
        return app


async def serve(length_port: int, unavailable_port: int, stats_path: Path) -> None:
    flood = Flood()
    runners = [web.AppRunner(flood.app(mode)) for mode in ("length", "503")]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    for runner, port in zip(runners, (length_port, unavailable_port), strict=False):
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
    while not stop.is_set():
        stats_path.write_text(json.dumps({**flood.stats, "at": time.time()}))
        try:
            await asyncio.wait_for(stop.wait(), STATS_EVERY_S)
        except TimeoutError:
            pass
    stats_path.write_text(json.dumps({**flood.stats, "at": time.time()}))
    # Cut every answer mid-body, as a crashing engine would: ending them cleanly would hand the gateway
    # a complete (huge) body to process after the bench asked the attack to stop.
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length-port", type=int, required=True)
    parser.add_argument("--unavailable-port", type=int, required=True)
    parser.add_argument("--stats", type=Path, required=True)
    args = parser.parse_args()
    run_client(serve(args.length_port, args.unavailable_port, args.stats))


if __name__ == "__main__":
    main()
