"""Authorization before disclosure: what a key may not use does not exist for it, in every answer."""

from __future__ import annotations

import pytest
import yaml

from gateway_app.auth import hash_key
from tests.routes import LLAMA, PHI, tutorial_routing, write_routing_map
from tests.support import RunningProcess
from tests.web import get, post

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]
PHI_ONLY, ALIAS_ONLY = "sk-phi-only", "sk-alias-only"
ENGINE_NAMES = ("vllm-llama-32-1b", "sglang-llama-32-1b", "vllm-phi-tiny-moe")


@pytest.fixture(scope="module")
def gateway(tutorial_engines, module_processes, tmp_path_factory) -> RunningProcess:
    folder = tmp_path_factory.mktemp("disclosure")
    keys = folder / "keys.yaml"
    keys.write_text(
        yaml.safe_dump(
            {
                "keys": [
                    {"name": "phi-only", "sha256": hash_key(PHI_ONLY), "models": [PHI]},
                    {"name": "alias-only", "sha256": hash_key(ALIAS_ONLY), "models": ["llama-1b"]},  # an alias of LLAMA
                ]
            }
        )
    )
    config = write_routing_map(folder / "routes.yaml", tutorial_routing(tutorial_engines))
    return module_processes.gateway(config, extra_args=["--keys-file", str(keys)])


def chat(gateway: RunningProcess, key: str, model: str, owned_by: str | None = None):
    body = {"model": model, "messages": HI, **({"owned_by": owned_by} if owned_by else {})}
    return post(gateway.url + CHAT, body, headers={"Authorization": f"Bearer {key}"})


def error_of(answer) -> dict:
    assert answer.status == 404, answer.body
    return answer.json()["error"]


def test_a_forbidden_model_is_answered_as_an_unknown_one(gateway):
    unknown = error_of(chat(gateway, PHI_ONLY, "no-such-model"))
    forbidden = error_of(chat(gateway, PHI_ONLY, LLAMA))
    by_alias = error_of(chat(gateway, PHI_ONLY, "llama-1b"))
    assert unknown["code"] == forbidden["code"] == by_alias["code"] == "model_not_found"
    assert forbidden["message"] == unknown["message"].replace("no-such-model", LLAMA)
    assert by_alias["message"] == unknown["message"].replace("no-such-model", "llama-1b")
    assert PHI in unknown["message"]
    for hidden in (LLAMA, "llama-1b", *ENGINE_NAMES):
        assert hidden not in unknown["message"]


def test_owned_by_on_a_forbidden_model_tells_nothing_of_its_engines(gateway):
    error = error_of(chat(gateway, PHI_ONLY, LLAMA, owned_by="nope"))
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "sglang" not in error["message"] and "served by" not in error["message"]


def test_owned_by_on_an_allowed_model_lists_its_engines(gateway):
    error = error_of(chat(gateway, PHI_ONLY, PHI, owned_by="sglang"))
    assert error["code"] == "engine_not_found" and error["param"] == "owned_by"
    assert "`vllm`" in error["message"]


def test_an_unknown_owned_by_names_the_model_as_the_key_knows_it(gateway):
    """A key allowed only an alias is never told the model id behind it, not even by an owned_by error."""
    error = error_of(chat(gateway, ALIAS_ONLY, "llama-1b", owned_by="nope"))
    assert error["code"] == "engine_not_found" and error["param"] == "owned_by"
    assert "`llama-1b`" in error["message"] and LLAMA not in error["message"]


def test_a_key_allowed_an_alias_sees_and_uses_only_that_alias(gateway):
    assert chat(gateway, ALIAS_ONLY, "llama-1b").status == 200
    error = error_of(chat(gateway, ALIAS_ONLY, LLAMA))
    assert "llama-1b" in error["message"] and PHI not in error["message"]
    listed = get(gateway.url + "/v1/models", headers={"Authorization": f"Bearer {ALIAS_ONLY}"}).json()["data"]
    assert {card["id"] for card in listed} == {"llama-1b"}


def test_the_card_of_a_forbidden_model_is_not_found(gateway):
    headers = {"Authorization": f"Bearer {PHI_ONLY}"}
    forbidden = get(gateway.url + f"/v1/models/{LLAMA}", headers=headers)
    unknown = get(gateway.url + "/v1/models/no-such-model", headers=headers)
    assert forbidden.status == unknown.status == 404
    assert forbidden.json()["error"]["message"] == unknown.json()["error"]["message"].replace("no-such-model", LLAMA)
    assert get(gateway.url + f"/v1/models/{PHI}", headers=headers).status == 200


def test_without_a_key_nothing_is_disclosed(gateway):
    answer = post(gateway.url + CHAT, {"model": "no-such-model", "messages": HI})
    assert answer.status == 401
    for name in (LLAMA, PHI, "llama-1b", *ENGINE_NAMES):
        assert name not in answer.body.decode()
