"""LoRA adapters in the chart: `engines[].lora` becomes each engine's own flags (vLLM, SGLang, the simulator),
the environment variable that allows run-time updates on vLLM, and the adapters in the routing map."""

from __future__ import annotations

from typing import Any

import pytest

from tests.chart.conftest import Helm
from tests.chart.test_chart_engines import assert_valid, container, env_of

SCHEMA_ERROR = "values don't meet the specifications of the schema"
ADAPTERS = [
    {"name": "sql-lora", "path": "/models/adapters/sql"},
    {"name": "support-bot", "path": "org/support-bot-lora"},
]
LORA = {"adapters": ADAPTERS, "maxLoras": 4, "maxLoraRank": 64, "runtimeUpdates": True}
SIM_LORA = {"adapters": [{"name": "sim-lora", "path": "/adapters/sim"}], "runtimeUpdates": True}


def lora_values(**extra: Any) -> dict[str, Any]:
    return {
        "engines": [
            {"name": "v", "engine": "vllm", "model": "meta-llama/Llama-3.1-8B-Instruct", "default": True, "lora": LORA},
            {"name": "s", "engine": "sglang", "model": "meta-llama/Llama-3.1-8B-Instruct", "lora": LORA},
            {"name": "sim", "engine": "simulator", "simulate": "sglang", "model": "m", "lora": SIM_LORA},
            {"name": "plain", "engine": "vllm", "model": "p"},
            {"name": "plain-sg", "engine": "sglang", "model": "p"},
            {"name": "far", "url": "http://10.0.0.9:8000", "ownedBy": "sglang", "api": "sglang", "model": "f",
             "lora": {"adapters": [{"name": "far-lora"}]}},
        ],
        **extra,
    }  # fmt: skip


def flags_after(args: list[str], flag: str) -> list[str]:
    """The values that follow `flag` up to the next flag."""
    start = args.index(flag) + 1
    end = next((i for i in range(start, len(args)) if args[i].startswith("--")), len(args))
    return args[start:end]


def test_vllm_and_sglang_get_their_own_lora_flags(helm: Helm) -> None:
    rendered = helm.template(values=lora_values())
    assert_valid(rendered)
    vllm = container(rendered, "v")["args"]
    assert "--enable-lora" in vllm
    assert flags_after(vllm, "--lora-modules") == ["sql-lora=/models/adapters/sql", "support-bot=org/support-bot-lora"]
    assert (flags_after(vllm, "--max-loras"), flags_after(vllm, "--max-lora-rank")) == (["4"], ["64"])
    assert env_of(rendered, "v")["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == {
        "name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING",
        "value": "True",
    }
    sglang = container(rendered, "s")["args"]
    assert "--enable-lora" in sglang and "--lora-modules" not in sglang and "--max-loras" not in sglang
    assert flags_after(sglang, "--lora-paths") == ["sql-lora=/models/adapters/sql", "support-bot=org/support-bot-lora"]
    assert (flags_after(sglang, "--max-loras-per-batch"), flags_after(sglang, "--max-lora-rank")) == (["4"], ["64"])
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in env_of(rendered, "s")  # SGLang's endpoints need no switch
    simulator = container(rendered, "sim")["args"]
    assert flags_after(simulator, "--lora-modules") == ["sim-lora=/adapters/sim"]
    assert "--allow-runtime-lora-updating" in simulator
    plain = container(rendered, "plain")["args"]
    assert not any("lora" in arg for arg in plain)
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in env_of(rendered, "plain")


def test_runtime_updates_stay_off_unless_asked(helm: Helm) -> None:
    values = lora_values()
    values["engines"][0]["lora"] = {"adapters": ADAPTERS}
    rendered = helm.template(values=values)
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in env_of(rendered, "v")
    assert "--max-loras" not in container(rendered, "v")["args"]


def test_adapters_and_engine_apis_in_the_routing_map(helm: Helm) -> None:
    rendered = helm.template(values=lora_values())
    routes = {route["name"]: route for route in rendered.routing["engines"]}
    assert {name: (route.get("adapters"), route.get("api")) for name, route in routes.items()} == {
        "v": (["sql-lora", "support-bot"], "vllm"),
        "s": (["sql-lora", "support-bot"], "sglang"),
        "sim": (["sim-lora"], "sglang"),
        # Engines without `lora` too: adapters loaded at run time (discover_adapters) must reach SGLang as
        # <base>:<adapter>, which only `api: sglang` makes the gateway send.
        "plain": (None, "vllm"),
        "plain-sg": (None, "sglang"),
        "far": (["far-lora"], "sglang"),
    }
    loaded = {spec.name: spec for spec in rendered.load_routing().engines}  # the gateway's own loader
    assert loaded["s"].adapters == ("sql-lora", "support-bot") and loaded["s"].api == "sglang"


def test_discovery_settings_and_admin_keys_pass_the_schema(helm: Helm) -> None:
    values = lora_values(
        gateway={"settings": {"discover_adapters": True, "max_discovered_adapters": 200}},
        auth={"enabled": True, "keys": [{"name": "ops", "sha256": "a" * 64, "admin": True, "models": ["m:*"]}]},
    )
    rendered = helm.template(values=values)
    assert rendered.load_routing().settings.discover_adapters is True


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"lora": {"adapters": [{"name": "a"}]}}, ["lora.adapters[0]", "path"]),
        ({"lora": {"adapters": [{"name": "a", "path": "/x"}, {"name": "a", "path": "/y"}]}}, ["twice"]),
        ({"lora": {"maxLoras": 2}, "extraArgs": ["--max-loras=8"]}, ["--max-loras", "lora"]),
        ({"api": "sglang"}, ["api is only for url and urls entries"]),
        ({"lora": {"adapters": [{"name": "a:b", "path": "/x"}]}}, [SCHEMA_ERROR]),
        ({"lora": {"maxLoras": 0}}, [SCHEMA_ERROR]),
    ],
)
def test_bad_lora_values_are_refused_naming_them(helm: Helm, change: dict[str, Any], words: list[str]) -> None:
    values = {"engines": [{"name": "v", "engine": "vllm", "model": "m", **change}]}
    message = helm.template_error(values=values)
    for word in words:
        assert word in message, message


@pytest.mark.parametrize(
    ("other", "words"),
    [
        ({"name": "w", "engine": "sglang", "model": "n", "lora": {"adapters": [{"name": "a", "path": "/y"}]}},
         ["engines[1] \"w\"", "adapter \"a\" is already an adapter of model \"m\""]),
        ({"name": "w", "engine": "sglang", "model": "a"}, ["adapter \"a\" is the model id of engine \"w\""]),
        ({"name": "w", "engine": "sglang", "model": "n", "aliases": ["a"]}, ["adapter \"a\" is an alias"]),
    ],
)  # fmt: skip
def test_adapter_names_are_checked_across_engines(helm: Helm, other: dict[str, Any], words: list[str]) -> None:
    first = {"name": "v", "engine": "vllm", "model": "m", "lora": {"adapters": [{"name": "a", "path": "/x"}]}}
    message = helm.template_error(values={"engines": [first, other]})
    for word in words:
        assert word in message, message


def test_keys_may_name_adapters_and_whole_base_models(helm: Helm) -> None:
    keys = [{"name": "a", "sha256": "b" * 64, "models": ["sql-lora", "meta-llama/Llama-3.1-8B-Instruct:*", "p:*"]}]
    helm.template(values=lora_values(auth={"enabled": True, "keys": keys}))
    keys = [{"name": "a", "sha256": "b" * 64, "models": ["not-an-adapter"]}]
    message = helm.template_error(values=lora_values(auth={"enabled": True, "keys": keys}))
    assert 'model "not-an-adapter" is neither a model id nor an alias' in message


def test_sglang_without_adapters_sizes_its_lora_memory_from_rank_and_target_modules(helm: Helm) -> None:
    lora = {"runtimeUpdates": True, "maxLoraRank": 48, "targetModules": ["q_proj", "v_proj"]}
    values = {"engines": [{"name": "s", "engine": "sglang", "model": "m", "lora": lora}]}
    rendered = helm.template(values=values)
    assert_valid(rendered)
    args = container(rendered, "s")["args"]
    assert "--enable-lora" in args and "--lora-paths" not in args
    assert (flags_after(args, "--max-lora-rank"), flags_after(args, "--lora-target-modules")) == (
        ["48"],
        ["q_proj", "v_proj"],
    )


@pytest.mark.parametrize(
    ("engine", "lora", "words"),
    [
        # SGLang refuses to start: "you need to specify both --max-lora-rank and --lora-target-modules".
        ("sglang", {"runtimeUpdates": True}, ['engines[0] "e"', "lora.maxLoraRank and lora.targetModules"]),
        ("sglang", {"maxLoraRank": 64}, ["lora.maxLoraRank and lora.targetModules"]),
        ("sglang", {"targetModules": ["all"]}, ["lora.maxLoraRank and lora.targetModules"]),
        ("vllm", {"targetModules": ["all"]}, ["lora.targetModules is SGLang's"]),
        ("vllm", {"maxLoraRank": 48}, [SCHEMA_ERROR]),  # vLLM takes 1, 8, 16, 32, 64, 128, 256, 320, 512
    ],
)
def test_lora_values_each_engine_refuses_are_refused(
    helm: Helm, engine: str, lora: dict[str, Any], words: list[str]
) -> None:
    message = helm.template_error(values={"engines": [{"name": "e", "engine": engine, "model": "m", "lora": lora}]})
    for word in words:
        assert word in message, message


def test_vllm_takes_its_own_ranks(helm: Helm) -> None:
    values = {"engines": [{"name": "v", "engine": "vllm", "model": "m", "lora": {"maxLoraRank": 320}}]}
    assert flags_after(container(helm.template(values=values), "v")["args"], "--max-lora-rank") == ["320"]


@pytest.mark.parametrize("settings", [{}, {"discover_adapters": True}])
def test_an_sglang_model_with_a_colon_cannot_take_adapters(helm: Helm, settings: dict[str, Any]) -> None:
    engine = {"name": "s", "engine": "sglang", "model": "qwen2.5:7b"}
    if not settings:
        engine["lora"] = {"adapters": [{"name": "a", "path": "/a"}]}
    message = helm.template_error(values={"engines": [engine], "gateway": {"settings": settings}})
    assert "contains ':'" in message and "servedModelName" in message, message


def test_with_discovery_keys_still_name_models_of_the_map(helm: Helm) -> None:
    discovery = {"gateway": {"settings": {"discover_adapters": True}}}
    fine = ["loaded-later", "meta-llama/Llama-3.1-8B-Instruct:*", "meta-llama/Llama-3.1-8B-Instruct:loaded-later"]
    keys = [{"name": "a", "sha256": "b" * 64, "models": fine}]
    helm.template(values=lora_values(auth={"enabled": True, "keys": keys}, **discovery))
    for wrong in ("no-such-model:*", "no-such-model:some-lora"):
        keys = [{"name": "a", "sha256": "b" * 64, "models": [wrong]}]
        message = helm.template_error(values=lora_values(auth={"enabled": True, "keys": keys}, **discovery))
        assert f'model "{wrong}" is neither a model id nor an alias' in message, message
