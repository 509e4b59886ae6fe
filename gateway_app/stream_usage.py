"""Token accounting for streams whose client did not ask for usage.

Rate limits need every stream's token count, so the gateway asks the engine for the usage chunk
(`stream_options.include_usage`) and, when the client had not asked for it, takes that chunk out of the
stream again: the client gets exactly the stream it asked for.
"""

from __future__ import annotations

import re
from typing import Any

from gateway_app.usage import USAGE_KEY, find_usage

_NO_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')


def request_usage_chunk(document: dict[str, Any]) -> bool:
    """Make a streaming request ask for usage; True if the client had not asked (so it must be removed)."""
    options = document.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return False
    document["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return True


class UsageChunkFilter:
    """Passes SSE events through, minus the usage-only event (`"choices": []` with `usage`).

    Events are released whole: an event cut between two reads waits for its end, which an SSE client
    would do anyway before acting on it.
    """

    __slots__ = ("_partial", "usage")

    def __init__(self) -> None:
        self._partial = b""
        self.usage: tuple[int, int] | None = None

    def feed(self, chunk: bytes) -> bytes:
        data = self._partial + chunk if self._partial else chunk
        cut = data.rfind(b"\n\n")
        if cut < 0:
            self._partial = data
            return b""
        complete, self._partial = data[: cut + 2], data[cut + 2 :]
        if USAGE_KEY not in complete:
            return complete
        kept = []
        for event in complete[:-2].split(b"\n\n"):
            if USAGE_KEY in event and _NO_CHOICES.search(event):
                self.usage = find_usage(event) or self.usage
                continue
            kept.append(event + b"\n\n")
        return b"".join(kept)

    def flush(self) -> bytes:
        rest, self._partial = self._partial, b""
        return rest
