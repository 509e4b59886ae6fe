"""An OpenAI-ish engine on loopback that records what it receives, to see exactly what the gateway sends.

It stands in for a third-party engine (not for any part of the gateway), runs a real aiohttp server in
a thread, and answers with fixed bytes so that the test can compare them with what the client got.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiohttp import web

from tests.background_server import BackgroundServer

FIXED_ANSWER = b'{"id":"x","object":"chat.completion","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}'
STREAM_EVENTS = [
    b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n',
    b'data: {"choices":[{"delta":{"content":"b"}}]}\n\n',
    b"data: [DONE]\n\n",
]


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


async def _stalled_json(request: web.Request) -> web.StreamResponse:
    """A chunked JSON answer that stops half-way: not SSE, so nothing can be said in-band."""
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    await response.write(b'{"id": "x", "choices": [')
    await asyncio.sleep(30)
    return response


async def _stalled_mid_event(request: web.Request) -> web.StreamResponse:
    """An SSE stream that stops in the middle of an event (its media type as the test asks, if it does)."""
    response = web.StreamResponse(
        headers={"Content-Type": request.headers.get("X-Test-Content-Type", "text/event-stream")}
    )
    await response.prepare(request)
    await response.write(b'data: {"choices": [{"delta": {"content": "a"}}]}\n\ndata: {"choices": [{"del')
    await asyncio.sleep(30)
    return response


BIG_EVENT = b"data: " + b"x" * (512 * 1024) + b"\n\n"


async def _big_fast_stream(request: web.Request) -> web.StreamResponse:
    """Eight 512 KiB events at once: a client that does not read makes the gateway wait on it."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for _ in range(8):
        await response.write(BIG_EVENT)
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def _never_answers(request: web.Request) -> web.StreamResponse:
    await asyncio.sleep(30)
    return web.Response(status=500)


SCENARIOS = {
    "stalled-json": _stalled_json,
    "stalled-mid-event": _stalled_mid_event,
    "big-fast-stream": _big_fast_stream,
    "never-answers": _never_answers,
}


@dataclass
class RecordingEngine:
    url: str = ""
    received: list[Received] = field(default_factory=list)
    fail_with: int | None = None  # answer requests with this status ...
    fail_health: bool = True  # ... /health included, unless this is False
    models: list[str] = field(default_factory=list)  # ids its GET /v1/models lists (else answered as any path)
    extra_cards: list[dict] = field(default_factory=list)  # more cards it lists after those (LoRA adapters)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(Received(request.path, dict(request.headers), body))
        if self.fail_with is not None and (self.fail_health or request.path != "/health"):
            return web.json_response({"error": {"message": "failing on purpose"}}, status=self.fail_with)
        if request.path.endswith("/v1/models") and self.models:  # at a provider's base path too
            cards = [{"id": model, "object": "model", "owned_by": "vllm"} for model in self.models]
            cards += list(self.extra_cards)
            return web.json_response({"object": "list", "data": cards})
        scenario = request.headers.get("X-Test-Scenario", "")
        if scenario:
            return await SCENARIOS[scenario](request)
        if b'"stream": true' in body or b'"stream":true' in body:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for event in STREAM_EVENTS:
                await response.write(event)
            await response.write_eof()
            return response
        return web.Response(
            body=FIXED_ANSWER,
            content_type="application/json",
            headers={"X-Engine-Own": "yes", "Keep-Alive": "timeout=5", "X-Hop": "engine-only", "Connection": "X-Hop"},
        )

    def start(self) -> RecordingEngine:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._server = BackgroundServer(app).start()
        self.url = self._server.url
        return self

    def stop(self) -> None:
        self._server.stop()
