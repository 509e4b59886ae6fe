"""A refused request as a value: what went wrong, in engine-neutral terms.

Validation raises `RequestError`; the engine profile (`engines.py`) turns it into that engine's status
code and body, so the wording of a refusal is decided once and its shape in one place per engine.
"""

from __future__ import annotations

import enum


class ErrorKind(enum.Enum):
    """The three ways the real engines refuse a request, each with its own status and `type`."""

    # The body does not fit the engine's request schema: FastAPI/pydantic refuse it before the handler
    # runs (both engines turn FastAPI's 422 into a 400).
    VALIDATION = "validation"
    # The body fits the schema but the engine refuses a value (max_tokens too large, empty messages...).
    INVALID_VALUE = "invalid_value"
    # The request names a model this engine does not serve.
    UNKNOWN_MODEL = "unknown_model"


class RequestError(Exception):
    """A request the simulated engine refuses.

    `loc` and `error_type` mimic pydantic's error record for VALIDATION errors (the engines echo it in
    their messages); `param` names the offending field where the engine reports one.
    """

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        param: str | None = None,
        loc: tuple[str | int, ...] = (),
        error_type: str = "value_error",
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param
        self.loc = loc
        self.error_type = error_type

    @classmethod
    def validation(cls, loc: tuple[str | int, ...], message: str, error_type: str) -> RequestError:
        return cls(ErrorKind.VALIDATION, message, loc=loc, error_type=error_type)

    @classmethod
    def invalid_value(cls, message: str, param: str | None = None) -> RequestError:
        return cls(ErrorKind.INVALID_VALUE, message, param=param)

    @classmethod
    def unknown_model(cls, model: str) -> RequestError:
        return cls(ErrorKind.UNKNOWN_MODEL, model, param="model")

    def pydantic_record(self) -> str:
        """The error as pydantic prints it, which is what both engines put in their messages."""
        return f"{{'type': {self.error_type!r}, 'loc': {self.loc!r}, 'msg': {self.message!r}}}"
