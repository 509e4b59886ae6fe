"""The attack clients of attacks.py: raw sockets, one attack per run, in a child process of its own.

attacks.py starts this on the CPU of the simulator and the victim clients, at a lower priority (nice
10), so that the attack gets what the victims leave of that CPU rather than taking the gateway's. It
runs until SIGTERM, then writes what the attackers got to --result (JSON) and exits.

    .venv/bin/python bench/attackers.py slow-heads --port 8000 --key sk-... --model m --result out.json

  huge-head     one request whose single header line grows to 100 MB, sent as fast as the socket takes
                it; a new connection whenever the gateway closes one
  many-headers  valid chat requests, one with 10,000 small headers and one with a 1 MiB header value, in turn
  slow-heads    1,100 connections that each send half a request head, then nothing; a closed one is reopened
  slow-bodies   1,100 connections that each send a whole head (Content-Length: 100000) and half the body
  big-bodies    40 clients sending valid 15 MiB chat requests (one huge message) in a loop
  engine-flood  chat requests for the two models of flood_engine.py (an endless 200, an endless 503)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from load import run_client
from processes import own_cpu_seconds

HOST = "127.0.0.1"
MiB = 1 << 20
FILLER = b"a" * MiB
EXAMPLES = 3  # replies kept whole per tally
WAITING_S = 1.0  # an exchange still waiting this long when the attack stops is reported as such
FLOOD_MODELS = ("flood-length", "flood-503")  # the engines of flood_engine.py, as attacks.py maps them


@dataclass(frozen=True)
class Target:
    port: int
    key: str
    model: str


def chat_body(model: str, size: int | None = None) -> bytes:
    """A valid chat request; with `size`, its one message is padded so that the body is `size` bytes."""
    document: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "Say something"}],
        "max_tokens": 1,
    }
    body = json.dumps(document).encode()
    if size is not None and size > len(body):
        document["messages"][0]["content"] += "a" * (size - len(body))  # one byte of JSON per "a"
        body = json.dumps(document).encode()
    return body


def request_head(
    target: Target,
    body_length: int,
    extra: bytes = b"",
    path: str = "/v1/chat/completions",
    host: str = "gateway",
) -> bytes:
    """A POST head with the target's key; `extra` is header lines (each ending in CRLF) to add."""
    return (
        (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {target.key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {body_length}\r\n"
        ).encode()
        + extra
        + b"\r\n"
    )


def error_name(error: BaseException) -> str:
    return type(error).__name__


@dataclass(eq=False)
class Reply:
    """What came back on one connection."""

    status: int | None = None
    status_line: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body_start: str = ""
    body_bytes: int = 0  # read, up to the caller's limit
    sent: int = 0  # request bytes the socket took
    sent_at_reply: int | None = None  # ... when the status line arrived
    seconds_to_reply: float | None = None
    seconds: float = 0.0  # until the answer was read or the connection ended; so far, while pending
    ended: str = "answered"  # else how the connection ended without an answer
    started: float = field(default_factory=time.perf_counter, repr=False)

    def outcome(self) -> str:
        return str(self.status) if self.status is not None else self.ended


class SocketReader:
    """Reads a raw socket. Unlike asyncio's streams, a failed send does not throw away an answer that
    already arrived: a gateway that refuses a request and closes is seen refusing, not only closing."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()

    async def _fill(self) -> bool:
        data = await asyncio.get_running_loop().sock_recv(self.sock, 256 * 1024)
        self.buffer += data
        return bool(data)

    async def line(self) -> bytes:
        """One line with its end, or what is left (b"" at the end of the stream)."""
        while (end := self.buffer.find(b"\n")) < 0:
            if len(self.buffer) > MiB:
                raise ValueError("an answer line longer than 1 MiB")
            if not await self._fill():
                end = len(self.buffer) - 1
                break
        line = bytes(self.buffer[: end + 1])
        del self.buffer[: end + 1]
        return line

    async def some(self, limit: int) -> bytes:
        if not self.buffer and not await self._fill():
            return b""
        chunk = bytes(self.buffer[:limit])
        del self.buffer[:limit]
        return chunk


async def _read_reply(reader: SocketReader, reply: Reply, started: float, body_limit: int) -> None:
    try:
        line = await reader.line()
        if not line:
            reply.ended = "closed, no answer"
            return
        reply.status_line = line.decode("latin-1").strip()[:200]
        reply.sent_at_reply, reply.seconds_to_reply = reply.sent, time.perf_counter() - started
        fields = reply.status_line.split(" ", 2)
        reply.status = int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else None
        while (line := await reader.line()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            reply.headers[name.strip().lower()] = value.strip()[:200]
        length = reply.headers.get("content-length")
        remaining = min(int(length), body_limit) if length and length.isdigit() else body_limit
        while remaining > 0 and (chunk := await reader.some(min(remaining, 256 * 1024))):
            if len(reply.body_start) < 200:
                reply.body_start += chunk[: 200 - len(reply.body_start)].decode("utf-8", errors="replace")
            reply.body_bytes += len(chunk)
            remaining -= len(chunk)
    except (OSError, ValueError) as error:
        reply.ended = error_name(error)


async def exchange(port: int, parts: Iterable[bytes], body_limit: int = 64 * 1024, reply: Reply | None = None) -> Reply:
    """Send `parts` on a new connection as fast as the socket takes them while reading the answer; stop
    sending once the answer starts. Returns when the answer is read (at most `body_limit` bytes of its
    body) or the connection ends; `reply` is filled in as it goes. Cancelling it closes the connection."""
    reply = reply or Reply()
    loop = asyncio.get_running_loop()
    with socket.socket() as sock:
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, (HOST, port))
        except OSError as error:
            reply.ended, reply.seconds = f"connect: {error_name(error)}", time.perf_counter() - reply.started
            return reply
        reading = asyncio.create_task(_read_reply(SocketReader(sock), reply, reply.started, body_limit))
        try:
            try:
                for part in parts:
                    if reading.done():
                        break
                    await loop.sock_sendall(sock, part)
                    reply.sent += len(part)
            except OSError:
                pass  # the gateway closed or reset the connection while we sent: the reading side says how
            await reading
        finally:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)  # no receive left waiting on a closed socket
    reply.seconds = time.perf_counter() - reply.started
    return reply


class Tally:
    """Outcomes of many exchanges: counts by status (or how the connection ended), a few examples, and
    the exchanges still waiting for an answer."""

    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.seconds: list[float] = []
        self.sent = 0
        self.examples: list[dict[str, Any]] = []
        self.pending: set[Reply] = set()

    async def exchange(self, port: int, parts: Iterable[bytes], body_limit: int = 64 * 1024) -> None:
        reply = Reply()
        self.pending.add(reply)
        try:
            await exchange(port, parts, body_limit, reply)
        finally:
            self.pending.discard(reply)
        self.add(reply)

    def add(self, reply: Reply) -> None:
        self.outcomes[reply.outcome()] += 1
        self.seconds.append(reply.seconds_to_reply if reply.seconds_to_reply is not None else reply.seconds)
        self.sent += reply.sent
        if len(self.examples) < EXAMPLES:
            example = asdict(reply)
            del example["started"]
            self.examples.append(example)

    def report(self) -> dict[str, Any]:
        ordered = sorted(self.seconds)
        now = time.perf_counter()
        waiting = [
            {"sent": r.sent, "seconds": round(now - r.started, 2), "status_line": r.status_line}
            for r in self.pending
            if now - r.started >= WAITING_S
        ]
        waiting.sort(key=lambda w: -w["seconds"])
        outcomes = dict(self.outcomes.most_common())
        if waiting:
            outcomes[f"no answer after {WAITING_S:g} s+"] = len(waiting)
        return {
            "exchanges": len(ordered),
            "outcomes": outcomes,
            "pending": waiting[:EXAMPLES],
            "seconds_to_answer_p50": round(ordered[len(ordered) // 2], 3) if ordered else None,
            "seconds_to_answer_max": round(ordered[-1], 3) if ordered else None,
            "bytes_sent": self.sent,
            "examples": self.examples,
        }


class Attack:
    """Runs until cancelled; `report()` says what it got so far, at any time."""

    def __init__(self, target: Target) -> None:
        self.target = target

    async def run(self) -> None:
        raise NotImplementedError

    def report(self) -> dict[str, Any]:
        raise NotImplementedError


class HugeHead(Attack):
    """A header line that grows to 100 MB; once all sent, the head ends and a valid body follows."""

    SIZE = 100 * 10**6

    def __init__(self, target: Target) -> None:
        super().__init__(target)
        self.tally = Tally()

    def parts(self) -> Iterable[bytes]:
        body = chat_body(self.target.model)
        yield request_head(self.target, len(body))[:-2] + b"X-Filler: "
        for _ in range(self.SIZE // MiB):
            yield FILLER
        yield b"\r\n\r\n" + body

    async def run(self) -> None:
        while True:
            await self.tally.exchange(self.target.port, self.parts())
            await asyncio.sleep(0.01)  # no busy loop when the gateway refuses connections at once

    def report(self) -> dict[str, Any]:
        return {"header_bytes": self.SIZE, **self.tally.report()}


class ManyHeaders(Attack):
    """Valid chat requests with 10,000 small headers, and with one 1 MiB header value, one of each at a time."""

    KINDS = {
        "10,000 headers": b"".join(b"X-Pad-%d: v\r\n" % i for i in range(10_000)),
        "1 MiB header value": b"X-Big: " + FILLER + b"\r\n",
    }

    def __init__(self, target: Target) -> None:
        super().__init__(target)
        self.tallies = {kind: Tally() for kind in self.KINDS}

    async def run(self) -> None:
        await asyncio.gather(*(self.send(kind, extra) for kind, extra in self.KINDS.items()))

    async def send(self, kind: str, extra: bytes) -> None:
        body = chat_body(self.target.model)
        request = request_head(self.target, len(body), extra) + body
        while True:
            await self.tallies[kind].exchange(self.target.port, [request])
            await asyncio.sleep(0.01)

    def report(self) -> dict[str, Any]:
        return {kind: tally.report() for kind, tally in self.tallies.items()}


class HoldOpen(Attack):
    """`count` connections that each send `payload` once and then nothing, held open; a connection
    the gateway closes is opened again after a pause."""

    COUNT = 1_100
    BATCH, BATCH_PAUSE_S = 100, 0.05
    REOPEN_PAUSE_S = 0.5
    CONNECT_TIMEOUT_S = 5

    def __init__(self, target: Target, payload: bytes) -> None:
        super().__init__(target)
        self.payload = payload
        self.started = time.perf_counter()
        self.open_now = self.max_open = self.opened = 0
        self.max_open_at_s: float | None = None
        self.first_close_at_s: float | None = None
        self.closed: Counter[str] = Counter()  # by what the gateway did: a status line, a close, a reset
        self.connect_errors: Counter[str] = Counter()

    async def run(self) -> None:
        tasks = []
        try:
            for number in range(self.COUNT):
                tasks.append(asyncio.create_task(self.hold_one()))
                if number % self.BATCH == self.BATCH - 1:
                    await asyncio.sleep(self.BATCH_PAUSE_S)
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def hold_one(self) -> None:
        while True:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(HOST, self.target.port), self.CONNECT_TIMEOUT_S
                )
            except (OSError, TimeoutError) as error:
                self.connect_errors[error_name(error)] += 1
                await asyncio.sleep(self.REOPEN_PAUSE_S)
                continue
            self.opened += 1
            self.open_now += 1
            if self.open_now > self.max_open:
                self.max_open, self.max_open_at_s = self.open_now, round(time.perf_counter() - self.started, 2)
            try:
                writer.write(self.payload)
                await writer.drain()
                data = await reader.read(4096)  # waits while the gateway holds the connection
                outcome = data.split(b"\r\n", 1)[0].decode("latin-1")[:80] if data else "closed (FIN)"
            except OSError as error:
                outcome = error_name(error)
            finally:
                self.open_now -= 1
                writer.transport.abort()
            self.closed[outcome] += 1
            if self.first_close_at_s is None:
                self.first_close_at_s = round(time.perf_counter() - self.started, 2)
            await asyncio.sleep(self.REOPEN_PAUSE_S)

    def report(self) -> dict[str, Any]:
        return {
            "connections": self.COUNT,
            "payload_bytes": len(self.payload),
            "open_at_stop": self.open_now,
            "max_open": self.max_open,
            "max_open_at_s": self.max_open_at_s,
            "opened": self.opened,
            "closed_by_gateway": dict(self.closed.most_common()),
            "first_close_at_s": self.first_close_at_s,
            "connect_errors": dict(self.connect_errors.most_common()),
        }


def slow_heads(target: Target) -> HoldOpen:
    body = chat_body(target.model)
    head = request_head(target, len(body))
    return HoldOpen(target, head[: len(head) // 2])


def slow_bodies(target: Target) -> HoldOpen:
    body = chat_body(target.model, size=100_000)
    return HoldOpen(target, request_head(target, len(body)) + body[: len(body) // 2])


class BigBodies(Attack):
    """`CLIENTS` clients, each sending valid 15 MiB chat requests one after another."""

    CLIENTS = 40
    SIZE = 15 * MiB

    def __init__(self, target: Target) -> None:
        super().__init__(target)
        self.body = chat_body(target.model, size=self.SIZE)
        self.tally = Tally()

    async def run(self) -> None:
        await asyncio.gather(*(self.client() for _ in range(self.CLIENTS)))

    async def client(self) -> None:
        head = request_head(self.target, len(self.body))
        view = memoryview(self.body)
        parts = [head, *(view[i : i + MiB] for i in range(0, len(view), MiB))]  # never more than 1 MiB queued
        while True:
            await self.tally.exchange(self.target.port, parts)

    def report(self) -> dict[str, Any]:
        return {"clients": self.CLIENTS, "body_bytes": len(self.body), **self.tally.report()}


class EngineFlood(Attack):
    """Chat requests for the flood engines' models, two clients per model; each answer is read for at
    most 1 MiB, then the connection is closed."""

    CLIENTS_PER_MODEL = 2

    def __init__(self, target: Target) -> None:
        super().__init__(target)
        self.tallies = {model: Tally() for model in FLOOD_MODELS}

    async def run(self) -> None:
        await asyncio.gather(*(self.client(model) for model in FLOOD_MODELS for _ in range(self.CLIENTS_PER_MODEL)))

    async def client(self, model: str) -> None:
        body = chat_body(model)
        request = request_head(self.target, len(body)) + body
        while True:
            await self.tallies[model].exchange(self.target.port, [request], body_limit=MiB)
            await asyncio.sleep(0.01)

    def report(self) -> dict[str, Any]:
        return {model: tally.report() for model, tally in self.tallies.items()}


ATTACKS = {
    "huge-head": HugeHead,
    "many-headers": ManyHeaders,
    "slow-heads": slow_heads,
    "slow-bodies": slow_bodies,
    "big-bodies": BigBodies,
    "engine-flood": EngineFlood,
}


async def attack_until_stopped(name: str, target: Target, ready: Path | None) -> dict[str, Any]:
    attack: Attack = ATTACKS[name](target)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    started, cpu = time.perf_counter(), own_cpu_seconds()
    running = asyncio.create_task(attack.run())
    if ready is not None:
        ready.touch()
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([running, stopping], return_when=asyncio.FIRST_COMPLETED)
    failure = None
    if running.done() and running.exception() is not None:
        failure = repr(running.exception())
    report = attack.report()  # before the connections close: what was open, what still waited
    running.cancel()
    stopping.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await running
    return {
        "attack": name,
        "pid": os.getpid(),
        "cpus": sorted(os.sched_getaffinity(0)),
        "niceness": os.nice(0),
        "seconds": round(time.perf_counter() - started, 2),
        "cpu_seconds": round(own_cpu_seconds() - cpu, 2),
        "failure": failure,
        **report,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("attack", choices=sorted(ATTACKS))
    parser.add_argument("--port", type=int, required=True, help="the gateway's API port on 127.0.0.1")
    parser.add_argument("--key", required=True, help="an API key the gateway accepts")
    parser.add_argument("--model", required=True)
    parser.add_argument("--result", type=Path, required=True, help="where to write the JSON report")
    parser.add_argument("--ready", type=Path, help="a file to create once the attack has started")
    args = parser.parse_args()
    report = run_client(attack_until_stopped(args.attack, Target(args.port, args.key, args.model), args.ready))
    args.result.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
