"""HTTP/1.1 on a bare socket, for tests that must behave the way no well-behaved client library does:
half a request head, a huge one, a body that stops half-way, a connection that is never used."""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


@dataclass
class RawAnswer:
    status: int
    headers: list[tuple[str, str]]  # names lower-cased, in order, repeats kept
    body: bytes

    def header(self, name: str) -> str | None:
        return next((value for key, value in self.headers if key == name), None)

    def json(self) -> Any:
        return json.loads(self.body)


def request_head(
    path: str = "/v1/chat/completions",
    method: str = "POST",
    body_length: int | None = None,
    headers: dict[str, str] | None = None,
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: gateway"]
    if body_length is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {body_length}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def json_request(body: dict, path: str = "/v1/chat/completions", headers: dict[str, str] | None = None) -> bytes:
    """A whole POST of `body` as JSON: head and body."""
    data = json.dumps(body).encode()
    return request_head(path, body_length=len(data), headers=headers) + data


class RawConnection:
    """One client connection; every method gives up after `timeout` seconds instead of hanging.

    `receive_buffer` sets SO_RCVBUF before connecting, which also bounds the window the connection
    offers: a client that reads slowly, or not at all, makes the other side wait sooner."""

    def __init__(self, url: str, timeout: float = 15.0, receive_buffer: int | None = None) -> None:
        parts = urlsplit(url)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if receive_buffer is not None:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            self.sock.settimeout(timeout)
            self.sock.connect((parts.hostname, parts.port))
        except OSError:
            self.sock.close()
            raise
        self._buffer = b""

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> bool:
        """Send all of `data`; False when the gateway closed or reset the connection meanwhile."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def _fill(self) -> bool:
        try:
            chunk = self.sock.recv(1 << 16)
        except ConnectionResetError:
            chunk = b""
        self._buffer += chunk
        return bool(chunk)

    def read_until(self, marker: bytes) -> bytes:
        """Everything received so far, once it holds `marker`; it stays buffered for `read_answer`.
        Fails when the connection ends first."""
        while marker not in self._buffer:
            if not self._fill():
                raise AssertionError(f"the connection ended before {marker!r} arrived: {self._buffer!r}")
        return self._buffer

    def read_until_close(self) -> bytes:
        """Every byte still to come, unparsed, until the other side closes the connection."""
        while self._fill():
            pass
        received, self._buffer = self._buffer, b""
        return received

    def read_answer(self) -> RawAnswer | None:
        """The next answer, read to its end (Content-Length, chunked, or the connection's close);
        None when the connection ends before a whole head arrives."""
        while b"\r\n\r\n" not in self._buffer:
            if not self._fill():
                return None
        head, _, self._buffer = self._buffer.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = [(name.strip().lower(), value.strip()) for name, _, value in (line.partition(":") for line in lines)]
        answer = RawAnswer(int(status_line.split()[1]), headers, b"")
        length = answer.header("content-length")
        if length is not None:
            while len(self._buffer) < int(length) and self._fill():
                pass
            answer.body, self._buffer = self._buffer[: int(length)], self._buffer[int(length) :]
        elif answer.header("transfer-encoding") == "chunked":
            answer.body = self._read_chunked()
        else:
            answer.body = self.read_until_close()
        return answer

    def _read_chunked(self) -> bytes:
        body = b""
        while True:
            while b"\r\n" not in self._buffer:
                if not self._fill():
                    return body
            size_line, _, self._buffer = self._buffer.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            while len(self._buffer) < size + 2:
                if not self._fill():
                    return body + self._buffer
            body, self._buffer = body + self._buffer[:size], self._buffer[size + 2 :]
            if size == 0:
                return body

    def closed_by_peer(self, within: float = 15.0) -> bool:
        """Whether the gateway closes the connection within `within` seconds (what it sends is dropped)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                if not self.sock.recv(1 << 16):
                    return True
            except (ConnectionResetError, BrokenPipeError):
                return True
            except TimeoutError:
                return False
        return False

    def close(self) -> None:
        self.sock.close()
