"""The usage-chunk filter on the SSE framings engines and proxies produce."""

from __future__ import annotations

import pytest

from gateway_app.stream_usage import MAX_PARTIAL, UsageChunkFilter, request_usage_chunk

TOKEN = b'data: {"choices":[{"delta":{"content":"a"}}]}'
USAGE = b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}}'
DONE = b"data: [DONE]"


@pytest.mark.parametrize("end", [b"\n\n", b"\r\n\r\n", b"\r\r"])
def test_usage_event_removed_and_counted_whatever_the_line_endings(end):
    stream = TOKEN + end + b": a comment" + end + TOKEN + end + USAGE + end + DONE + end
    usage_filter = UsageChunkFilter()
    released = []
    for i in range(0, len(stream), 7):  # events split across reads at odd places
        out = usage_filter.feed(stream[i : i + 7])
        released.append(out)
    out = b"".join(released) + usage_filter.flush()
    assert out == TOKEN + end + b": a comment" + end + TOKEN + end + DONE + end
    assert usage_filter.usage == (3, 5)
    assert any(released[:-3])  # events go out as they complete, not all at the end


def test_an_endless_event_is_passed_through_not_held():
    usage_filter = UsageChunkFilter()
    assert usage_filter.feed(b"data: " + b"x" * (MAX_PARTIAL + 1)) != b""
    assert usage_filter.feed(b"more") == b"more"


def test_request_usage_chunk_keeps_other_stream_options():
    document = {"stream": True, "stream_options": {"continuous_usage_stats": True}}
    assert request_usage_chunk(document) is True
    assert document["stream_options"] == {"continuous_usage_stats": True, "include_usage": True}
    assert request_usage_chunk({"stream_options": {"include_usage": True}}) is False
