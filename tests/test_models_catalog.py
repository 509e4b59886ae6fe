"""`GET /v1/models` is cached for `settings.models_cache_ttl`: however many clients list the models, an
engine is asked once per TTL, so that a busy listing never multiplies into engine traffic."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.recording_engine import RecordingEngine
from tests.routes import write_routing_map
from tests.support import Processes, RunningProcess
from tests.web import get


def gateway_with_models_cache(
    processes: Processes, tmp_path: Path, ttl: float
) -> tuple[RunningProcess, RecordingEngine]:
    engine = processes.recording_engine()
    engine.models = ["m"]
    config = write_routing_map(
        tmp_path / "routes.yaml",
        [{"name": "e", "model": "m", "owned_by": "vllm", "url": engine.url}],
        settings={"models_cache_ttl": ttl},
    )
    return processes.gateway(config), engine


def times_asked(engine: RecordingEngine) -> int:
    return sum(1 for received in engine.received if received.path == "/v1/models")


def listed(gateway: RunningProcess) -> list[str]:
    answer = get(gateway.url + "/v1/models")
    assert answer.status == 200, answer.body
    return [card["id"] for card in answer.json()["data"]]


def test_within_the_ttl_the_engine_is_asked_once_however_many_clients_list(processes, tmp_path):
    gateway, engine = gateway_with_models_cache(processes, tmp_path, ttl=60)
    with ThreadPoolExecutor(16) as pool:  # 16 clients at once, 48 listings
        answers = list(pool.map(lambda _: listed(gateway), range(48)))
    assert answers == [["m"]] * 48
    assert get(gateway.url + "/v1/models/m").json()["id"] == "m"  # one model's card comes from the same list
    assert times_asked(engine) == 1


def test_after_the_ttl_the_engine_is_asked_again(processes, tmp_path):
    ttl = 0.3
    gateway, engine = gateway_with_models_cache(processes, tmp_path, ttl)
    assert listed(gateway) == ["m"]
    assert times_asked(engine) == 1
    time.sleep(ttl + 0.2)  # the cache's clock starts when the engine answered, before `listed` returned
    assert listed(gateway) == ["m"]
    assert times_asked(engine) == 2
