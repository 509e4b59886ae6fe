"""The install path of the image, checked without Docker: wheel → fresh venv → the command runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
from pathlib import Path

from tests.support import REPO_ROOT, RunningProcess, free_port, wait_until_ready
from tests.web import get


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, str(REPO_ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_wheel_installs_into_a_fresh_venv_and_serves(processes, tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(REPO_ROOT)],
        check=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("llm_gateway-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", str(wheel)], check=True, timeout=600)
    # Run from an empty folder, so that only the installed package can be imported.
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    help_text = subprocess.run(
        [str(env_dir / "bin" / "llm-gateway"), "--help"], capture_output=True, text=True, check=True, cwd=workdir
    ).stdout
    for command in ("serve", "simulate", "demo"):
        assert command in help_text
    port = free_port()
    log_path = tmp_path / "sim.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                str(python),
                "-m",
                "gateway_app",
                "simulate",
                "--engine",
                "vllm",
                "--model",
                "m",
                "--port",
                str(port),
                "--host",
                "127.0.0.1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
    sim = processes.add(RunningProcess(process=process, url=f"http://127.0.0.1:{port}", log_path=log_path))
    wait_until_ready(sim, "/health")
    assert get(sim.url + "/v1/models").json()["data"][0]["id"] == "m"
