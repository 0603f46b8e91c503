"""Shared pieces of the trajectory readers: located one-line errors, field checks, JSON lines.

Every problem in a trajectory file must reach the user as ``path:line: field must be ..., got ...``
(an ``AgentperfError``), never as a traceback from deep inside a reader, so the checks here take the
location and the field name along. Reading is bounded (``simulator.bounded``): a line is at most
``MAX_LINE_BYTES``, integers are length-checked before conversion, numbers are finite, nesting is at
most ``MAX_DEPTH`` deep, and a gzip file may not inflate beyond ``GZIP_MAX_RATIO`` times what was read
of it (past ``GZIP_FREE_BYTES``), so a bomb fails in seconds instead of filling memory or the clock.
"""

from __future__ import annotations

import gzip
import json
import zlib
from contextlib import closing
from pathlib import Path
from typing import IO, Any, Iterator, Mapping, NoReturn

from agentperf_users.bounded import (
    InputError,
    decode_text,
    is_single_line_text,
    loads_json,
    one_line,
    read_text,
)
from agentperf_users.errors import AgentperfError
from agentperf_users.tokens import count_prompt_tokens
from agentperf_users.workload.trajectory import MAX_ID_CHARS

REPLY_TOKENS = count_prompt_tokens(())
"""Tokens the chat template adds after the last message (the opening of the assistant's reply)."""

_GOT_MAX_CHARS = 40
MISSING = object()
"""Default of the checks below meaning "the field is required"."""
MAX_LINE_BYTES = 64 * 1024 * 1024
"""Longest JSONL line: an AA line repeats a whole 131K-token conversation in well under a tenth of it."""
GZIP_FREE_BYTES = 16 * 1024 * 1024
GZIP_MAX_RATIO = 200
"""A ``.gz`` file may inflate to ``GZIP_FREE_BYTES`` plus this many times the compressed bytes read so
far: JSONL compresses 5-30x, a decompression bomb 1000x."""
ROLES = ("system", "developer", "user", "assistant", "tool")
"""Chat roles a trajectory message may have (OpenAI's, and what the simulator's template knows)."""


def fail(where: str, message: str) -> NoReturn:
    """Raise the one-line error ``where: message`` (control characters escaped, so it stays one line)."""
    raise AgentperfError(one_line(f"{where}: {message}"))


def got(value: Any) -> str:
    """A short rendering of a bad value for an error message (JSON, cut to 40 characters)."""
    if value is MISSING:
        return "nothing (the field is missing)"
    if isinstance(value, (list, dict)) and len(value) > _GOT_MAX_CHARS:  # don't serialise a big value to cut it
        return f"a {'list' if isinstance(value, list) else 'mapping'} of {len(value)} items"
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        text = f"a {type(value).__name__}"
    text = one_line(text)
    return text if len(text) <= _GOT_MAX_CHARS else text[: _GOT_MAX_CHARS - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def require_int(obj: Mapping[str, Any], key: str, where: str, minimum: int, label: str = "",
                maximum: int | None = None) -> int:
    """An integer field in ``[minimum, maximum]`` (1: "positive", 0: "non-negative"); bools are not integers."""
    value = obj.get(key, MISSING)
    if _is_int(value) and value >= minimum and (maximum is None or value <= maximum):
        return value
    kind = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
    bound = f" at most {maximum:,}" if maximum is not None else ""
    fail(where, f"{label or key} must be {kind}{bound}, got {got(value)}")


def require_number(obj: Mapping[str, Any], key: str, where: str, default: Any = MISSING, label: str = "",
                   maximum: float = float("inf")) -> float:
    """A non-negative finite number field, at most ``maximum``; ``default`` when absent."""
    value = obj.get(key, default)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if number and 0 <= value <= maximum and value < float("inf"):  # NaN fails the comparisons
        return float(value)
    bound = f", at most {maximum:,g}" if maximum < float("inf") else ""
    fail(where, f"{label or key} must be a non-negative number{bound}, got {got(value)}")


def require_id(obj: Mapping[str, Any], key: str, where: str, default: Any = MISSING, label: str = "") -> str:
    """A string (or integer) identifier field, returned as a non-empty string of one printable line
    (ids name trajectories in records, logs and reports)."""
    value = obj.get(key, default)
    if is_single_line_text(value, MAX_ID_CHARS):
        return value
    if _is_int(value) and len(str(value)) <= MAX_ID_CHARS:
        return str(value)
    fail(where, f"{label or key} must be a non-empty string of one printable line, at most {MAX_ID_CHARS} "
                f"characters, got {got(value)}")


def check_message(message: Any, where: str, label: str) -> dict:
    """An OpenAI chat message as a trajectory may hold it: an object with a known role, content that is
    text, a list of content parts or null, string names, ids and reasoning, and tool calls of the
    right shape. What the simulator's tokenizer and a server would choke on fails here, located."""
    if not isinstance(message, dict):
        fail(where, f"{label} must be an object (a chat message), got {got(message)}")
    role = message.get("role", MISSING)
    if role not in ROLES:
        fail(where, f"{label}.role must be one of {', '.join(ROLES)}, got {got(role)}")
    if "content" in message:
        check_content(message["content"], where, f"{label}.content")
    for key in ("tool_call_id", "name", "reasoning_content", "reasoning"):
        if message.get(key) is not None and not isinstance(message[key], str):
            fail(where, f"{label}.{key} must be a string, got {got(message[key])}")
    calls = message.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            fail(where, f"{label}.tool_calls must be a list of tool calls, got {got(calls)}")
        for k, call in enumerate(calls):
            check_tool_call(call, where, f"{label}.tool_calls[{k}]")
    return message


def check_content(content: Any, where: str, label: str) -> None:
    """Message content: a string, null, or a list of content-part objects with a string ``type`` (and a
    string ``text`` where there is one)."""
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list):
        fail(where, f"{label} must be a string or a list of content parts, got {got(content)}")
    for i, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            fail(where, f"{label}[{i}] must be a content part (an object with a string type), got {got(part)}")
        if "text" in part and not isinstance(part["text"], str):
            fail(where, f"{label}[{i}].text must be a string, got {got(part['text'])}")


def check_tool_call(call: Any, where: str, label: str) -> None:
    """A literal OpenAI tool call: an object whose ``function`` has a string name and string arguments."""
    if not isinstance(call, dict):
        fail(where, f"{label} must be an object (an OpenAI tool call), got {got(call)}")
    function = call.get("function", MISSING)
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) \
            or not isinstance(function.get("arguments"), str):
        fail(where, f"{label}.function must be an object with a string name and string arguments, got {got(function)}")
    for key in ("id", "type"):
        if key in call and not isinstance(call[key], str):
            fail(where, f"{label}.{key} must be a string, got {got(call[key])}")


def require_list(obj: Mapping[str, Any], key: str, where: str, default: Any = MISSING, label: str = "",
                 non_empty: bool = False) -> list:
    """A list field (``non_empty``: with at least one item), ``default`` when absent."""
    value = obj.get(key, default)
    if isinstance(value, list) and (value or not non_empty):
        return value
    fail(where, f"{label or key} must be a {'non-empty ' if non_empty else ''}list, got {got(value)}")


def tool_definitions(obj: Mapping[str, Any], key: str, where: str) -> tuple[dict, ...]:
    """OpenAI tool definitions: a list of objects (absent means none)."""
    tools = require_list(obj, key, where, default=[])
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            fail(where, f"{key}[{i}] must be an object (an OpenAI tool definition), got {got(tool)}")
    return tuple(tools)


def open_binary(path: Path) -> IO[bytes]:
    """A binary handle on ``path``, decompressing ``.gz`` files."""
    return gzip.open(path, "rb") if path.name.endswith(".gz") else path.open("rb")


def read_file_text(path: Path, max_bytes: int, what: str) -> str:
    """The whole UTF-8 text of a file read at once (a YAML set, a manifest), at most ``max_bytes``."""
    try:
        return read_text(path, max_bytes)
    except OSError as exc:
        fail(str(path), f"cannot read ({exc.strerror or exc})")
    except InputError as exc:
        fail(f"{path}:{exc.line}" if exc.line else str(path), f"{exc.reason}; expected {what}")


def _lines(handle: IO[bytes], path: Path) -> Iterator[tuple[int, bytes]]:
    """``(line number, line)`` of ``handle``, each at most ``MAX_LINE_BYTES``, inflating within bounds."""
    gz = handle if isinstance(handle, gzip.GzipFile) else None
    number = 0
    while True:
        line = handle.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        number += 1
        if len(line) > MAX_LINE_BYTES:
            fail(f"{path}:{number}", f"line longer than {MAX_LINE_BYTES:,} bytes; expected one JSON object a line")
        if gz is not None and gz.tell() > GZIP_FREE_BYTES + GZIP_MAX_RATIO * gz.fileobj.tell():
            fail(f"{path}:{number}", f"inflates more than {GZIP_MAX_RATIO}x; expected gzip-compressed JSONL, "
                                     "not a decompression bomb")
        yield number, line


def parse_json(text: str, where: str) -> Any:
    """One JSON value, within the bounds of ``simulator.bounded.loads_json``; fails located."""
    try:
        return loads_json(text)
    except json.JSONDecodeError as exc:
        at = f"line {exc.lineno} column {exc.colno}" if exc.lineno > 1 else f"column {exc.colno}"
        fail(where, f"not valid JSON ({exc.msg.removesuffix(' at')} at {at})")  # "Invalid control character at"
    except InputError as exc:
        fail(where, exc.reason)


def _decoded(line: bytes, where: str) -> str:
    try:
        return decode_text(line)
    except InputError as exc:
        fail(where, f"{exc.reason}; expected UTF-8 JSON lines")


def json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line of a JSONL file; bad lines fail located."""
    try:
        with open_binary(path) as handle:
            for number, line in _lines(handle, path):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                obj = parse_json(_decoded(line, where), where)
                if not isinstance(obj, dict):
                    fail(where, f"each line must be a JSON object, got {got(obj)}")
                yield number, obj
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError; a torn stream, EOFError
        fail(str(path), f"cannot read ({exc.strerror if isinstance(exc, OSError) and exc.strerror else exc})")


def first_json_line(path: Path) -> tuple[int, dict] | None:
    """The first object of a JSONL file (None when the file has no lines), for format sniffing."""
    with closing(json_lines(path)) as lines:
        return next(lines, None)
