"""The command line: a bad routing map stops `serve` with a message naming the field; `demo` runs and stops;
`--version`, help with defaults, the simulator's start line, and one clear line for a busy port."""

from __future__ import annotations

import hashlib
import os
import re
import select
import signal
import socket
import subprocess
import sys

import pytest

from gateway_app import __version__
from gateway_app.cli import _build_parser, main
from tests.support import REPO_ROOT, RunningProcess, free_port, wait_until_ready
from tests.web import get, post

HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("engines:\n  - {name: a, model: m, owned_by: vllm}\n", "engines[0].url"),
        ("engines:\n  - {name: a, model: m, owned_by: vllm, url: 'not a url'}\n", "engines[0].url"),
        (
            "engines:\n  - {name: a, model: m, owned_by: vllm, url: 'http://x'}\n  - {name: a, model: n, owned_by: vllm, url: 'http://y'}\n",
            "engines[1].name",
        ),
        (
            "engines:\n  - {name: a, model: m, owned_by: vllm, url: 'http://x', default: true}\n  - {name: b, model: m, owned_by: sglang, url: 'http://y', default: true}\n",
            "engines[1].default",
        ),
        (
            "engines:\n  - {name: a, model: m, owned_by: vllm, url: 'http://x', aliases: [n]}\n  - {name: b, model: n, owned_by: vllm, url: 'http://y'}\n",
            "engines[0].aliases",
        ),
        (
            "engines:\n  - {name: a, model: m, owned_by: vllm, url: 'http://x', timeout: {idle: 3}}\n",
            "engines[0].timeout",
        ),
        (
            "settings: {max_body_bytes: -1}\nengines:\n  - {name: a, model: m, owned_by: vllm, url: 'http://x'}\n",
            "settings.max_body_bytes",
        ),
        ("engines: [\n", "not valid YAML"),
    ],
)
def test_serve_refuses_an_invalid_map_naming_the_field(tmp_path, text, field):
    config = tmp_path / "routes.yaml"
    config.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "gateway_app", "serve", "--config", str(config), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 2
    assert field in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_a_missing_file(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "gateway_app", "serve", "--config", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 2 and "nope.yaml" in result.stderr


def test_demo_serves_the_tutorial_topology_and_stops_on_ctrl_c(processes, tmp_path):
    port = free_port()
    log_path = tmp_path / "demo.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway_app", "demo", "--port", str(port), "--ttft-ms", "0", "--itl-ms", "0"],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
        )
    demo = processes.add(RunningProcess(process=process, url=f"http://127.0.0.1:{port}", log_path=log_path))
    wait_until_ready(demo, "/readyz")
    pairs = {(c["id"], c["owned_by"]) for c in get(demo.url + "/v1/models").json()["data"]}
    assert pairs == {
        ("meta-llama/Llama-3.2-1B-Instruct", "vllm"),
        ("meta-llama/Llama-3.2-1B-Instruct", "sglang"),
        ("/models/Phi-tiny-MoE-instruct", "vllm"),
    }
    answer = post(
        demo.url + "/v1/chat/completions",
        {"model": "meta-llama/Llama-3.2-1B-Instruct", "owned_by": "sglang", "messages": HI},
    )
    assert answer.headers["x-gateway-engine"] == "sglang-llama-32-1b"
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=15) == 0
    assert "curl" in demo.log()


def run_cli(*args: str, env: dict[str, str] | None = None, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway_app", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO_ROOT,
        env=dict(os.environ, **(env or {})),
    )


def test_version_prints_the_package_version():
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout == f"llm-gateway {__version__}\n"


def help_text(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    with pytest.raises(SystemExit) as exited:
        main([*args, "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        (
            "serve",
            [
                "--host HOST  address to listen on (default: 0.0.0.0)",
                "(default: 8000)",
                "(default: info)",
                "(default: 110.0)",
                "--metrics-port PORT  serve /metrics on this port only",
            ],
        ),
        ("simulate", ["(default: 0.0.0.0)", "(default: 8000)", "(default: warning)", "--ttft-ms MS"]),
        ("demo", ["(default: 127.0.0.1)", "(default: 8000)", "(default: 50.0)", "(default: 20.0)"]),
        ("hash-key", ["--generate", "read from standard input"]),
    ],
)
def test_every_command_help_shows_its_defaults(capsys, monkeypatch, command, shown):
    monkeypatch.setenv("COLUMNS", "250")  # one line per option, so that the checks do not depend on wrapping
    for name in ("LLM_GATEWAY_DEMO_HOST", "LLM_GATEWAY_METRICS_PORT", "LLM_GATEWAY_LOG_FORMAT"):
        monkeypatch.delenv(name, raising=False)
    text = help_text(capsys, command)
    for expected in shown:
        assert re.sub(r" {2,}", "  ", expected) in re.sub(r" {2,}", "  ", text), text
    # Options that are off by default, and flags, show no "(default: None)" or "(default: False)".
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: True)" not in text


def test_metrics_port_and_demo_host_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("LLM_GATEWAY_METRICS_PORT", "9090")
    monkeypatch.setenv("LLM_GATEWAY_DEMO_HOST", "0.0.0.0")  # what the container image sets
    parser = _build_parser()
    assert parser.parse_args(["serve", "--config", "x"]).metrics_port == 9090
    assert parser.parse_args(["serve", "--config", "x", "--metrics-port", "9100"]).metrics_port == 9100
    assert parser.parse_args(["demo"]).host == "0.0.0.0"
    monkeypatch.delenv("LLM_GATEWAY_METRICS_PORT")
    monkeypatch.delenv("LLM_GATEWAY_DEMO_HOST")
    assert _build_parser().parse_args(["serve", "--config", "x"]).metrics_port is None
    assert _build_parser().parse_args(["demo"]).host == "127.0.0.1"


def first_line(process: subprocess.Popen, timeout: float = 20.0) -> str:
    """The first line the process prints, waiting at most `timeout` seconds for it."""
    readable, _, _ = select.select([process.stdout], [], [], timeout)
    assert readable, f"nothing printed within {timeout}s"
    return process.stdout.readline()


def test_simulate_prints_one_line_once_it_serves(processes, tmp_path, capsys, monkeypatch):
    key = "sk-simulator-test"
    monkeypatch.setenv("LLM_GATEWAY_SIMULATOR_API_KEY", key)  # for the process below and for --help here
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway_app",
            "simulate",
            "--engine",
            "sglang",
            "--model",
            "m",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO_ROOT,
    )
    processes.add(RunningProcess(process=process, url="", log_path=tmp_path / "unused.log"))
    line = first_line(process)
    match = re.fullmatch(
        r"llm-gateway simulate: simulated sglang engine serving m on (http://127\.0\.0\.1:\d+)\n", line
    )
    assert match, line
    url = match[1]
    # The line is printed once the socket accepts: the first request needs no retry.
    assert get(url + "/health").status == 200
    # The key still comes from the environment, and --help does not show it.
    assert get(url + "/v1/models").status == 401
    assert get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status == 200
    assert key not in help_text(capsys, "simulate")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=15) == 0


@pytest.mark.parametrize("command", [["simulate", "--engine", "vllm", "--model", "m"], ["demo"]])
def test_a_busy_port_is_one_clear_line_and_exit_code_1(command):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli(*command, "--host", "127.0.0.1", "--port", str(port))
    assert result.returncode == 1
    assert result.stderr == f"llm-gateway {command[0]}: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    assert result.stdout == ""


def test_serve_on_a_busy_port_is_one_clear_line_and_exit_code_1(tmp_path):
    config = tmp_path / "routes.yaml"
    config.write_text("engines: [{name: e, model: m, owned_by: vllm, url: 'http://127.0.0.1:9'}]\n")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(port))
    assert result.returncode == 1
    assert result.stderr == f"llm-gateway serve: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    assert result.stdout == ""


# --- hash-key: what goes into the keys file ------------------------------------------------------

CLIENT_KEY = "sk-a-client-key-4711"


def test_hash_key_prints_the_sha256_of_the_key_given():
    result = run_cli("hash-key", CLIENT_KEY)
    assert result.returncode == 0, result.stderr
    assert result.stdout == hashlib.sha256(CLIENT_KEY.encode()).hexdigest() + "\n"


def test_hash_key_reads_the_key_from_standard_input():
    """`llm-gateway hash-key < key.txt`: the key need not be on a command line, where `ps` shows it."""
    result = run_cli("hash-key", stdin=CLIENT_KEY + "\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == hashlib.sha256(CLIENT_KEY.encode()).hexdigest() + "\n"
    nothing = run_cli("hash-key", stdin="")
    assert nothing.returncode == 2 and nothing.stdout == ""
    assert nothing.stderr == "llm-gateway hash-key: no key given\n"


def test_hash_key_generate_prints_a_new_key_and_its_sha256():
    keys = set()
    for _ in range(2):
        result = run_cli("hash-key", "--generate")
        assert result.returncode == 0, result.stderr
        printed = re.fullmatch(r"key: +(sk-[A-Za-z0-9_-]{32,})\nsha256: ([0-9a-f]{64})\n", result.stdout)
        assert printed, result.stdout
        key, sha256 = printed.groups()
        assert sha256 == hashlib.sha256(key.encode()).hexdigest()
        keys.add(key)
    assert len(keys) == 2  # a new key each time
