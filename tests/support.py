"""Helpers for tests that run the real gateway and simulators as processes on loopback."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from tests.recording_engine import RecordingEngine

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningProcess:
    """A child process and the base URL it serves; `stop()` is safe to call twice."""

    process: subprocess.Popen
    url: str
    log_path: Path
    args: list[str] = field(default_factory=list)
    _terminated: bool = field(default=False, init=False, repr=False)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def terminate(self) -> None:
        """Ask the process to exit (SIGTERM, sent once) without waiting for it; `stop()` waits."""
        if self.process.poll() is None and not self._terminated:
            self.process.send_signal(signal.SIGTERM)
            self._terminated = True

    def stop(self, timeout: float = 10.0) -> None:
        self.terminate()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=timeout)


def wait_until_ready(running: RunningProcess, path: str, timeout: float = 20.0) -> None:
    """Poll `path` until it answers 200; fail with the process's log if it dies or never answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if running.process.poll() is not None:
            raise RuntimeError(f"process exited with {running.process.returncode}:\n{running.log()}")
        try:
            with urllib.request.urlopen(running.url + path, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.05)
    running.stop()
    raise RuntimeError(f"{running.url}{path} not ready after {timeout}s:\n{running.log()}")


def start_cli(
    args: list[str],
    port: int,
    ready_path: str,
    log_dir: Path,
    name: str,
    env: dict[str, str] | None = None,
    host: str = "127.0.0.1",
    fd_limit: int | None = None,
) -> RunningProcess:
    """Start `python -m gateway_app ARGS` and wait until `ready_path` answers 200.

    `fd_limit` caps the child's open files (soft and hard), as a container's limit would."""
    log_path = log_dir / f"{name}-{port}.log"
    log_file = open(log_path, "wb")
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway_app", *args],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        cwd=REPO_ROOT,
        env=env,
        preexec_fn=(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, fd_limit))) if fd_limit else None,
    )
    log_file.close()
    running = RunningProcess(process=process, url=f"http://{host}:{port}", log_path=log_path, args=args)
    wait_until_ready(running, ready_path)
    return running


def start_simulator(
    engine: str,
    model: str,
    log_dir: Path,
    ttft_ms: float = 0,
    itl_ms: float = 0,
    port: int | None = None,
    extra_args: list[str] | None = None,
) -> RunningProcess:
    port = port or free_port()
    args = ["simulate", "--engine", engine, "--model", model, "--host", "127.0.0.1", "--port", str(port)]
    args += ["--ttft-ms", str(ttft_ms), "--itl-ms", str(itl_ms), *(extra_args or [])]
    return start_cli(args, port, "/health", log_dir, f"sim-{engine}")


def start_gateway(
    config_path: Path,
    log_dir: Path,
    port: int | None = None,
    extra_args: list[str] | None = None,
    env: dict[str, str] | None = None,
    fd_limit: int | None = None,
) -> RunningProcess:
    port = port or free_port()
    args = ["serve", "--config", str(config_path), "--host", "127.0.0.1", "--port", str(port), *(extra_args or [])]
    return start_cli(args, port, "/readyz", log_dir, "gateway", env, fd_limit=fd_limit)


class Stoppable(Protocol):
    def stop(self) -> None: ...


StoppableT = TypeVar("StoppableT", bound=Stoppable)


class Processes:
    """What a test starts (gateways, simulators, stand-in servers), stopped together when it ends.

    The `processes` and `module_processes` fixtures hand one out; a session fixture uses it as a context
    manager. Stopping is idempotent, so a test may still stop a process on purpose (to read its whole
    log, say): the teardown then has nothing left to do for it."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._started: list[Stoppable] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def add(self, started: StoppableT) -> StoppableT:
        """Take charge of something already started: it is stopped with the rest."""
        self._started.append(started)
        return started

    def gateway(self, config_path: Path, **options: Any) -> RunningProcess:
        """`start_gateway(config_path, ...)`, with the same keyword options."""
        return self.add(start_gateway(config_path, self.log_dir, **options))

    def simulator(self, engine: str, model: str, **options: Any) -> RunningProcess:
        """`start_simulator(engine, model, ...)`, with the same keyword options."""
        return self.add(start_simulator(engine, model, self.log_dir, **options))

    def cli(self, args: list[str], port: int, ready_path: str, name: str, **options: Any) -> RunningProcess:
        """`start_cli(args, port, ready_path, ...)`, with the same keyword options."""
        return self.add(start_cli(args, port, ready_path, self.log_dir, name, **options))

    def recording_engine(self) -> RecordingEngine:
        return self.add(RecordingEngine().start())

    def stop_all(self) -> None:
        """Stop everything, the last started first. Every process is sent SIGTERM before any is waited
        for, so that they shut down side by side. The first error is raised once all were stopped."""
        started, self._started = self._started[::-1], []
        for item in started:
            if isinstance(item, RunningProcess):
                item.terminate()
        errors: list[BaseException] = []
        for item in started:
            try:
                item.stop()
            except Exception as error:  # the others must be stopped all the same
                errors.append(error)
        if errors:
            raise errors[0]


class ConfigMapVolume:
    """A folder laid out as the kubelet lays out a ConfigMap or Secret volume:
    <file> -> ..data/<file>, ..data -> ..<version>; `publish` swaps ..data atomically."""

    def __init__(self, root: Path, name: str = "routes.yaml") -> None:
        self.root = root
        self.name = name
        self.version = 0
        root.mkdir(parents=True, exist_ok=True)
        (root / name).symlink_to(f"..data/{name}")

    @property
    def path(self) -> Path:
        return self.root / self.name

    def publish(self, text: str) -> None:
        self.version += 1
        folder = self.root / f"..v{self.version}"
        folder.mkdir()
        (folder / self.name).write_text(text)
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(folder.name)
        old = os.readlink(self.root / "..data") if (self.root / "..data").is_symlink() else None
        os.rename(tmp, self.root / "..data")
        if old:
            shutil.rmtree(self.root / old)
