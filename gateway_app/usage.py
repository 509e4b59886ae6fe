"""Token counts from the `usage` object that engines put in answers and in a stream's last chunk.

A regular expression over a short window after the last `"usage"` avoids parsing whole answers
(embedding answers can be megabytes of floats) on the hot path.
"""

from __future__ import annotations

import re

USAGE_KEY = b'"usage"'
_WINDOW = 512
# Chat/completions say prompt/completion tokens; the Responses API says input/output tokens.
_COUNTS = re.compile(rb'"(prompt_tokens|completion_tokens|input_tokens|output_tokens)"\s*:\s*(\d+)')
_SYNONYMS = {b"input_tokens": b"prompt_tokens", b"output_tokens": b"completion_tokens"}


def find_usage(data: bytes) -> tuple[int, int] | None:
    """(prompt_tokens, completion_tokens) from the last non-null `usage` in `data`, or None."""
    start = data.rfind(USAGE_KEY)
    while start >= 0:
        window = data[start + len(USAGE_KEY) : start + len(USAGE_KEY) + _WINDOW]
        if window.lstrip(b" \t\r\n:").startswith(b"{"):
            counts: dict[bytes, int] = {}
            for key, value in _COUNTS.findall(window):
                counts.setdefault(_SYNONYMS.get(key, key), int(value))
            if counts:
                return counts.get(b"prompt_tokens", 0), counts.get(b"completion_tokens", 0)
        start = data.rfind(USAGE_KEY, 0, start)
    return None
