"""Shared pieces of the trajectory readers: located one-line errors, field checks, JSON lines.

Every problem in a trajectory file must reach the user as ``path:line: field must be ..., got ...``
(an ``AgentperfError``), never as a traceback from deep inside a reader, so the checks here take the
location and the field name along.
"""

from __future__ import annotations

import gzip
import json
from contextlib import closing
from pathlib import Path
from typing import IO, Any, Iterator, Mapping, NoReturn

from agentperf_users.errors import AgentperfError
from agentperf_users.simulator.tokenizer import count_prompt_tokens

REPLY_TOKENS = count_prompt_tokens(())
"""Tokens the chat template adds after the last message (the opening of the assistant's reply)."""

_GOT_MAX_CHARS = 40
MISSING = object()
"""Default of the checks below meaning "the field is required"."""


def fail(where: str, message: str) -> NoReturn:
    """Raise the one-line error ``where: message``."""
    raise AgentperfError(f"{where}: {message}")


def got(value: Any) -> str:
    """A short rendering of a bad value for an error message."""
    if value is MISSING:
        return "nothing (the field is missing)"
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= _GOT_MAX_CHARS else text[: _GOT_MAX_CHARS - 3] + "..."


def require_int(obj: Mapping[str, Any], key: str, where: str, minimum: int, label: str = "") -> int:
    """An integer field >= ``minimum`` (1: "positive", 0: "non-negative"); bools are not integers."""
    value = obj.get(key, MISSING)
    if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
        return value
    kind = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
    fail(where, f"{label or key} must be {kind}, got {got(value)}")


def require_number(obj: Mapping[str, Any], key: str, where: str, default: Any = MISSING, label: str = "") -> float:
    """A non-negative (finite) number field, ``default`` when absent."""
    value = obj.get(key, default)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < float("inf"):
        return float(value)
    fail(where, f"{label or key} must be a non-negative number, got {got(value)}")


def require_id(obj: Mapping[str, Any], key: str, where: str, default: Any = MISSING, label: str = "") -> str:
    """A string (or integer) identifier field, returned as a non-empty string."""
    value = obj.get(key, default)
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    fail(where, f"{label or key} must be a non-empty string, got {got(value)}")


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


def open_text(path: Path) -> IO[str]:
    """A text handle on ``path``, decompressing ``.gz`` files."""
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line of a JSONL file; bad lines fail located."""
    try:
        with open_text(path) as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    fail(f"{path}:{number}", f"not valid JSON ({exc.msg} at column {exc.colno})")
                if not isinstance(obj, dict):
                    fail(f"{path}:{number}", f"each line must be a JSON object, got {got(obj)}")
                yield number, obj
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        fail(str(path), f"cannot read ({exc})")


def first_json_line(path: Path) -> tuple[int, dict] | None:
    """The first object of a JSONL file (None when the file has no lines), for format sniffing."""
    with closing(json_lines(path)) as lines:
        return next(lines, None)
