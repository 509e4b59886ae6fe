"""LoRA adapters over real processes: static adapters of the routing map, adapters discovered from the
engines' own lists, SGLang's `<base>:<adapter>`, `/v1/models` cards, access lists, and loading and
unloading through the gateway on every replica (simulated vLLM and SGLang engines, stand-in engines
that record what they receive)."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import aiohttp
import openai
import pytest
import yaml
from aiohttp import web

from gateway_app.adapters import DiscoveredAdapters
from gateway_app.auth import hash_key
from gateway_app.balancer import pick_replica
from gateway_app.config import ConfigError, parse_routing_map
from gateway_app.errors import ModelNotFound
from gateway_app.lora_admin import AdapterAdmin
from gateway_app.metrics import GatewayMetrics
from gateway_app.models_catalog import MAX_LISTS_AT_ONCE, ModelCatalog
from gateway_app.replicas import Replica
from gateway_app.route_table import build_routes
from gateway_app.snapshot import Snapshot
from gateway_app.upstream import create_session
from tests.background_server import BackgroundServer
from tests.recording_engine import Received, RecordingEngine
from tests.routes import write_routing_map
from tests.support import RunningProcess, free_port
from tests.web import get, metric_value, post, wait_for

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]
BASE = "meta-llama/Llama-3.1-8B-Instruct"
OTHER = "other-base"
KEY_ALL, KEY_SQL, KEY_WHOLE, KEY_BASE = "sk-all-1", "sk-sql-only-2", "sk-whole-base-3", "sk-base-only-4"
KEY_ADMIN, KEY_USER = "sk-admin-5", "sk-user-6"


def keys_file(path, *entries: dict):
    path.write_text(yaml.safe_dump({"keys": list(entries)}))
    return path


def key(name: str, secret: str, **extra) -> dict:
    return {"name": name, "sha256": hash_key(secret), **extra}


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def last_sent(engine: RecordingEngine, path: str = CHAT) -> Received:
    """The last request the engine received on `path` (its /v1/models is polled meanwhile)."""
    return next(received for received in reversed(engine.received) if received.path == path)


def chat(gateway: RunningProcess, model: str, secret: str = KEY_ALL, **extra):
    body = {"model": model, "messages": HI, "max_tokens": 2, **extra}
    return post(gateway.url + CHAT, body, headers=bearer(secret))


@pytest.fixture(scope="module")
def engines(module_processes):
    """vLLM and SGLang simulators of one base model with adapters, and a recording stand-in engine."""
    vllm = module_processes.simulator(
        "vllm", BASE, extra_args=["--lora-modules", "sql-lora=/adapters/sql", '{"name": "support-bot", "path": "/a/s"}']
    )
    sglang = module_processes.simulator("sglang", BASE, extra_args=["--lora-paths", "sql-lora=/adapters/sql"])
    recording = module_processes.recording_engine()
    recording.models = [OTHER]
    # Listed by the engine, but not in the map, and discovery is off: not routed, not shown.
    recording.extra_cards = [{"id": "unlisted-lora", "object": "model", "parent": OTHER, "root": "/x"}]
    return {"vllm": vllm, "sglang": sglang, "recording": recording}


@pytest.fixture(scope="module")
def lora_gateway(engines, module_processes, tmp_path_factory) -> RunningProcess:
    folder = tmp_path_factory.mktemp("lora")
    routing = [
        {
            "name": "vllm-base",
            "model": BASE,
            "owned_by": "vllm",
            "url": engines["vllm"].url,
            "default": True,
            "api": "vllm",
            "adapters": ["sql-lora", "support-bot"],
        },
        {
            "name": "sglang-base",
            "model": BASE,
            "owned_by": "sglang",
            "url": engines["sglang"].url,
            "api": "sglang",
            "adapters": ["sql-lora"],
        },
        {
            "name": "recorded",
            "model": OTHER,
            "owned_by": "vllm",
            "url": engines["recording"].url,
            "adapters": ["rec-lora"],
        },
    ]
    config = write_routing_map(folder / "routes.yaml", routing)
    keys = keys_file(
        folder / "keys.yaml",
        key("all", KEY_ALL),
        key("sql-only", KEY_SQL, models=["sql-lora"]),
        key("whole-base", KEY_WHOLE, models=[f"{BASE}:*"]),
        key("base-only", KEY_BASE, models=[BASE]),
    )
    return module_processes.gateway(config, extra_args=["--keys-file", str(keys), "--log-format", "json"])


def test_a_static_adapter_is_forwarded_unchanged(lora_gateway, engines):
    recording = engines["recording"]
    raw = b'{"model": "rec-lora", "messages": [{"role": "user", "content": "hi"}], "x_own_field": [1, 2.50]}'
    answer = post(lora_gateway.url + CHAT, raw, headers=bearer(KEY_ALL))
    assert answer.status == 200, answer.body
    assert answer.headers["x-gateway-engine"] == "recorded"
    assert recording.received[-1].path == CHAT
    assert last_sent(recording).body == raw  # byte for byte: the engine gets the adapter's own name
    # With owned_by (a gateway field, removed) the body is re-encoded, still naming the adapter.
    answer = post(
        lora_gateway.url + CHAT, {"model": "rec-lora", "owned_by": "vllm", "messages": HI}, headers=bearer(KEY_ALL)
    )
    assert answer.status == 200, answer.body
    assert json.loads(last_sent(recording).body) == {"model": "rec-lora", "messages": HI}


def test_adapters_reach_each_engine_in_the_form_it_understands(lora_gateway):
    client = openai.OpenAI(base_url=lora_gateway.url + "/v1", api_key=KEY_ALL, max_retries=0)
    # The default engine (vLLM) takes the adapter's name; the simulator would answer 404 to anything else.
    answer = client.chat.completions.create(model="sql-lora", messages=HI, max_tokens=2)
    assert answer.model == "sql-lora"
    # SGLang takes `<base>:<adapter>` (a bare name would run the base model; its simulator refuses one).
    answer = client.chat.completions.create(
        model="sql-lora", messages=HI, max_tokens=2, extra_body={"owned_by": "sglang"}
    )
    assert answer.model == f"{BASE}:sql-lora"
    # SGLang's own form is accepted too: forwarded unchanged to SGLang, as the adapter's name to vLLM.
    answer = client.chat.completions.create(
        model=f"{BASE}:sql-lora", messages=HI, max_tokens=2, extra_body={"owned_by": "sglang"}
    )
    assert answer.model == f"{BASE}:sql-lora"
    answer = client.chat.completions.create(model=f"{BASE}:sql-lora", messages=HI, max_tokens=2)
    assert answer.model == "sql-lora"
    # An adapter only one engine serves: owned_by applies to adapters as to models.
    refused = chat(lora_gateway, "support-bot", owned_by="sglang")
    assert refused.status == 404
    assert refused.json()["error"]["code"] == "engine_not_found"
    assert "`vllm`" in refused.json()["error"]["message"]
    for unknown in (f"{BASE}:no-such-lora", "no-such-lora", f"{OTHER}:sql-lora", "unlisted-lora"):
        refused = chat(lora_gateway, unknown)
        assert refused.status == 404, unknown
        assert refused.json()["error"]["code"] == "model_not_found"


def test_models_lists_one_card_per_adapter_and_owner(lora_gateway):
    answer = get(lora_gateway.url + "/v1/models", headers=bearer(KEY_ALL))
    assert answer.status == 200, answer.body
    cards = {(card["id"], card["owned_by"]): card for card in answer.json()["data"]}
    assert set(cards) == {
        (BASE, "vllm"),
        (BASE, "sglang"),
        (OTHER, "vllm"),
        ("sql-lora", "vllm"),
        ("sql-lora", "sglang"),
        ("support-bot", "vllm"),
        ("rec-lora", "vllm"),
    }
    sql = cards[("sql-lora", "vllm")]
    assert (sql["object"], sql["parent"], sql["root"]) == ("model", BASE, "/adapters/sql")
    assert cards[("support-bot", "vllm")]["root"] == "/a/s"
    assert cards[("sql-lora", "sglang")]["parent"] == BASE
    assert cards[(BASE, "vllm")]["parent"] is None
    # A static adapter the engine does not list (yet) is shown with its name as root, and routes.
    assert (cards[("rec-lora", "vllm")]["parent"], cards[("rec-lora", "vllm")]["root"]) == (OTHER, "rec-lora")
    assert get(lora_gateway.url + "/v1/models/support-bot", headers=bearer(KEY_ALL)).json()["parent"] == BASE


@pytest.mark.parametrize(
    ("secret", "usable"),
    [
        (KEY_SQL, {"sql-lora", f"{BASE}:sql-lora"}),  # either name of the adapter
        (KEY_WHOLE, {BASE, "sql-lora", "support-bot", f"{BASE}:sql-lora"}),
        (KEY_BASE, {BASE}),
    ],
)
def test_access_lists_name_adapters_and_whole_base_models(lora_gateway, secret, usable):
    for model in (BASE, "sql-lora", "support-bot", f"{BASE}:sql-lora", "rec-lora", OTHER):
        answer = chat(lora_gateway, model, secret)
        if model in usable:
            assert answer.status == 200, (model, answer.body)
            continue
        # Exactly what an unknown model gets, listing only what the key may use.
        assert answer.status == 404, model
        error = answer.json()["error"]
        assert error["code"] == "model_not_found"
        offered = error["message"].partition("Available")[2]
        for hidden in {"sql-lora", "support-bot", "rec-lora", BASE, OTHER} - usable:
            assert f"`{hidden}`" not in offered, (model, error["message"])
    listed = {card["id"] for card in get(lora_gateway.url + "/v1/models", headers=bearer(secret)).json()["data"]}
    assert listed == usable - {f"{BASE}:sql-lora"}


def test_metrics_and_log_carry_the_adapter_and_its_base_model(lora_gateway):
    assert chat(lora_gateway, "support-bot").status == 200
    metrics = get(lora_gateway.url + "/metrics").body.decode()
    labels = {"model": "support-bot", "base_model": BASE, "engine": "vllm-base", "status": "200"}
    assert metric_value(metrics, "llm_gateway_adapter_requests_total", **labels) >= 1
    assert metric_value(metrics, "llm_gateway_requests_total", model="support-bot", engine="vllm-base") >= 1

    def logged() -> list[dict]:
        lines = [json.loads(line) for line in lora_gateway.log().splitlines() if line.startswith("{")]
        return [line for line in lines if line.get("model") == "support-bot"]

    wait_for(lambda: logged(), message="the adapter's log line")
    assert logged()[-1]["base_model"] == BASE
    assert logged()[-1]["engine"] == "vllm-base"


def test_discovered_adapters_route_while_the_engine_lists_them(processes, tmp_path):
    engine, other = processes.recording_engine(), processes.recording_engine()
    engine.models, other.models = ["m"], ["n"]
    routing = [
        {"name": "e", "model": "m", "owned_by": "vllm", "url": engine.url, "adapters": ["static-lora"]},
        {"name": "o", "model": "n", "owned_by": "vllm", "url": other.url, "adapters": ["shared-lora"]},
    ]
    settings = {"discover_adapters": True, "models_cache_ttl": 0.2, "max_discovered_adapters": 2}
    gateway = processes.gateway(write_routing_map(tmp_path / "routes.yaml", routing, settings=settings))

    def status(model: str) -> int:
        return post(gateway.url + CHAT, {"model": model, "messages": HI}).status

    assert status("static-lora") == 200  # from the map: routed before the engine said anything of it
    assert status("late-lora") == 404
    engine.extra_cards = [
        {"id": "late-lora", "object": "model", "parent": "m", "root": "/adapters/late"},
        {"id": "foreign-lora", "object": "model", "parent": "another-model", "root": "/adapters/f"},
        # The map's adapter of another base model keeps its engine: an engine's list never takes it over.
        {"id": "shared-lora", "object": "model", "parent": "m", "root": "/adapters/shared"},
    ]
    wait_for(lambda: status("late-lora") == 200, message="the loaded adapter routed")
    shared = post(gateway.url + CHAT, {"model": "shared-lora", "messages": HI})
    assert (shared.status, shared.headers["x-gateway-engine"]) == (200, "o")
    assert last_sent(engine).body == json.dumps({"model": "late-lora", "messages": HI}).encode()
    card = get(gateway.url + "/v1/models/late-lora").json()
    assert (card["parent"], card["root"], card["owned_by"]) == ("m", "/adapters/late", "vllm")
    assert status("foreign-lora") == 404  # its parent is not the engine's model
    # At most max_discovered_adapters of an engine's list, the first listed; the map's own adapters (which
    # the engine lists too) do not count. Past the limit, one warning, not one per reading.
    engine.extra_cards = [
        {"id": name, "object": "model", "parent": "m", "root": f"/adapters/{name}"}
        for name in ("static-lora", "a1", "a2", "a3")
    ]
    wait_for(lambda: status("a2") == 200, message="the new list routed")
    assert (status("a1"), status("a3"), status("late-lora"), status("static-lora")) == (200, 404, 404, 200)
    polls = len([r for r in engine.received if r.path == "/v1/models"])
    wait_for(lambda: len([r for r in engine.received if r.path == "/v1/models"]) >= polls + 3, message="3 readings")
    assert gateway.log().count("more than 2 adapters; the rest are not routed") == 1, gateway.log()
    engine.extra_cards = []
    wait_for(lambda: status("a1") == 404, message="the unloaded adapter gone")
    assert status("static-lora") == 200
    # With keys off every caller is anonymous: it may use every model, and administer nothing.
    refused = post(gateway.url + "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/x", "engine": "e"})
    assert (refused.status, refused.json()["error"]["code"]) == (403, "admin_required")
    assert not [r for r in engine.received if "lora_adapter" in r.path]


@pytest.fixture
def admin_gateway(processes, tmp_path):
    """One vLLM engine of two replicas and one SGLang engine, all allowing run-time LoRA updates."""
    runtime = ["--allow-runtime-lora-updating"]
    replicas = [processes.simulator("vllm", BASE, extra_args=runtime) for _ in range(2)]
    sglang = processes.simulator("sglang", BASE, extra_args=runtime)
    routing = [
        {"name": "pool", "model": BASE, "owned_by": "vllm", "urls": [r.url for r in replicas], "api": "vllm"},
        {"name": "sg", "model": BASE, "owned_by": "sglang", "url": sglang.url, "api": "sglang"},
    ]
    config = write_routing_map(
        tmp_path / "routes.yaml", routing, settings={"discover_adapters": True, "models_cache_ttl": 60}
    )
    keys = keys_file(tmp_path / "keys.yaml", key("ops", KEY_ADMIN, admin=True), key("user", KEY_USER))
    gateway = processes.gateway(config, extra_args=["--keys-file", str(keys)])
    return gateway, replicas, sglang


def listed_by(engine: RunningProcess) -> set[str]:
    return {card["id"] for card in get(engine.url + "/v1/models").json()["data"]}


def test_only_administrators_load_adapters(admin_gateway):
    gateway, replicas, _ = admin_gateway
    body = {"lora_name": "new-lora", "lora_path": "/adapters/new", "engine": "pool"}
    answer = post(gateway.url + "/v1/load_lora_adapter", body, headers=bearer(KEY_USER))
    assert answer.status == 403
    error = answer.json()["error"]
    assert (error["type"], error["code"]) == ("permission_error", "admin_required")
    assert "pool" not in error["message"]
    assert post(gateway.url + "/v1/load_lora_adapter", body).status == 401
    assert all("new-lora" not in listed_by(replica) for replica in replicas)


def test_loading_and_unloading_reach_every_replica(admin_gateway):
    gateway, replicas, sglang = admin_gateway
    load = gateway.url + "/v1/load_lora_adapter"
    body = {"lora_name": "new-lora", "lora_path": "/adapters/new", "engine": "pool"}
    assert chat(gateway, "new-lora", KEY_USER).status == 404
    answer = post(load, body, headers=bearer(KEY_ADMIN))
    assert answer.status == 200, answer.body
    report = answer.json()
    assert (report["action"], report["lora_name"], report["engine"]) == ("load", "new-lora", "pool")
    assert {r["endpoint"] for r in report["replicas"]} == {r.url for r in replicas}
    assert all(r["status"] == 200 for r in report["replicas"])
    assert all("new-lora" in listed_by(replica) for replica in replicas)
    # The gateway read the engines' lists again at once: the adapter routes now, on either replica.
    assert chat(gateway, "new-lora", KEY_USER).status == 200
    # SGLang's own paths, chosen by owned_by.
    sg_body = {"lora_name": "sg-lora", "lora_path": "/adapters/sg", "owned_by": "sglang"}
    answer = post(load, sg_body, headers=bearer(KEY_ADMIN))
    assert answer.status == 200, answer.body
    assert "sg-lora" in listed_by(sglang)
    assert chat(gateway, "sg-lora", KEY_USER, owned_by="sglang").status == 200

    # Loaded twice: every replica refuses alike, so does the gateway, naming them.
    answer = post(load, body, headers=bearer(KEY_ADMIN))
    assert answer.status == 400
    message = answer.json()["error"]["message"]
    assert all(replica.url in message for replica in replicas) and "already been loaded" in message

    # One replica no longer has it: the unload succeeds on the other, and the answer says which failed.
    post(replicas[0].url + "/v1/unload_lora_adapter", {"lora_name": "new-lora"})
    answer = post(
        gateway.url + "/v1/unload_lora_adapter", {"lora_name": "new-lora", "engine": "pool"}, headers=bearer(KEY_ADMIN)
    )
    assert answer.status == 502
    error = answer.json()["error"]
    assert (error["type"], error["code"]) == ("upstream_error", "adapter_update_failed")
    assert f"failed on 1 of 2 replicas: {replicas[0].url} (404" in error["message"]
    assert f"succeeded on: {replicas[1].url}" in error["message"]
    assert all("new-lora" not in listed_by(replica) for replica in replicas)
    assert chat(gateway, "new-lora", KEY_USER).status == 404


def test_adapters_loaded_through_the_gateway_follow_the_routing_maps_name_rules(admin_gateway):
    gateway, replicas, _ = admin_gateway
    for name in ("a:b", "a*", "has space", BASE):
        body = {"lora_name": name, "lora_path": "/p", "engine": "pool"}
        answer = post(gateway.url + "/v1/load_lora_adapter", body, headers=bearer(KEY_ADMIN))
        assert answer.status == 400, (name, answer.body)
        assert (answer.json()["error"]["type"], answer.json()["error"]["param"]) == (
            "invalid_request_error",
            "lora_name",
        )
    assert all(listed_by(replica) == {BASE} for replica in replicas)


def test_admin_requests_must_name_one_engine(admin_gateway):
    gateway, _, _ = admin_gateway
    load = gateway.url + "/v1/load_lora_adapter"
    cases = [
        ({"lora_name": "x", "lora_path": "/p"}, 400, "engine"),
        ({"lora_name": "x", "lora_path": "/p", "engine": "nope"}, 404, "engine"),
        ({"lora_name": "x", "lora_path": "/p", "owned_by": "tgi"}, 404, "owned_by"),
        ({"lora_path": "/p", "engine": "pool"}, 400, "lora_name"),
    ]
    for body, status, param in cases:
        answer = post(load, body, headers=bearer(KEY_ADMIN))
        assert answer.status == status, (body, answer.body)
        assert answer.json()["error"]["param"] == param


@pytest.mark.parametrize(
    ("engines", "words"),
    [
        ([{"adapters": ["a", "a"]}], ["engines[0].adapters", "twice"]),
        ([{"adapters": ["m"]}], ["engines[0].adapters", "collides with the model id"]),
        ([{"aliases": ["x"]}, {"model": "n", "adapters": ["x"]}], ["engines[1].adapters", "alias"]),
        ([{"adapters": ["a"]}, {"model": "n", "adapters": ["a"]}], ["engines[1].adapters", "already an adapter of model 'm'"]),
        ([{"adapters": ["b:c"]}], ["engines[0].adapters", "':'"]),
        ([{"api": "tgi"}], ["engines[0].api"]),
        ([{"adapters": ["a*"]}], ["engines[0].adapters", "'*'"]),
        ([{"adapters": ["a b"]}], ["engines[0].adapters", "whitespace"]),
        ([{"api": "sglang", "model": "qwen2.5:7b", "adapters": ["a"]}], ["engines[0].model", "first ':'"]),
    ],
)  # fmt: skip
def test_bad_adapters_in_the_routing_map_are_refused_naming_the_field(engines, words):
    entries = [
        {"name": f"e{i}", "model": "m", "owned_by": f"o{i}", "url": f"http://e{i}:8000", **fields}
        for i, fields in enumerate(engines)
    ]
    with pytest.raises(ConfigError) as refused:
        parse_routing_map(json.dumps({"engines": entries}))
    for word in words:
        assert word in str(refused.value), str(refused.value)


@pytest.mark.parametrize("allowed", [True, False])
def test_the_vllm_simulator_takes_runtime_updates_from_vllms_variable(processes, allowed):
    port = free_port()
    args = ["simulate", "--engine", "vllm", "--model", "m", "--host", "127.0.0.1", "--port", str(port)]
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True" if allowed else "False"}
    sim = processes.cli(args, port, "/health", "sim-lora", env=env)
    answer = post(sim.url + "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/adapters/x"})
    assert answer.status == (200 if allowed else 404)
    if allowed:
        assert answer.body == b"Success: LoRA adapter 'x' added successfully."
        card = get(sim.url + "/v1/models").json()["data"][1]
        assert (card["id"], card["parent"], card["root"]) == ("x", "m", "/adapters/x")


def discovering_gateway(processes, tmp_path, routing: list[dict], keys: list[dict] | None = None, **settings):
    """A gateway that discovers adapters, reading the engines' lists every 0.2 s unless told otherwise."""
    settings = {"discover_adapters": True, "models_cache_ttl": 0.2, **settings}
    config = write_routing_map(tmp_path / "routes.yaml", routing, settings=settings)
    extra = ["--log-format", "json"]
    if keys is not None:
        extra += ["--keys-file", str(keys_file(tmp_path / "keys.yaml", *keys))]
    return processes.gateway(config, extra_args=extra)


def test_a_discovered_adapter_goes_only_to_the_replicas_that_list_it(processes, tmp_path):
    # Replicas differ after a restart, a scale-up or a load that reached only some of them.
    runtime = ["--allow-runtime-lora-updating"]
    replicas = [processes.simulator("vllm", "m", extra_args=runtime) for _ in range(2)]
    routing = [{"name": "pool", "model": "m", "owned_by": "vllm", "urls": [r.url for r in replicas]}]
    gateway = discovering_gateway(processes, tmp_path, routing, balancing="round_robin")
    for replica, name in zip(replicas, ("only-on-0", "only-on-1"), strict=True):
        assert post(replica.url + "/v1/load_lora_adapter", {"lora_name": name, "lora_path": f"/{name}"}).status == 200

    def status(model: str) -> int:
        return post(gateway.url + CHAT, {"model": model, "messages": HI, "max_tokens": 1}).status

    wait_for(lambda: status("only-on-0") == 200 and status("only-on-1") == 200, message="both adapters routed")
    # Round robin would send every other request to the replica without the adapter (a 404 there).
    assert [status(name) for name in ("only-on-0", "only-on-1") for _ in range(10)] == [200] * 20
    cards = {card["id"]: card for card in get(gateway.url + "/v1/models").json()["data"]}
    assert (cards["only-on-0"]["root"], cards["only-on-1"]["root"]) == ("/only-on-0", "/only-on-1")


def test_discovered_adapters_have_bounded_metric_series(processes, tmp_path):
    sim = processes.simulator(
        "vllm", "m", extra_args=["--allow-runtime-lora-updating", "--lora-modules", "static-lora=/s"]
    )
    routing = [{"name": "e", "model": "m", "owned_by": "vllm", "url": sim.url, "adapters": ["static-lora"]}]
    gateway = discovering_gateway(processes, tmp_path, routing, max_adapter_metric_labels=1)

    def status(model: str) -> int:
        body = {
            "model": model,
            "messages": HI,
            "max_tokens": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        return post(gateway.url + CHAT, body).status

    for name in ("first-lora", "second-lora"):  # one after the other: the first listed takes the one label
        assert post(sim.url + "/v1/load_lora_adapter", {"lora_name": name, "lora_path": "/x"}).status == 200
        wait_for(lambda name=name: status(name) == 200, message=f"{name} routed")

    def series(model: str) -> list[str]:
        text = get(gateway.url + "/metrics").body.decode()
        return [line for line in text.splitlines() if f'model="{model}"' in line and not line.startswith("#")]

    assert metric_value("\n".join(series("first-lora")), "llm_gateway_requests_total", engine="e") >= 1
    assert series("second-lora") == []  # past the engine's budget: counted under its base model
    second = {"model": "m", "base_model": "m", "engine": "e", "status": "200"}
    assert metric_value("\n".join(series("m")), "llm_gateway_adapter_requests_total", **second) >= 1

    def logged_models() -> set[str]:
        return {json.loads(line).get("model") for line in gateway.log().splitlines() if line.startswith("{")}

    wait_for(lambda: "second-lora" in logged_models(), message="the log line naming the adapter in full")
    # Unloaded: its series go (and its label is free again); the map's adapters keep their own name.
    assert post(sim.url + "/v1/unload_lora_adapter", {"lora_name": "first-lora"}).status == 200
    # (Watched through /v1/models: a request routed just before the unload would count under it again.)
    wait_for(lambda: get(gateway.url + "/v1/models/first-lora").status == 404, message="the unloaded adapter gone")
    assert series("first-lora") == []
    assert status("static-lora") == 200
    assert metric_value("\n".join(series("static-lora")), "llm_gateway_requests_total", engine="e") >= 1


def test_a_reload_that_changes_an_engines_model_drops_the_adapters_it_listed(processes, tmp_path):
    engine = processes.recording_engine()
    engine.models = ["m", "n"]
    engine.extra_cards = [{"id": "m-lora", "object": "model", "parent": "m", "root": "/m-lora"}]
    routing = [{"name": "e", "model": "m", "owned_by": "vllm", "url": engine.url}]
    # Read once at start, then not for a minute: what the table holds after the reload comes from before it.
    gateway = discovering_gateway(processes, tmp_path, routing, models_cache_ttl=60)
    wait_for(lambda: post(gateway.url + CHAT, {"model": "m-lora", "messages": HI}).status == 200, message="routed")
    write_routing_map(
        tmp_path / "routes.yaml",
        [{**routing[0], "model": "n"}],
        settings={"discover_adapters": True, "models_cache_ttl": 60},
    )
    wait_for(lambda: post(gateway.url + CHAT, {"model": "n", "messages": HI}).status == 200, message="reloaded")
    # An adapter of m is not one of n: the engine's new model did not list it.
    assert post(gateway.url + CHAT, {"model": "m-lora", "messages": HI}).status == 404


def test_the_route_table_never_rebuilds_adapter_routes_on_a_request():
    discovered = DiscoveredAdapters()
    routing = parse_routing_map(
        json.dumps(
            {
                "settings": {"discover_adapters": True},
                "engines": [{"name": "e", "model": "m", "owned_by": "vllm", "url": "http://e:8000"}],
            }
        )
    )
    table = build_routes(routing, discovered=discovered)
    listed = {"http://e:8000": [{"id": "late-lora", "object": "model", "parent": "m"}]}
    discovered.update("e", "m", listed, ["http://e:8000"], (), table.model_names, routing.settings)
    with pytest.raises(ModelNotFound):  # until the catalog, having read the lists, brings the table up to date
        table.resolve("late-lora", None)
    table.sync_adapters()
    assert table.resolve("late-lora", None).engine.base_model == "m"


@dataclass
class HeldListEngine(RecordingEngine):
    """A stand-in engine whose `/v1/models` reads its list when asked but answers only once `holding` is
    cleared, and whose load adds the adapter at once: a reading under way while an adapter is loaded."""

    holding: bool = True

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/v1/models":
            self.received.append(Received(request.path, dict(request.headers), b""))
            cards = [{"id": "m", "object": "model", "owned_by": "vllm"}, *self.extra_cards]
            while self.holding:
                await asyncio.sleep(0.01)
            return web.json_response({"object": "list", "data": cards})
        if request.path == "/v1/load_lora_adapter":
            name = (await request.json())["lora_name"]
            self.extra_cards = [*self.extra_cards, {"id": name, "object": "model", "parent": "m", "root": "/x"}]
            return web.Response(text="Success")
        return await super()._handle(request)


def test_the_lists_read_after_a_load_are_read_after_it(processes, tmp_path):
    engine = processes.add(HeldListEngine(models=["m"]).start())
    routing = [{"name": "e", "model": "m", "owned_by": "vllm", "url": engine.url}]
    keys = [key("ops", KEY_ADMIN, admin=True)]
    gateway = discovering_gateway(processes, tmp_path, routing, keys, models_cache_ttl=60, models_timeout=30)
    # The gateway's first reading is under way, and holds the list from before the load.
    wait_for(lambda: any(r.path == "/v1/models" for r in engine.received), message="a reading under way")
    body = {"lora_name": "new-lora", "lora_path": "/x", "engine": "e"}
    with ThreadPoolExecutor(1) as pool:
        loading = pool.submit(post, gateway.url + "/v1/load_lora_adapter", body, headers=bearer(KEY_ADMIN))
        # Logged just before the gateway asks for the lists again (while the old reading still runs).
        wait_for(lambda: "load on engine e by ops succeeded" in gateway.log(), message="the load done")
        engine.holding = False
        assert loading.result().status == 200
    assert chat(gateway, "new-lora", KEY_ADMIN).status == 200  # the admin was told it loaded: it routes


def test_discovered_names_follow_the_routing_maps_rules(processes, tmp_path):
    engine, other = processes.recording_engine(), processes.recording_engine()
    engine.models, other.models = ["m"], ["n"]
    refused = ["n:*", "n:foo", "has space", "n"]  # a grant, SGLang's form of n's adapter, whitespace, a model id
    engine.extra_cards = [
        {"id": name, "object": "model", "parent": "m", "root": "/x"} for name in [*refused, "fine-lora"]
    ]
    routing = [
        {"name": "e", "model": "m", "owned_by": "vllm", "url": engine.url},
        {"name": "f", "model": "n", "owned_by": "sglang", "url": other.url, "api": "sglang", "adapters": ["foo"]},
    ]
    keys = [key("all", KEY_ALL), key("whole-n", KEY_WHOLE, models=["n:*"])]
    gateway = discovering_gateway(processes, tmp_path, routing, keys)
    wait_for(lambda: chat(gateway, "fine-lora").status == 200, message="the adapter with a fine name routed")
    # `n:foo` is still n's adapter foo (SGLang's form), not an adapter of m that took its name.
    answer = chat(gateway, "n:foo")
    assert (answer.status, answer.headers["x-gateway-engine"]) == (200, "f")
    assert json.loads(last_sent(other).body)["model"] == "n:foo"
    # `n:*` grants n and n's adapters: not an adapter of m named so.
    assert chat(gateway, "n:*", KEY_WHOLE).status == 404
    polls = len([r for r in engine.received if r.path == "/v1/models"])
    wait_for(lambda: len([r for r in engine.received if r.path == "/v1/models"]) >= polls + 3, message="3 readings")
    log = gateway.log()
    assert log.count("lists an adapter that is not routed") == len(refused), log  # each once


def test_an_engine_refusing_the_gateways_credential_is_a_bad_gateway(processes, tmp_path):
    engine = processes.recording_engine()
    engine.fail_with, engine.fail_health = 401, False
    routing = [{"name": "e", "model": "m", "owned_by": "vllm", "url": engine.url}]
    gateway = discovering_gateway(processes, tmp_path, routing, [key("ops", KEY_ADMIN, admin=True)])
    body = {"lora_name": "x", "lora_path": "/x", "engine": "e"}
    answer = post(gateway.url + "/v1/load_lora_adapter", body, headers=bearer(KEY_ADMIN))
    assert answer.status == 502, answer.body  # not the client's 401: its key was good
    error = answer.json()["error"]
    assert (error["type"], error["code"]) == ("upstream_error", "adapter_update_failed")
    assert f"{engine.url} (401" in error["message"] and "credential" in error["message"]


@dataclass
class Update:
    """One load or unload a replica of a stand-in engine received. `started` and `ended` are places in
    the order of everything the engine saw (a counter, not a clock)."""

    action: str  # "load" or "unload"
    lora_name: str
    replica: str  # the URL it came in on
    started: int
    ended: int | None = None


class HeldUpdatesEngine:
    """A stand-in vLLM engine on `replicas` ports (a replica URL each) that records the loads and unloads
    it receives and how many were under way at once, and holds those of a held adapter until released."""

    def __init__(self, replicas: int, model: str = "m") -> None:
        self.model = model
        self.updates: list[Update] = []
        self.under_way = 0
        self.most_under_way = 0
        self._order = itertools.count()
        self._gates: dict[str, asyncio.Event] = {}
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._server = BackgroundServer(app, ports=replicas)

    def start(self) -> HeldUpdatesEngine:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    @property
    def urls(self) -> list[str]:
        return self._server.urls

    def hold(self, name: str) -> None:
        """Hold the loads and unloads of adapter `name` (those to come) until `release(name)`."""
        self._gates[name] = asyncio.Event()

    def release(self, name: str) -> None:
        assert self._server.loop is not None
        self._server.loop.call_soon_threadsafe(self._gates[name].set)

    def of(self, action: str, name: str) -> list[Update]:
        return [update for update in self.updates if (update.action, update.lora_name) == (action, name)]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/health":
            return web.Response()
        if request.path == "/v1/models":
            return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})
        action = {"/v1/load_lora_adapter": "load", "/v1/unload_lora_adapter": "unload"}.get(request.path)
        if action is None:
            return web.json_response({"detail": "Not Found"}, status=404)
        name = (await request.json())["lora_name"]
        port = request.transport.get_extra_info("sockname")[1] if request.transport else 0
        update = Update(action, name, f"http://127.0.0.1:{port}", next(self._order))
        self.updates.append(update)
        self.under_way += 1
        self.most_under_way = max(self.most_under_way, self.under_way)
        try:
            gate = self._gates.get(name)
            if gate is not None:
                await gate.wait()
        finally:
            self.under_way -= 1
            update.ended = next(self._order)  # before the answer is sent: the gateway sees it end after this
        return web.Response(text=f"Success: LoRA adapter '{name}' {action}ed successfully.")


def admin_gateway_of(processes, tmp_path, urls: list[str], extra_args: list[str] | None = None) -> RunningProcess:
    """A gateway with the admin key KEY_ADMIN in front of one engine `e` (model `m`) of these replicas."""
    routing = [{"name": "e", "model": "m", "owned_by": "vllm", "urls": urls}]
    keys = keys_file(tmp_path / "keys.yaml", key("ops", KEY_ADMIN, admin=True))
    config = write_routing_map(tmp_path / "routes.yaml", routing)
    return processes.gateway(config, extra_args=["--keys-file", str(keys), *(extra_args or [])])


def test_a_load_one_replica_refuses_names_it_without_the_engines_key(processes, tmp_path):
    engine_key = "sk-engine-only-7"
    runtime = ["--allow-runtime-lora-updating", "--api-key", engine_key]
    replicas = [processes.simulator("vllm", "m", extra_args=runtime) for _ in range(3)]
    # The last replica has the adapter already (an earlier load reached only it): it refuses with 400.
    loaded = post(
        replicas[2].url + "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/x"}, headers=bearer(engine_key)
    )
    assert loaded.status == 200
    (tmp_path / "engine.key").write_text(engine_key)
    gateway = admin_gateway_of(
        processes, tmp_path, [r.url for r in replicas], ["--engine-api-key-file", str(tmp_path / "engine.key")]
    )
    body = {"lora_name": "x", "lora_path": "/x", "engine": "e"}
    answer = post(gateway.url + "/v1/load_lora_adapter", body, headers=bearer(KEY_ADMIN))
    assert answer.status == 502, answer.body  # not the 400 of one replica: the others took it
    error = answer.json()["error"]
    assert (error["type"], error["code"]) == ("upstream_error", "adapter_update_failed")
    assert (
        f"failed on 1 of 3 replicas: {replicas[2].url} (400: The lora adapter 'x' has already been loaded.)"
        in error["message"]
    )
    assert f"It succeeded on: {replicas[0].url}, {replicas[1].url}." in error["message"]
    # The replicas took the gateway's key (they refuse requests without it), which the answer never shows.
    for replica in replicas:
        cards = get(replica.url + "/v1/models", headers=bearer(engine_key)).json()["data"]
        assert "x" in {card["id"] for card in cards}
    assert engine_key not in answer.body.decode() and engine_key not in json.dumps(answer.headers)
    assert engine_key not in gateway.log()


def test_an_admin_update_is_sent_to_16_replicas_at_a_time(processes, tmp_path):
    engine = processes.add(HeldUpdatesEngine(replicas=20).start())
    engine.hold("wide-lora")
    gateway = admin_gateway_of(processes, tmp_path, engine.urls)
    body = {"lora_name": "wide-lora", "lora_path": "/x", "engine": "e"}
    with ThreadPoolExecutor(1) as pool:
        loading = pool.submit(post, gateway.url + "/v1/load_lora_adapter", body, headers=bearer(KEY_ADMIN))
        try:
            wait_for(lambda: engine.under_way >= 16, message="16 loads under way")
            # Had the gateway sent more, they would be here by now: it answered a request since, and so did
            # every replica, on connections opened after the gateway's.
            assert get(gateway.url + "/healthz").status == 200
            assert all(get(url + "/health").status == 200 for url in engine.urls)
            assert len(engine.updates) == 16  # the other 4 wait for a place while the 16 are held
        finally:
            engine.release("wide-lora")
        answer = loading.result()
    assert answer.status == 200, answer.body
    assert {replica["endpoint"] for replica in answer.json()["replicas"]} == set(engine.urls)
    assert sorted(update.replica for update in engine.updates) == sorted(engine.urls)  # each once
    assert engine.most_under_way == 16


def test_updates_of_different_adapters_on_one_engine_run_side_by_side(processes, tmp_path):
    engine = processes.add(HeldUpdatesEngine(replicas=3).start())
    engine.hold("slow-lora")
    gateway = admin_gateway_of(processes, tmp_path, engine.urls)
    load = gateway.url + "/v1/load_lora_adapter"
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(
            post, load, {"lora_name": "slow-lora", "lora_path": "/s", "engine": "e"}, headers=bearer(KEY_ADMIN)
        )
        try:
            wait_for(lambda: len(engine.of("load", "slow-lora")) == 3, message="slow-lora's loads under way")
            # Done on every replica while slow-lora's loads are still held there.
            quick = post(
                load,
                {"lora_name": "quick-lora", "lora_path": "/q", "engine": "e"},
                headers=bearer(KEY_ADMIN),
                timeout=10,
            )
            assert quick.status == 200, quick.body
            assert all(update.ended is None for update in engine.of("load", "slow-lora"))
        finally:
            engine.release("slow-lora")
        assert slow.result().status == 200
    assert len(engine.of("load", "quick-lora")) == 3


def test_updates_of_one_adapter_on_one_engine_run_one_after_the_other(processes):
    # In process (the gateway's AdapterAdmin and its aiohttp session, stand-in replicas on loopback), to
    # see each update wait for its turn and the bookkeeping of who waits.
    engine = processes.add(HeldUpdatesEngine(replicas=3).start())
    routing = parse_routing_map(
        json.dumps({"engines": [{"name": "e", "model": "m", "owned_by": "vllm", "urls": engine.urls}]})
    )
    target = build_routes(routing, discovered=DiscoveredAdapters()).engine_named("e")
    assert target is not None
    engine.hold("x")

    async def refresh() -> None:  # the catalog's reading of the engines' lists: not under test here
        return None

    async def until(condition, message: str) -> None:
        for _ in range(1000):
            if condition():
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{message} not reached")

    async def scenario() -> None:
        session = create_session()
        admin = AdapterAdmin(session, refresh)
        started: list[asyncio.Task] = []

        def update(action: str, name: str) -> asyncio.Task:
            body = {"lora_name": name, "lora_path": f"/{name}"} if action == "load" else {"lora_name": name}
            started.append(asyncio.create_task(admin.update(action, target, body, (), "ops")))
            return started[-1]

        try:
            load = update("load", "x")
            await until(lambda: len(engine.of("load", "x")) == 3, "x's loads under way")
            unload, again = update("unload", "x"), update("load", "x")
            await until(lambda: admin.pending_updates().get(("e", "x")) == 3, "two more updates of x waiting")
            # Another adapter's update is not held up by x's, and leaves no entry behind.
            assert (await asyncio.wait_for(update("load", "y"), 10))[0] == 200
            assert admin.pending_updates().keys() == {("e", "x")}
            # Had the waiting updates been sent, they would be here by now: every replica answered since,
            # on connections opened after theirs.
            async with aiohttp.ClientSession() as probe:
                for url in engine.urls:
                    async with probe.get(url + "/health") as answer:
                        assert answer.status == 200
            assert engine.of("unload", "x") == [] and len(engine.of("load", "x")) == 3
            again.cancel()  # one that stops waiting (cancelled) no longer counts as waiting
            with pytest.raises(asyncio.CancelledError):
                await again
            assert admin.pending_updates() == {("e", "x"): 2}
            engine.release("x")
            assert (await load)[0] == 200
            assert (await unload)[0] == 200
        finally:
            engine.release("x")
            for task in started:
                task.cancel()
            await asyncio.gather(*started, return_exceptions=True)
            await session.close()
        # The unload reached no replica before the load had ended on all of them; the cancelled load none.
        assert min(u.started for u in engine.of("unload", "x")) > max(u.ended for u in engine.of("load", "x"))
        assert len(engine.of("unload", "x")) == 3 and len(engine.of("load", "x")) == 3
        assert admin.pending_updates() == {}  # nobody holds or waits: no entry left, whatever the names were

    asyncio.run(scenario())


def test_the_sglang_simulator_splits_the_model_at_the_first_colon_as_sglang_does(processes):
    sim = processes.simulator("sglang", "qwen2.5:7b", extra_args=["--lora-paths", "sql-lora=/adapters/sql"])
    answer = post(sim.url + CHAT, {"model": "qwen2.5:7b:sql-lora", "messages": HI, "max_tokens": 1})
    assert answer.status == 404  # SGLang reads base `qwen2.5`, adapter `7b:sql-lora`: neither is there


def test_an_sglang_engine_without_api_that_lists_adapters_is_warned_about_once(processes, tmp_path):
    engine = processes.recording_engine()
    engine.models = ["unrelated"]
    engine.extra_cards = [
        {"id": "m", "object": "model", "owned_by": "sglang"},  # what SGLang's own card says
        {"id": "sql-lora", "object": "model", "owned_by": "sglang", "parent": "m"},
    ]
    routing = [{"name": "sg", "model": "m", "owned_by": "sglang", "url": engine.url}]  # no `api: sglang`
    gateway = discovering_gateway(processes, tmp_path, routing)
    wait_for(lambda: "gives it no `api: sglang`" in gateway.log(), message="the warning")
    polls = len([r for r in engine.received if r.path == "/v1/models"])
    wait_for(lambda: len([r for r in engine.received if r.path == "/v1/models"]) >= polls + 3, message="3 readings")
    assert gateway.log().count("gives it no `api: sglang`") == 1


def test_an_sglang_model_with_a_colon_cannot_take_adapters_by_discovery_either():
    engine = {"name": "e", "model": "qwen2.5:7b", "owned_by": "sglang", "url": "http://e:8000", "api": "sglang"}
    with pytest.raises(ConfigError) as refused:
        parse_routing_map(json.dumps({"settings": {"discover_adapters": True}, "engines": [engine]}))
    assert "engines[0].model" in str(refused.value)
    parse_routing_map(json.dumps({"engines": [engine]}))  # without adapters, it is served as any model


@dataclass
class HeldStreamEngine(RecordingEngine):
    """A stand-in engine whose chat streams send one event, then hold until `holding` is cleared."""

    holding: bool = True

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.path != CHAT:
            return await super()._handle(request)
        self.received.append(Received(request.path, dict(request.headers), await request.read()))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n')
        while self.holding:
            await asyncio.sleep(0.01)
        await response.write(b'data: {"choices":[{"delta":{"content":"b"}}]}\n\ndata: [DONE]\n\n')
        await response.write_eof()
        return response


def test_a_request_under_way_when_its_adapter_is_unloaded_leaves_no_series(processes, tmp_path):
    engine = processes.add(HeldStreamEngine(models=["m"]).start())
    engine.extra_cards = [{"id": "brief-lora", "object": "model", "parent": "m", "root": "/x"}]
    gateway = discovering_gateway(
        processes, tmp_path, [{"name": "e", "model": "m", "owned_by": "vllm", "url": engine.url}]
    )
    wait_for(lambda: get(gateway.url + "/v1/models/brief-lora").status == 200, message="routed")

    def series() -> list[str]:
        text = get(gateway.url + "/metrics").body.decode()
        return [line for line in text.splitlines() if 'model="brief-lora"' in line and not line.startswith("#")]

    body = {"model": "brief-lora", "messages": HI, "stream": True}
    with ThreadPoolExecutor(1) as pool:
        streaming = pool.submit(post, gateway.url + CHAT, body)
        wait_for(
            lambda: any(line.startswith("llm_gateway_requests_in_flight") for line in series()), message="under way"
        )
        engine.extra_cards = []  # unloaded while the request streams
        wait_for(lambda: get(gateway.url + "/v1/models/brief-lora").status == 404, message="unlisted")
        assert not streaming.done()  # the race under test: it ends after its series were removed
        engine.holding = False
        assert streaming.result().status == 200  # counted again under the removed label as it ended
    wait_for(lambda: series() == [], message="its series removed once it ended")


class CountingDict(dict):
    """A dict that counts how often it is walked whole (forgetting one adapter must not walk them)."""

    walks = 0

    def __iter__(self):
        CountingDict.walks += 1
        return super().__iter__()

    def items(self):
        CountingDict.walks += 1
        return super().items()

    def keys(self):
        CountingDict.walks += 1
        return super().keys()

    def values(self):
        CountingDict.walks += 1
        return super().values()


def test_forgetting_an_adapters_series_touches_only_its_own(monkeypatch):
    # An engine's 100 adapters may go in one reading, among thousands of series: each removal must cost
    # that adapter's own series, not a walk over every child of every metric.
    metrics = GatewayMetrics()
    for engine in ("e0", "e1"):
        for adapter in ("a", "b"):
            stats = metrics.route_stats(adapter, engine, CHAT)
            stats.answered(200).inc()
            stats.duration(True).observe(0.1)
            stats.first_byte(True).observe(0.1)
            prompt, _ = stats.tokens()
            prompt.inc(3)
            metrics.time_per_output_token.labels(adapter, engine).observe(0.01)
            metrics.adapter_request(adapter, "m", engine, 200).inc()
            metrics.in_flight_of(adapter, engine)
    for metric in metrics._by_model:
        monkeypatch.setattr(metric, "_children", CountingDict(metric._children))
    monkeypatch.setattr(metrics, "_route_stats", CountingDict(metrics._route_stats))
    monkeypatch.setattr(metrics, "_adapter_requests", CountingDict(metrics._adapter_requests))
    CountingDict.walks = 0
    assert metrics.forget_model("a", "e0")
    assert CountingDict.walks == 0
    text = metrics.render().decode()
    assert 'engine="e0",model="a"' not in text and 'model="a"' in text and 'engine="e0",model="b"' in text
    # Counted again afterwards, it is there again.
    metrics.route_stats("a", "e0", CHAT).answered(200).inc()
    assert 'llm_gateway_requests_total{endpoint="/v1/chat/completions",engine="e0",model="a",status="200"} 1.0' in (
        metrics.render().decode()
    )


def discovering_table(urls: list[str], static: tuple[str, ...] = (), **settings):
    """A route table of one engine `e` (model `m`) on these replicas, discovering adapters."""
    engine = {"name": "e", "model": "m", "owned_by": "vllm", "urls": urls}
    if static:
        engine["adapters"] = list(static)
    routing = parse_routing_map(json.dumps({"settings": {"discover_adapters": True, **settings}, "engines": [engine]}))
    return routing, build_routes(routing, discovered=DiscoveredAdapters())


class ComparedReplica(Replica):
    """A replica that counts the comparisons made with it (a list's `in` makes one per element)."""

    __slots__ = ()
    compared = 0
    __hash__ = Replica.__hash__

    def __eq__(self, other: object) -> bool:
        ComparedReplica.compared += 1
        return self is other


def test_choosing_a_replica_for_an_adapter_is_linear_in_replicas():
    # With 256 replicas, one listing the adapter: the others are filtered out by a set of URLs, not
    # searched for in a list of 255 for each of them (65,000 comparisons a request).
    urls = [f"http://r{i}:8000" for i in range(256)]
    routing, table = discovering_table(urls)
    answers = {url: [] for url in urls} | {urls[7]: [{"id": "x", "parent": "m"}]}
    table._discovered.update("e", "m", answers, urls, (), table.model_names, routing.settings)
    table.sync_adapters()
    view = table.resolve("x", None).engine
    view.pool.replicas = tuple(ComparedReplica(url) for url in urls)
    ComparedReplica.compared = 0
    for _ in range(10):
        pick = pick_replica(view.pool, time.monotonic(), view.policy, None, None, (), view.holders)
        assert pick is not None and pick.replica.url == urls[7]
    assert ComparedReplica.compared == 0


def test_after_a_wake_an_adapter_no_replica_in_service_lists_yet_goes_to_any():
    woken = "http://10.0.0.2:8000"  # the pod that woke; the one that listed the adapter is gone
    routing, table = discovering_table([woken])
    # Listed before the sleep (the catalog does not ask an engine while it sleeps, and keeps its lists).
    listed = {"http://10.0.0.1:8000": [{"id": "x", "parent": "m"}]}
    table._discovered.update("e", "m", listed, ["http://10.0.0.1:8000"], (), table.model_names, routing.settings)
    table.sync_adapters()
    view = table.resolve("x", None).engine
    assert view.holders == frozenset({"http://10.0.0.1:8000"})
    pick = pick_replica(view.pool, time.monotonic(), view.policy, None, None, (), view.holders)
    assert pick is not None and pick.replica.url == woken


def test_an_adapter_a_reload_adds_to_the_map_keeps_its_series():
    # Discovered first, then listed in the map by the operator: it keeps its label (its name), which its
    # series share, so unlisting it as a discovered adapter must not remove them, now or at later readings.
    metrics = GatewayMetrics()
    discovered = DiscoveredAdapters(metrics)
    url, cards = "http://e:8000", {"http://e:8000": [{"id": "x", "parent": "m"}]}
    first = parse_routing_map(
        json.dumps(
            {
                "settings": {"discover_adapters": True},
                "engines": [{"name": "e", "model": "m", "owned_by": "vllm", "url": url}],
            }
        )
    )
    table = build_routes(first, discovered=discovered)
    discovered.update("e", "m", cards, [url], (), table.model_names, first.settings)
    metrics.route_stats("x", "e", CHAT).answered(200).inc()
    metrics.in_flight_of("x", "e").count += 1  # a request under way
    second = parse_routing_map(
        json.dumps(
            {
                "settings": {"discover_adapters": True},
                "engines": [{"name": "e", "model": "m", "owned_by": "vllm", "url": url, "adapters": ["x"]}],
            }
        )
    )
    discovered.retain([("e", "m", ("x",))])
    assert "x" not in discovered.of("e", "m").labels  # no longer a discovered adapter
    table = build_routes(second, discovered=discovered)
    view = table.resolve("x", None).engine
    assert (view.holders, view.metric_model) == (None, "x")  # the map's: every replica, its own label
    series = 'llm_gateway_requests_total{endpoint="/v1/chat/completions",engine="e",model="x",status="200"} 1.0'
    for _ in range(3):  # readings
        discovered.update("e", "m", cards, [url], ("x",), table.model_names, second.settings)
        assert series in metrics.render().decode()


def test_lists_read_across_a_reload_are_not_recorded_under_the_old_map():
    # The reload makes x an adapter of the map while the lists are read: recorded under the old map's
    # rules, x would be a discovered adapter again (its series then removed as unlisted).
    url = "http://e:8000"
    engine = {"name": "e", "model": "m", "owned_by": "vllm", "url": url}
    before = parse_routing_map(json.dumps({"settings": {"discover_adapters": True}, "engines": [engine]}))
    after = parse_routing_map(
        json.dumps({"settings": {"discover_adapters": True}, "engines": [{**engine, "adapters": ["x"]}]})
    )
    discovered = DiscoveredAdapters()
    current = [Snapshot(build_routes(before, discovered=discovered), None, ())]
    catalog = ModelCatalog(None, lambda: current[0], discovered)  # type: ignore[arg-type]

    async def engine_lists(engine, table):
        discovered.retain([("e", "m", ("x",))])
        current[0] = Snapshot(build_routes(after, discovered=discovered), None, ())  # the reload
        cards = [{"id": "m", "object": "model"}, {"id": "x", "object": "model", "parent": "m"}]
        return cards, {url: cards}

    catalog._engine_lists = engine_lists
    cards = asyncio.run(catalog.cards())
    assert {card["id"] for card in cards} == {"m"}  # still answered (from the old table)
    assert discovered.of("e", "m") is None  # nothing recorded: the next reading, under the new map, will


def test_what_replicas_list_past_the_limit_is_not_kept():
    # 20 replicas each listing 500 adapters, with a limit of 10: 10 names kept per replica, each name one
    # string, and the adapters on the same replicas share one set of them.
    urls = [f"http://r{i}:8000" for i in range(20)]
    routing, table = discovering_table(urls, max_discovered_adapters=10)
    answers = {url: json.loads(json.dumps([{"id": f"a{i}", "parent": "m"} for i in range(500)])) for url in urls}
    table._discovered.update("e", "m", answers, urls, (), table.model_names, routing.settings)
    listed = table._discovered.of("e", "m")
    assert list(listed.holders) == [f"a{i}" for i in range(10)]
    assert all(len(names) == 10 for names in listed.by_replica.values())
    assert len({id(names[3]) for names in listed.by_replica.values()}) == 1
    assert len({id(urls) for urls in listed.holders.values()}) == 1


def test_a_reading_asks_a_bounded_number_of_replicas_at_once():
    urls = [f"http://r{i}:8000" for i in range(100)]
    routing, table = discovering_table(urls)
    catalog = ModelCatalog(None, lambda: Snapshot(table, None, ()), table._discovered)  # type: ignore[arg-type]
    asking, most = 0, 0

    async def replica_cards(engine, url, table):
        nonlocal asking, most
        asking += 1
        most = max(most, asking)
        await asyncio.sleep(0.01)
        asking -= 1
        return [{"id": "m", "object": "model"}]

    catalog._replica_cards = replica_cards
    asyncio.run(catalog.cards())
    assert most == MAX_LISTS_AT_ONCE


def test_an_adapter_of_another_base_model_in_the_map_is_refused_with_one_warning(caplog):
    # `shared` is the map's adapter of n: e (model m) listing it does not take it, nor one of its slots.
    url = "http://e:8000"
    engines = [
        {"name": "e", "model": "m", "owned_by": "vllm", "url": url},
        {"name": "f", "model": "n", "owned_by": "vllm", "url": "http://f:8000", "adapters": ["shared"]},
    ]
    settings = {"discover_adapters": True, "max_discovered_adapters": 1}
    routing = parse_routing_map(json.dumps({"settings": settings, "engines": engines}))
    discovered = DiscoveredAdapters()
    table = build_routes(routing, discovered=discovered)
    listed = {url: [{"id": "shared", "parent": "m"}, {"id": "fine", "parent": "m"}]}
    for _ in range(3):  # readings
        discovered.update("e", "m", listed, [url], (), table.model_names, routing.settings, table.adapter_bases)
    assert list(discovered.of("e", "m").holders) == ["fine"]
    warnings = [r.getMessage() for r in caplog.records if "lists an adapter that is not routed" in r.getMessage()]
    assert warnings == [
        "engine e lists an adapter that is not routed: 'shared' is an adapter of the routing map's model 'n'"
    ]


def forgetting_engine(metrics: GatewayMetrics):
    """Discovered adapters of engine `e` (model `m`) whose series are `metrics`', and a reading of it."""
    url = "http://e:8000"
    routing, table = discovering_table([url])
    discovered = DiscoveredAdapters(metrics)

    def reading(*names: str) -> None:
        listed = {url: [{"id": name, "parent": "m"} for name in names]}
        discovered.update("e", "m", listed, [url], (), table.model_names, routing.settings)

    return discovered, reading


def test_a_request_admitted_as_its_adapter_is_unlisted_leaves_no_series():
    metrics = GatewayMetrics()
    _, reading = forgetting_engine(metrics)
    reading("x")
    metrics.route_stats("x", "e", CHAT).answered(200).inc()
    reading()  # unlisted, nothing under way: removed
    reading()  # and again
    # A request that chose x before the unlisting was still being admitted (queued, say): it ends now.
    metrics.route_stats("x", "e", CHAT).answered(200).inc()
    reading()
    assert 'model="x"' not in metrics.render().decode()


def test_requests_left_from_two_removals_of_one_label_are_both_waited_for():
    metrics = GatewayMetrics()
    first = metrics.in_flight_of("x", "e")
    first.count += 1
    assert not metrics.forget_model("x", "e")
    second = metrics.in_flight_of("x", "e")  # listed again, chosen again, unlisted again
    second.count += 1
    assert not metrics.forget_model("x", "e")
    second.count -= 1
    assert not metrics.forget_model("x", "e")  # the first is still under way
    first.count -= 1
    assert metrics.forget_model("x", "e")


def test_an_adapter_listed_again_while_its_requests_drain_is_not_removed_any_more():
    metrics = GatewayMetrics()
    discovered, reading = forgetting_engine(metrics)
    reading("x")
    metrics.in_flight_of("x", "e").count += 1
    reading()  # unlisted while a request is under way
    reading("x")  # listed again: its label is its own again
    assert ("x", "e") not in metrics._draining
    metrics.route_stats("x", "e", CHAT).answered(200).inc()
    reading("x")
    assert 'model="x"' in metrics.render().decode()


def test_a_reload_lowering_the_label_budget_applies_to_the_labels_already_given():
    metrics = GatewayMetrics()
    discovered = DiscoveredAdapters(metrics)
    url = "http://e:8000"
    listed = {url: [{"id": f"a{i}", "parent": "m"} for i in range(5)]}
    routing, table = discovering_table([url])
    discovered.update("e", "m", listed, [url], (), table.model_names, routing.settings)
    for i in range(5):
        metrics.route_stats(f"a{i}", "e", CHAT).answered(200).inc()
    lower, table = discovering_table([url], max_adapter_metric_labels=2)
    discovered.retain([("e", "m", ())])
    discovered.update("e", "m", listed, [url], (), table.model_names, lower.settings)  # the same lists
    assert discovered.of("e", "m").labels == {"a0": "a0", "a1": "a1", "a2": "m", "a3": "m", "a4": "m"}
    text = metrics.render().decode()
    assert 'model="a1"' in text and 'model="a2"' not in text and 'model="a4"' not in text
