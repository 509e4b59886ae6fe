"""Why a request was not answered as asked, in one vocabulary for the answer, the metrics and the log.

Each kind is the `kind` label of `llm_gateway_upstream_errors_total` and the `error_kind` field of the
request log, and maps to the error the client gets (status, type, code) and its message. Tests import
the same names.
"""

from __future__ import annotations

from enum import StrEnum

from gateway_app.config import Timeouts
from gateway_app.errors import (
    EngineBadAnswer,
    EngineNotFound,
    EngineTimeout,
    EngineUnreachable,
    GatewayError,
    InternalError,
)


class Failure(StrEnum):
    CONNECT = "connect"  # no connection (refused, reset) on every replica tried
    NOT_FOUND = "engine_not_found"  # its host name does not resolve (e.g. its Service was just removed)
    TIMEOUT_CONNECT = "timeout_connect"
    TIMEOUT_FIRST_BYTE = "timeout_first_byte"
    TIMEOUT_IDLE = "timeout_idle"  # silence in the middle of an answer
    TIMEOUT_TOTAL = "timeout_total"
    BROKEN_STREAM = "broken_stream"  # the engine's connection broke in the middle of an answer
    BAD_ANSWER = "bad_answer"  # an error answer past the size the gateway reads
    INTERNAL = "internal"  # a bug of ours
    # Not the engine's doing: counted elsewhere (client disconnects, refusals), logged all the same.
    CLIENT_DISCONNECT = "client_disconnect"
    ENGINE_OVERLOADED = "engine_overloaded"
    ENGINE_WAKING = "engine_waking"  # scaled to zero, and not awake in time (wake.py)


# What the client is told, by kind: the error class (status, type, code) and its message.
_ANSWERS: dict[Failure, tuple[type[GatewayError], str]] = {
    Failure.CONNECT: (EngineUnreachable, "The engine `{engine}` is unreachable."),
    Failure.NOT_FOUND: (
        EngineNotFound,
        "The engine `{engine}` cannot be found: its host name does not resolve. If it was just removed from "
        "the configuration, this gateway stops routing to it when it reloads its routing map.",
    ),
    Failure.TIMEOUT_CONNECT: (EngineTimeout, "Timed out connecting to the engine `{engine}` after {t.connect} s."),
    Failure.TIMEOUT_FIRST_BYTE: (EngineTimeout, "The engine `{engine}` did not answer within {t.first_byte} s."),
    Failure.TIMEOUT_IDLE: (
        EngineTimeout,
        "The engine `{engine}` sent nothing for {t.idle} s in the middle of its answer.",
    ),
    Failure.TIMEOUT_TOTAL: (EngineTimeout, "The engine `{engine}` did not finish within {t.total} s."),
    Failure.BROKEN_STREAM: (EngineUnreachable, "The answer from the engine `{engine}` broke off."),
    Failure.BAD_ANSWER: (EngineBadAnswer, "The engine `{engine}` sent an error answer too large to relay."),
    Failure.INTERNAL: (InternalError, "Internal gateway error."),
}


def failure_error(kind: Failure, engine: str, timeouts: Timeouts, message: str | None = None) -> GatewayError:
    """The error a client gets for an upstream failure of this kind (`message` overrides the usual one)."""
    error_class, template = _ANSWERS[kind]
    return error_class(message or template.format(engine=engine, t=timeouts))
