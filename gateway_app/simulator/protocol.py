"""Reading OpenAI request bodies the way the engines do: the checks that decide 200 or 4xx.

Only what changes the answer is checked (types of the fields the simulator uses, the model, the
token budget); everything else in a body is accepted and ignored, as the engines ignore most knobs.
Checks run in the engines' order: schema first, then the model, then values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from gateway_app.simulator.engines import MAX_MODEL_LEN, EngineBehaviour
from gateway_app.simulator.errors import RequestError

# Tokens generated when a request sets no max_tokens; the "model" then stops by itself.
DEFAULT_MAX_TOKENS = 16
# Chat-template tokens a message costs besides its words (role markers, separators), in the fixed timing.
TOKENS_PER_MESSAGE = 4
# The engine model's tokenizer: a token is 4 characters of the prompt as the model sees it (English text
# averages about that with the Llama and GPT tokenizers), so that prefixes can be hashed block by block.
CHARS_PER_TOKEN = 4


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """A chat or text completion request, reduced to what shapes the answer."""

    response_model: str
    prompt_tokens: int
    max_tokens: int
    # "length" when the client's max_tokens cut the answer, "stop" when the model ended it.
    finish_reason: str
    stream: bool
    include_usage: bool
    # The prompt as the model sees it (chat template applied), kept only for the engine model.
    prompt_text: str = ""


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    response_model: str
    inputs: list[str]
    prompt_tokens: int


def approximate_tokens(text: str) -> int:
    """The engine model's token count: `CHARS_PER_TOKEN` characters a token, rounded up."""
    return -(-len(text) // CHARS_PER_TOKEN)


def render_chat(messages: list[dict[str, Any]]) -> str:
    """The prompt a chat template would make of `messages`: `<|role|>text<|end|>` each, then the
    assistant's turn. Only the shape matters: equal leading messages render to an equal prefix."""
    turns = [f"<|{message['role']}|>{_text(message.get('content'))}<|end|>" for message in messages]
    return "".join(turns) + "<|assistant|>"


def parse_chat(raw: bytes, engine: EngineBehaviour, served_model: str, with_text: bool = False) -> GenerationRequest:
    """`with_text`: render the prompt and count its tokens from its characters, for the engine model;
    otherwise count words, which costs next to nothing."""
    body = _json_object(raw)
    messages = body.get("messages")
    if "messages" not in body:
        raise RequestError.validation(("body", "messages"), "Field required", "missing")
    if not isinstance(messages, list):
        raise RequestError.validation(("body", "messages"), "Input should be a valid list", "list_type")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError.validation(
                ("body", "messages", index), "Input should be a message object with a string 'role'", "model_type"
            )
    requested_model = _model(body)
    requested_max = _optional_int(body, "max_completion_tokens")
    if requested_max is None:
        requested_max = _optional_int(body, "max_tokens")
    stream, stream_options = _streaming(body, engine)
    _check_model(engine, requested_model, served_model)
    engine.check_messages(messages)
    if with_text:
        text = render_chat(messages)
        prompt_tokens = approximate_tokens(text)
    else:
        text = ""
        prompt_tokens = sum(_words(message.get("content")) + TOKENS_PER_MESSAGE for message in messages)
    return _generation(
        engine, served_model, requested_model, max(prompt_tokens, 1), requested_max, stream, stream_options, text
    )


def parse_completion(
    raw: bytes, engine: EngineBehaviour, served_model: str, with_text: bool = False
) -> GenerationRequest:
    body = _json_object(raw)
    prompts = _text_inputs(body, "prompt")
    requested_model = _model(body)
    requested_max = _optional_int(body, "max_tokens")
    stream, stream_options = _streaming(body, engine)
    _check_model(engine, requested_model, served_model)
    # A list of prompts is answered as one generation whose prompt is all of them.
    if with_text:
        text = "".join(prompts)
        prompt_tokens = approximate_tokens(text)
    else:
        text = ""
        prompt_tokens = sum(_words(prompt) for prompt in prompts)
    return _generation(
        engine, served_model, requested_model, max(prompt_tokens, 1), requested_max, stream, stream_options, text
    )


def parse_embedding(
    raw: bytes, engine: EngineBehaviour, served_model: str, with_text: bool = False
) -> EmbeddingRequest:
    body = _json_object(raw)
    inputs = _text_inputs(body, "input")
    requested_model = _model(body)
    _check_model(engine, requested_model, served_model)
    count = approximate_tokens if with_text else _words
    prompt_tokens = sum(max(count(text), 1) for text in inputs)
    return EmbeddingRequest(engine.response_model(requested_model, served_model), inputs, prompt_tokens)


def _generation(
    engine: EngineBehaviour,
    served_model: str,
    requested_model: str | None,
    prompt_tokens: int,
    requested_max: int | None,
    stream: bool,
    stream_options: dict[str, Any] | None,
    prompt_text: str,
) -> GenerationRequest:
    if requested_max is not None and requested_max < 1:
        raise engine.max_tokens_error(requested_max)
    max_tokens = DEFAULT_MAX_TOKENS if requested_max is None else requested_max
    if prompt_tokens + max_tokens > MAX_MODEL_LEN:
        raise engine.context_length_error(prompt_tokens, max_tokens)
    return GenerationRequest(
        response_model=engine.response_model(requested_model, served_model),
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        finish_reason="stop" if requested_max is None else "length",
        stream=stream,
        include_usage=stream and engine.include_usage(stream_options),
        prompt_text=prompt_text,
    )


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise RequestError.validation(("body", 0), "JSON decode error", "json_invalid") from None
    if not isinstance(body, dict):
        raise RequestError.validation(
            ("body",), "Input should be a valid dictionary or object to extract fields from", "model_attributes_type"
        )
    return body


def _model(body: dict[str, Any]) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError.validation(("body", "model"), "Input should be a valid string", "string_type")
    return model


def _check_model(engine: EngineBehaviour, requested: str | None, served: str) -> None:
    if not engine.accepts_model(requested, served):
        raise RequestError.unknown_model(requested or "")


def _optional_int(body: dict[str, Any], field: str) -> int | None:
    value = body.get(field)
    # bool is an int subclass in Python but not in JSON Schema: refuse `true` as a token count.
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise RequestError.validation(("body", field), "Input should be a valid integer", "int_type")


def _streaming(body: dict[str, Any], engine: EngineBehaviour) -> tuple[bool, dict[str, Any] | None]:
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise RequestError.validation(("body", "stream"), "Input should be a valid boolean", "bool_type")
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise RequestError.validation(
            ("body", "stream_options"), "Input should be a valid dictionary or object", "model_type"
        )
    engine.check_stream_options(body)
    return bool(stream), stream_options


def _text_inputs(body: dict[str, Any], field: str) -> list[str]:
    """A `prompt`/`input` as a list of texts: str, list[str], list[int] or list[list[int]]."""
    if field not in body:
        raise RequestError.validation(("body", field), "Field required", "missing")
    value = body[field]
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(item, str) for item in value):
            return value
        if all(_is_token_ids(item) for item in value):
            return [" ".join(map(str, item)) for item in value]
        if _is_token_ids(value):
            return [" ".join(map(str, value))]
    raise RequestError.validation(
        ("body", field), "Input should be a string, a list of strings or a list of token ids", "union_type"
    )


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(type(item) is int for item in value)


def _words(content: Any) -> int:
    """A cheap token count: whitespace-separated words, text parts of multimodal content included."""
    if isinstance(content, str):
        return len(content.split())
    if isinstance(content, list):
        texts = (part.get("text") for part in content if isinstance(part, dict))
        return sum(len(text.split()) for text in texts if isinstance(text, str))
    return 0


def _text(content: Any) -> str:
    """A message's text: the string, or the text parts of multimodal content joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = (part.get("text") for part in content if isinstance(part, dict))
        return "".join(text for text in texts if isinstance(text, str))
    return ""
