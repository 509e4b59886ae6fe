"""The processes a benchmark runs: started pinned to CPUs, waited for, measured, always stopped."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 30.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Pinning:
    """Which CPUs each party runs on; empty means unpinned (fewer than 2 CPUs)."""

    gateway: tuple[int, ...]
    simulator: tuple[int, ...]  # and Redis, when the bench starts one
    load_generator: tuple[int, ...]


def choose_pinning() -> Pinning:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return Pinning((), (), ())
    return Pinning(gateway=(cpus[1],), simulator=(cpus[0],), load_generator=(cpus[0],))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads) from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15 of proc(5)


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def memory_kib(pid: int) -> tuple[int, int]:
    """Resident memory now and at its peak (VmRSS, VmHWM), in KiB, from /proc/<pid>/status."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_limit(pid: int) -> int | None:
    """The soft limit on open files of a process (from /proc/<pid>/limits); None when unlimited."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft = line.split()[3]
            return None if soft == "unlimited" else int(soft)
    return None


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's soft limit on open files to `wanted` (children started later inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            raise RuntimeError(f"need {wanted} open files, but the hard limit is {hard} (ulimit -Hn)")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def stop_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so that the bench stops its processes either way."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def pin_to(
    cpus: tuple[int, ...],
    open_files: int | None = None,
    niceness: int = 0,
) -> Callable[[], None] | None:
    """What the child runs between fork and exec, so that its pinning (and an open-file limit, soft and
    hard, and a lower priority, when given) hold from its first instruction."""
    if not cpus and open_files is None and not niceness:
        return None

    def prepare() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)
        if open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))
        if niceness:
            os.nice(niceness)

    return prepare


class ProcessGroup:
    """Processes started by the bench, each logging to `<log_dir>/<name>.log`, stopped in reverse order."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._procs: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        name: str,
        argv: list[str],
        cpus: tuple[int, ...],
        *,
        open_files: int | None = None,
        niceness: int = 0,
    ) -> subprocess.Popen[bytes]:
        with (self.log_dir / f"{name}.log").open("wb") as log:
            # A new session keeps Ctrl-C away from the children: the bench stops them itself, in order.
            proc = subprocess.Popen(
                argv,
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=pin_to(cpus, open_files, niceness),
                start_new_session=True,
            )
        self._procs.append(proc)
        return proc

    def start_gateway_app(
        self,
        name: str,
        args: list[str],
        cpus: tuple[int, ...],
        *,
        open_files: int | None = None,
    ) -> subprocess.Popen[bytes]:
        """`python -m gateway_app <args>` with this interpreter."""
        return self.start(name, [sys.executable, "-m", "gateway_app", *args], cpus, open_files=open_files)

    def wait_ready(self, name: str, proc: subprocess.Popen[bytes], probe: Callable[[], bool]) -> None:
        """Call `probe` until it returns True; fail early, with the process's log, if the process dies."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            if probe():
                return
            time.sleep(0.05)
        log = (self.log_dir / f"{name}.log").read_text(errors="replace")[-3000:]
        state = f"exited with {proc.returncode}" if proc.poll() is not None else "not ready in time"
        raise RuntimeError(f"{name} {state}; its log:\n{log}")

    def stop_all(self) -> None:
        while self._procs:
            stop(self._procs.pop())


@contextmanager
def process_group() -> Iterator[ProcessGroup]:
    """A group whose processes are stopped, and whose temporary directory is removed, however the bench ends."""
    with tempfile.TemporaryDirectory(prefix="llm-gateway-bench-") as tmp:
        group = ProcessGroup(Path(tmp))
        try:
            yield group
        finally:
            group.stop_all()


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def http_ok(url: str) -> Callable[[], bool]:
    def probe() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    return probe


def scrape(base_url: str) -> str:
    """The Prometheus text of `<base_url>/metrics`."""
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=5) as response:
        return response.read().decode()


_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})? (\S+)$", re.MULTILINE)
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def metric_samples(metrics: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of `name`: its labels and its value."""
    return [
        (dict(_LABEL.findall(label_text)), float(value))
        for sample_name, label_text, value in _SAMPLE.findall(metrics)
        if sample_name == name
    ]


def metric_sum(metrics: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`; 0 when there are none."""
    total = 0.0
    for sample_name, label_text, value in _SAMPLE.findall(metrics):
        if sample_name == name and labels.items() <= dict(_LABEL.findall(label_text)).items():
            total += float(value)
    return total


def redis_command(port: int, *words: str) -> bytes:
    """One command in Redis's inline protocol, without a client library; the raw first reply line."""
    with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
        sock.sendall(" ".join(words).encode() + b"\r\n")
        reply = b""
        while not reply.endswith(b"\r\n"):
            data = sock.recv(4096)
            if not data:
                break
            reply += data
        return reply.strip()


def redis_ok(port: int) -> Callable[[], bool]:
    def probe() -> bool:
        try:
            return redis_command(port, "PING") == b"+PONG"
        except OSError:
            return False

    return probe


@dataclass(frozen=True)
class Servers:
    simulator: subprocess.Popen[bytes]
    simulator_url: str
    gateway: subprocess.Popen[bytes]
    gateway_url: str


def start_servers(
    group: ProcessGroup,
    pinning: Pinning,
    model: str,
    gateway_args: tuple[str, ...] = (),
    more_engines: str = "",
) -> Servers:
    """The simulator, then an open gateway (no keys, no limits) in front of it, started with `gateway_args`;
    `more_engines` (lines of `engine_entry`) are routed by the same gateway, to engines started before."""
    simulator, sim_url = start_simulator(group, "simulator", pinning.simulator, model)
    gw_port = free_port()
    routes = routing_map(model, sim_url) + more_engines
    gateway = start_gateway(group, "gateway", pinning, routes, gw_port, gateway_args)
    return Servers(simulator, sim_url, gateway, f"http://127.0.0.1:{gw_port}")


def start_relay(
    group: ProcessGroup, cpus: tuple[int, ...], upstream_url: str, name: str = "relay"
) -> tuple[subprocess.Popen[bytes], str]:
    """bench/bare_relay.py in front of `upstream_url` on a free loopback port, ready when this returns; the
    process and its base URL. `name` names its log, so that two relays do not share one."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    script = REPO_ROOT / "bench" / "bare_relay.py"
    relay = group.start(name, [sys.executable, str(script), "--upstream", upstream_url, "--port", str(port)], cpus)
    group.wait_ready(name, relay, http_ok(f"{url}/healthz"))
    return relay, url


def start_simulator(
    group: ProcessGroup,
    name: str,
    cpus: tuple[int, ...],
    model: str,
    ttft_ms: float = 0,
    itl_ms: float = 0,
) -> tuple[subprocess.Popen[bytes], str]:
    """A vLLM simulator on a free loopback port, ready when this returns; the process and its base URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    simulator = group.start_gateway_app(
        name,
        [
            "simulate",
            "--engine",
            "vllm",
            "--model",
            model,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--ttft-ms",
            f"{ttft_ms:g}",
            "--itl-ms",
            f"{itl_ms:g}",
        ],
        cpus,
    )
    group.wait_ready(name, simulator, http_ok(f"{url}/health"))
    return simulator, url


def engine_entry(name: str, model: str, simulator_url: str) -> str:
    """One engine of a routing map's `engines:` list, as a YAML line."""
    return f'  - {{name: {name}, model: {model}, owned_by: vllm, url: "{simulator_url}"}}\n'


def routing_map(model: str, simulator_url: str, settings: str = "") -> str:
    engine = "engines:\n" + engine_entry("bench-vllm", model, simulator_url)
    return (f"settings: {settings}\n" if settings else "") + engine


def start_gateway(
    group: ProcessGroup,
    name: str,
    pinning: Pinning,
    routes: str,
    port: int,
    extra_args: tuple[str, ...] = (),
) -> subprocess.Popen[bytes]:
    """`serve` with the routing map `routes` (YAML text), ready on `port` when this returns."""
    config = group.log_dir / f"{name}.routes.yaml"
    config.write_text(routes)
    gateway = group.start_gateway_app(
        name,
        [
            "serve",
            "--config",
            str(config),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            *extra_args,
        ],
        pinning.gateway,
    )
    group.wait_ready(name, gateway, http_ok(f"http://127.0.0.1:{port}/readyz"))
    return gateway


def start_redis(group: ProcessGroup, cpus: tuple[int, ...], port: int) -> subprocess.Popen[bytes]:
    """A throwaway redis-server on loopback: no persistence, its working directory the bench's temporary one."""
    server = shutil.which("redis-server")
    if server is None:
        raise RuntimeError("redis-server is not on PATH: install it, or leave keys+redis out of --access")
    redis = group.start(
        "redis",
        [
            server,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(group.log_dir),
            "--daemonize",
            "no",
        ],
        cpus,
    )
    group.wait_ready("redis", redis, redis_ok(port))
    return redis


def run_and_report(name: str, run: Callable[[], dict], output: Path) -> tuple[dict | None, int]:
    """Run a benchmark with its processes stopped however it ends, and write its JSON report.

    Returns the report and the exit code: (None, 130) after Ctrl-C or SIGTERM, (None, 1) after a failure."""
    stop_on_sigterm()
    try:
        report = run()
    except KeyboardInterrupt:
        print(f"\n{name}: interrupted; servers stopped", file=sys.stderr)
        return None, 130
    except RuntimeError as error:
        print(f"{name}: {error}", file=sys.stderr)
        return None, 1
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {output}")
    return report, 0


def simulate_help() -> str:
    """What `python -m gateway_app simulate --help` prints: which options this tree's simulator has."""
    done = subprocess.run(
        [sys.executable, "-m", "gateway_app", "simulate", "--help"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    return done.stdout


def start_simulators(
    group: ProcessGroup,
    names: list[str],
    cpus: tuple[int, ...],
    model: str,
    extra_args: tuple[str, ...] = (),
) -> list[tuple[subprocess.Popen[bytes], str]]:
    """vLLM simulators started together (each with `extra_args`), on free loopback ports, all ready when
    this returns; each process and its base URL, in the order of `names`."""
    started = []
    for name in names:
        port = free_port()
        argv = ["simulate", "--engine", "vllm", "--model", model, "--host", "127.0.0.1", "--port", str(port)]
        started.append((name, group.start_gateway_app(name, [*argv, *extra_args], cpus), f"http://127.0.0.1:{port}"))
    for name, simulator, url in started:
        group.wait_ready(name, simulator, http_ok(f"{url}/health"))
    return [(simulator, url) for _, simulator, url in started]
