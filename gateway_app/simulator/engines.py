"""Everything that differs between the engines the simulator imitates, one class per engine.

A gateway in front of real engines sees these differences (error shapes, usage-chunk defaults, metric
names), so the simulator must reproduce them; a new engine version means editing one class here.
Sources: vLLM `vllm/entrypoints/openai/*` and `entrypoints/serve/utils/server_utils.py`,
`vllm/v1/metrics/loggers.py`; SGLang `srt/entrypoints/openai/{protocol,serving_chat}.py`,
`srt/entrypoints/http_server.py`, `srt/metrics/collector.py`.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson

from gateway_app.simulator.errors import ErrorKind, RequestError

# What /v1/models reports; the simulator refuses prompt + max_tokens beyond it, as the engines do.
MAX_MODEL_LEN = 4096


@dataclass(frozen=True)
class MetricNames:
    """Prometheus names of the series a load-aware gateway reads.

    Counters are named without `_total`: prometheus_client appends it on exposition, so the
    Counter `vllm:prompt_tokens` is scraped as `vllm:prompt_tokens_total`, as from vLLM itself.
    """

    running: str
    waiting: str
    kv_cache_usage: str
    prompt_tokens: str
    generation_tokens: str
    time_to_first_token: str
    inter_token_latency: str
    e2e_latency: str
    ttft_buckets: tuple[float, ...]
    itl_buckets: tuple[float, ...]
    e2e_buckets: tuple[float, ...]
    # Prefix cache: vLLM counts tokens looked up and tokens found (counters), SGLang reports a hit rate.
    prefix_cache_queries: str | None = None
    prefix_cache_hits: str | None = None
    cache_hit_rate: str | None = None


@dataclass(frozen=True)
class StaticResponse:
    """A fixed answer for an info endpoint (`/version`, `/get_model_info`...)."""

    body: bytes
    content_type: bytes | None = b"application/json"
    methods: tuple[str, ...] = ("GET",)

    @classmethod
    def json(cls, payload: Any, methods: tuple[str, ...] = ("GET",)) -> StaticResponse:
        return cls(orjson.dumps(payload), b"application/json", methods)

    @classmethod
    def empty(cls, methods: tuple[str, ...] = ("GET",)) -> StaticResponse:
        # Both engines answer /health with an empty 200 and no content type (Starlette `Response()`).
        return cls(b"", None, methods)


class EngineBehaviour:
    """The behaviour both engines share; each subclass overrides what its engine does differently."""

    name: ClassVar[str]
    version: ClassVar[str]
    metric_names: ClassVar[MetricNames]
    # Per-choice field reporting which stop sequence ended the generation.
    stop_field: ClassVar[str]
    # SGLang's chat stream ends with a separate empty-delta chunk carrying finish_reason; vLLM puts
    # finish_reason on the chunk carrying the last token.
    chat_finish_in_own_chunk: ClassVar[bool] = False

    # --- requests -------------------------------------------------------------------------------

    def accepts_model(self, requested: str | None, served: str) -> bool:
        """Whether `model` in a request body selects the served model (a missing one does)."""
        return requested is None or requested == served

    def response_model(self, requested: str | None, served: str) -> str:
        """The `model` echoed in responses."""
        return served

    def include_usage(self, stream_options: dict[str, Any] | None) -> bool:
        """Whether a stream ends with a usage chunk."""
        raise NotImplementedError

    def check_stream_options(self, body: dict[str, Any]) -> None:
        """Refuse `stream_options` where the engine does (only vLLM refuses any)."""

    def check_messages(self, messages: list[Any]) -> None:
        """Refuse a message list the engine refuses beyond its schema."""

    def max_tokens_error(self, value: int) -> RequestError:
        raise NotImplementedError

    def context_length_error(self, prompt_tokens: int, max_tokens: int) -> RequestError:
        raise NotImplementedError

    # --- responses ------------------------------------------------------------------------------

    def render_error(self, error: RequestError) -> tuple[int, dict[str, Any]]:
        """Status code and JSON body of a refusal, in this engine's shape."""
        raise NotImplementedError

    def usage(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict[str, Any]:
        """`cached_tokens`: the prompt tokens found in the prefix cache, None when nothing reports them."""
        return {
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens,
            "prompt_tokens_details": self.prompt_tokens_details(cached_tokens),
        }

    def prompt_tokens_details(self, cached_tokens: int | None) -> dict[str, int] | None:
        raise NotImplementedError

    def chat_message(self, text: str) -> dict[str, Any]:
        """The `message` of a non-streaming chat choice."""
        raise NotImplementedError

    def response_extras(self) -> dict[str, Any]:
        """Top-level fields the engine adds to non-streaming chat and completion responses."""
        return {}

    def embedding_response(self, model: str, data: list[dict[str, Any]], prompt_tokens: int) -> dict[str, Any]:
        raise NotImplementedError

    def model_card(self, model: str, created: int) -> dict[str, Any]:
        return {
            "id": model,
            "object": "model",
            "created": created,
            "owned_by": self.name,
            "root": model,
            "parent": None,
            "max_model_len": MAX_MODEL_LEN,
        }

    def model_list(self, model: str, adapters: dict[str, str] | None = None) -> dict[str, Any]:
        # Both engines build the card on each call, so `created` is the time of the request.
        created = int(time.time())
        cards = [self.model_card(model, created)]
        cards += [self.adapter_card(name, path, model, created) for name, path in (adapters or {}).items()]
        return {"object": "list", "data": cards}

    # --- LoRA adapters --------------------------------------------------------------------------

    def adapter_card(self, name: str, path: str, base_model: str, created: int) -> dict[str, Any]:
        """An adapter's card: its name, where it was loaded from (`root`), the base model (`parent`)."""
        return {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": self.name,
            "root": path,
            "parent": base_model,
            "max_model_len": None,
        }

    def adapter_requested(self, requested: str, served: str, adapters: dict[str, str]) -> bool:
        """Whether a request's `model` selects one of the loaded adapters."""
        return requested in adapters

    lora_update_paths: ClassVar[tuple[str, str]] = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")

    def lora_updated(self, loaded: bool, name: str, adapters: dict[str, str]) -> tuple[int, bytes, bytes]:
        """Status, body and content type of a successful load (`loaded`) or unload."""
        raise NotImplementedError

    def lora_refused(self, status: int, message: str, adapters: dict[str, str]) -> tuple[int, bytes, bytes]:
        raise NotImplementedError

    def static_routes(self, model: str) -> dict[str, StaticResponse]:
        """Info endpoints answered with a fixed body, by path."""
        return {"/health": StaticResponse.empty()}

    def metric_labels(self, model: str) -> dict[str, str]:
        return {"model_name": model}


class Vllm(EngineBehaviour):
    """vLLM 0.10–0.12 (V1 engine, OpenAI-compatible server)."""

    name = "vllm"
    version = "0.12.0"
    stop_field = "stop_reason"
    # fmt: off
    metric_names = MetricNames(
        running="vllm:num_requests_running",
        waiting="vllm:num_requests_waiting",
        kv_cache_usage="vllm:kv_cache_usage_perc",
        prompt_tokens="vllm:prompt_tokens",
        generation_tokens="vllm:generation_tokens",
        time_to_first_token="vllm:time_to_first_token_seconds",
        inter_token_latency="vllm:inter_token_latency_seconds",
        e2e_latency="vllm:e2e_request_latency_seconds",
        ttft_buckets=(0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                      7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0),
        itl_buckets=(0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                     10.0, 20.0, 40.0, 80.0),
        e2e_buckets=(0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                     120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0),
        prefix_cache_queries="vllm:prefix_cache_queries",
        prefix_cache_hits="vllm:prefix_cache_hits",
    )
    # fmt: on

    def include_usage(self, stream_options: dict[str, Any] | None) -> bool:
        # vLLM's StreamOptions.include_usage defaults to True, so any `stream_options` object, even
        # `{}`, asks for usage; an explicit false or null does not (`should_include_usage`).
        if stream_options is None:
            return False
        return bool(stream_options.get("include_usage", True))

    def check_stream_options(self, body: dict[str, Any]) -> None:
        # `validate_stream_options`: a truthy stream_options (so not `{}`) needs stream=true.
        if body.get("stream_options") and not body.get("stream"):
            raise RequestError.validation(
                ("body",),
                "Value error, Stream options can only be defined when `stream=True`. (parameter=stream_options)",
                "value_error",
            )

    def max_tokens_error(self, value: int) -> RequestError:
        return RequestError.invalid_value(
            f"max_tokens must be at least 1, got {value}. (parameter=max_tokens, value={value})",
            param="max_tokens",
        )

    def context_length_error(self, prompt_tokens: int, max_tokens: int) -> RequestError:
        return RequestError.invalid_value(
            f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's maximum "
            f"context length is {MAX_MODEL_LEN} tokens and your request has {prompt_tokens} input tokens "
            f"({max_tokens} > {MAX_MODEL_LEN} - {prompt_tokens}).",
            param="max_tokens",
        )

    def prompt_tokens_details(self, cached_tokens: int | None) -> dict[str, int] | None:
        # As vLLM run with --enable-prompt-tokens-details: reported only when some tokens were cached.
        return {"cached_tokens": cached_tokens} if cached_tokens else None

    def render_error(self, error: RequestError) -> tuple[int, dict[str, Any]]:
        param: str | None
        if error.kind is ErrorKind.UNKNOWN_MODEL:
            status, message, kind = 404, f"The model `{error.message}` does not exist.", "NotFoundError"
            param = "model"
        elif error.kind is ErrorKind.VALIDATION:
            # server_utils.validation_exception_handler: type is the status phrase, param the field path.
            status, message, kind = 400, f"1 validation error:\n  {error.pydantic_record()}", "Bad Request"
            param = error.param or ".".join(str(part) for part in error.loc)
        else:
            status, message, kind, param = 400, error.message, "BadRequestError", error.param
        return status, {"error": {"message": message, "type": kind, "param": param, "code": status}}

    def chat_message(self, text: str) -> dict[str, Any]:
        return {
            "role": "assistant",
            "content": text,
            "refusal": None,
            "annotations": None,
            "audio": None,
            "function_call": None,
            "tool_calls": [],
            "reasoning_content": None,
        }

    def response_extras(self) -> dict[str, Any]:
        return {"service_tier": None, "system_fingerprint": None, "prompt_logprobs": None, "kv_transfer_params": None}

    def embedding_response(self, model: str, data: list[dict[str, Any]], prompt_tokens: int) -> dict[str, Any]:
        return {
            "id": f"embd-{uuid.uuid4().hex}",
            "object": "list",
            "created": int(time.time()),
            "model": model,
            "data": data,
            "usage": self.usage(prompt_tokens, 0),
        }

    def model_card(self, model: str, created: int) -> dict[str, Any]:
        card = super().model_card(model, created)
        card["permission"] = [
            {
                "id": f"modelperm-{uuid.uuid4().hex}",
                "object": "model_permission",
                "created": created,
                "allow_create_engine": False,
                "allow_sampling": True,
                "allow_logprobs": True,
                "allow_search_indices": False,
                "allow_view": True,
                "allow_fine_tuning": False,
                "organization": "*",
                "group": None,
                "is_blocking": False,
            }
        ]
        return card

    def adapter_card(self, name: str, path: str, base_model: str, created: int) -> dict[str, Any]:
        card = super().adapter_card(name, path, base_model, created)
        card["permission"] = self.model_card(name, created)["permission"]
        return card

    def lora_updated(self, loaded: bool, name: str, adapters: dict[str, str]) -> tuple[int, bytes, bytes]:
        # OpenAIServingModels answers a plain sentence with status 200.
        verb = "added" if loaded else "removed"
        return 200, f"Success: LoRA adapter '{name}' {verb} successfully.".encode(), b"text/plain; charset=utf-8"

    def lora_refused(self, status: int, message: str, adapters: dict[str, str]) -> tuple[int, bytes, bytes]:
        kind = "NotFoundError" if status == 404 else "BadRequestError"
        body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
        return status, orjson.dumps(body), b"application/json"

    def static_routes(self, model: str) -> dict[str, StaticResponse]:
        return {
            **super().static_routes(model),
            "/ping": StaticResponse.empty(methods=("GET", "POST")),
            "/version": StaticResponse.json({"version": self.version}),
        }

    def metric_labels(self, model: str) -> dict[str, str]:
        # vLLM V1 labels every series with the served model and the engine index.
        return {"model_name": model, "engine": "0"}


class Sglang(EngineBehaviour):
    """SGLang 0.5.x (`python -m sglang.launch_server`)."""

    name = "sglang"
    version = "0.5.6"
    stop_field = "matched_stop"
    chat_finish_in_own_chunk = True
    # The `model` SGLang's request models default to when a body has none.
    default_model_name = "default"
    # fmt: off
    metric_names = MetricNames(
        running="sglang:num_running_reqs",
        waiting="sglang:num_queue_reqs",
        kv_cache_usage="sglang:token_usage",
        prompt_tokens="sglang:prompt_tokens",
        generation_tokens="sglang:generation_tokens",
        time_to_first_token="sglang:time_to_first_token_seconds",
        inter_token_latency="sglang:inter_token_latency_seconds",
        e2e_latency="sglang:e2e_request_latency_seconds",
        ttft_buckets=(0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0,
                      200.0, 400.0),
        itl_buckets=(0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.025, 0.03, 0.035, 0.04, 0.06, 0.08,
                     0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0),
        e2e_buckets=(0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0,
                     200.0, 400.0, 800.0),
        cache_hit_rate="sglang:cache_hit_rate",
    )
    # fmt: on

    def accepts_model(self, requested: str | None, served: str) -> bool:
        # Real SGLang 0.5.x serves any `model` (sglang#7035, #31404); the simulator refuses a foreign
        # one so that a misrouting gateway fails loudly in tests. The "default" sentinel is accepted.
        return requested is None or requested in (served, self.default_model_name)

    def response_model(self, requested: str | None, served: str) -> str:
        # SGLang echoes the request's `model`, which defaults to "default".
        return requested if requested is not None else self.default_model_name

    def adapter_requested(self, requested: str, served: str, adapters: dict[str, str]) -> bool:
        # On its OpenAI routes SGLang takes `<base>:<adapter>`, split at the first ':' as SGLang does (a
        # base model with a ':' in its name cannot name an adapter); a bare adapter name is just another
        # `model` to it (it would run the base model), which the simulator refuses like any foreign one.
        base, colon, name = requested.partition(":")
        return bool(colon) and base == served and name in adapters

    lora_update_paths = ("/load_lora_adapter", "/unload_lora_adapter")

    def lora_updated(self, loaded: bool, name: str, adapters: dict[str, str]) -> tuple[int, bytes, bytes]:
        body = {"success": True, "error_message": None, "loaded_adapters": adapters}
        return 200, orjson.dumps(body), b"application/json"

    def lora_refused(self, status: int, message: str, adapters: dict[str, str]) -> tuple[int, bytes, bytes]:
        # LoadLoRAAdapterReqOutput with success false, answered 400 whatever went wrong.
        body = {"success": False, "error_message": message, "loaded_adapters": adapters}
        return 400, orjson.dumps(body), b"application/json"

    def include_usage(self, stream_options: dict[str, Any] | None) -> bool:
        # StreamOptions.include_usage defaults to False and --stream-response-default-include-usage is
        # off by default: usage only when asked for explicitly.
        return stream_options is not None and bool(stream_options.get("include_usage"))

    def check_messages(self, messages: list[Any]) -> None:
        if not messages:
            raise RequestError.invalid_value("Messages cannot be empty.")

    def max_tokens_error(self, value: int) -> RequestError:
        # CompletionRequest's field validator; pydantic reports it as a validation error.
        return RequestError.validation(
            ("body", "max_tokens"), "Value error, max_tokens must be positive", "value_error"
        )

    def context_length_error(self, prompt_tokens: int, max_tokens: int) -> RequestError:
        return RequestError.invalid_value(
            f"Requested token count exceeds the model's maximum context length of {MAX_MODEL_LEN} tokens. "
            f"You requested a total of {prompt_tokens + max_tokens} tokens: {prompt_tokens} tokens from the "
            f"input messages and {max_tokens} tokens for the completion. Please reduce the number of tokens "
            "in the input messages or the completion to fit within the limit."
        )

    def render_error(self, error: RequestError) -> tuple[int, dict[str, Any]]:
        if error.kind is ErrorKind.UNKNOWN_MODEL:
            # The body SGLang's own /v1/models/{model} returns for a model it does not serve.
            return 404, {
                "error": {
                    "message": f"The model '{error.message}' does not exist",
                    "type": "invalid_request_error",
                    "param": "model",
                    "code": "model_not_found",
                }
            }
        if error.kind is ErrorKind.VALIDATION:
            # http_server.validation_exception_handler: flat ErrorResponse, type "Bad Request", no param.
            message, kind = f"[{error.pydantic_record()}]", "Bad Request"
        else:
            message, kind = error.message, "BadRequestError"
        return 400, {"object": "error", "message": message, "type": kind, "param": None, "code": 400}

    def usage(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict[str, Any]:
        return {**super().usage(prompt_tokens, completion_tokens, cached_tokens), "reasoning_tokens": 0}

    def prompt_tokens_details(self, cached_tokens: int | None) -> dict[str, int] | None:
        # As SGLang run with --enable-cache-report: reported on every answer, zero included.
        return None if cached_tokens is None else {"cached_tokens": cached_tokens}

    def chat_message(self, text: str) -> dict[str, Any]:
        return {"role": "assistant", "content": text, "reasoning_content": None, "tool_calls": None}

    def response_extras(self) -> dict[str, Any]:
        return {"metadata": {"weight_version": "default"}}

    def embedding_response(self, model: str, data: list[dict[str, Any]], prompt_tokens: int) -> dict[str, Any]:
        return {"data": data, "model": model, "object": "list", "usage": self.usage(prompt_tokens, 0)}

    def static_routes(self, model: str) -> dict[str, StaticResponse]:
        model_info = StaticResponse.json(
            {
                "model_path": model,
                "tokenizer_path": model,
                "is_generation": True,
                "preferred_sampling_params": None,
                "weight_version": "default",
                "has_image_understanding": False,
                "has_audio_understanding": False,
                "model_type": None,
                "architectures": None,
            }
        )
        return {
            **super().static_routes(model),
            "/health_generate": StaticResponse.empty(),
            "/get_model_info": model_info,
            "/model_info": model_info,
        }


ENGINES: dict[str, EngineBehaviour] = {engine.name: engine for engine in (Vllm(), Sglang())}


def engine_named(name: str) -> EngineBehaviour:
    try:
        return ENGINES[name]
    except KeyError:
        raise ValueError(f"unknown engine {name!r}; expected one of {sorted(ENGINES)}") from None
