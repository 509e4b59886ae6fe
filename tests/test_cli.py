"""The command line: a bad routing map stops `serve` with a message naming the field; `demo` runs and stops."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from tests.support import REPO_ROOT, RunningProcess, free_port, wait_until_ready
from tests.web import get, post

HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("engines:\n  - {name: a, model: m, owned_by: vllm}\n", "engines[0].url"),
        ("engines:\n  - {name: a, model: m, owned_by: vllm, url: 'not a url'}\n", "engines[0].url"),
        ("engines:\n  - {name: a, model: m, owned_by: vllm, url: 'http://x'}\n  - {name: a, model: n, owned_by: vllm, url: 'http://y'}\n", "engines[1].name"),
        ("engines:\n  - {name: a, model: m, owned_by: vllm, url: 'http://x', default: true}\n  - {name: b, model: m, owned_by: sglang, url: 'http://y', default: true}\n", "engines[1].default"),
        ("engines:\n  - {name: a, model: m, owned_by: vllm, url: 'http://x', aliases: [n]}\n  - {name: b, model: n, owned_by: vllm, url: 'http://y'}\n", "engines[0].aliases"),
        ("engines:\n  - {name: a, model: m, owned_by: vllm, url: 'http://x', timeout: {idle: 3}}\n", "engines[0].timeout"),
        ("settings: {max_body_bytes: -1}\nengines:\n  - {name: a, model: m, owned_by: vllm, url: 'http://x'}\n", "settings.max_body_bytes"),
        ("engines: [\n", "not valid YAML"),
    ],
)
def test_serve_refuses_an_invalid_map_naming_the_field(tmp_path, text, field):
    config = tmp_path / "routes.yaml"
    config.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "gateway_app", "serve", "--config", str(config), "--port", str(free_port())],
        capture_output=True, text=True, timeout=30, cwd=REPO_ROOT,
    )
    assert result.returncode == 2
    assert field in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_a_missing_file(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "gateway_app", "serve", "--config", str(tmp_path / "nope.yaml")],
        capture_output=True, text=True, timeout=30, cwd=REPO_ROOT,
    )
    assert result.returncode == 2 and "nope.yaml" in result.stderr


def test_demo_serves_the_tutorial_topology_and_stops_on_ctrl_c(tmp_path):
    port = free_port()
    log_path = tmp_path / "demo.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway_app", "demo", "--port", str(port), "--ttft-ms", "0", "--itl-ms", "0"],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
        )
    demo = RunningProcess(process=process, url=f"http://127.0.0.1:{port}", log_path=log_path)
    try:
        wait_until_ready(demo, "/readyz")
        pairs = {(c["id"], c["owned_by"]) for c in get(demo.url + "/v1/models").json()["data"]}
        assert pairs == {
            ("meta-llama/Llama-3.2-1B-Instruct", "vllm"),
            ("meta-llama/Llama-3.2-1B-Instruct", "sglang"),
            ("/models/Phi-tiny-MoE-instruct", "vllm"),
        }
        answer = post(demo.url + "/v1/chat/completions",
                      {"model": "meta-llama/Llama-3.2-1B-Instruct", "owned_by": "sglang", "messages": HI})
        assert answer.headers["x-gateway-engine"] == "sglang-llama-32-1b"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=15) == 0
        assert "curl" in demo.log()
    finally:
        demo.stop()
