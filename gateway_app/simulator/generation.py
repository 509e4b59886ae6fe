"""The simulated model's (deterministic) words, and the bodies and SSE events carrying them.

Rendering is shared by both engines; what differs (extra fields, where finish_reason goes) comes
from the `EngineBehaviour`. Everything is built with orjson and no sleep happens at zero latency, so that the
simulator is never what a gateway benchmark measures.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import time
import uuid
from typing import Any

import orjson

from gateway_app.simulator.engines import MAX_MODEL_LEN, EngineBehaviour
from gateway_app.simulator.protocol import GenerationRequest

EMBEDDING_DIMENSIONS = 16

# The model's output: token i is "tok{i} ", so a client can count tokens and spot a gap or a repeat.
_TOKENS = tuple(f"tok{index} " for index in range(MAX_MODEL_LEN))
_TOKENS_JSON = tuple(orjson.dumps(token) for token in _TOKENS)
_TEXT = "".join(_TOKENS)
_TEXT_ENDS = tuple(itertools.accumulate(len(token) for token in _TOKENS))


def token_text(index: int) -> str:
    return _TOKENS[index]


def generated_text(count: int) -> str:
    """The first `count` tokens as one string, without joining them on every request."""
    return _TEXT[: _TEXT_ENDS[count - 1]] if count else ""


class Completion:
    """The body and SSE events of one chat or text completion."""

    def __init__(self, engine: EngineBehaviour, request: GenerationRequest, chat: bool) -> None:
        self.engine = engine
        self.request = request
        self.chat = chat
        prefix = "chatcmpl" if chat else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        if request.stream:
            # Every token chunk but the last is the same bytes around a different token: render the
            # chunk once with a placeholder and splice each token's JSON string in.
            placeholder = {"content": "\0"} if chat else "\0"
            template = self._event([self._choice(placeholder, None)])
            self._token_prefix, self._token_suffix = template.rsplit(orjson.dumps("\0"), 1)

    def response(self, cached_tokens: int | None = None) -> dict[str, Any]:
        """The non-streaming answer; `cached_tokens` as in `EngineBehaviour.usage`."""
        request, engine = self.request, self.engine
        text = generated_text(request.max_tokens)
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            choice["message"] = engine.chat_message(text)
        else:
            choice["text"] = text
        choice.update({"logprobs": None, "finish_reason": request.finish_reason, engine.stop_field: None})
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": request.response_model,
            "choices": [choice],
            "usage": engine.usage(request.prompt_tokens, request.max_tokens, cached_tokens),
            **engine.response_extras(),
        }

    def opening_event(self) -> bytes:
        """What precedes the first token: the role chunk of a chat stream (both engines send one)."""
        if not self.chat:
            return b""
        return self._event([self._choice({"role": "assistant", "content": ""}, None)])

    def token_event(self, index: int) -> bytes:
        """The chunk carrying token `index`; the last one carries finish_reason unless the engine
        sends it in a chunk of its own."""
        if index < self.request.max_tokens - 1:
            return self._token_prefix + _TOKENS_JSON[index] + self._token_suffix
        finish_here = not (self.chat and self.engine.chat_finish_in_own_chunk)
        text = token_text(index)
        delta_or_text: dict[str, Any] | str = {"content": text} if self.chat else text
        return self._event([self._choice(delta_or_text, self.request.finish_reason if finish_here else None)])

    def closing_events(self, cached_tokens: int | None = None) -> bytes:
        """What follows the last token: SGLang's finish chunk, the usage chunk if asked, then [DONE]."""
        events = []
        if self.chat and self.engine.chat_finish_in_own_chunk:
            events.append(self._event([self._choice({}, self.request.finish_reason)]))
        if self.request.include_usage:
            usage = self.engine.usage(self.request.prompt_tokens, self.request.max_tokens, cached_tokens)
            events.append(self._event([], usage=usage))
        events.append(b"data: [DONE]\n\n")
        return b"".join(events)

    def _choice(self, delta_or_text: dict[str, Any] | str, finish_reason: str | None) -> dict[str, Any]:
        key = "delta" if self.chat else "text"
        return {
            "index": 0,
            key: delta_or_text,
            "logprobs": None,
            "finish_reason": finish_reason,
            self.engine.stop_field: None,
        }

    def _event(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.request.response_model,
            "choices": choices,
            **extra,
        }
        return b"data: " + orjson.dumps(chunk) + b"\n\n"


def embedding_vector(text: str) -> list[float]:
    """A unit vector that depends only on the text, so equal inputs embed equally across runs."""
    digest = hashlib.blake2b(text.encode(), digest_size=EMBEDDING_DIMENSIONS).digest()
    raw = [byte - 127.5 for byte in digest]
    norm = math.sqrt(sum(value * value for value in raw)) or 1.0
    return [round(value / norm, 6) for value in raw]


def embedding_data(inputs: list[str]) -> list[dict[str, Any]]:
    return [
        {"index": index, "object": "embedding", "embedding": embedding_vector(text)}
        for index, text in enumerate(inputs)
    ]
