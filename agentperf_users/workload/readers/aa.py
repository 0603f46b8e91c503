"""Reader for Artificial Analysis' open replayer traces (aa-agentperf-local ``traces/*.jsonl``).

One line is one model turn: ``conversation_id``, ``conversation_idx``, ``messages`` (the full request
history), ``tools``, ``target_output_tokens`` and ``simulated_tool_delay_ms_after`` (falling back to
the sum of ``recorded_tool_calls_after[].duration_ms``). Lines of one conversation may come from
several files; they are grouped by ``conversation_id`` and ordered by ``conversation_idx``.

Every line repeats the whole history, so consecutive turns' equal leading messages are replaced by
the previous turn's objects, while reading (memory stays linear in the conversation) and again after
ordering.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from agentperf_users.tokens import message_tokens, tools_tokens
from agentperf_users.workload.readers.common import (
    REPLY_TOKENS,
    check_message,
    fail,
    got,
    json_lines,
    require_id,
    require_int,
    require_list,
    require_number,
    tool_definitions,
)
from agentperf_users.workload.trajectory import (
    MAX_CONTEXT_TOKENS,
    MAX_OUTPUT_TOKENS,
    MAX_TOOL_WAIT_S,
    BuiltPlan,
    Trajectory,
    Turn,
)

MS_PER_S = 1000.0
MAX_TOOL_WAIT_MS = MAX_TOOL_WAIT_S * MS_PER_S


@dataclass(frozen=True)
class _Line:
    where: str
    index: int
    messages: tuple[dict, ...]
    tools: tuple[dict, ...]
    output_tokens: int
    tool_wait_s: float


def read_aa(files: Sequence[Path]) -> list[BuiltPlan]:
    conversations: dict[str, dict[int, _Line]] = {}
    for path in files:
        for number, obj in json_lines(path):
            where = f"{path}:{number}"
            conversation_id = require_id(obj, "conversation_id", where)
            turns = conversations.setdefault(conversation_id, {})
            line = _parse_line(obj, where, latest=next(reversed(turns.values()), None))
            if line.index in turns:
                fail(where, f"conversation_idx {line.index} of conversation {conversation_id!r} "
                            f"repeats {turns[line.index].where}")
            turns[line.index] = line
    return [BuiltPlan(_trajectory(cid, [turns[i] for i in sorted(turns)])) for cid, turns in conversations.items()]


def _parse_line(obj: dict, where: str, latest: _Line | None) -> _Line:
    index = require_int(obj, "conversation_idx", where, minimum=0)
    messages = require_list(obj, "messages", where, non_empty=True)
    for i, message in enumerate(messages):
        check_message(message, where, f"messages[{i}]")
    output_tokens = require_int(obj, "target_output_tokens", where, minimum=1, maximum=MAX_OUTPUT_TOKENS)
    if "simulated_tool_delay_ms_after" in obj:
        wait_ms = require_number(obj, "simulated_tool_delay_ms_after", where, default=0.0, maximum=MAX_TOOL_WAIT_MS)
    else:
        wait_ms = _recorded_tool_ms(obj, where)
    tools = tool_definitions(obj, "tools", where)
    if latest is not None:  # usually the previous turn: share its objects now, before the next line
        messages = _share_prefix(latest.messages, messages)
        tools = latest.tools if tools == latest.tools else tools
    return _Line(where, index, tuple(messages), tools, output_tokens, wait_ms / MS_PER_S)


def _recorded_tool_ms(obj: dict, where: str) -> float:
    calls = require_list(obj, "recorded_tool_calls_after", where, default=[])
    total = 0.0
    for i, call in enumerate(calls):
        if not isinstance(call, dict):
            fail(where, f"recorded_tool_calls_after[{i}] must be an object, got {got(call)}")
        total += require_number(call, "duration_ms", where, default=0.0, maximum=MAX_TOOL_WAIT_MS,
                                 label=f"recorded_tool_calls_after[{i}].duration_ms")
    if total > MAX_TOOL_WAIT_MS:
        fail(where, f"recorded_tool_calls_after[].duration_ms must add up to at most {MAX_TOOL_WAIT_MS:,g} ms "
                    f"(a day), got {total:,g}")
    return total


def _share_prefix(previous: Sequence[dict], current: Sequence[Any]) -> tuple[dict, ...]:
    """``current`` with its leading messages equal to ``previous``'s replaced by those objects."""
    shared = 0
    for old, new in zip(previous, current):
        if old is not new and old != new:
            break
        shared += 1
    return tuple(previous[:shared]) + tuple(current[shared:])


def _trajectory(conversation_id: str, lines: list[_Line]) -> Trajectory:
    token_cache: dict[int, int] = {}

    def tokens_of(message: dict) -> int:
        count = token_cache.get(id(message))
        if count is None:
            count = token_cache[id(message)] = len(message_tokens(message))
        return count

    turns = []
    previous: _Line | None = None
    for line in lines:
        messages, tools = line.messages, line.tools
        if previous is not None:
            messages = _share_prefix(previous.messages, messages)
            tools = previous.tools if tools == previous.tools else tools
        line = _Line(line.where, line.index, messages, tools, line.output_tokens, line.tool_wait_s)
        prompt_tokens = len(tools_tokens(tools)) + sum(tokens_of(m) for m in messages) + REPLY_TOKENS
        if prompt_tokens > MAX_CONTEXT_TOKENS:
            fail(line.where, f"the request's prompt must be at most {MAX_CONTEXT_TOKENS:,} tokens, "
                             f"got {prompt_tokens:,}")
        turns.append(Turn(messages, tools, line.output_tokens, line.tool_wait_s, prompt_tokens))
        previous = line
    return Trajectory(conversation_id, tuple(turns))
