"""The contract between the chart and the gateway, checked with the real processes.

Take the routing ConfigMap the chart renders, point each engine's URL at a simulator of the same kind
and model on loopback (nothing else in the map changes), start the real gateway on that file and route
every (model, owned_by), every default and every alias through it: the response must come from the
engine the chart named.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway_app.config import parse_routing_map
from tests.chart.conftest import EXAMPLES, Helm, VALUE_SETS
from tests.support import RunningProcess, start_gateway, start_simulator

ENGINE_HEADER = "x-gateway-engine"


def call(url: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, str], Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read().decode(errors="replace")


class SimulatorPool:
    """One simulator per (engine kind, model), shared by every routing map of the module."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.running: dict[tuple[str, str], RunningProcess] = {}

    def url_for(self, kind: str, model: str) -> str:
        if (kind, model) not in self.running:
            self.running[(kind, model)] = start_simulator(kind, model, self.log_dir)
        return self.running[(kind, model)].url

    def stop(self) -> None:
        for process in self.running.values():
            process.stop()


@pytest.fixture(scope="module")
def contract_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("contract")


@pytest.fixture(scope="module")
def simulators(contract_logs: Path) -> Iterator[SimulatorPool]:
    pool = SimulatorPool(contract_logs)
    yield pool
    pool.stop()


@pytest.mark.parametrize("value_set", [*EXAMPLES, "defaults", "all-features"])
def test_gateway_routes_the_rendered_map(
    helm: Helm, simulators: SimulatorPool, contract_logs: Path, value_set: str
) -> None:
    routing = helm.template(VALUE_SETS[value_set]).routing
    for engine in routing["engines"]:
        # every engine here is owned_by vllm or sglang: a simulator of that kind stands in for it
        engine["url"] = simulators.url_for(engine["owned_by"], engine["model"])
    config = contract_logs / f"routes-{value_set}.yaml"
    config.write_text(yaml.safe_dump(routing, sort_keys=False))
    parse_routing_map(config.read_text())  # still the gateway's format after the rewrite

    gateway = start_gateway(config, contract_logs)
    try:
        status, _, listing = call(gateway.url + "/v1/models")
        assert status == 200, listing
        listed = {(card["id"], card["owned_by"]) for card in listing["data"]}

        for engine in routing["engines"]:
            route = (engine["model"], engine["owned_by"])
            assert route in listed, f"{route} missing from /v1/models: {sorted(listed)}"
            asks = [{"model": engine["model"], "owned_by": engine["owned_by"]}]
            if engine.get("default"):
                asks.append({"model": engine["model"]})
            asks += [{"model": alias, "owned_by": engine["owned_by"]} for alias in engine.get("aliases", [])]
            for ask in asks:
                body = {**ask, "messages": [{"role": "user", "content": "What is machine learning?"}], "max_tokens": 4}
                status, headers, answer = call(gateway.url + "/v1/chat/completions", body)
                assert status == 200, f"{ask}: {answer}\n{gateway.log()}"
                assert headers.get(ENGINE_HEADER) == engine["name"], f"{ask} went to {headers.get(ENGINE_HEADER)}"
                assert answer["choices"][0]["message"]["content"]
    finally:
        gateway.stop()
