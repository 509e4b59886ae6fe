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


_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")  # SSE allows all three line-ending styles
MAX_PARTIAL = 1 << 20  # an "event" this long is not one: stop filtering rather than hold it


class UsageChunkFilter:
    """Passes SSE events through, minus the usage-only event (`"choices": []` with `usage`).

    Events are released whole: an event cut between two reads waits for its end, which an SSE client
    would do anyway before acting on it.
    """

    __slots__ = ("_partial", "usage", "_given_up")

    def __init__(self) -> None:
        self._partial = b""
        self.usage: tuple[int, int] | None = None
        self._given_up = False

    def feed(self, chunk: bytes) -> bytes:
        if self._given_up:
            return chunk
        data = self._partial + chunk if self._partial else chunk
        ends = [m.end() for m in _EVENT_END.finditer(data)]
        if not ends:
            if len(data) > MAX_PARTIAL:
                self._given_up, self._partial = True, b""
                return data
            self._partial = data
            return b""
        cut = ends[-1]
        complete, self._partial = data[:cut], data[cut:]
        if USAGE_KEY not in complete:
            return complete
        kept, start = [], 0
        for end in ends:
            event = complete[start:end]
            start = end
            if USAGE_KEY in event and _NO_CHOICES.search(event):
                self.usage = find_usage(event) or self.usage
                continue
            kept.append(event)
        return b"".join(kept)

    def flush(self) -> bytes:
        rest, self._partial = self._partial, b""
        return rest
