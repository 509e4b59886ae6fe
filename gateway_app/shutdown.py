"""Process exit after a graceful uvicorn shutdown."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


@contextmanager
def quiet_after_shutdown() -> Iterator[None]:
    """Let uvicorn's graceful shutdown be the whole response to a signal.

    uvicorn catches SIGINT/SIGTERM, shuts down, restores the handlers it found and raises the signal
    again so that they run. With the default handlers that would kill the process (or raise
    KeyboardInterrupt) after a clean shutdown; these handlers make the re-raise a no-op instead.
    """

    def already_handled(signum: int, frame: FrameType | None) -> None:
        pass

    previous = {sig: signal.signal(sig, already_handled) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
