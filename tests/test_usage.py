"""The token counts read from engines' answers (usage.py), on the shapes engines send."""

from __future__ import annotations

import json

from gateway_app.usage import find_usage


def test_chat_usage_of_a_json_answer() -> None:
    answer = {
        "id": "x",
        "choices": [{"message": {"content": "prompt_tokens: 99"}}],
        "usage": {"prompt_tokens": 12, "total_tokens": 28, "completion_tokens": 16},
    }
    assert find_usage(json.dumps(answer).encode()) == (12, 16)


def test_responses_api_names_and_details_objects() -> None:
    usage = b'"usage":{"input_tokens":7,"input_tokens_details":{"cached_tokens":3},"output_tokens":5}'
    assert find_usage(b'{"object":"response",' + usage + b"}") == (7, 5)


def test_cached_tokens_do_not_count_as_a_count() -> None:
    usage = b'"usage": {"prompt_tokens_details": {"cached_tokens": 64}, "prompt_tokens": 80, "completion_tokens": 2}'
    assert find_usage(b"{" + usage + b"}") == (80, 2)


def test_spaces_and_line_breaks_around_the_colon() -> None:
    assert find_usage(b'{"usage" :\n {"prompt_tokens" :\t 3 ,\r\n "completion_tokens":  4}}') == (3, 4)


def test_the_last_non_null_usage_of_a_stream_counts() -> None:
    stream = (
        b'data: {"choices":[{"delta":{"content":"a"}}],"usage":{"prompt_tokens":5,"completion_tokens":1}}\n\n'
        b'data: {"choices":[{"delta":{"content":"b"}}],"usage":{"prompt_tokens":5,"completion_tokens":2}}\n\n'
        b'data: {"choices":[],"usage":null}\n\n'
        b"data: [DONE]\n\n"
    )
    assert find_usage(stream) == (5, 2)


def test_a_null_count_is_skipped_for_a_later_number() -> None:
    assert find_usage(b'{"usage":{"prompt_tokens":null,"completion_tokens":9}}') == (0, 9)


def test_no_usage_or_no_counts_is_none() -> None:
    assert find_usage(b'{"choices":[]}') is None
    assert find_usage(b'{"usage":null}') is None
    assert find_usage(b'{"usage":{"total_tokens":4}}') is None
    assert find_usage(b'{"text":"the \\"usage\\" word"}') is None


def test_counts_beyond_the_window_are_not_read() -> None:
    padding = b'"filler":"' + b"x" * 600 + b'",'
    assert find_usage(b'{"usage":{' + padding + b'"prompt_tokens":1,"completion_tokens":2}}') is None
