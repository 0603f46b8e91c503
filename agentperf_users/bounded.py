"""Reading untrusted YAML, JSON and text files in bounded time and memory.

Every input file (trajectories, SLO tiers, simulator profiles, manifests) may be hostile or merely
broken, and the plain library calls fail in ways that are neither one line nor bounded: ``yaml.safe_load``
expands an alias bomb (84 KB of YAML becomes gigabytes), ``json.loads`` and ``int()`` raise a bare
``ValueError`` past Python's 4,300-digit limit, deep nesting ends in ``RecursionError``, a NUL byte or
a Latin-1 file in ``UnicodeDecodeError``. The functions here check sizes, digits, nesting and alias
expansion *before* the expensive or failing step, and raise :class:`InputError` carrying the line
(when known) and a one-line reason, which each caller turns into its own error naming the file.

Why here, in the simulator package: profiles are read by the simulator, which imports nothing from the
harness; the harness (trajectory readers, SLO files) imports these functions from here.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import re
from pathlib import Path
from typing import Any

import yaml

MAX_DEPTH = 64
"""Deepest nesting of lists and mappings accepted in any input file (real files nest under 10 deep)."""
MAX_INT_CHARS = 40
"""Longest YAML integer literal accepted (sign and digits): checked before ``int()`` is ever called."""
MAX_YAML_NODES = 2_000_000
"""Default bound on a YAML document's nodes with every alias expanded (what consumers will walk)."""
_SHORT_CHARS = 40


class InputError(ValueError):
    """Malformed input: ``reason`` is one line; ``line`` is 1-based, or None when not known."""

    def __init__(self, reason: str, line: int | None = None) -> None:
        super().__init__(reason if line is None else f"line {line}: {reason}")
        self.reason = one_line(reason)
        self.line = line


def one_line(text: str) -> str:
    """``text`` with line breaks and other control characters escaped, so a message stays one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def short(value: Any) -> str:
    """A short one-line rendering of a bad value (``repr``, cut to 40 characters), safe for any value:
    huge strings, huge or deeply nested containers and integers past Python's digit limit included."""
    if isinstance(value, (dict, list, tuple)):
        text = f"a {type(value).__name__} of {len(value)} item{'s' if len(value) != 1 else ''}"
        return text if len(value) else repr(value)
    if isinstance(value, str) and len(value) > _SHORT_CHARS:
        value = value[:_SHORT_CHARS]
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an int beyond the digit limit
        text = f"an integer of about {value.bit_length() * 0.30103:.0f} digits" if isinstance(value, int) else "?"
    text = one_line(text)
    return text if len(text) <= _SHORT_CHARS else text[: _SHORT_CHARS - 3] + "..."


def is_single_line_text(value: Any, max_chars: int = 200) -> bool:
    """A non-empty printable string of at most ``max_chars`` (names shown in reports and metrics)."""
    return isinstance(value, str) and 0 < len(value) <= max_chars and value.isprintable() and bool(value.strip())


def read_text(path: str | Path, max_bytes: int) -> str:
    """The UTF-8 text of ``path``; :class:`InputError` when it is larger than ``max_bytes``, binary
    (a NUL byte) or not UTF-8. ``OSError`` (missing, unreadable) is left to the caller."""
    with open(path, "rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise InputError(f"larger than {max_bytes:,} bytes")
    return decode_text(data)


def decode_text(data: bytes) -> str:
    """``data`` as UTF-8 text, refusing binary data (NUL bytes) with the line where it starts."""
    nul = data.find(b"\0")
    if nul >= 0:
        raise InputError("binary data (a NUL byte), not text", data.count(b"\n", 0, nul) + 1)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InputError(f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})", line) from None


# --- JSON ------------------------------------------------------------------------------------------


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise InputError(f"the number {short(text)} overflows; expected a finite number")
    return value


def _no_constant(name: str) -> Any:
    raise InputError(f"{name} is not a number; expected a finite number")


_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_BRACKET_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")


def loads_json(text: str, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads`` with finite numbers only (``NaN``, ``Infinity`` and ``1e999`` are refused), at
    most ``max_depth`` levels of nesting, and an integer past Python's digit limit refused in one line.

    ``json.JSONDecodeError`` (the text is not JSON) passes through for the caller to locate;
    every other problem is an :class:`InputError` without a line (a JSONL caller knows it).
    Why no ``parse_int`` hook: it is a Python call per integer, which slowed reading a set by a
    third; Python's own limit (4,300 digits) already stops ``int()`` before it costs anything, and
    the readers' range checks refuse every integer too large for its field."""
    check_json_depth(text, max_depth)
    try:
        return json.loads(text, parse_float=_finite_float, parse_constant=_no_constant)
    except (json.JSONDecodeError, InputError):
        raise
    except ValueError:  # "Exceeds the limit (4300 digits) for integer string conversion"
        raise InputError("an integer of more than 4,300 digits; expected a number of sensible size") from None


def check_json_depth(text: str, max_depth: int = MAX_DEPTH) -> None:
    """:class:`InputError` when the JSON ``text`` nests lists and objects more than ``max_depth`` deep,
    found without parsing, so without recursion, in linear time: strings are dropped, brackets become
    +1 and -1, and the running sum's maximum is the depth (C loops throughout, no Python per character)."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text)).encode("ascii").translate(_BRACKET_STEPS)
    too_deep = b"\x01" * (max_depth + 1)
    if too_deep in brackets or brackets and max(itertools.accumulate(memoryview(brackets).cast("b"))) > max_depth:
        raise InputError(f"nested more than {max_depth} levels deep")


# --- YAML ------------------------------------------------------------------------------------------


class BoundedSafeLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """YAML's safe loader whose integers are length-checked before conversion. Aliases and depth are
    bounded by :func:`load_yaml`'s scan of the event stream, which runs first."""


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = str(loader.construct_scalar(node))
    if len(text.replace("_", "")) > MAX_INT_CHARS:
        raise InputError(f"an integer of {len(text)} characters; expected at most {MAX_INT_CHARS - 1} digits",
                         node.start_mark.line + 1)
    return yaml.constructor.SafeConstructor.construct_yaml_int(loader, node)


BoundedSafeLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def load_yaml(text: str, loader: type = BoundedSafeLoader, max_nodes: int = MAX_YAML_NODES,
              max_depth: int = MAX_DEPTH, name: str = "<input>") -> Any:
    """One YAML document from ``text`` with ``loader`` (a :class:`BoundedSafeLoader` subclass), after
    checking that it nests at most ``max_depth`` levels and has at most ``max_nodes`` nodes once every
    alias is expanded (an alias costs the size of what it names, so an alias bomb fails here, in time
    linear in the text). Any YAML problem is an :class:`InputError` with its line."""
    try:
        _check_events(text, loader, max_nodes, max_depth)
        return yaml.load(_NamedText(text, name), Loader=loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        problem = getattr(exc, "problem", None) or getattr(exc, "reason", None) or str(exc).splitlines()[0]
        raise InputError(f"not valid YAML ({problem})", mark.line + 1 if mark is not None else None) from None
    except RecursionError:
        raise InputError(f"nested more than {max_depth} levels deep") from None


class _NamedText(io.StringIO):
    """Text that tells the YAML reader its file name, for the marks (``node.start_mark.name``)."""

    def __init__(self, text: str, name: str) -> None:
        super().__init__(text)
        self.name = name


def _check_events(text: str, loader: type, max_nodes: int, max_depth: int) -> None:
    open_sizes: list[list] = []  # per open collection: [expanded nodes so far, its anchor]
    anchored: dict[str, int] = {}  # anchor -> expanded size of the node it names
    expanded = 0

    def close(size: int, anchor: str | None) -> None:
        if anchor:
            anchored[anchor] = size
        if open_sizes:
            open_sizes[-1][0] += size

    for event in yaml.parse(text, Loader=loader):
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent):
            size = anchored.get(event.anchor, 1)  # an unknown alias: the loader reports it
            expanded += size
            close(size, None)
        elif isinstance(event, yaml.ScalarEvent):
            expanded += 1
            close(1, event.anchor)
        elif isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            expanded += 1
            open_sizes.append([1, event.anchor])
            if len(open_sizes) > max_depth:
                raise InputError(f"nested more than {max_depth} levels deep", line)
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            size, anchor = open_sizes.pop()
            close(size, anchor)
        if expanded > max_nodes:
            raise InputError(f"more than {max_nodes:,} values once its aliases (*name) are expanded; "
                             "expected a document without an alias bomb", line)
