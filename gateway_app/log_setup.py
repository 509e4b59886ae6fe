"""Process logging: JSON lines for log collectors, or plain text for a terminal."""

from __future__ import annotations

import logging
import sys
import threading
import time
from datetime import UTC, datetime

import orjson

# Held while a line (or a batch of them) goes to stderr, by the log handler and by the request log:
# lines written from two threads never mix.
OUTPUT_LOCK = threading.RLock()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def default_format() -> str:
    """Text on a terminal, JSON otherwise (in a container, logs go to a collector)."""
    return "text" if sys.stderr.isatty() else "json"


def configure_logging(level: str, fmt: str | None = None) -> str:
    fmt = fmt or default_format()
    handler = logging.StreamHandler(sys.stderr)
    handler.lock = OUTPUT_LOCK  # shared with the request log, which writes from a thread of its own
    handler.setFormatter(
        JsonFormatter() if fmt == "json" else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # watchfiles logs every file event at INFO; the reload itself is logged by the watcher.
    logging.getLogger("watchfiles").setLevel(logging.WARNING)
    return fmt


class ThrottledWarning:
    """One log line per key at most every `interval` seconds, with how many were left out since.

    For events that clients or engines can repeat at will (refused connections, a failing engine): the
    log must say it happens, not become a resource anyone can exhaust. Keys must come from a bounded set
    (reasons, engine names), never from what a client sends.
    """

    def __init__(self, logger: logging.Logger, interval: float = 60.0) -> None:
        self._log = logger
        self._interval = interval
        self._last: dict[str, float] = {}
        self._quiet: dict[str, int] = {}

    def warn(self, key: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -self._interval) < self._interval:
            self._quiet[key] = self._quiet.get(key, 0) + 1
            return
        self._last[key] = now
        quiet = self._quiet.pop(key, 0)
        self._log.warning(message + (f" ({quiet} more like it since the last such line)" if quiet else ""), *args)
