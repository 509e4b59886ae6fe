"""The simulator's HTTP surface as a plain ASGI app.

Plain ASGI rather than Starlette routing because the hot path must cost next to nothing: a gateway
benchmark on a small machine runs the simulator beside the gateway, and only the gateway should
show up in the figures. It also gives direct access to `receive`, which is how a client's
disconnect is noticed while the simulated model is still "thinking".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import orjson
from starlette.types import Message, Receive, Scope, Send

from gateway_app.responses import send_bytes
from gateway_app.simulator.engine_model import GpuEngine, GpuProfile
from gateway_app.simulator.engines import EngineBehaviour, StaticResponse, engine_named
from gateway_app.simulator.errors import RequestError
from gateway_app.simulator.generation import Completion, embedding_data
from gateway_app.simulator.lora import MAX_ADAPTERS
from gateway_app.simulator.metrics import METRICS_CONTENT_TYPE, EngineMetrics
from gateway_app.simulator.protocol import GenerationRequest, parse_chat, parse_completion, parse_embedding
from gateway_app.simulator.timing import Pacing, Timing

PostHandler = Callable[[bytes, Receive, Send], Awaitable[None]]

logger = logging.getLogger(__name__)

_SSE_START: Message = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")],
}


def build_simulator_app(
    engine: str,
    model: str,
    ttft_ms: float = 0.0,
    itl_ms: float = 0.0,
    api_key: str | None = None,
    gpu: GpuProfile | None = None,
    lora_modules: dict[str, str] | None = None,
    runtime_lora: bool = False,
) -> SimulatorApp:
    """An ASGI app answering as `engine` ("vllm" or "sglang") serving `model`.

    `lora_modules` (adapter name → path) are LoRA adapters on the model, listed and answered as the
    engine does; with `runtime_lora`, adapters may be loaded and unloaded at run time.

    Tokens come at the fixed pace `ttft_ms`/`itl_ms`, or from the engine model when `gpu` is given.
    Each app has its own metrics registry and engine state, so several can run in one process. With
    `api_key`, the `/v1` routes want `Authorization: Bearer <api_key>`, as both engines do when started
    with `--api-key`.
    """
    timing: Timing = GpuEngine(gpu) if gpu is not None else Pacing(ttft_ms / 1000.0, itl_ms / 1000.0)
    return SimulatorApp(engine_named(engine), model, timing, api_key, lora_modules, runtime_lora)


class SimulatorApp:
    """One simulated engine serving one model."""

    def __init__(
        self,
        engine: EngineBehaviour,
        model: str,
        timing: Timing,
        api_key: str | None = None,
        lora_modules: dict[str, str] | None = None,
        runtime_lora: bool = False,
    ) -> None:
        self.adapters = dict(lora_modules or {})  # LoRA adapter name → where it was loaded from
        self._authorization = f"Bearer {api_key}".encode() if api_key else None
        self.engine = engine
        self.model = model
        self.timing = timing
        # The engine model counts tokens from the prompt's characters and hashes its text.
        self._with_text = timing.load is not None
        self.metrics = EngineMetrics(engine, model, timing.load)
        self._static_routes = engine.static_routes(model)
        self._post_routes: dict[str, PostHandler] = {
            "/v1/chat/completions": self._chat,
            "/v1/completions": self._completions,
            "/v1/embeddings": self._embeddings,
        }
        if runtime_lora:
            load, unload = engine.lora_update_paths
            self._post_routes[load] = self._load_adapter
            self._post_routes[unload] = self._unload_adapter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await _lifespan(receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        if self._authorization is not None and path.startswith("/v1"):
            if dict(scope["headers"]).get(b"authorization") != self._authorization:
                await _send_json(send, 401, {"error": "Unauthorized"})  # what both engines answer
                return
        post_handler = self._post_routes.get(path)
        if post_handler is not None:
            if method != "POST":
                await _method_not_allowed(send, ("POST",))
                return
            body = await _read_body(receive)
            if body is not None:  # None: the client left before sending all of it
                await post_handler(body, receive, send)
            return
        if path == "/v1/models" or path == "/metrics":
            if method != "GET":
                await _method_not_allowed(send, ("GET",))
            elif path == "/v1/models":
                await _send_json(send, 200, self.engine.model_list(self.model, self.adapters))
            else:
                await send_bytes(send, 200, self.metrics.render(), content_type=(b"content-type", METRICS_CONTENT_TYPE))
            return
        static = self._static_routes.get(path)
        if static is not None:
            await _send_static(send, method, static)
            return
        # What FastAPI, under both engines, answers for a path it does not route.
        await _send_json(send, 404, {"detail": "Not Found"})

    # --- OpenAI endpoints -----------------------------------------------------------------------

    async def _chat(self, body: bytes, receive: Receive, send: Send) -> None:
        try:
            request = parse_chat(body, self.engine, self._served(body), self._with_text)
        except RequestError as error:
            await self._send_error(send, error)
            return
        await self._generate(Completion(self.engine, request, chat=True), receive, send)

    async def _completions(self, body: bytes, receive: Receive, send: Send) -> None:
        try:
            request = parse_completion(body, self.engine, self._served(body), self._with_text)
        except RequestError as error:
            await self._send_error(send, error)
            return
        await self._generate(Completion(self.engine, request, chat=False), receive, send)

    async def _embeddings(self, body: bytes, receive: Receive, send: Send) -> None:
        try:
            request = parse_embedding(body, self.engine, self._served(body), self._with_text)
        except RequestError as error:
            await self._send_error(send, error)
            return

        async def embed() -> None:
            # An embedding costs one forward pass: it is ready when a first token would be. No text for
            # the prefix cache: pooling models do not cache prefixes.
            tracker = self.metrics.track(request.prompt_tokens, 0)
            with tracker, self.timing.schedule("", request.prompt_tokens) as schedule:
                await schedule.prefill()
                payload = self.engine.embedding_response(
                    request.response_model, embedding_data(request.inputs), request.prompt_tokens
                )
                tracker.finish()
                await _send_json(send, 200, payload)

        await self._run(embed(), receive)

    def _served(self, body: bytes) -> str:
        """The model a request is served by: the base model, or the adapter it names (body read twice only
        when there are adapters)."""
        if not self.adapters:
            return self.model
        try:
            requested = orjson.loads(body).get("model")
        except (orjson.JSONDecodeError, AttributeError):
            return self.model
        if isinstance(requested, str) and self.engine.adapter_requested(requested, self.model, self.adapters):
            return requested
        return self.model

    # --- LoRA adapters at run time --------------------------------------------------------------

    async def _load_adapter(self, body: bytes, receive: Receive, send: Send) -> None:
        fields = _lora_fields(body)
        name, path = fields.get("lora_name"), fields.get("lora_path")
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            message = "Both 'lora_name' and 'lora_path' must be provided."
            await self._send_lora(send, self.engine.lora_refused(400, message, self.adapters))
        elif name in self.adapters:
            message = f"The lora adapter '{name}' has already been loaded."
            await self._send_lora(send, self.engine.lora_refused(400, message, self.adapters))
        elif len(self.adapters) >= MAX_ADAPTERS:
            message = f"At most {MAX_ADAPTERS} adapters can be loaded."
            await self._send_lora(send, self.engine.lora_refused(400, message, self.adapters))
        else:
            self.adapters[name] = path
            await self._send_lora(send, self.engine.lora_updated(True, name, self.adapters))

    async def _unload_adapter(self, body: bytes, receive: Receive, send: Send) -> None:
        name = _lora_fields(body).get("lora_name")
        if not isinstance(name, str) or name not in self.adapters:
            message = f"The lora adapter '{name}' cannot be found."
            await self._send_lora(send, self.engine.lora_refused(404, message, self.adapters))
            return
        del self.adapters[name]
        await self._send_lora(send, self.engine.lora_updated(False, name, self.adapters))

    @staticmethod
    async def _send_lora(send: Send, answer: tuple[int, bytes, bytes]) -> None:
        status, body, content_type = answer
        await send_bytes(send, status, body, content_type=(b"content-type", content_type))

    async def _send_error(self, send: Send, error: RequestError) -> None:
        status, payload = self.engine.render_error(error)
        await _send_json(send, status, payload)

    # --- generation -----------------------------------------------------------------------------

    async def _generate(self, completion: Completion, receive: Receive, send: Send) -> None:
        if completion.request.stream:
            await self._run(self._stream(completion, send), receive)
        else:
            await self._run(self._answer(completion, send), receive)

    async def _answer(self, completion: Completion, send: Send) -> None:
        request: GenerationRequest = completion.request
        tracker = self.metrics.track(request.prompt_tokens, request.max_tokens)
        with tracker, self.timing.schedule(request.prompt_text, request.prompt_tokens) as schedule:
            await schedule.prefill()
            tracker.tokens_done(1)
            if request.max_tokens > 1:
                await schedule.decode(request.max_tokens - 1)
                tracker.tokens_done(request.max_tokens - 1)
            tracker.finish()
            await _send_json(send, 200, completion.response(schedule.cached_tokens))

    async def _stream(self, completion: Completion, send: Send) -> None:
        request: GenerationRequest = completion.request
        count = request.max_tokens
        tracker = self.metrics.track(request.prompt_tokens, count)
        with tracker, self.timing.schedule(request.prompt_text, request.prompt_tokens) as schedule:
            # Headers go out at once, as from the engines' StreamingResponse; events follow the pace.
            await send(_SSE_START)
            for index in range(count):
                if index == 0:
                    await schedule.prefill()
                else:
                    await schedule.decode(1)
                tracker.tokens_done()
                event = completion.token_event(index)
                if index == 0:
                    event = completion.opening_event() + event
                last = index == count - 1
                if last:
                    tracker.finish()
                    # The last token and what follows it are produced at the same instant: one write.
                    event += completion.closing_events(schedule.cached_tokens)
                await send({"type": "http.response.body", "body": event, "more_body": not last})

    async def _run(self, work: Coroutine[Any, Any, None], receive: Receive) -> None:
        """Run `work`, abandoning it the moment the client disconnects.

        A real engine aborts a request whose client is gone; so does the simulator, which matters to
        a gateway that cancels upstream requests and to whoever reads the running gauge. uvicorn
        reports the disconnect as an `http.disconnect` from `receive`, so that is watched
        concurrently. At zero latency `work` never waits, so there is nothing to watch.
        """
        if self.timing.instant:
            await work
            return
        work_task = asyncio.create_task(work)
        watcher = asyncio.create_task(_until_disconnect(receive))
        try:
            await asyncio.wait((work_task, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            # uvicorn also answers `receive` with http.disconnect once the response is complete, so
            # only cancel work that is still running: the client left before getting its answer.
            if not work_task.done():
                work_task.cancel()
            watcher.cancel()
        try:
            await work_task
        except asyncio.CancelledError:
            if not watcher.done() or watcher.cancelled():
                raise  # we are being cancelled ourselves, not abandoning the request
            logger.debug("client disconnected; request aborted")


def _lora_fields(body: bytes) -> dict[str, Any]:
    try:
        fields = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    return fields if isinstance(fields, dict) else {}


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _read_body(receive: Receive) -> bytes | None:
    message = await receive()
    if message["type"] == "http.disconnect":
        return None
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return body
    parts = [body]
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


async def _send_json(send: Send, status: int, payload: Any) -> None:
    await send_bytes(send, status, orjson.dumps(payload))


async def _send_static(send: Send, method: str, static: StaticResponse) -> None:
    if method not in static.methods:
        await _method_not_allowed(send, static.methods)
        return
    content_type = (b"content-type", static.content_type) if static.content_type is not None else None
    await send_bytes(send, 200, static.body, content_type=content_type)


async def _method_not_allowed(send: Send, allowed: tuple[str, ...]) -> None:
    body = orjson.dumps({"detail": "Method Not Allowed"})
    await send_bytes(send, 405, body, [(b"allow", ", ".join(allowed).encode())])


async def _lifespan(receive: Receive, send: Send) -> None:
    """Nothing to start or stop; acknowledge so that a server run with lifespan on is content."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
