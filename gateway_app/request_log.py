"""One structured line per request, written off the hot path.

The handler only fills a small dict and appends it to a bounded buffer; a background task serializes
and writes the buffer a few times a second. Lines never carry a prompt, a completion or a key.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import sys
import time
from typing import Any, TextIO

import orjson

from gateway_app.background import PeriodicTask
from gateway_app.log_setup import OUTPUT_LOCK

FLUSH_SECONDS = 0.2
MAX_BUFFERED = 10_000  # past this, lines are dropped (and counted) rather than memory growing


@functools.lru_cache(maxsize=4)
def _iso_second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def _iso_time(stamp: float) -> str:
    """ISO 8601 UTC with milliseconds, as `datetime.isoformat` writes it, at a fraction of its cost (the
    second's part is formatted once per second)."""
    second = int(stamp)
    return f"{_iso_second(second)}.{int((stamp - second) * 1000):03d}+00:00"


class RequestLog(PeriodicTask):
    """Buffers request records and writes them as JSON lines or as text for a terminal, a few times a
    second, from a thread: a slow log pipe must slow the log, never the requests."""

    def __init__(self, stream: TextIO | None = None, fmt: str = "json", enabled: bool = True) -> None:
        super().__init__(lambda: FLUSH_SECONDS)
        self.enabled = enabled
        self.format = fmt
        self._stream = stream or sys.stderr
        self._buffer: collections.deque[dict[str, Any]] = collections.deque()
        self.dropped = 0

    def record(self, entry: dict[str, Any]) -> None:
        """Called on the hot path: no formatting, no I/O."""
        if not self.enabled:
            return
        if len(self._buffer) >= MAX_BUFFERED:
            self.dropped += 1
            return
        entry["time"] = time.time()
        self._buffer.append(entry)

    def _render(self, entry: dict[str, Any]) -> bytes:
        stamp = _iso_time(entry.pop("time"))
        if self.format == "json":
            return orjson.dumps({"time": stamp, **{k: v for k, v in entry.items() if v is not None}})
        fields = " ".join(f"{k}={v}" for k, v in entry.items() if v is not None and k not in ("status", "path"))
        return f"{stamp} {entry.get('status')} {entry.get('path')} {fields}".encode()

    def flush(self) -> None:
        if self.dropped:
            dropped, self.dropped = self.dropped, 0
            with OUTPUT_LOCK:
                self._stream.write(f"llm-gateway: {dropped} request log lines dropped (the log cannot keep up)\n")
        if not self._buffer:
            return
        lines = []
        while self._buffer:
            lines.append(self._render(self._buffer.popleft()))
        text = b"\n".join(lines) + b"\n"
        with OUTPUT_LOCK:
            binary = getattr(self._stream, "buffer", None)  # bytes straight to the file, not decoded and re-encoded
            if binary is not None:
                self._stream.flush()  # what the text layer holds goes first
                binary.write(text)
                binary.flush()
            else:
                self._stream.write(text.decode())
                self._stream.flush()

    async def step(self) -> None:
        if self._buffer or self.dropped:
            await asyncio.to_thread(self.flush)

    def stop(self) -> None:
        super().stop()
        self.flush()
