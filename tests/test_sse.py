"""The SSE parser and the chat-stream tally against byte streams cut at every position and into many
random pieces: the events, and what the tally makes of them, must not depend on where reads end."""

from __future__ import annotations

import json
import random

import pytest

from agentperf_users.client.sse import (
    MAX_SSE_LINE_BYTES,
    SSEEvent,
    SSEParser,
    StreamTally,
)


def _chunk(delta: dict | None = None, **extra) -> dict:
    body = {"id": "c1", "object": "chat.completion.chunk", "model": "m"}
    if delta is not None:
        body["choices"] = [{"index": 0, "delta": delta, "finish_reason": None}]
    return {**body, **extra}


USAGE = {"prompt_tokens": 1200, "completion_tokens": 6, "prompt_tokens_details": {"cached_tokens": 1024}}

# (event type, data payload) in order, as a server would send them; the text covers 2-, 3- and 4-byte UTF-8.
PAYLOADS: list[tuple[str, str]] = [
    ("", json.dumps(_chunk({"role": "assistant", "content": ""}))),
    ("", json.dumps(_chunk({"reasoning_content": "think é"}), ensure_ascii=False)),
    ("", json.dumps(_chunk({"reasoning": "more"}))),
    ("", json.dumps(_chunk({"content": "héllo 日本 🎉"}), ensure_ascii=False)),
    ("", json.dumps(_chunk({"tool_calls": [{"index": 0, "id": "t", "function": {"name": "bash", "arguments": ""}}]}))),
    ("", json.dumps(_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"cmd":"ls"}'}}]}))),
    ("", json.dumps(_chunk({"content": "end"}))),
    ("", json.dumps(_chunk(None, choices=[], usage=USAGE))),
    ("", "[DONE]"),
]


def _encode(payloads, newline: bytes = b"\n") -> bytes:
    """Payloads framed with comments, an ``event:`` line and a payload split over two ``data:`` lines."""
    out = [b": keep-alive" + newline + newline]
    for i, (event, data) in enumerate(payloads):
        raw = data.encode()
        if event:
            out.append(b"event: " + event.encode() + newline)
        if i == 3:  # multi-line data: JSON allows a newline between tokens, and the parser joins with \n
            cut = raw.index(b'"choices"')
            out.append(b"data: " + raw[:cut] + newline + b"data:" + raw[cut:] + newline + newline)
        else:
            out.append(b"data: " + raw + newline + newline)
        if i == 1:
            out.append(b": ping" + newline)
    return b"".join(out)


def _expected(payloads) -> list[SSEEvent]:
    events = []
    for i, (event, data) in enumerate(payloads):
        raw = data.encode()
        if i == 3:
            cut = raw.index(b'"choices"')
            raw = raw[:cut] + b"\n" + raw[cut:]
        events.append(SSEEvent(event, raw))
    return events


def _parse(pieces) -> tuple[list[SSEEvent], SSEParser]:
    parser = SSEParser()
    events = []
    for piece in pieces:
        events += parser.feed(piece)
    return events, parser


def _tally(events) -> StreamTally:
    tally = StreamTally()
    for t, event in enumerate(events):
        tally.add(event, float(t))
    return tally


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
def test_every_two_piece_split_gives_the_same_events(newline):
    stream = _encode(PAYLOADS, newline)
    expected = _expected(PAYLOADS)
    for cut in range(len(stream) + 1):
        events, parser = _parse([stream[:cut], stream[cut:]])
        assert events == expected, f"cut at byte {cut}"
        assert not parser.has_partial_event


def test_many_random_pieces_including_single_bytes():
    stream = _encode(PAYLOADS, b"\r\n")
    expected = _expected(PAYLOADS)
    rng = random.Random(7)
    assert _parse([bytes([b]) for b in stream])[0] == expected
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(2, 60)))
        pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
        assert _parse(pieces)[0] == expected


def test_tally_counts_text_chunks_not_the_role_chunk_and_reads_usage():
    events, _ = _parse([_encode(PAYLOADS)])
    tally = _tally(events)
    # events 1..6 carry reasoning, content or tool-call text; event 0 is role-only, 7 is usage.
    assert tally.token_times == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert tally.usage == USAGE
    assert tally.done_at == 8.0
    assert tally.error is None
    assert json.loads(events[3].data)["choices"][0]["delta"]["content"] == "héllo 日本 🎉"


def test_usage_with_null_choices_and_events_after_done_are_ignored():
    payloads = [
        ("", json.dumps(_chunk({"content": "a"}))),
        ("", json.dumps(_chunk(None, choices=None, usage={"completion_tokens": 1}))),
        ("", "[DONE]"),
        ("", json.dumps(_chunk({"content": "late"}))),
    ]
    tally = _tally(_parse([_encode(payloads)])[0])
    assert tally.token_times == [0.0]
    assert tally.usage == {"completion_tokens": 1}
    assert tally.done_at == 2.0


@pytest.mark.parametrize(
    "event, data, expected",
    [
        ("", '{"error": {"message": "KV cache exhausted", "code": 500}}', "in-band error: KV cache exhausted"),
        ("error", '{"message": "overloaded"}', "in-band error: overloaded"),
        ("", "{not json", "unparseable JSON in the stream"),
        ("", "[1, 2]", "a stream chunk that is not a JSON object"),
        ("", '{"choices": 5}', "a stream chunk of the wrong shape: choices is a number, expected a list"),
        ("", '{"choices": [3]}', "a stream chunk of the wrong shape: choices[0] is a number, expected an object"),
        ("", '{"choices": [{"delta": "str"}]}',
         "a stream chunk of the wrong shape: choices[0].delta is a string, expected an object"),
        ("", '{"choices": [{"delta": {"content": 5}}]}',
         "a stream chunk of the wrong shape: choices[0].delta.content is a number, expected a string"),
        ("", '{"choices": [{"delta": {"reasoning_content": ["a"]}}]}',
         "a stream chunk of the wrong shape: choices[0].delta.reasoning_content is a list, expected a string"),
        ("", '{"choices": [{"delta": {"tool_calls": 7}}]}',
         "a stream chunk of the wrong shape: choices[0].delta.tool_calls is a number, expected a list"),
        ("", '{"choices": [{"delta": {"tool_calls": ["x"]}}]}',
         "a stream chunk of the wrong shape: choices[0].delta.tool_calls[0] is a string, expected an object"),
        ("", '{"choices": [{"delta": {"tool_calls": [{"function": true}]}}]}',
         "a stream chunk of the wrong shape: choices[0].delta.tool_calls[0].function is a boolean, expected an object"),
        ("", '{"choices": [{"delta": {"tool_calls": [{"function": {"arguments": {}}}]}}]}',
         "a stream chunk of the wrong shape: choices[0].delta.tool_calls[0].function.arguments is an object, "
         "expected a string"),
        ("", '{"choices": [], "usage": [1]}', "a stream chunk of the wrong shape: usage is a list, expected an object"),
        ("", '{"choices": [], "usage": {"prompt_tokens": "many", "completion_tokens": null}}',
         "a stream chunk of the wrong shape: usage.prompt_tokens is a string, expected a non-negative integer"),
        ("", '{"choices": [], "usage": {"completion_tokens": -3}}',
         "a stream chunk of the wrong shape: usage.completion_tokens is a number, expected a non-negative integer"),
        ("", '{"choices": [], "usage": {"prompt_tokens_details": {"cached_tokens": 1.5}}}',
         "a stream chunk of the wrong shape: usage.prompt_tokens_details.cached_tokens is a number, expected a "
         "non-negative integer"),
    ],
)
def test_error_events_and_garbage_stop_the_tally(event, data, expected):
    payloads = [("", json.dumps(_chunk({"content": "a"}))), (event, data), ("", "[DONE]")]
    stream = _encode(payloads)
    for cut in range(0, len(stream) + 1, 7):
        tally = _tally(_parse([stream[:cut], stream[cut:]])[0])
        assert tally.error == expected
        assert tally.done_at is None
        assert tally.token_times == [0.0]


def test_json_nested_deeper_than_the_decoder_recurses_is_unparseable_not_a_crash():
    payloads = [("", json.dumps(_chunk({"content": "a"}))), ("", "[" * 100_000 + "]" * 100_000), ("", "[DONE]")]
    tally = _tally(_parse([_encode(payloads)])[0])
    assert (tally.error, tally.token_times, tally.done_at) == ("unparseable JSON in the stream", [0.0], None)


def test_usage_is_checked_against_what_arrived():
    from agentperf_users.client.sse import implausible_usage

    payloads = [("", json.dumps(_chunk({"content": "héllo"}), ensure_ascii=False)),  # 6 bytes in one chunk
                ("", json.dumps(_chunk({"tool_calls": [{"function": {"name": "ls", "arguments": "{}"}}]})))]
    tally = _tally(_parse([_encode(payloads)])[0])
    assert (len(tally.token_times), tally.text_bytes) == (2, 10)
    assert implausible_usage(12, tally, max_tokens=None) is None  # 10 bytes + one slack token per chunk
    assert implausible_usage(13, tally, max_tokens=None) == \
        "usage.completion_tokens 13 > what arrived (2 text chunks, 10 bytes)"
    assert implausible_usage(12, tally, max_tokens=11) == "usage.completion_tokens 12 > the 11 requested"


def test_early_close_leaves_no_done_and_a_partial_event():
    stream = _encode(PAYLOADS)
    end_of_usage = stream.index(b"[DONE]") - len(b"data: ")
    for cut in range(end_of_usage - 40, end_of_usage + 4):
        events, parser = _parse([stream[:cut]])
        tally = _tally(events)
        assert tally.done_at is None, f"cut at {cut}"
        # Only a cut exactly between the usage event and "data: [DONE]" leaves nothing half-read.
        assert parser.has_partial_event == (cut != end_of_usage)


def test_a_line_without_end_is_rejected_instead_of_buffered_forever():
    parser = SSEParser()
    piece = b"x" * (1024 * 1024)
    with pytest.raises(ValueError, match="longer than"):
        for _ in range(MAX_SSE_LINE_BYTES // len(piece) + 2):
            parser.feed(piece)
