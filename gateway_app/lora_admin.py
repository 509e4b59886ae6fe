"""Loading and unloading LoRA adapters through the gateway, for administrator keys only.

One request names an engine (`engine`, its name in the routing map, or `owned_by` with `model` when
several engines share it) and is sent to every replica of that engine at once: vLLM's
`/v1/load_lora_adapter` (`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`), SGLang's `/load_lora_adapter`. The
answer is 200 only when every replica took it; otherwise it names the replicas that failed and why.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import orjson

from gateway_app.auth import Client
from gateway_app.config import adapter_name_problem
from gateway_app.errors import EngineWaking, GatewayError, InvalidRequest, NotFound
from gateway_app.route_table import Engine, RouteTable
from gateway_app.upstream import read_capped
from gateway_app.waker import RETRY_AFTER_UNKNOWN

log = logging.getLogger("llm_gateway.lora_admin")

Action = Literal["load", "unload"]
ADMIN_PATHS: dict[str, Action] = {"/v1/load_lora_adapter": "load", "/v1/unload_lora_adapter": "unload"}
# The gateway's own fields of an admin request: which engine. Everything else goes to the engine.
TARGET_FIELDS = ("engine", "owned_by", "model")
MAX_REQUEST_BYTES = 64 * 1024
MAX_ANSWER_BYTES = 64 * 1024  # of each replica's answer, read to report it
MAX_MESSAGE_CHARS = 300
DEFAULT_UPDATE_TIMEOUT = 600.0  # seconds, for an engine whose first_byte timeout is off
MAX_REPLICAS_AT_ONCE = 16  # replicas of an engine sent one load or unload at the same time
# An engine that refuses the gateway's own credential: the gateway's fault (its engine key), not the client's.
CREDENTIAL_REFUSALS = frozenset({401, 403})


class AdminRequired(GatewayError):
    status = 403
    error_type = "permission_error"
    code = "admin_required"


class AdapterUpdateFailed(GatewayError):
    """Some replicas failed, or they failed in different ways: the engines' side."""

    status = 502
    error_type = "upstream_error"
    code = "adapter_update_failed"


class AdapterUpdateRefused(GatewayError):
    """Every replica refused the request alike (an adapter already loaded, an unknown one): its status."""

    error_type = "invalid_request_error"
    code = "adapter_update_failed"


@dataclass(frozen=True, slots=True)
class ReplicaOutcome:
    endpoint: str
    status: int | None  # None: no answer (connection refused, timeout)
    message: str

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def engine_path(engine: Engine, action: Action) -> str:
    """Where an engine takes the request: SGLang's paths have no /v1."""
    return f"/{action}_lora_adapter" if engine.api == "sglang" else f"/v1/{action}_lora_adapter"


def check_admin(client: Client) -> None:
    if not client.admin:
        raise AdminRequired(
            "Loading and unloading LoRA adapters needs an API key marked `admin: true` in the keys file."
        )


def parse_admin_request(body: bytes) -> dict[str, Any]:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidRequest("The request body is not valid JSON.") from None
    if not isinstance(document, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    name = document.get("lora_name")
    if not isinstance(name, str) or not name:
        raise InvalidRequest("`lora_name` (the adapter's name) is required and must be a string.", param="lora_name")
    for field in TARGET_FIELDS:
        if field in document and not isinstance(document[field], str):
            raise InvalidRequest(f"`{field}` must be a string.", param=field)
    return document


def check_adapter_name(routes: RouteTable, name: str) -> None:
    """The routing map's rules for an adapter's name, for one loaded through the gateway: no `:`, `*` or
    whitespace (SGLang's `<base>:<adapter>` and access lists' `<model>:*` must mean one thing), and not
    a model id or alias."""
    problem = adapter_name_problem(name)
    if problem is None and name in routes.model_names:
        problem = f"{name!r} is a model id or alias of the routing map; an adapter needs a name of its own"
    if problem is not None:
        raise InvalidRequest(f"`lora_name`: {problem}.", param="lora_name")


def target_engine(routes: RouteTable, document: dict[str, Any]) -> Engine:
    """The one engine an admin request names, or a 400/404 that says how to name it."""
    name, owned_by, model = (document.get(field) for field in TARGET_FIELDS)
    if name is not None:
        engine = routes.engine_named(name)
        if engine is None:
            names = ", ".join(f"`{e.name}`" for e in routes.engines)
            raise NotFound(f"There is no engine `{name}`. Engines: {names}.", param="engine", code="engine_not_found")
        candidates = [engine]
    elif owned_by is not None:
        candidates = [e for e in routes.engines if e.owned_by == owned_by and model in (None, e.model)]
        if not candidates:
            raise NotFound(
                f"No engine has owned_by `{owned_by}`" + (f" and model `{model}`." if model else "."),
                param="owned_by",
                code="engine_not_found",
            )
        if len(candidates) > 1:
            names = ", ".join(f"`{e.name}` ({e.model})" for e in candidates)
            raise InvalidRequest(
                f"owned_by `{owned_by}` names {len(candidates)} engines: {names}; add `model` (the base model) "
                "or give `engine` instead.",
                param="owned_by",
            )
    else:
        raise InvalidRequest(
            "Name the engine: `engine` (its name in the routing map), or `owned_by` (with `model` when several "
            "engines share it).",
            param="engine",
        )
    engine = candidates[0]
    if model is not None and engine.model != model:
        raise InvalidRequest(f"The engine `{engine.name}` serves `{engine.model}`, not `{model}`.", param="model")
    if engine.base_url:
        raise InvalidRequest(
            f"The engine `{engine.name}` is an OpenAI-compatible provider (`base_url`); its adapters are not "
            "loaded through the gateway.",
            param="engine",
        )
    return engine


class AdapterAdmin:
    """Sends one load or unload to every replica of an engine, and says how each answered."""

    def __init__(self, session: aiohttp.ClientSession, refresh: Callable[[], Awaitable[object]]) -> None:
        self._session = session
        self._refresh = refresh  # re-reads the engines' model lists, so discovered adapters follow at once
        # One load or unload of an adapter on an engine at a time (a load racing an unload of the same
        # adapter would leave the replicas disagreeing): its lock and how many hold or wait for it.
        self._updating: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}

    def pending_updates(self) -> dict[tuple[str, str], int]:
        """How many loads or unloads of each (engine name, adapter name) run or wait for their turn, as a copy;
        an adapter with none is absent. It lets tests and diagnostics watch the one-at-a-time rule at work
        without reaching into its locks."""
        return {key: users for key, (_, users) in self._updating.items()}

    async def update(
        self,
        action: Action,
        engine: Engine,
        document: dict[str, Any],
        engine_auth: tuple[tuple[str, str], ...],
        client: str,
    ) -> tuple[int, bytes]:
        """Status and JSON body of the gateway's answer; raises the error to answer when a replica failed."""
        payload = orjson.dumps({key: value for key, value in document.items() if key not in TARGET_FIELDS})
        headers = {**dict(engine.headers + engine.auth_headers(engine_auth)), "Content-Type": "application/json"}
        # Loading may download the adapter: as long as a whole answer may take, and never unbounded.
        total = engine.timeouts.first_byte or DEFAULT_UPDATE_TIMEOUT
        timeout = aiohttp.ClientTimeout(total=total, connect=engine.timeouts.connect)
        path = engine_path(engine, action)
        if not engine.pool.replicas:  # scaled to zero (wake.py): nothing holds adapters, nothing to wake for
            raise EngineWaking(
                f"The engine `{engine.name}` is asleep (scaled to zero): no replica to {action} the adapter on. "
                "An adapter loaded at run time lives in a replica's memory and is gone when the engine sleeps; "
                "list it in the routing map (the chart's lora.adapters) for every replica to start with it.",
                code="engine_asleep",
                retry_after=RETRY_AFTER_UNKNOWN,
            )
        name = document["lora_name"]
        key = (engine.name, name)
        lock, users = self._updating.get(key, (asyncio.Lock(), 0))
        self._updating[key] = (lock, users + 1)
        try:
            async with lock:
                outcomes = await self._send_all(engine, path, payload, headers, timeout)
        finally:
            lock, users = self._updating[key]
            if users == 1:
                del self._updating[key]
            else:
                self._updating[key] = (lock, users - 1)
        done = [outcome for outcome in outcomes if outcome.ok]
        log.info(
            "LoRA adapter %s: %s on engine %s by %s succeeded on %d of %d replicas",
            name,
            action,
            engine.name,
            client,
            len(done),
            len(outcomes),
        )
        if done:
            try:
                await self._refresh()
            except Exception:  # the update itself is done; the lists are read again on the next round anyway
                log.exception("reading the engines' model lists after a LoRA update failed")
        if len(done) == len(outcomes):
            report = [{"endpoint": o.endpoint, "status": o.status, "message": o.message} for o in outcomes]
            answer = {"object": "lora_adapter_update", "action": action, "lora_name": name, "engine": engine.name}
            return 200, orjson.dumps({**answer, "replicas": report})
        raise _failure(action, name, engine, outcomes)

    async def _send_all(
        self, engine: Engine, path: str, payload: bytes, headers: dict[str, str], timeout: aiohttp.ClientTimeout
    ) -> list[ReplicaOutcome]:
        """Every replica's outcome, at most MAX_REPLICAS_AT_ONCE asked at a time."""
        bound = asyncio.Semaphore(MAX_REPLICAS_AT_ONCE)

        async def send(url: str) -> ReplicaOutcome:
            async with bound:
                return await self._send(url, path, payload, headers, timeout)

        return list(await asyncio.gather(*(send(replica.url) for replica in engine.pool.replicas)))

    async def _send(
        self, replica: str, path: str, payload: bytes, headers: dict[str, str], timeout: aiohttp.ClientTimeout
    ) -> ReplicaOutcome:
        try:
            async with self._session.post(replica + path, data=payload, headers=headers, timeout=timeout) as answer:
                return ReplicaOutcome(replica, answer.status, _message(await read_capped(answer, MAX_ANSWER_BYTES)))
        except (aiohttp.ClientError, TimeoutError) as exc:
            return ReplicaOutcome(replica, None, f"no answer ({str(exc) or type(exc).__name__})")


def _message(raw: bytes | None) -> str:
    """What an engine said, in one short line: vLLM answers plain text or an OpenAI error, SGLang a JSON
    object with `error_message`."""
    if raw is None:
        return "an answer too large to report"
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            text = error["message"]
        elif isinstance(data.get("error_message"), str):
            text = data["error_message"]
        elif isinstance(data.get("message"), str):
            text = data["message"]
    text = " ".join(text.split())
    return text[:MAX_MESSAGE_CHARS] + ("..." if len(text) > MAX_MESSAGE_CHARS else "")


def _failure(action: Action, name: str, engine: Engine, outcomes: list[ReplicaOutcome]) -> GatewayError:
    failed = [o for o in outcomes if not o.ok]
    done = [o.endpoint for o in outcomes if o.ok]
    described = "; ".join(
        f"{o.endpoint} ({o.status}: {o.message})" if o.status is not None else f"{o.endpoint} ({o.message})"
        for o in failed
    )
    message = (
        f"{action.capitalize()}ing adapter `{name}` on engine `{engine.name}` failed on {len(failed)} of "
        f"{len(outcomes)} replicas: {described}." + (f" It succeeded on: {', '.join(done)}." if done else "")
    )
    statuses = {o.status for o in failed}
    if not done and len(statuses) == 1:
        status = statuses.pop()
        if status in CREDENTIAL_REFUSALS:  # the engine refused the gateway's key, not the client's request
            return AdapterUpdateFailed(
                message + " The engine refused the gateway's credential (check --engine-api-key-file)."
            )
        if status is not None and 400 <= status < 500:  # every replica refused it alike: the request's fault
            return AdapterUpdateRefused(message, status=status, param="lora_name")
    return AdapterUpdateFailed(message)
