"""The routing map: the one definition of its format, and its loader.

The Helm chart writes this file into a ConfigMap; the gateway loads it at start and on every change.
Validation happens here, once, and every message names the offending field so that an operator can
fix a bad ConfigMap without reading code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENGINE_NAME_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$"
HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# Headers the gateway owns on the way to an engine; a map may not override them.
RESERVED_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})


class ConfigError(ValueError):
    """A routing map that must not be served; the message names the field at fault."""


class _Strict(BaseModel):
    # Unknown keys are typos until proven otherwise: reject them, naming the key.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Timeouts(_Strict):
    """Upstream timeouts in seconds; `None` means no limit."""

    connect: float | None = Field(default=5.0, gt=0)
    # Time until the engine's first body byte. A non-streaming answer arrives whole after generation,
    # so this bounds a whole non-streaming request: keep it long.
    first_byte: float | None = Field(default=600.0, gt=0)
    # Longest silence between two chunks of a stream once it has started.
    idle: float | None = Field(default=120.0, gt=0)
    # Whole request; off by default so that long streams are never cut.
    total: float | None = Field(default=None, gt=0)


class TimeoutOverrides(_Strict):
    """Per-engine overrides; a field left out keeps the map-wide value."""

    connect: float | None = Field(default=None, gt=0)
    first_byte: float | None = Field(default=None, gt=0)
    idle: float | None = Field(default=None, gt=0)
    total: float | None = Field(default=None, gt=0)


class LimitSettings(_Strict):
    """Default per-key rate limits (a key may override them); `None` means unlimited."""

    requests_per_minute: int | None = Field(default=None, ge=0)
    tokens_per_minute: int | None = Field(default=None, ge=0)
    # Admission charges the prompt's size plus `max_tokens`; without `max_tokens`, this many.
    completion_tokens_estimate: int = Field(default=256, ge=0)
    # With Redis unreachable: serve without limits (True) or refuse with 503 (False).
    fail_open: bool = True


class Settings(_Strict):
    """Map-wide gateway settings, all optional with safe defaults."""

    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    list_aliases: bool = True
    models_cache_ttl: float = Field(default=5.0, ge=0)
    models_timeout: float = Field(default=2.0, gt=0)
    timeouts: Timeouts = Timeouts()
    limits: LimitSettings = LimitSettings()


class EngineSpec(_Strict):
    """One engine: a base URL that serves one model for one `owned_by`."""

    name: str = Field(pattern=ENGINE_NAME_PATTERN)
    model: str = Field(min_length=1)
    owned_by: str = Field(min_length=1)
    url: str
    default: bool = False
    aliases: tuple[str, ...] = ()
    headers: dict[str, str] = Field(default_factory=dict)
    timeouts: TimeoutOverrides = TimeoutOverrides()

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http:// or https:// URL with a host, got {url!r}")
        if parts.query or parts.fragment:
            raise ValueError(f"must not have a query or fragment, got {url!r}")
        try:
            parts.port
        except ValueError:
            raise ValueError(f"has a bad port, got {url!r}") from None
        if parts.path.rstrip("/").endswith("/v1"):
            raise ValueError(f"is the engine's root, where /health and /v1/... live: drop the trailing /v1 from {url!r}")
        return url.rstrip("/")

    @field_validator("aliases")
    @classmethod
    def _check_aliases(cls, aliases: tuple[str, ...]) -> tuple[str, ...]:
        for alias in aliases:
            if not alias:
                raise ValueError("an alias must not be empty")
        return aliases

    @field_validator("headers")
    @classmethod
    def _check_headers(cls, headers: dict[str, str]) -> dict[str, str]:
        for name in headers:
            if not HEADER_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid header name")
            if name.lower() in RESERVED_HEADERS:
                raise ValueError(f"{name!r} is set by the gateway and cannot be overridden")
            if any(char in headers[name] for char in "\r\n\0"):
                raise ValueError(f"the value of {name!r} must not contain line breaks")
        return headers

    def effective_timeouts(self, defaults: Timeouts) -> Timeouts:
        """The map-wide timeouts with this engine's overrides applied."""
        overrides = self.timeouts.model_dump(exclude_none=True)
        return defaults.model_copy(update=overrides) if overrides else defaults


class RoutingMap(_Strict):
    """The whole file. Cross-engine rules are checked here."""

    settings: Settings = Settings()
    engines: list[EngineSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _check_across_engines(self) -> "RoutingMap":
        names: dict[str, int] = {}
        pairs: dict[tuple[str, str], int] = {}
        defaults: dict[str, int] = {}
        for index, engine in enumerate(self.engines):
            where = f"engines[{index}]"
            if engine.name in names:
                raise ValueError(f"{where}.name: duplicate engine name {engine.name!r} (also engines[{names[engine.name]}])")
            names[engine.name] = index
            pair = (engine.model, engine.owned_by)
            if pair in pairs:
                raise ValueError(
                    f"{where}.owned_by: model {engine.model!r} is already served by owned_by "
                    f"{engine.owned_by!r} at engines[{pairs[pair]}]"
                )
            pairs[pair] = index
            if engine.default:
                if engine.model in defaults:
                    raise ValueError(
                        f"{where}.default: model {engine.model!r} already has a default engine "
                        f"(engines[{defaults[engine.model]}]); mark only one"
                    )
                defaults[engine.model] = index
        models = {engine.model for engine in self.engines}
        alias_owner: dict[str, str] = {}
        for index, engine in enumerate(self.engines):
            for alias in engine.aliases:
                where = f"engines[{index}].aliases"
                if alias in models:
                    raise ValueError(f"{where}: alias {alias!r} collides with the model id {alias!r}")
                owner = alias_owner.setdefault(alias, engine.model)
                if owner != engine.model:
                    raise ValueError(
                        f"{where}: alias {alias!r} already names model {owner!r}; an alias names one model"
                    )
        return self


def describe_validation_error(error: ValidationError) -> str:
    """Turn pydantic's report into one line per problem, each starting with the field's path."""
    lines = []
    for item in error.errors():
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in item["loc"]).lstrip(".")
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field (check the spelling)"
        elif item["type"] == "missing":
            message = "required field is missing"
        lines.append(f"{path}: {message}" if path else message)
    return "; ".join(lines)


def parse_routing_map(text: str, source: str = "routing map") -> RoutingMap:
    """Parse YAML (or JSON) text into a validated map, or raise ConfigError naming the field."""
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with an 'engines' list at the top")
    try:
        return RoutingMap.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {describe_validation_error(exc)}") from None


def load_routing_map(path: str | Path) -> tuple[RoutingMap, bytes]:
    """Read and validate the file; return the map and the raw bytes (to notice real changes)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the routing map: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the routing map is not UTF-8 text") from None
    return parse_routing_map(text, str(path)), raw
