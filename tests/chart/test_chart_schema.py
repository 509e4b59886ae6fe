"""Bad values are refused before anything reaches a cluster, with a message that says what to fix.

Shape errors come from values.schema.json; rules across entries come from templates/_engines.tpl.
"""

from __future__ import annotations

import json
import typing
from typing import Any

import pytest
from pydantic import BaseModel

from gateway_app.config import ClientLimits, Concurrency, ConfigError, Settings, parse_routing_map
from tests.chart.conftest import CHART_DIR, Helm, HelmError


def engine(name: str = "a", **fields: Any) -> dict[str, Any]:
    return {"name": name, "engine": "vllm", "model": "m", **fields}


HASH = "0123456789abcdef" * 4  # the sha256 of some key: 64 hex characters


def api_key(name: str = "team-a", **fields: Any) -> dict[str, Any]:
    return {"name": name, "sha256": HASH, **fields}


def with_keys(*keys: dict[str, Any]) -> dict[str, Any]:
    return {"auth": {"enabled": True, "keys": list(keys)}}


SCHEMA_ERROR = "values don't meet the specifications of the schema"
SCHEMA = json.loads((CHART_DIR / "values.schema.json").read_text())

# values.schema.json: (values, the offending path, words the message must contain). helm 4 writes the
# path as /engines/0/model, helm 3 as engines.0.model; both are accepted.
REFUSED_BY_SCHEMA: dict[str, tuple[dict[str, Any], str, list[str]]] = {
    "engine without model": ({"engines": [{"name": "a", "engine": "vllm"}]}, "engines/0", ["model"]),
    "unknown engine type": ({"engines": [engine(engine="tgi")]}, "engines/0/engine", ["vllm", "sglang", "simulator"]),
    "negative replicas": ({"engines": [engine(replicas=-1)]}, "engines/0/replicas", ["0"]),
    "zero gpus": ({"engines": [engine(gpus=0)]}, "engines/0/gpus", ["1"]),
    "negative gateway replicas": ({"gateway": {"replicas": -2}}, "gateway/replicas", ["0"]),
    "misspelt engine key": ({"engines": [engine(servedModelname="x")]}, "engines/0", ["servedModelname", "not allowed"]),
    "misspelt top-level key": ({"engine": []}, "", ["engine", "not allowed"]),
    "name that is no DNS label": ({"engines": [engine(name="Llama_1B")]}, "engines/0/name", ["pattern"]),
    "no engines": ({"engines": []}, "engines", ["1"]),
    "numeric extra argument": ({"engines": [engine(extraArgs=["--max-model-len", 4096])]}, "engines/0/extraArgs/1", ["string"]),
    "unknown settings key": ({"gateway": {"settings": {"max_body": 10}}}, "gateway/settings", ["max_body", "not allowed"]),
    "url with a path": (
        {"engines": [{"name": "x", "url": "http://h:1/v1", "ownedBy": "vllm", "model": "m"}]},
        "engines/0/url",
        ["pattern"],
    ),
    "unknown storage type": ({"engines": [engine(modelStorage={"type": "nfs"})]}, "engines/0/modelStorage/type", ["emptyDir"]),
    "unknown strategy type": ({"engines": [engine(strategy={"type": "BlueGreen"})]}, "engines/0/strategy/type", ["Recreate", "RollingUpdate"]),
    "misspelt strategy key": ({"engineDefaults": {"strategy": {"rollingupdate": {}}}}, "engineDefaults/strategy", ["rollingupdate", "not allowed"]),
    "surge that is no count or percentage": (
        {"engines": [engine(strategy={"rollingUpdate": {"maxSurge": "25"}})]},
        "engines/0/strategy/rollingUpdate/maxSurge",
        ["%"],
    ),
    "negative preStop wait": ({"gateway": {"preStopSleepSeconds": -1}}, "gateway/preStopSleepSeconds", ["0"]),
    # API keys: hashes only, never a key; limits are counts
    "hash that is no hex": (with_keys(api_key(sha256="z" * 64)), "auth/keys/0/sha256", ["pattern"]),
    "hash too short": (with_keys(api_key(sha256=HASH[:40])), "auth/keys/0/sha256", ["pattern"]),
    "plaintext key in values": (with_keys(api_key(key="sk-live-123")), "auth/keys/0", ["key", "not allowed"]),
    "plaintext key instead of a hash": (with_keys({"name": "a", "key": "sk-live-123"}), "auth/keys/0", ["sha256"]),
    "negative key limit": (with_keys(api_key(requests_per_minute=-1)), "auth/keys/0/requests_per_minute", ["0"]),
    "fractional key limit": (with_keys(api_key(tokens_per_minute=1.5)), "auth/keys/0/tokens_per_minute", ["integer"]),
    "negative default limit": (
        {"gateway": {"settings": {"limits": {"tokens_per_minute": -5}}}},
        "gateway/settings/limits/tokens_per_minute",
        ["0"],
    ),
    "misspelt limits key": (
        {"gateway": {"settings": {"limits": {"requests_per_second": 5}}}},
        "gateway/settings/limits",
        ["requests_per_second", "not allowed"],
    ),
    "key name with a space": (with_keys(api_key(name="team a")), "auth/keys/0/name", ["pattern"]),
    "secret item with a slash": ({"auth": {"enabled": True, "existingSecret": "s", "key": "a/b"}}, "auth/key", ["pattern"]),
    "engine key with a line break inside": ({"engineApiKey": {"value": "abc\ndef"}}, "engineApiKey/value", ["pattern"]),
    "password in the redis url": ({"redis": {"url": "redis://:hunter2@redis:6379/0"}}, "redis/url", ["pattern"]),
    "redis url of another scheme": ({"redis": {"url": "http://redis:6379"}}, "redis/url", ["pattern"]),
    "misspelt redis key": ({"redis": {"deployed": True}}, "redis", ["deployed", "not allowed"]),
    # logging and discovery
    "unknown log level": ({"gateway": {"log": {"level": "trace"}}}, "gateway/log/level", ["debug", "error"]),
    "unknown log format": ({"gateway": {"log": {"format": "xml"}}}, "gateway/log/format", ["json", "text"]),
    "access log as a string": ({"gateway": {"log": {"accessLog": "off"}}}, "gateway/log/accessLog", ["boolean"]),
    "logLevel, renamed to log.level": ({"gateway": {"logLevel": "debug"}}, "gateway", ["logLevel", "not allowed"]),
    "discovery as a string": ({"gateway": {"discovery": {"enabled": "yes"}}}, "gateway/discovery/enabled", ["boolean"]),
    "misspelt discovery key": ({"gateway": {"discovery": {"enable": True}}}, "gateway/discovery", ["enable", "not allowed"]),
    # an engine's fallback and concurrency
    "fallback that is no engine name": ({"engines": [engine(fallback="Other_Engine")]}, "engines/0/fallback", ["pattern"]),
    "zero concurrency limit": ({"engines": [engine(concurrency={"limit": 0})]}, "engines/0/concurrency/limit", ["1"]),
    "negative queue": ({"engines": [engine(concurrency={"queue": -1})]}, "engines/0/concurrency/queue", ["0"]),
    "zero queue timeout": ({"engines": [engine(concurrency={"queue_timeout": 0})]}, "engines/0/concurrency/queue_timeout", ["0"]),
    "misspelt concurrency key": ({"engines": [engine(concurrency={"max": 4})]}, "engines/0/concurrency", ["max", "not allowed"]),
}  # fmt: skip

# gateway.settings is the routing map's settings block: what the schema refuses, the gateway refuses too.
# (settings, the offending path under gateway/settings, words the message must contain)
REFUSED_SETTINGS: dict[str, tuple[dict[str, Any], str, list[str]]] = {
    "unknown balancing": ({"balancing": "least_loaded"}, "balancing", ["power_of_two", "round_robin"]),
    "no attempt at all": ({"retries": {"max_attempts": 0}}, "retries/max_attempts", ["1"]),
    "too many attempts": ({"retries": {"max_attempts": 11}}, "retries/max_attempts", ["10"]),
    "fractional attempts": ({"retries": {"max_attempts": 2.5}}, "retries/max_attempts", ["integer"]),
    "zero deadline": ({"retries": {"deadline": 0}}, "retries/deadline", ["0"]),
    "misspelt retries key": ({"retries": {"attempts": 2}}, "retries", ["attempts", "not allowed"]),
    "zero health interval": ({"health": {"interval": 0}}, "health/interval", ["0"]),
    "negative health timeout": ({"health": {"timeout": -1}}, "health/timeout", ["0"]),
    "ejection as text": ({"health": {"ejection_max": "1m"}}, "health/ejection_max", ["number"]),
    "misspelt health key": ({"health": {"intervall": 5}}, "health", ["intervall", "not allowed"]),
    "affinity header that is no header name": ({"affinity": {"header": "X Session"}}, "affinity/header", ["pattern"]),
    "affinity on the body as a string": ({"affinity": {"body_user": "user"}}, "affinity/body_user", ["boolean"]),
    "misspelt affinity key": ({"affinity": {"cookie": "s"}}, "affinity", ["cookie", "not allowed"]),
    "readiness flag as a string": ({"ready_requires_engine": "sometimes"}, "ready_requires_engine", ["boolean"]),
    # the front door's bounds (gateway_app/config.py ClientLimits)
    "misspelt client_limits key": ({"client_limits": {"max_header_size": 8192}}, "client_limits", ["max_header_size", "not allowed"]),
    "head bound below 1 KiB": ({"client_limits": {"max_header_bytes": 512}}, "client_limits/max_header_bytes", ["minimum"]),
    "head bound above 16 MiB": ({"client_limits": {"max_header_bytes": 16777217}}, "client_limits/max_header_bytes", ["maximum"]),
    "too few header lines": ({"client_limits": {"max_headers": 5}}, "client_limits/max_headers", ["minimum"]),
    "too many header lines": ({"client_limits": {"max_headers": 10001}}, "client_limits/max_headers", ["maximum"]),
    "zero head timeout": ({"client_limits": {"head_timeout": 0}}, "client_limits/head_timeout", ["0"]),
    "body timeout as text": ({"client_limits": {"body_timeout": "30s"}}, "client_limits/body_timeout", ["number"]),
    "zero connections": ({"client_limits": {"max_connections": 0}}, "client_limits/max_connections", ["1"]),
    "body budget below 1 MiB": ({"client_limits": {"max_body_memory": 1000000}}, "client_limits/max_body_memory", ["minimum"]),
    "body budget as a quantity": ({"client_limits": {"max_body_memory": "128Mi"}}, "client_limits/max_body_memory", ["integer"]),
}  # fmt: skip

# templates/_engines.tpl and friends: (values, fragments of the exact message)
REFUSED_BY_TEMPLATES: dict[str, tuple[dict[str, Any], list[str]]] = {
    "duplicate name": (
        {"engines": [engine("a"), engine("a", engine="sglang")]},
        ['engines[1] "a": duplicate name, already used by engines[0]'],
    ),
    "two defaults for one model": (
        {"engines": [engine("a", default=True), engine("b", engine="sglang", default=True)]},
        ['engines[1] "b": model "m" already has a default engine (engines[0])'],
    ),
    "same model and owned_by twice": (
        {"engines": [engine("a"), engine("b", engine="simulator")]},
        ['engines[1] "b": model "m" with owned_by "vllm" is already served by engines[0]'],
    ),
    "both url and engine": (
        {"engines": [engine(url="http://h:8000")]},
        ['engines[0] "a": set either engine', "or url", "not both"],
    ),
    "neither url nor engine": (
        {"engines": [{"name": "a", "model": "m"}]},
        ['engines[0] "a": set engine (vllm, sglang or simulator)', "or url"],
    ),
    "url without ownedBy": (
        {"engines": [{"name": "a", "url": "http://h:8000", "model": "m"}]},
        ['engines[0] "a": an entry with url, urls or baseUrl needs ownedBy'],
    ),
    "ownedBy on a deployed engine": (
        {"engines": [engine(ownedBy="foo")]},
        ['engines[0] "a": ownedBy is only for url, urls and baseUrl entries; a vllm engine is owned_by "vllm"'],
    ),
    "simulate on a real engine": ({"engines": [engine(simulate="sglang")]}, ['engines[0] "a": simulate is only']),
    "latest engine image": ({"engines": [engine(image={"tag": "latest"})]}, ["vllm/vllm-openai:latest is not allowed"]),
    "latest gateway image": ({"gateway": {"image": {"tag": "latest"}}}, ["llm-gateway:latest is not allowed"]),
    "repository without tag": (
        {"engines": [engine(image={"repository": "my/vllm"})]},
        ['engines[0] "a": image.repository is set, so set image.tag'],
    ),
    "alias equal to a model": (
        {"engines": [engine("a", aliases=["n"]), engine("b", engine="sglang", model="n")]},
        ['engines[0] "a": alias "n" is already the model id of engine "b"'],
    ),
    "alias naming two models": (
        {"engines": [engine("a", aliases=["x"]), engine("b", model="n", aliases=["x"])]},
        ['engines[1] "b": alias "x" already names model "m"'],
    ),
    "engine named like the gateway": (
        {"engines": [engine("my-llm-llm-gateway")]},
        ["the name is taken by the gateway's own Service"],
    ),
    "pvc without claim": (
        {"engines": [engine(modelStorage={"type": "pvc"})]},
        ['engines[0] "a": modelStorage.type pvc needs modelStorage.claimName'],
    ),
    "token twice": (
        {"engines": [engine(hfToken={"existingSecret": "s", "value": "v"})]},
        ["hfToken: set existingSecret or value, not both"],
    ),
    "autoscaling bounds": (
        {"gateway": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}},
        ["minReplicas (5) is larger than maxReplicas (2)"],
    ),
    "rollingUpdate with Recreate": (
        {"engines": [engine(strategy={"type": "Recreate", "rollingUpdate": {"maxSurge": 1}})]},
        ['engines[0] "a": strategy type Recreate takes no rollingUpdate'],
    ),
    "keys while auth is off": (
        {"auth": {"keys": [api_key()]}},
        ["auth: keys or existingSecret are set but auth.enabled is false", "set auth.enabled: true"],
    ),
    "existing keys Secret while auth is off": (
        {"auth": {"existingSecret": "keys"}},
        ["auth.enabled is false"],
    ),
    "inline keys and an existing Secret": (
        {"auth": {"enabled": True, "existingSecret": "keys", "keys": [api_key()]}},
        ["auth: set keys or existingSecret, not both"],
    ),
    "duplicate key name": (
        with_keys(api_key("a"), api_key("a", sha256="f" * 64)),
        ['auth.keys[1] "a": duplicate name, already used by auth.keys[0]'],
    ),
    "one key for two clients": (
        with_keys(api_key("a"), api_key("b", sha256=HASH.upper())),
        ['auth.keys[1] "b": the same key (sha256) is already auth.keys[0]'],
    ),
    "key for an unknown model": (
        with_keys(api_key(models=["gpt-4"])),
        ['auth.keys[0] "team-a": model "gpt-4" is neither a model id nor an alias of any engine'],
    ),
    "engine key twice": (
        {"engineApiKey": {"existingSecret": "s", "value": "v"}},
        ["engineApiKey: set existingSecret or value, not both"],
    ),
    "two redis": (
        {"redis": {"url": "redis://r:6379/0", "deploy": True}},
        ["redis: set url (your Redis) or deploy: true (the chart's), not both"],
    ),
    "redis password twice": (
        {"redis": {"deploy": True, "existingSecret": "s", "password": "p"}},
        ["redis: set existingSecret or password, not both"],
    ),
    "redis password without a redis": (
        {"redis": {"password": "p"}},
        ["redis: a password is set but there is no Redis"],
    ),
    "grace period within the preStop wait": (
        {"gateway": {"preStopSleepSeconds": 30, "terminationGracePeriodSeconds": 30}},
        ["gateway.terminationGracePeriodSeconds (30) must be larger than gateway.preStopSleepSeconds (30)"],
    ),
    "fallback to an unknown engine": (
        {"engines": [engine("a"), engine("b", engine="sglang", fallback="c")]},
        ['engines[1] "b": fallback "c" is not the name of any engine'],
    ),
    "fallback to itself": (
        {"engines": [engine("a", fallback="a")]},
        ['engines[0] "a": fallback names the engine itself'],
    ),
    "discovery as the namespace's default account": (
        {"gateway": {"serviceAccount": {"create": False}}},
        [
            'gateway.discovery.enabled: the gateway would read EndpointSlices as the namespace\'s "default" ServiceAccount'
        ],
    ),
    # the gateway holds at most max_body_memory bytes of bodies at once: one body of the largest size must fit
    "body budget below the body limit": (
        {"gateway": {"settings": {"max_body_bytes": 33554432, "client_limits": {"max_body_memory": 16777216}}}},
        [
            "gateway.settings.client_limits.max_body_memory (16777216) must be at least gateway.settings.max_body_bytes (33554432)"
        ],
    ),
    "body limit above the default budget": (
        {"gateway": {"settings": {"max_body_bytes": 268435456}}},
        [
            "gateway.settings.client_limits.max_body_memory (134217728, the gateway's default) must be at least",
            "gateway.settings.max_body_bytes (268435456)",
            "raise max_body_memory",
        ],
    ),
    "discovery as the default account by name": (
        {"gateway": {"serviceAccount": {"create": False, "name": "default"}}},
        ["set gateway.serviceAccount.create: true", "or set gateway.discovery.enabled: false"],
    ),
}


@pytest.mark.parametrize("case", REFUSED_BY_SCHEMA)
def test_schema_refuses_bad_values(helm: Helm, case: str) -> None:
    values, path, words = REFUSED_BY_SCHEMA[case]
    message = helm.template_error(values=values)
    assert SCHEMA_ERROR in message, message
    if path:
        assert f"/{path}'" in message or f"- {path.replace('/', '.')}:" in message, f"{case}: no {path} in:\n{message}"
    for word in words:
        assert word.lower() in message.lower(), f"{case}: {word!r} not in:\n{message}"


@pytest.mark.parametrize("case", REFUSED_SETTINGS)
def test_schema_refuses_bad_settings_like_the_gateway(helm: Helm, case: str) -> None:
    settings, path, words = REFUSED_SETTINGS[case]
    message = helm.template_error(values={"gateway": {"settings": settings}})
    assert SCHEMA_ERROR in message, message
    path = f"gateway/settings/{path}"
    assert f"/{path}'" in message or f"- {path.replace('/', '.')}:" in message, f"{case}: no {path} in:\n{message}"
    for word in words:
        assert word.lower() in message.lower(), f"{case}: {word!r} not in:\n{message}"
    route = {"name": "a", "model": "m", "owned_by": "vllm", "url": "http://a:8000"}
    routing_map = {"settings": settings, "engines": [route]}
    with pytest.raises(ConfigError):
        parse_routing_map(json.dumps(routing_map))


def _model_shape(model: type[BaseModel]) -> dict[str, Any]:
    """Field names of a pydantic model, nested models as dicts of their own fields."""
    shape: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        nested = field.annotation
        shape[name] = _model_shape(nested) if isinstance(nested, type) and issubclass(nested, BaseModel) else None
    return shape


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = SCHEMA["definitions"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def _schema_shape(node: dict[str, Any]) -> dict[str, Any]:
    """Property names of a schema object, nested objects as dicts of their own properties."""
    node = _resolve(node)
    assert node.get("additionalProperties") is False  # unknown keys are refused at every level
    return {
        name: _schema_shape(prop) if _resolve(prop).get("type") == "object" else None
        for name, prop in node["properties"].items()
    }


def test_settings_schema_has_the_gateways_keys() -> None:
    """values.schema.json knows exactly the routing map's settings and concurrency keys (gateway_app/config.py),
    so a key the gateway gains or drops fails here rather than at `helm install`."""
    definitions = SCHEMA["definitions"]
    assert _schema_shape(definitions["settings"]) == _model_shape(Settings)
    assert _schema_shape(definitions["concurrency"]) == _model_shape(Concurrency)
    balancing = typing.get_args(Settings.model_fields["balancing"].annotation)
    assert definitions["settings"]["properties"]["balancing"]["enum"] == list(balancing)


MIB = 1024 * 1024
BUDGET = ClientLimits().max_body_memory  # the gateway's default


@pytest.mark.parametrize(
    "settings",
    [
        {"max_body_bytes": BUDGET},
        {"max_body_bytes": BUDGET + 1},
        {"max_body_bytes": 2 * MIB, "client_limits": {"max_body_memory": 2 * MIB}},
        {"max_body_bytes": 2 * MIB + 1, "client_limits": {"max_body_memory": 2 * MIB}},
        {"client_limits": {"max_body_memory": MIB}},  # below the default body limit (16 MiB)
    ],
)
def test_body_budget_rule_is_the_gateways(helm: Helm, settings: dict[str, Any]) -> None:
    """The chart refuses exactly the settings the gateway refuses for max_body_memory < max_body_bytes, the
    gateway's defaults included (a chart default that drifted from gateway_app/config.py fails here)."""
    route = {"name": "a", "model": "m", "owned_by": "vllm", "url": "http://a:8000"}
    try:
        parse_routing_map(json.dumps({"settings": settings, "engines": [route]}))
        gateway_accepts = True
    except ConfigError:
        gateway_accepts = False
    try:
        helm.run(*helm.template_args(values={"gateway": {"settings": settings}}))
        chart_accepts = True
    except HelmError as error:
        assert "must be at least gateway.settings.max_body_bytes" in str(error), error
        chart_accepts = False
    assert chart_accepts == gateway_accepts


@pytest.mark.parametrize("case", REFUSED_BY_TEMPLATES)
def test_templates_refuse_what_a_schema_cannot_express(helm: Helm, case: str) -> None:
    values, fragments = REFUSED_BY_TEMPLATES[case]
    message = helm.template_error(values=values)
    for fragment in fragments:
        assert fragment in message, f"{case}: {fragment!r} not in:\n{message}"


def test_a_good_override_is_accepted(helm: Helm) -> None:
    """The near misses of the cases above render."""
    rendered = helm.template(
        values={
            "engines": [
                engine("a", default=True, aliases=["x"], image={"tag": "v0.12.1"}),
                engine("b", engine="sglang", default=False),
                {"name": "c", "url": "http://h:8000/", "ownedBy": "tgi", "model": "m"},
                engine("d", engine="simulator", simulate="sglang", model="n", replicas=0),
                engine("e", model="o", strategy={"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "50%"}}),
                # a fallback may be a url entry, or another model (the request is re-addressed to it)
                engine("f", model="p", fallback="c", concurrency={"limit": 1, "queue": 0, "queue_timeout": 0.5}),
            ],
            "gateway": {
                "preStopSleepSeconds": 29,
                "terminationGracePeriodSeconds": 30,
                "settings": {
                    # a body budget equal to the largest body; connections sized by the gateway
                    "max_body_bytes": 2 * MIB,
                    "client_limits": {"max_body_memory": 2 * MIB, "max_connections": None, "head_timeout": 0.5},
                    "limits": {"requests_per_minute": 0, "tokens_per_minute": None},
                    "affinity": {"header": None, "body_user": False},
                    "retries": {"max_attempts": 10, "deadline": 0.1},
                },
                "log": {"level": "error", "format": "text", "accessLog": True},
                "serviceAccount": {"create": False, "name": "llm-gateway"},
            },
            # ids and aliases, upper-case hex, a limit of 0 (refuse all) and null (unlimited)
            "auth": {
                "enabled": True,
                "keys": [
                    api_key("a", models=["m", "x"], requests_per_minute=0),
                    api_key("b.team_2", sha256="ABCDEF" + HASH[6:], tokens_per_minute=None),
                ],
            },
            "engineApiKey": {"value": "  key-with-surrounding-space\n"},
            "redis": {"url": "rediss://default@r.cache:6380/15", "existingSecret": "r"},
        }
    )
    assert [r["name"] for r in rendered.routing["engines"]] == ["a", "b", "c", "d", "e", "f"]
    routing = rendered.load_routing()
    assert routing.engines[5].fallback == "c" and routing.engines[5].concurrency.limit == 1
    limits = routing.settings.client_limits
    assert (limits.max_body_memory, limits.max_connections, limits.head_timeout) == (2 * MIB, None, 0.5)
    assert len(rendered.of_kind("Secret")) == 2  # the keys and the engine key; the Redis password is existing
