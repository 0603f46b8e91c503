"""What an OpenAI chat-completions stream says, from its raw bytes.

Two layers, both free of any I/O so they can be fed bytes cut anywhere (tests/test_sse.py cuts them at
every position): :class:`SSEParser` turns ``text/event-stream`` bytes into events, and
:class:`StreamTally` decides what each event means for the measurement (a token chunk, the usage, an
in-band error, the end). The streaming client only reads sockets and stamps arrival times around them.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, NamedTuple

MAX_SSE_LINE_BYTES = 16 * 1024 * 1024  # a longer line without a newline is a broken stream, not a big chunk
_JSON_DECODER = json.JSONDecoder()


class SSEEvent(NamedTuple):
    """One dispatched server-sent event: its ``event:`` type ("" when absent) and joined ``data:`` bytes."""

    event: str
    data: bytes


class SSEParser:
    """Incremental ``text/event-stream`` parser (WHATWG rules) over raw bytes.

    Bytes may be cut anywhere, including inside a CRLF pair or a multibyte UTF-8 character: lines are
    reassembled as bytes and only a complete event's data is ever decoded. ``data:``
    lines of one event are joined with ``\\n``; comment lines (``:``) and ``id``/``retry`` fields are
    ignored; an event is dispatched at a blank line, and one left without it when the stream ends is
    dropped, as the spec says (see :attr:`has_partial_event`).
    """

    def __init__(self) -> None:
        self._pending: list[bytes] = []  # bytes of an unterminated line
        self._pending_len = 0
        self._after_cr = False  # the last line ended with CR: a leading LF of the next read belongs to it
        self._data: list[bytes] = []
        self._event = ""

    @property
    def has_partial_event(self) -> bool:
        return bool(self._pending or self._data or self._event)

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if not chunk:
            return []
        if self._after_cr:
            self._after_cr = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
                if not chunk:
                    return []
        if b"\n" not in chunk and b"\r" not in chunk:
            self._pending.append(chunk)
            self._pending_len += len(chunk)
            if self._pending_len > MAX_SSE_LINE_BYTES:
                raise ValueError(f"an SSE line longer than {MAX_SSE_LINE_BYTES} bytes")
            return []
        if self._pending:
            self._pending.append(chunk)
            chunk = b"".join(self._pending)
            self._pending, self._pending_len = [], 0
        if b"\r" in chunk:
            self._after_cr = chunk.endswith(b"\r")
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = chunk.split(b"\n")
        tail = lines.pop()
        if tail:
            self._pending, self._pending_len = [tail], len(tail)
        events = []
        for line in lines:
            if not line:
                if self._data:
                    events.append(SSEEvent(self._event, b"\n".join(self._data)))
                self._data, self._event = [], ""
                continue
            field, _, value = line.partition(b":")
            if not field:
                continue  # a comment / keep-alive line
            if value[:1] == b" ":
                value = value[1:]
            if field == b"data":
                self._data.append(value)
            elif field == b"event":
                self._event = value.decode("utf-8", "replace")
        return events


class StreamTally:
    """What one OpenAI chat-completions stream said so far, fed event by event with arrival times.

    A *token chunk* carries generated text: ``content``, ``reasoning_content``/``reasoning`` or
    tool-call name/arguments. A role-only or empty delta is not one (it is no token), and neither is the
    usage chunk (``choices`` empty or null). Its arrival times give TTFT and the inter-token gaps.

    It never raises, whatever the server sends: a chunk that is valid JSON of the wrong shape (``choices``
    not a list, a ``delta`` that is a string, ``tool_calls`` that is a number) sets :attr:`error` naming the
    offending field, so the request becomes one ``bad_stream`` record instead of an exception that leaves
    no record and retries at once. The UTF-8 bytes of generated text are counted too: the client checks a
    server's ``usage`` against what actually arrived (:func:`implausible_usage`).
    """

    def __init__(self) -> None:
        self.token_times: list[float] = []
        self.text_bytes = 0  # UTF-8 bytes of generated text (content, reasoning, tool-call name and arguments)
        self.usage: Mapping[str, Any] | None = None
        self.server_timing: Mapping[str, Any] | None = None
        self.finished = False  # a choice carried a finish_reason
        self.last_event_at: float | None = None
        self.done_at: float | None = None
        self.error: str | None = None

    def add(self, event: SSEEvent, arrived_at: float) -> None:
        if self.done_at is not None or self.error is not None:
            return
        data = event.data.strip()
        if not data:
            return
        self.last_event_at = arrived_at
        if data == b"[DONE]":
            self.done_at = arrived_at
            return
        try:  # raw_decode on str skips json.loads' encoding sniffing and trailing-space regex: 2.5x faster
            text = data.decode()
            chunk, end = _JSON_DECODER.raw_decode(text)
            if end != len(text):
                raise ValueError("trailing data")
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; RecursionError: deep nesting
            self.error = "unparseable JSON in the stream"
            return
        if not isinstance(chunk, dict):
            self.error = "a stream chunk that is not a JSON object"
            return
        if event.event == "error" or chunk.get("error"):
            self.error = "in-band error: " + error_text(chunk.get("error") or chunk)
            return
        texts, problem = _chunk_texts(chunk)
        if problem is not None:
            self.error = f"a stream chunk of the wrong shape: {problem}"
            return
        if texts:
            self.token_times.append(arrived_at)
            self.text_bytes += sum(len(text.encode("utf-8", "surrogatepass")) for text in texts)
        if any(isinstance(choice, dict) and choice.get("finish_reason") for choice in chunk.get("choices") or ()):
            self.finished = True
        usage = chunk.get("usage")
        if (problem := _usage_problem(usage)) is not None:
            self.error = f"a stream chunk of the wrong shape: {problem}"
        elif usage:
            self.usage = usage
            timing = chunk.get("agentperf_timing") or usage.get("agentperf_timing")
            self.server_timing = timing if isinstance(timing, dict) else None


_TEXT_FIELDS = ("content", "reasoning_content", "reasoning")


def _chunk_texts(chunk: Mapping[str, Any]) -> tuple[list[str], str | None]:
    """The generated texts a chunk carries (non-empty ones), or the first field whose JSON type is wrong.

    Only the fields the measurement reads are checked, each where the OpenAI schema puts it; anything else a
    server adds is its own business. ``null`` is accepted wherever a value may be absent."""
    choices = chunk.get("choices")
    if choices is None:
        return [], None
    if not isinstance(choices, list):
        return [], f"choices is {_json_type(choices)}, expected a list"
    texts: list[str] = []
    for i, choice in enumerate(choices):
        if not isinstance(choice, dict):
            return [], f"choices[{i}] is {_json_type(choice)}, expected an object"
        delta = choice.get("delta")
        if delta is None:
            continue
        if not isinstance(delta, dict):
            return [], f"choices[{i}].delta is {_json_type(delta)}, expected an object"
        for name in _TEXT_FIELDS:
            value = delta.get(name)
            if value is not None and not isinstance(value, str):
                return [], f"choices[{i}].delta.{name} is {_json_type(value)}, expected a string"
            if value:
                texts.append(value)
        calls = delta.get("tool_calls")
        if calls is None:
            continue
        if not isinstance(calls, list):
            return [], f"choices[{i}].delta.tool_calls is {_json_type(calls)}, expected a list"
        for j, call in enumerate(calls):
            where = f"choices[{i}].delta.tool_calls[{j}]"
            if not isinstance(call, dict):
                return [], f"{where} is {_json_type(call)}, expected an object"
            function = call.get("function")
            if function is None:
                continue
            if not isinstance(function, dict):
                return [], f"{where}.function is {_json_type(function)}, expected an object"
            for name in ("name", "arguments"):
                value = function.get(name)
                if value is not None and not isinstance(value, str):
                    return [], f"{where}.function.{name} is {_json_type(value)}, expected a string"
                if value:
                    texts.append(value)
    return texts, None


_USAGE_COUNTS = ("prompt_tokens", "completion_tokens", "total_tokens")


def _usage_problem(usage: Any) -> str | None:
    """What is wrong with a chunk's ``usage`` (absent and null are fine; so is a null count: not reported)."""
    if usage is None:
        return None
    if not isinstance(usage, dict):
        return f"usage is {_json_type(usage)}, expected an object"
    counts = [(f"usage.{name}", usage.get(name)) for name in _USAGE_COUNTS]
    details = usage.get("prompt_tokens_details")
    if details is not None:
        if not isinstance(details, dict):
            return f"usage.prompt_tokens_details is {_json_type(details)}, expected an object"
        counts.append(("usage.prompt_tokens_details.cached_tokens", details.get("cached_tokens")))
    for name, value in counts:
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            return f"{name} is {_json_type(value)}, expected a non-negative integer"
    return None


def _json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, for messages (``a number``, ``a string``, ...)."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return "null"


def implausible_usage(completion_tokens: int, tally: StreamTally, max_tokens: int | None) -> str | None:
    """Why a server's ``usage.completion_tokens`` cannot be believed, or None.

    Output speed is (tokens - 1) / (last token - first token), with tokens from ``usage``: a server that
    claims 100,000 tokens for a short stream would pass any speed floor. A count is impossible when it
    exceeds the ``max_tokens`` the request asked for, or what arrived: every generated token decodes to at
    least one byte of text except special tokens, and those cannot outnumber the chunks that carried text
    (one slack token per chunk, which also covers a byte-level tokenizer's split characters)."""
    if max_tokens is not None and completion_tokens > max_tokens:
        return f"usage.completion_tokens {completion_tokens} > the {max_tokens} requested"
    bound = tally.text_bytes + len(tally.token_times)
    if completion_tokens > bound:
        return (f"usage.completion_tokens {completion_tokens} > what arrived ({len(tally.token_times)} text chunks, "
                f"{tally.text_bytes} bytes)")
    return None


def error_text(error: Any) -> str:
    """The human part of an OpenAI-style ``error`` (in-band event or HTTP error body), unredacted."""
    if isinstance(error, dict):
        error = error.get("message") or error.get("detail") or error.get("type") or json.dumps(error)
    return str(error)
