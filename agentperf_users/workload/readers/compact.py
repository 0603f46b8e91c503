"""Reader for agentperf's own compact trajectory format (YAML, or JSONL with one trajectory a line).

Each turn lists only its *new* messages, so a file is linear in the conversation, and a message may
say ``content_tokens: N`` instead of carrying text: N tokens of deterministic filler, seeded by the
trajectory id, turn and message index (or the message's own ``seed``, e.g. to give every trajectory
the same system prompt). The format is specified, with an example, in ``docs/trajectory-formats.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from agentperf_users.bounded import BoundedSafeLoader, InputError, load_yaml
from agentperf_users.tokens import message_tokens, tools_tokens
from agentperf_users.workload.readers.common import (
    REPLY_TOKENS,
    ROLES,
    check_content,
    fail,
    got,
    json_lines,
    read_file_text,
    require_id,
    require_int,
    require_list,
    require_number,
    tool_definitions,
)
from agentperf_users.workload.textgen import (
    ARGUMENTS_OVERHEAD_TOKENS,
    filler,
    tool_arguments,
)
from agentperf_users.workload.trajectory import (
    MAX_CONTEXT_TOKENS,
    MAX_OUTPUT_TOKENS,
    MAX_TOOL_WAIT_S,
    Trajectory,
    Turn,
    TurnShape,
)

FORMAT_VERSION = 1
HEADER_KEYS = frozenset({"agentperf", "name", "description", "generator", "tools"})
TRAJECTORY_KEYS = frozenset({"id", "tools", "turns"})
TURN_KEYS = frozenset({"messages", "output_tokens", "tool_wait_s"})
MESSAGE_KEYS = frozenset({"role", "content", "content_tokens", "seed", "tool_calls", "tool_call_id", "name",
                          "reasoning_content"})
YAML_SUFFIXES = (".yaml", ".yml")
MAX_YAML_BYTES = 32 * 1024 * 1024
"""Largest YAML set: it is parsed whole into memory (tens of times its size); bigger sets belong in JSONL,
which is read a line at a time."""
MAX_YAML_NODES = 5_000_000
"""YAML values a set may hold with its aliases expanded: an alias bomb fails at once, not after the
readers have walked a billion shared nodes."""


@dataclass(frozen=True)
class _GeneratedCall:
    id: str
    name: str
    arguments_tokens: int


@dataclass(frozen=True)
class _MessageSpec:
    literal: dict  # the fields given as they are (role, content, tool_call_id, ...)
    content_tokens: int | None
    calls: tuple  # literal tool-call dicts and _GeneratedCall, in order; () = no tool_calls
    seed: str
    tokens: int  # what the message adds to prompt_tokens

    def build(self) -> dict:
        message = dict(self.literal)
        if self.content_tokens is not None:
            message["content"] = filler(self.content_tokens, self.seed)
        if self.calls:
            message["tool_calls"] = [_build_call(call, f"{self.seed}/call{k}") for k, call in enumerate(self.calls)]
        return message


def _build_call(call: Any, seed: str) -> dict:
    if isinstance(call, _GeneratedCall):
        arguments = tool_arguments(call.arguments_tokens, seed)
        return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": arguments}}
    return call


@dataclass(frozen=True)
class CompactPlan:
    id: str
    tools: tuple[dict, ...]
    new_messages: tuple[tuple[_MessageSpec, ...], ...]  # per turn
    shapes: tuple[TurnShape, ...]

    def build(self) -> Trajectory:
        messages: tuple[dict, ...] = ()
        turns = []
        for new, shape in zip(self.new_messages, self.shapes):
            messages = messages + tuple(spec.build() for spec in new)
            turns.append(Turn(messages, self.tools, shape.output_tokens, shape.tool_wait_s, shape.prompt_tokens))
        return Trajectory(self.id, tuple(turns))


def read_compact(files: Sequence[Path]) -> list[CompactPlan]:
    plans: list[CompactPlan] = []
    seen: dict[str, str] = {}
    tools_token_cache: dict[int, int] = {}
    for path in files:
        stem = path.name.split(".")[0]
        for where, obj, default_tools in _trajectory_objects(path):
            plan = _plan(obj, where, default_tools, f"{stem}-{len(plans)}", tools_token_cache)
            if plan.id in seen:
                fail(where, f"trajectory id {plan.id!r} repeats {seen[plan.id]} (ids seed the generated text)")
            seen[plan.id] = where
            plans.append(plan)
    return plans


def _trajectory_objects(path: Path):
    """``(location, trajectory object, header tools)`` for each trajectory in a file."""
    if path.name.endswith(YAML_SUFFIXES):
        document, where = _load_yaml(path)
        if isinstance(document, list):
            document = {"trajectories": document}
        if not isinstance(document, dict):
            fail(where, f"a trajectory file must be a mapping with trajectories, got {got(document)}")
        tools = _header(document, where, allowed=HEADER_KEYS | {"trajectories"})
        for i, obj in enumerate(require_list(document, "trajectories", where, non_empty=True)):
            obj_where = _where(obj, where)
            yield obj_where, _mapping(obj, obj_where, f"trajectories[{i}]"), tools
        return
    tools: tuple[dict, ...] = ()
    for number, obj in json_lines(path):
        where = f"{path}:{number}"
        if "turns" not in obj:
            if number != 1 and "agentperf" in obj:
                fail(where, "the header line (with agentperf) must be the first line")
            if "agentperf" not in obj:
                fail(where, "a trajectory line needs turns (and a header line needs agentperf)")
            tools = _header(obj, where, allowed=HEADER_KEYS)
            continue
        yield where, obj, tools


def _header(obj: dict, where: str, allowed: frozenset) -> tuple[dict, ...]:
    """Check a file's header fields; returns its tools (the default for its trajectories)."""
    _check_keys(obj, allowed, where, "the header")
    version = obj.get("agentperf", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        fail(where, f"agentperf must be {FORMAT_VERSION} (the format version), got {got(version)}")
    return tool_definitions(obj, "tools", where)


def _plan(obj: dict, where: str, default_tools: tuple, default_id: str, tools_token_cache: dict) -> CompactPlan:
    _check_keys(obj, TRAJECTORY_KEYS, where, "trajectory")
    trajectory_id = require_id(obj, "id", where, default=default_id)
    tools = tool_definitions(obj, "tools", where) if "tools" in obj else default_tools
    if id(tools) not in tools_token_cache:
        tools_token_cache[id(tools)] = len(tools_tokens(tools))
    prompt_tokens = tools_token_cache[id(tools)] + REPLY_TOKENS
    pending_calls: list[str] = []  # ids of the last assistant message's calls not yet answered
    new_messages, shapes = [], []
    for t, turn in enumerate(require_list(obj, "turns", where, non_empty=True)):
        label = f"turns[{t}]"
        turn_where = _where(turn, where)
        turn = _mapping(turn, turn_where, label)
        _check_keys(turn, TURN_KEYS, turn_where, label)
        specs = []
        messages = require_list(turn, "messages", turn_where, label=f"{label}.messages", non_empty=True)
        for m, message in enumerate(messages):
            message_label = f"{label}.messages[{m}]"
            message_where = _where(message, turn_where)
            message = _mapping(message, message_where, message_label)
            spec = _message(message, message_where, message_label, f"{trajectory_id}/{t}/{m}", t, pending_calls)
            specs.append(spec)
            prompt_tokens += spec.tokens
        if prompt_tokens > MAX_CONTEXT_TOKENS:  # checked per turn: the filler is generated when an agent asks
            fail(turn_where, f"{label}'s prompt must be at most {MAX_CONTEXT_TOKENS:,} tokens, got {prompt_tokens:,}")
        output_tokens = require_int(turn, "output_tokens", turn_where, minimum=1, maximum=MAX_OUTPUT_TOKENS,
                                    label=f"{label}.output_tokens")
        wait_s = require_number(turn, "tool_wait_s", turn_where, default=0.0, maximum=MAX_TOOL_WAIT_S,
                                label=f"{label}.tool_wait_s")
        new_messages.append(tuple(specs))
        shapes.append(TurnShape(prompt_tokens, output_tokens, wait_s))
    return CompactPlan(trajectory_id, tools, tuple(new_messages), tuple(shapes))


def _message(obj: dict, where: str, label: str, default_seed: str, turn: int, pending_calls: list[str]) -> _MessageSpec:
    _check_keys(obj, MESSAGE_KEYS, where, label)
    role = obj.get("role")
    if role not in ROLES:
        fail(where, f"{label}.role must be one of {', '.join(ROLES)}, got {got(role)}")
    literal = {k: v for k, v in obj.items() if k not in ("content_tokens", "seed", "tool_calls")}
    content_tokens = None
    if "content_tokens" in obj:
        if "content" in obj:
            fail(where, f"{label} has both content and content_tokens; give one")
        content_tokens = require_int(obj, "content_tokens", where, minimum=0, maximum=MAX_CONTEXT_TOKENS,
                                     label=f"{label}.content_tokens")
    for key in ("tool_call_id", "name", "reasoning_content"):
        if key in obj and not isinstance(obj[key], str):
            fail(where, f"{label}.{key} must be a string, got {got(obj[key])}")
    if "content" in obj:
        if obj["content"] is None:
            fail(where, f"{label}.content must be a string or a list of content parts, got null")
        check_content(obj["content"], where, f"{label}.content")
    calls = _tool_calls(obj, where, label, turn) if "tool_calls" in obj else ()
    if role != "assistant" and calls:
        fail(where, f"{label}.tool_calls is only allowed on assistant messages, got role {role!r}")
    if content_tokens is None and "content" not in obj and not calls:
        fail(where, f"{label} needs content or content_tokens (or tool_calls on an assistant message)")
    if role == "assistant":
        pending_calls[:] = [c.id if isinstance(c, _GeneratedCall) else c["id"] for c in calls]
    elif role == "tool" and "tool_call_id" not in obj:
        if not pending_calls:
            fail(where, f"{label} is a tool message without tool_call_id and no unanswered tool call before it")
        literal["tool_call_id"] = pending_calls.pop(0)
    elif role == "tool" and obj["tool_call_id"] in pending_calls:
        pending_calls.remove(obj["tool_call_id"])
    seed = obj.get("seed", default_seed)
    if not isinstance(seed, (str, int)) or isinstance(seed, bool):
        fail(where, f"{label}.seed must be a string or an integer, got {got(seed)}")
    skeleton = dict(literal)
    if calls:
        skeleton["tool_calls"] = [_skeleton_call(c) for c in calls]
    generated = (content_tokens or 0) + sum(c.arguments_tokens for c in calls if isinstance(c, _GeneratedCall))
    return _MessageSpec(literal, content_tokens, calls, str(seed), len(message_tokens(skeleton)) + generated)


def _tool_calls(obj: dict, where: str, label: str, turn: int) -> tuple:
    calls = []
    for k, call in enumerate(require_list(obj, "tool_calls", where, label=f"{label}.tool_calls", non_empty=True)):
        call_label = f"{label}.tool_calls[{k}]"
        call = _mapping(call, where, call_label)
        call_id = require_id(call, "id", where, default=f"call_{turn}_{k}", label=f"{call_label}.id")
        if "function" in call:  # literal OpenAI tool call
            function = _mapping(call["function"], where, f"{call_label}.function")
            if not isinstance(function.get("name"), str) or not isinstance(function.get("arguments"), str):
                fail(where, f"{call_label}.function must have a string name and a string arguments, got {got(function)}")
            calls.append({**call, "id": call_id, "type": call.get("type", "function")})
            continue
        _check_keys(call, frozenset({"id", "name", "arguments_tokens"}), where, call_label)
        name = require_id(call, "name", where, label=f"{call_label}.name")
        arguments_tokens = require_int(call, "arguments_tokens", where, minimum=ARGUMENTS_OVERHEAD_TOKENS,
                                       maximum=MAX_CONTEXT_TOKENS, label=f"{call_label}.arguments_tokens")
        calls.append(_GeneratedCall(call_id, name, arguments_tokens))
    return tuple(calls)


def _skeleton_call(call: Any) -> dict:
    """A tool call with generated arguments left empty, to count its literal tokens (the name)."""
    if isinstance(call, _GeneratedCall):
        return {"function": {"name": call.name, "arguments": ""}}
    return call


def _check_keys(obj: dict, allowed: frozenset, where: str, label: str) -> None:
    unknown = obj.keys() - allowed
    if unknown:
        fail(where, f"{label} has unknown field {min(unknown)!r} (expected {', '.join(sorted(allowed))})")


def _mapping(obj: Any, where: str, label: str) -> dict:
    if not isinstance(obj, dict):
        fail(where, f"{label} must be an object, got {got(obj)}")
    return obj


class _LineDict(dict):
    """A YAML mapping that remembers where it is (``path:line``), so errors can point at it."""

    where = ""


class _LineLoader(BoundedSafeLoader):
    pass


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> _LineDict:
    mapping = _LineDict(loader.construct_mapping(node, deep=True))
    mapping.where = f"{node.start_mark.name}:{node.start_mark.line + 1}"
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _load_yaml(path: Path) -> tuple[Any, str]:
    text = read_file_text(path, MAX_YAML_BYTES, "a YAML trajectory set (use JSONL for bigger sets)")
    try:
        return load_yaml(text, _LineLoader, max_nodes=MAX_YAML_NODES, name=str(path)), f"{path}:1"
    except InputError as exc:
        fail(f"{path}:{exc.line or 1}", exc.reason)


def _where(obj: Any, fallback: str) -> str:
    """``path:line`` of a YAML mapping, else ``fallback`` (in JSONL, the trajectory's line)."""
    return getattr(obj, "where", "") or fallback
