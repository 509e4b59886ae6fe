"""The routing-map format: what it accepts, and that every refusal names the field at fault."""

from __future__ import annotations

import pytest

from gateway_app.config import ConfigError, parse_routing_map
from gateway_app.errors import ModelNotFound
from gateway_app.route_table import build_routes

MINIMAL = """
engines:
  - name: vllm-llama-32-1b
    model: meta-llama/Llama-3.2-1B-Instruct
    owned_by: vllm
    url: http://vllm-llama-32-1b:8000
    default: true
    aliases: [llama-1b]
  - name: sglang-llama-32-1b
    model: meta-llama/Llama-3.2-1B-Instruct
    owned_by: sglang
    url: http://sglang-llama-32-1b:8000
"""


def test_minimal_form_from_the_issue_is_accepted():
    routing_map = parse_routing_map(MINIMAL)
    assert [e.name for e in routing_map.engines] == ["vllm-llama-32-1b", "sglang-llama-32-1b"]
    assert routing_map.settings.timeouts.total is None  # streams are never cut by default


def test_json_is_accepted_too():
    text = '{"engines": [{"name": "a", "model": "m", "owned_by": "vllm", "url": "https://a.example:8443/"}]}'
    assert parse_routing_map(text).engines[0].url == "https://a.example:8443"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "engines:\n  - {name: a, model: m, owned_by: v, url: 'http://x'}\n  - {name: a, model: n, owned_by: v, url: 'http://y'}",
            "engines[1].name: duplicate engine name 'a'",
        ),
        ("engines:\n  - {name: a, owned_by: v, url: 'http://x'}", "engines[0].model: required field is missing"),
        ("engines:\n  - {name: a, model: m, owned_by: v, url: 'ftp://x'}", "engines[0].url"),
        ("engines:\n  - {name: a, model: m, owned_by: v, url: 'http://x:99999'}", "engines[0].url"),
        (
            "engines:\n  - {name: a, model: m, owned_by: v, url: 'http://x', default: true}\n  - {name: b, model: m, owned_by: s, url: 'http://y', default: true}",
            "engines[1].default",
        ),
        (
            "engines:\n  - {name: a, model: m, owned_by: v, url: 'http://x', aliases: [n]}\n  - {name: b, model: n, owned_by: v, url: 'http://y'}",
            "engines[0].aliases: alias 'n' collides",
        ),
        (
            "engines:\n  - {name: a, model: m, owned_by: v, url: 'http://x', aliases: [z]}\n  - {name: b, model: n, owned_by: v, url: 'http://y', aliases: [z]}",
            "engines[1].aliases: alias 'z' already names model 'm'",
        ),
        (
            "engines:\n  - {name: a, model: m, owned_by: v, url: 'http://x'}\n  - {name: b, model: m, owned_by: v, url: 'http://y'}",
            "engines[1].owned_by",
        ),
        ("engines:\n  - {name: 'bad name', model: m, owned_by: v, url: 'http://x'}", "engines[0].name"),
        ("engines:\n  - {name: a, model: m, owned_by: v, url: 'http://x', headers: {Host: y}}", "engines[0].headers"),
        (
            "engines:\n  - {name: a, model: m, owned_by: v, url: 'http://x', timeouts: {idle: 0}}",
            "engines[0].timeouts.idle",
        ),
        (
            "settings: {timeouts: {conect: 3}}\nengines:\n  - {name: a, model: m, owned_by: v, url: 'http://x'}",
            "settings.timeouts.conect: unknown field",
        ),
        ("engines: []", "engines"),
        (
            "engines:\n  - {name: a, model: m, owned_by: v, url: 'http://user:pw@x'}",
            "engines[0].url: must not carry a user",
        ),
        (
            "engines:\n  - {name: a, model: m, owned_by: v, url: 'http://x', headers: {Authorization: Bearer k}}",
            "engines[0].headers",
        ),
        ("engines:\n  - {name: a, model: m, owned_by: v, url: 'http://x/v1'}", "drop the trailing /v1"),
        ("engines:\n  - {name: a, model: m, owned_by: v, url: 'http://x', urls: ['http://y']}", "engines[0].urls"),
        ("engines:\n  - {name: a, model: m, owned_by: v, url: 'http://x', fallback: b}", "engines[0].fallback"),
        (
            "engines:\n  - {name: a, model: m, owned_by: v, url: 'http://x', base_url: 'https://y/v1'}",
            "engines[0].base_url: give one of url, urls and base_url, not url and base_url",
        ),
        (
            "engines:\n  - {name: a, model: m, owned_by: v, base_url: 'https://y/v1', api_key_file: /no/such/key}",
            "engines[0].api_key_file: cannot read /no/such/key",
        ),
        (
            "engines:\n  - {name: a, model: m, owned_by: v, url: 'http://x', health_path: health}",
            "engines[0].health_path",
        ),
        (
            "settings: {cache_aware: {balance_abs_threshold: 8, history_abs_threshold: 6}}\n"
            "engines:\n  - {name: a, model: m, owned_by: v, url: 'http://x'}",
            "settings.cache_aware.history_abs_threshold: must be at least balance_abs_threshold (8)",
        ),
        ("- a\n- b", "expected a mapping"),
    ],
)
def test_refusals_name_the_field(text, expected):
    with pytest.raises(ConfigError) as caught:
        parse_routing_map(text)
    assert expected in str(caught.value)


def test_resolution_rules():
    table = build_routes(parse_routing_map(MINIMAL))
    assert table.resolve("meta-llama/Llama-3.2-1B-Instruct", None).engine.name == "vllm-llama-32-1b"
    assert table.resolve("meta-llama/Llama-3.2-1B-Instruct", "sglang").engine.name == "sglang-llama-32-1b"
    resolved = table.resolve("llama-1b", "sglang")
    assert resolved.via_alias and resolved.engine.model == "meta-llama/Llama-3.2-1B-Instruct"
    with pytest.raises(ModelNotFound):
        table.resolve("llama-1b", "trtllm")


def test_first_listed_is_default_when_none_is_marked():
    routing_map = parse_routing_map("""
engines:
  - {name: s, model: m, owned_by: sglang, url: 'http://s'}
  - {name: v, model: m, owned_by: vllm, url: 'http://v'}
""")
    assert build_routes(routing_map).resolve("m", None).engine.name == "s"


def test_engine_timeouts_override_the_map_defaults_field_by_field():
    routing_map = parse_routing_map("""
settings: {timeouts: {connect: 2, idle: 30}}
engines:
  - {name: a, model: m, owned_by: v, url: 'http://x', timeouts: {idle: 5}}
""")
    engine = build_routes(routing_map).engines[0]
    assert (engine.timeouts.connect, engine.timeouts.idle, engine.timeouts.first_byte) == (2, 5, 600)
