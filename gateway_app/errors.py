"""Every error the gateway itself makes: a type, an HTTP status and an OpenAI-shaped body, built here.

Engines' own error answers are relayed untouched and never pass through this module.
"""

from __future__ import annotations

import orjson


class GatewayError(Exception):
    """An error answer for the client: `{"error": {"message", "type", "param", "code"}}`."""

    status: int = 500
    error_type: str = "internal_error"
    code: str | None = None
    retry_after: int | None = None  # seconds, sent as Retry-After when set

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if retry_after is not None:
            self.retry_after = retry_after
        if status is not None:
            self.status = status

    def extra_headers(self) -> dict[str, str]:
        """Headers the answer carries besides its content type: `Retry-After` when set."""
        return {"retry-after": str(self.retry_after)} if self.retry_after is not None else {}

    def body(self) -> bytes:
        return orjson.dumps(
            {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}
        )


class InvalidRequest(GatewayError):
    status = 400
    error_type = "invalid_request_error"


class NotFound(GatewayError):
    status = 404
    error_type = "invalid_request_error"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    error_type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLarge(GatewayError):
    status = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class RequestTimeout(GatewayError):
    status = 408
    error_type = "invalid_request_error"
    code = "request_timeout"


class RequestHeaderTooLarge(GatewayError):
    status = 431
    error_type = "invalid_request_error"
    code = "request_header_too_large"


class GatewayOverloaded(GatewayError):
    """The gateway itself (not an engine) has no room: connections or request-body memory."""

    status = 503
    error_type = "server_error"
    code = "gateway_overloaded"


class EngineUnreachable(GatewayError):
    status = 502
    error_type = "upstream_error"
    code = "engine_unreachable"


class EngineNotFound(GatewayError):
    """The engine's host name does not resolve: most often an engine just removed from the chart's values,
    whose Service is gone while this gateway still routes to it until it reloads the routing map."""

    status = 503
    error_type = "upstream_error"
    code = "engine_not_found"
    retry_after = 5


class EngineWaking(GatewayError):
    """The engine is scaled to zero and could not serve this request in time: its wake took longer than
    the request may be held, too many requests were held already, or the wake itself failed."""

    status = 503
    error_type = "upstream_error"
    code = "engine_waking"


class EngineBadAnswer(GatewayError):
    """An engine answer the gateway will not relay (an error body past the size it reads)."""

    status = 502
    error_type = "upstream_error"
    code = "engine_bad_answer"


class EngineTimeout(GatewayError):
    status = 504
    error_type = "upstream_error"
    code = "engine_timeout"


class InternalError(GatewayError):
    status = 500
    error_type = "internal_error"
    code = "internal_error"


def sse_error_event(error: GatewayError) -> bytes:
    """A stream that breaks after bytes were sent ends with an error event and [DONE], never a silent cut."""
    return b"data: " + error.body() + b"\n\ndata: [DONE]\n\n"
