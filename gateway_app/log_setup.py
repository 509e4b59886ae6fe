"""Process logging: JSON lines for log collectors, or plain text for a terminal."""

from __future__ import annotations

import logging
import sys
from datetime import datetime, timezone

import orjson


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
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
