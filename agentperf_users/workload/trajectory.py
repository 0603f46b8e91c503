"""Trajectories: what one simulated agent sends, turn by turn.

A trajectory is a recorded (or synthesised) agent session: each turn is one chat-completion request
carrying the whole conversation so far, a target output length, and the tool wait that followed it.
The agent user replays turns in order; the conversation grows, so a prefix cache can reuse the KV of
everything but the newest messages, which is the load AA-AgentPerf measures.

Why lazy: the locustfile loads the set in every worker process at start, and a few hundred
trajectories averaging ~27K-token prompts are gigabytes once written out. Readers therefore parse and
validate structure eagerly (a bad file fails before anything starts) into light *plans*, and
:meth:`TrajectorySet.trajectory` materialises the text of one trajectory when an agent asks for it.

Why shared message objects: turn k's messages are turn k-1's message objects plus the new ones, so a
materialised trajectory is linear in its text, and a client can cache per-message encodings by
identity.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Protocol, Sequence

from agentperf_users.options import MAX_TOOL_WAIT_S  # noqa: F401  (re-exported: the readers' bound)
from agentperf_users.tokens import count_tokens

TRAJECTORY_CACHE_SIZE = 8
"""Materialised trajectories kept per set; agents usually start on different ones, so this is small."""

NAMESPACE_MARKER = "[agentperf session {marker}]\n"
"""Line put before the first user message by :meth:`Trajectory.with_namespace`."""

# Limits every reader enforces, so a malformed or hostile file fails at load with one line instead of
# an agent allocating a trillion tokens of filler (and looping on MemoryError) or sleeping for ever.
MAX_CONTEXT_TOKENS = 10_000_000
"""Most prompt tokens of one turn (so of one message too): ten times the longest context windows served
today; a set beyond it is a typo or an attack, and its text alone would be gigabytes."""
MAX_OUTPUT_TOKENS = 1_000_000
"""Most output tokens one turn may ask for: far beyond any model's reply limit."""
# MAX_TOOL_WAIT_S (from options): the longest tool wait after a turn, seconds: a day. Longer is no tool call,
# and 1e300 would never end. Declared with the options, as it also bounds --tool-wait-median.
MAX_ID_CHARS = 256
"""Longest trajectory id; ids are single printable lines (they appear in records and reports)."""


@dataclass(frozen=True)
class TurnShape:
    """The sizes of one turn, known without materialising its text (for statistics)."""

    prompt_tokens: int
    output_tokens: int
    tool_wait_s: float


@dataclass(frozen=True)
class Turn:
    """One chat-completion request of a trajectory and what follows it."""

    messages: tuple[dict, ...]
    """The whole conversation to send; message dicts are the same objects in every turn that has them."""
    tools: tuple[dict, ...]
    """OpenAI tool definitions (one shared tuple for the whole trajectory)."""
    output_tokens: int
    """Target output tokens, sent as max_completion_tokens/max_tokens with ignore_eos."""
    tool_wait_s: float
    """Recorded tool wait after this turn's response (0.0 if none)."""
    prompt_tokens: int
    """``count_prompt_tokens(messages, tools)``: the simulator's ``usage.prompt_tokens``."""

    @property
    def shape(self) -> TurnShape:
        return TurnShape(self.prompt_tokens, self.output_tokens, self.tool_wait_s)


@dataclass(frozen=True)
class Trajectory:
    """One agent session: its turns in order."""

    id: str
    turns: tuple[Turn, ...]

    def with_namespace(self, marker: str) -> Trajectory:
        """A copy whose first user message starts with a per-session marker line.

        Every turn gets the same replacement object, so messages stay shared. Messages before the first
        user message (system prompt) and tools are untouched, so sessions still share those in a prefix
        cache (as in AA's per-run isolation and InferenceX's cache-bust marker), but nothing after.
        """
        prefix = NAMESPACE_MARKER.format(marker=marker)
        extra_tokens = count_tokens(prefix)
        replaced: dict[int, dict] = {}
        turns = []
        for turn in self.turns:
            index = next((i for i, m in enumerate(turn.messages) if m.get("role") == "user"), None)
            if index is None:
                turns.append(turn)
                continue
            old = turn.messages[index]
            new = replaced.get(id(old))
            if new is None:
                new = replaced[id(old)] = {**old, "content": _prefixed_content(prefix, old.get("content"))}
            messages = turn.messages[:index] + (new,) + turn.messages[index + 1 :]
            turns.append(replace(turn, messages=messages, prompt_tokens=turn.prompt_tokens + extra_tokens))
        return Trajectory(self.id, tuple(turns))


def _prefixed_content(prefix: str, content: Any) -> Any:
    if isinstance(content, list):  # OpenAI content parts: a text part of its own keeps the others intact
        return [{"type": "text", "text": prefix}, *content]
    return prefix + (content or "")


class TrajectoryPlan(Protocol):
    """What a reader produces per trajectory: validated structure, text not yet generated."""

    id: str
    shapes: tuple[TurnShape, ...]

    def build(self) -> Trajectory:
        """Materialise the trajectory (deterministic: the same plan always builds the same text)."""
        ...


@dataclass(frozen=True)
class BuiltPlan:
    """A plan for a trajectory whose text was in the file anyway (AA traces)."""

    trajectory: Trajectory

    @property
    def id(self) -> str:
        return self.trajectory.id

    @property
    def shapes(self) -> tuple[TurnShape, ...]:
        return tuple(turn.shape for turn in self.trajectory.turns)

    def build(self) -> Trajectory:
        return self.trajectory


class TrajectorySet:
    """An indexed set of trajectories; :meth:`trajectory` builds one on demand and caches a few."""

    def __init__(self, name: str, plans: Sequence[TrajectoryPlan], source: str = "") -> None:
        self.name = name
        self.source = source
        self._plans = tuple(plans)
        self._cache: OrderedDict[int, Trajectory] = OrderedDict()

    def __len__(self) -> int:
        return len(self._plans)

    def __repr__(self) -> str:
        return f"TrajectorySet({self.name!r}, {len(self)} trajectories)"

    def trajectory_id(self, index: int) -> str:
        return self._plans[index].id

    def shapes(self, index: int) -> tuple[TurnShape, ...]:
        """Per-turn sizes of trajectory ``index`` without materialising its text."""
        return self._plans[index].shapes

    def trajectory(self, index: int) -> Trajectory:
        """Trajectory ``index`` (0 <= index < len), materialised now or taken from the small cache."""
        if not 0 <= index < len(self._plans):
            raise IndexError(f"trajectory index {index} out of range for {len(self._plans)} trajectories")
        cached = self._cache.get(index)
        if cached is not None:
            self._cache.move_to_end(index)
            return cached
        trajectory = self._plans[index].build()
        self._cache[index] = trajectory
        if len(self._cache) > TRAJECTORY_CACHE_SIZE:
            self._cache.popitem(last=False)
        return trajectory
