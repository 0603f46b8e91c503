"""The replay rules an agent follows, as pure functions: which trajectory a session plays, at which turn
an agent's first session starts, which cache namespace it gets, and how long it waits after a turn.

Why a module of its own: the live agent (``agent.py``, a Locust user) and the ground truth
(``truth.py``, the simulator's engine on a virtual clock, which must not import Locust and its gevent
monkey-patching) have to follow exactly the same rules, or the truth is the answer to another question.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Sequence

from agentperf_users import options


@dataclass
class Dealer:
    """Deals agent indices and sessions, in one process (the master, a LocalRunner, the ground truth).

    Sessions are dealt in order, so no two agents replay the same trajectory until the whole set is in
    play. A load step that starts from no agents (``restart``) is dealt from the start: its agent k is
    agent index k with session k, and later sessions follow from the step's agent count. So a step at
    N agents replays the same agents whatever steps came before it, and N + 1 agents are those N and
    one more: verdicts that differ between counts differ by the load, not by which agents were drawn.
    Sessions dealt for a restarted step ``step`` > 0 get a cache namespace of that step
    (``namespace_marker``), so a step cannot reuse the prefixes an earlier step left in the server's
    cache: each step starts as cold as the first, whatever the search measured before it.
    """

    next_agent: int = 0
    next_session: int = 0
    step: int = 0  # the load step being dealt (0 until a restart)
    _reserved: int = 0  # sessions 0 .. _reserved - 1 belong to the step's first agents
    _restarted: bool = False

    def restart(self, step: int, agents: int) -> None:
        """Deal load step ``step`` (of ``agents`` agents) from the start; a no-op when already doing so."""
        if not self._restarted or self.step != step:
            self.step, self._reserved, self._restarted = step, agents, True
            self.next_agent, self.next_session = 0, agents

    def deal(self, new_agent: bool) -> tuple[int | None, int]:
        """(the agent index for a new agent, else None; its next session)."""
        if not new_agent:
            session, self.next_session = self.next_session, self.next_session + 1
            return None, session
        agent, self.next_agent = self.next_agent, self.next_agent + 1
        if agent < self._reserved:
            return agent, agent
        session, self.next_session = self.next_session, self.next_session + 1
        return agent, session


def session_trajectory(session: int, set_size: int) -> tuple[int, int]:
    """(trajectory index, pass number) of a session: sessions are dealt in order, so no two agents
    replay the same trajectory until the whole set is in play."""
    return session % set_size, session // set_size


def start_turn(mode: str, seed: int, session: int, turns: int) -> int:
    """The turn an agent's *first* session starts at (later sessions start at turn 0).

    ``random`` (a seeded uniform turn per session) is why a load step measures steady state from its
    start: agents that all began at turn 0 would all carry short contexts at first and long ones later,
    so a step's verdict would depend on how long it ran. An agent joining at turn k sends turn k's whole
    conversation, a cold prefill, like an agent whose cache was evicted; the warm-up absorbs it.
    (InferenceX's AgentX rules start each lane at a random point of its trace for the same reason.)"""
    if mode == "first" or turns <= 1:
        return 0
    return random.Random(f"{seed}:start:{session}").randrange(turns)


def namespace_marker(mode: str, run_id: str, session: int, set_size: int, step: int = 0) -> str | None:
    """The cache-namespace marker of a session dealt for load step ``step`` (``Dealer.step``), or None
    to replay the trajectory unchanged."""
    rounds = session // set_size
    prefix = f"{run_id} step {step}" if step else run_id
    if mode == "per-session":
        return f"{prefix} session {session}"
    return f"{prefix} pass {rounds}" if mode == "per-run" or rounds > 0 or step else None


JOIN_LEAD_S = 0.5  # more than Locust's dispatch and a claim's round trip to the master take (~0.2 s)


def join_offset_s(ordinal: int, spawn_rate: float) -> float:
    """When the ``ordinal``-th agent (from 0) of a load step that starts from no agents sends its first
    request, in seconds after the step's ramp began: one agent every ``1 / spawn_rate`` seconds, from
    ``JOIN_LEAD_S`` on (an agent whose time has passed when it is dealt would start at once, on top of
    another).

    Locust starts users in batches (``floor(spawn_rate)`` at once, a batch a second). Agents that sent
    their cold joins at the same instant would reach the server in an order set by how long the client
    takes to serialise each conversation (the longest last), and that order decides whose cold prefill
    queues behind whose, so verdicts near the KV-memory limit would hang on client CPU time. Spaced as
    the spawn rate says, the order is the agents' own, live and in the ground truth alike."""
    return JOIN_LEAD_S + ordinal / spawn_rate


def agent_rng(seed: int, agent: int) -> random.Random:
    """One seeded random stream per agent, the same in every process and in the ground truth."""
    return random.Random(f"{seed}:{agent}")


def tool_wait_s(mode: str, recorded_s: float, rng: random.Random, median_s: float = 1.0, sigma: float = 1.0) -> float:
    """The pause after a turn: the recorded tool time, a lognormal sample, or none."""
    if mode == "recorded":
        return recorded_s
    if mode == "sampled":
        return rng.lognormvariate(math.log(median_s), sigma)
    return 0.0


@dataclass(frozen=True)
class ReplaySettings:
    """How agents replay their trajectories: the options the ground truth must share with the agents."""

    ignore_eos: bool = True
    tool_wait: str = "recorded"
    tool_wait_median_s: float = 1.0
    tool_wait_sigma: float = 1.0
    cache_namespace: str = "on-wrap"
    seed: int = 0
    start_turn: str = "random"
    tools: bool = True  # send each trajectory's tool definitions (and count them in the truth's prompts)

    @classmethod
    def from_options(cls, parsed: Any) -> ReplaySettings:
        """The replay options, each checked against its declaration (``agentperf_users.options``), from
        ``agentperf capacity``'s or ``truth``'s arguments or Locust's options (the web UI's strings too)."""
        return cls(ignore_eos=options.value(parsed, "ignore_eos"), tool_wait=options.value(parsed, "tool_wait"),
                   tool_wait_median_s=options.value(parsed, "tool_wait_median"),
                   tool_wait_sigma=options.value(parsed, "tool_wait_sigma"),
                   cache_namespace=options.value(parsed, "cache_namespace"), seed=options.value(parsed, "seed"),
                   start_turn=options.value(parsed, "start_turn"), tools=options.value(parsed, "tools"))


def chat_params(model: str, output_tokens: int, settings: ReplaySettings) -> dict[str, Any]:
    """The parameters of one turn's streaming chat request, besides its messages and tools: the one place
    that says what a request of the run looks like, so the agents and the qualification probe
    (``probe.py``) send the same shape. Both limit names go out: ``max_completion_tokens`` is OpenAI's
    current one, older servers know only ``max_tokens``."""
    params: dict[str, Any] = {
        "model": model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_completion_tokens": output_tokens,
        "max_tokens": output_tokens,
    }
    if settings.ignore_eos:
        params["ignore_eos"] = True
    return params


def request_tools(tools: Sequence[dict], settings: ReplaySettings) -> Sequence[dict]:
    """The tool definitions a turn's request carries: the trajectory's, or none with ``--no-tools`` (a
    server started without tool calling rejects any request that has them). The ground truth counts
    its prompts with the same tools, so it answers the same question as the live run. The trajectory's
    own object is returned, not a copy: the body encoder caches its JSON by identity."""
    return tools if settings.tools else ()
