"""Hot reload the way a Kubernetes ConfigMap volume updates: a `..data` symlink swapped under the file."""

from __future__ import annotations

import json
import os
import threading

import pytest
import yaml

from tests.support import ConfigMapVolume, RunningProcess
from tests.web import get, metric_value, post, sse_events, wait_for

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def engines(module_processes) -> dict[str, RunningProcess]:
    return {
        "vllm": module_processes.simulator("vllm", "m", itl_ms=100),
        "sglang": module_processes.simulator("sglang", "m", itl_ms=100),
    }


def routing(engines, default: str, alias: str | None = None) -> str:
    entries = []
    for kind in ("vllm", "sglang"):
        entry = {
            "name": f"{kind}-m",
            "model": "m",
            "owned_by": kind,
            "url": engines[kind].url,
            "default": kind == default,
        }
        if alias and kind == default:
            entry["aliases"] = [alias]
        entries.append(entry)
    return yaml.safe_dump({"engines": entries})


def reloads(gateway: RunningProcess, result: str) -> float:
    return metric_value(get(gateway.url + "/metrics").body.decode(), "llm_gateway_config_reloads_total", result=result)


def stream_in_background(gateway: RunningProcess, tokens: int) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run() -> None:
        outcome["answer"] = post(
            gateway.url + CHAT, {"model": "m", "messages": HI, "max_tokens": tokens, "stream": True}
        )

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def content_tokens(answer) -> int:
    events = sse_events(answer.body)
    assert events[-1] == "[DONE]"
    return sum(1 for e in events[:-1] for c in json.loads(e).get("choices", []) if c.get("delta", {}).get("content"))


def test_reload_valid_then_invalid_while_streams_are_in_flight(engines, processes, tmp_path):
    volume = ConfigMapVolume(tmp_path)
    volume.publish(routing(engines, default="vllm"))
    gateway = processes.gateway(volume.path)
    assert post(gateway.url + CHAT, {"model": "m", "messages": HI}).headers["x-gateway-engine"] == "vllm-m"

    thread, outcome = stream_in_background(gateway, tokens=80)  # about 8 s of tokens
    wait_for(lambda: metric_value(get(gateway.url + "/metrics").body.decode(), "llm_gateway_requests_in_flight") == 1)
    volume.publish(routing(engines, default="sglang", alias="m-latest"))
    wait_for(lambda: reloads(gateway, "success") == 1, message="reload")
    assert file_refused(gateway) == 0
    assert thread.is_alive(), "the stream ended before the reload: the test proves nothing"
    assert post(gateway.url + CHAT, {"model": "m", "messages": HI}).headers["x-gateway-engine"] == "sglang-m"
    assert post(gateway.url + CHAT, {"model": "m-latest", "messages": HI}).status == 200
    thread.join(20)
    assert outcome["answer"].headers["x-gateway-engine"] == "vllm-m"  # finished on the table it started with
    assert content_tokens(outcome["answer"]) == 80

    thread, outcome = stream_in_background(gateway, tokens=80)
    wait_for(lambda: metric_value(get(gateway.url + "/metrics").body.decode(), "llm_gateway_requests_in_flight") == 1)
    volume.publish("engines:\n  - name: broken\n    model: m\n")  # no owned_by, no url
    wait_for(lambda: reloads(gateway, "failure") == 1, message="refused reload")
    assert thread.is_alive(), "the stream ended before the refused reload: the test proves nothing"
    assert "engines[0].owned_by" in gateway.log()  # the log names the field
    thread.join(20)
    assert content_tokens(outcome["answer"]) == 80
    volume.publish("engines:\n  - name: broken\n    model: m\n")  # the same bad file again
    volume.publish("engines:\n  - name: broken\n    model: m\n")
    answer = post(gateway.url + CHAT, {"model": "m-latest", "messages": HI})
    assert reloads(gateway, "failure") == 1  # one bad file is one failure, however many events it makes
    answer = post(gateway.url + CHAT, {"model": "m-latest", "messages": HI})
    assert answer.status == 200 and answer.headers["x-gateway-engine"] == "sglang-m"  # old table still serves
    assert reloads(gateway, "success") == 1
    assert file_refused(gateway) == 1  # as long as the bad file is mounted (what the alert watches)
    volume.publish(routing(engines, default="sglang", alias="m-latest"))  # the values fixed: the file in service
    wait_for(lambda: file_refused(gateway) == 0, message="the refused file replaced")
    assert reloads(gateway, "success") == 1  # nothing new to load


def file_refused(gateway: RunningProcess) -> float:
    metrics = get(gateway.url + "/metrics").body.decode()
    return metric_value(metrics, "llm_gateway_config_file_refused", file="routing_map")


def test_plain_file_rewrite_is_picked_up(engines, processes, tmp_path):
    path = tmp_path / "routes.yaml"
    path.write_text(routing(engines, default="vllm"))
    gateway = processes.gateway(path)
    tmp = tmp_path / "routes.yaml.new"
    tmp.write_text(routing(engines, default="sglang"))
    os.replace(tmp, path)  # how editors and `kubectl cp` replace a file
    wait_for(lambda: reloads(gateway, "success") == 1, message="reload")
    assert post(gateway.url + CHAT, {"model": "m", "messages": HI}).headers["x-gateway-engine"] == "sglang-m"
