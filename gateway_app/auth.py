"""API keys: who is calling, and which models they may use.

Keys live in a file mounted from a Kubernetes Secret, as sha256 hashes: the plaintext key exists only
with the client. A presented key is hashed, looked up by its hash, and compared in constant time; the
key itself is never logged, counted or echoed. The file is reloaded when it changes, like the routing map.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gateway_app.config import SAFE_LOADER, ConfigError, describe_validation_error, read_config_file
from gateway_app.errors import GatewayError

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
KEY_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"


class Unauthorized(GatewayError):
    status = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


class KeySpec(BaseModel):
    """One client key in the keys file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=KEY_NAME_PATTERN)
    sha256: str
    # None: every model. Model ids, aliases and adapter names; `<model>:*` is that model, its aliases and
    # every LoRA adapter on it.
    models: tuple[str, ...] | None = None
    requests_per_minute: int | None = Field(default=None, ge=0)
    tokens_per_minute: int | None = Field(default=None, ge=0)
    # May load and unload LoRA adapters on the engines (/v1/load_lora_adapter, /v1/unload_lora_adapter).
    admin: bool = False

    @field_validator("sha256")
    @classmethod
    def _check_hash(cls, value: str) -> str:
        value = value.strip().lower()
        if not SHA256_HEX.match(value):
            raise ValueError("must be the 64-character hex sha256 of the key (see `llm-gateway hash-key`)")
        return value


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    keys: list[KeySpec] = Field(default_factory=list)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Client:
    """An authenticated caller: its name is what logs and metrics show."""

    name: str
    allowed_models: frozenset[str] | None
    requests_per_minute: int | None
    tokens_per_minute: int | None
    admin: bool = False  # may load and unload LoRA adapters


# With keys off every caller is anonymous: it may use every model, and administer nothing.
ANONYMOUS = Client(name="anonymous", allowed_models=None, requests_per_minute=None, tokens_per_minute=None)
# In an access list, `<model>:*` grants the model, its aliases and all its adapters.
WHOLE_MODEL_SUFFIX = ":*"


def presented_key(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The key from `Authorization: Bearer <key>` (the OpenAI SDKs) or `X-API-Key` (the tutorial)."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif name == b"x-api-key" and value.strip():
            return value.decode("latin-1").strip()
    return None


class KeyStore:
    """Immutable set of keys; a reload builds a new store and swaps it whole."""

    def __init__(self, spec: KeysFile) -> None:
        self._by_hash: dict[str, Client] = {}
        for entry in spec.keys:
            client = Client(
                name=entry.name,
                allowed_models=frozenset(entry.models) if entry.models is not None else None,
                requests_per_minute=entry.requests_per_minute,
                tokens_per_minute=entry.tokens_per_minute,
                admin=entry.admin,
            )
            self._by_hash[entry.sha256] = client

    def __len__(self) -> int:
        return len(self._by_hash)

    def authenticate(self, headers: list[tuple[bytes, bytes]]) -> Client:
        """The client for the presented key, or Unauthorized with the same message whatever was wrong."""
        key = presented_key(headers)
        if key is None:
            raise Unauthorized("A valid API key is required: send `Authorization: Bearer <key>`.")
        # Looked up by the sha256 of the presented key: any timing difference of the lookup is about
        # the hash, which an attacker cannot steer towards a stored one, so no secret is compared.
        client = self._by_hash.get(hash_key(key))
        if client is None:
            raise Unauthorized("A valid API key is required: send `Authorization: Bearer <key>`.")
        return client


def may_use(allowed: frozenset[str] | None, name: str, model: str) -> bool:
    """Whether a client with this access list may use `name` (a model id, or an alias of `model`).

    A key that lists a model id may use it under its aliases too; a key that lists only an alias may use
    that alias, not the model id behind it.
    """
    return allowed is None or name in allowed or model in allowed or model + WHOLE_MODEL_SUFFIX in allowed


def may_use_adapter(allowed: frozenset[str] | None, adapter: str, base_model: str) -> bool:
    """Whether a client may use a LoRA adapter: one its list names, or any adapter of a model it holds
    whole (`<model>:*`). The base model alone does not grant its adapters: fifty fine-tunes on one base
    are fifty models, each for its own clients."""
    return allowed is None or adapter in allowed or base_model + WHOLE_MODEL_SUFFIX in allowed


def parse_keys_file(text: str, source: str) -> KeyStore:
    try:
        data = yaml.load(text, Loader=SAFE_LOADER)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with a 'keys' list at the top")
    try:
        spec = KeysFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {describe_validation_error(exc)}") from None
    names: set[str] = set()
    hashes: set[str] = set()
    for index, entry in enumerate(spec.keys):
        if entry.name in names:
            raise ConfigError(f"{source}: keys[{index}].name: duplicate key name {entry.name!r}")
        if entry.sha256 in hashes:
            raise ConfigError(f"{source}: keys[{index}].sha256: the same key is listed twice")
        names.add(entry.name)
        hashes.add(entry.sha256)
    return KeyStore(spec)


def load_keys_file(path: str | Path) -> tuple[KeyStore, bytes]:
    raw = read_config_file(path, "keys file")
    return parse_keys_file(raw.decode("utf-8", errors="replace"), str(path)), raw


def load_engine_key(path: str | Path) -> tuple[str, bytes]:
    """The gateway's credential towards engines: the whole file, surrounding whitespace removed."""
    raw = read_config_file(path, "engine API key")
    key = raw.decode("utf-8", errors="replace").strip()
    if not key or any(char in key for char in "\r\n\0"):
        raise ConfigError(f"{path}: the engine API key file must hold one key on one line")
    return key, raw


def generate_key() -> str:
    """A new random client key, in the `sk-...` form OpenAI tools expect."""
    return "sk-" + secrets.token_urlsafe(32)
