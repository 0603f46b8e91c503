"""Data-parallel replicas of one profiled server behind a router, stepped on one virtual clock.

Why: "what if we had twice the replicas?" is a capacity planner's question a single engine cannot answer,
and the answer is not simply twice the capacity: a router that scatters a conversation's turns over the
replicas makes each turn miss the prefix cache its previous turn filled on another replica. So a
:class:`Fleet` is N independent :class:`~agentperf_users.simulator.engine.Engine` copies of one profile
(each its own KV cache, ``max_num_seqs`` and prefix cache), each stepping on its own step boundaries,
and a router that picks the replica of every request when it arrives:

* ``round-robin``: the next replica in turn, whatever the request (a plain L4 load balancer).
* ``prefix-affinity``: the replica whose prefix cache holds the longest prefix of the request's prompt
  (ties: the least loaded, then the lowest index), among the replicas whose load (running plus waiting
  requests) stays within ``(1 + BALANCE_SLACK)`` times the fleet's mean with this request counted (the
  bounded-load rule of consistent hashing). So a conversation's next turn goes where its previous turns
  left their KV blocks, a new conversation (whose only hit is the prefix every conversation shares) goes
  to the least loaded replica, and a replica that is overloaded sheds conversations to others, which
  pay one cold prefill there instead of queueing behind it. The router asks the replicas' caches
  directly: an ideal cache-aware router (real ones keep an approximate copy of each replica's prefix
  tree, built from the requests they routed).

The routers read a replica only through :class:`Routed` (its engine and its load), so the live
simulator's replicas (``agentperf simulate --replicas``, :mod:`agentperf_users.simulator.replica`) are
routed by these same functions.

A fleet of one replica is exactly the engine it wraps: the same submits at the same step boundaries,
the same sampled reply lengths (every reply length is drawn from the first replica's generator, so the
lengths never depend on the routing), the same times.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from agentperf_users.simulator.engine import Engine, EngineRequest, EngineStep
from agentperf_users.simulator.profile import Profile, SimulatorError

ROUND_ROBIN = "round-robin"
PREFIX_AFFINITY = "prefix-affinity"
ROUTERS = (ROUND_ROBIN, PREFIX_AFFINITY)
BALANCE_SLACK = 0.25
"""A replica takes a request only while its load stays within (1 + this) x the mean (bounded-load
consistent hashing's epsilon; 0.25 keeps most conversations home and no replica twice as loaded as another)."""
MAX_REPLICAS = 1024


@dataclass(frozen=True)
class ReplicaStats:
    """What one replica did over a search: requests routed to it, its prefix cache, its busy time."""

    routed: int
    prefix_queries_tokens: int
    prefix_hits_tokens: int
    busy_s: float

    @property
    def hit_ratio(self) -> float:
        """Prompt tokens found in its prefix cache over prompt tokens looked up (0 when none were)."""
        return self.prefix_hits_tokens / self.prefix_queries_tokens if self.prefix_queries_tokens else 0.0

    def to_dict(self) -> dict:
        return {"routed": self.routed, "prefix_hit_ratio": round(self.hit_ratio, 4),
                "prefix_queries_tokens": self.prefix_queries_tokens, "busy_s": round(self.busy_s, 3)}


class Routed(Protocol):
    """What a router reads of a replica: its engine (whose prefix cache it asks) and its load."""

    engine: Engine

    @property
    def load(self) -> int: ...


def engine_load(engine: Engine) -> int:
    """A replica's load as the routers weigh it: the requests its engine runs plus those waiting."""
    counters = engine.counters
    return counters.num_running + counters.num_waiting


def replica_count(replicas: int | str) -> int:
    """``replicas`` (a number, or an option's text), checked: one line naming ``--replicas`` and what it takes."""
    text = str(replicas).strip()
    if not text.isdigit() or not 1 <= int(text) <= MAX_REPLICAS:
        raise SimulatorError(f"--replicas: expected a whole number from 1 to {MAX_REPLICAS}, got {replicas!r}")
    return int(text)


class _Replica:
    """One engine and the step it has in flight (whose tokens exist at the step's end)."""

    __slots__ = ("engine", "step", "routed")

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.step: EngineStep | None = None
        self.routed = 0

    @property
    def load(self) -> int:
        return engine_load(self.engine)

    @property
    def step_end_s(self) -> float:
        return self.step.start_s + self.step.duration_s if self.step is not None else math.inf


Router = Callable[[Sequence[Routed], EngineRequest], int]


def round_robin() -> Router:
    """Each request to the next replica in turn."""
    turn = itertools.count()
    return lambda replicas, request: next(turn) % len(replicas)


def prefix_affinity(replicas: Sequence[Routed], request: EngineRequest) -> int:
    """The replica holding the longest prefix of the prompt, within the bounded load (module docstring)."""
    loads = [replica.load for replica in replicas]
    bound = math.ceil((1 + BALANCE_SLACK) * (sum(loads) + 1) / len(replicas))
    eligible = [i for i, load in enumerate(loads) if load < bound]  # never empty: the least loaded is below
    return max(eligible, key=lambda i: (replicas[i].engine.cached_prefix_tokens(request.prompt), -loads[i], -i))


def make_router(name: str) -> Router:
    if name == ROUND_ROBIN:
        return round_robin()
    if name == PREFIX_AFFINITY:
        return prefix_affinity
    raise SimulatorError(f"--router: expected one of {', '.join(ROUTERS)}, got {name!r}")


class Fleet:
    """``replicas`` engines of one profile behind a router (module docstring); the truth's world drives it:
    ``submit``/``abort`` requests, ``start_steps`` on idle replicas at a time, ``end_steps`` when the
    clock reaches ``next_step_end_s``."""

    def __init__(self, engines: Sequence[Engine], router: str = ROUND_ROBIN) -> None:
        if not engines:
            raise SimulatorError("a fleet needs at least one replica")
        self._replicas = [_Replica(engine) for engine in engines]
        self._route = make_router(router)
        self.router = router
        self._where: dict[str, _Replica] = {}

    @classmethod
    def of(cls, profile: Profile, replicas: int = 1, router: str = ROUND_ROBIN, seed: int = 0) -> Fleet:
        return cls([Engine(profile, seed=seed) for _ in range(replica_count(replicas))], router)

    @property
    def size(self) -> int:
        return len(self._replicas)

    def sample_output_tokens(self, limit: int) -> int:
        return self._replicas[0].engine.sample_output_tokens(limit)

    def submit(self, request: EngineRequest) -> None:
        """Route and queue a request; raises what the chosen engine's ``submit`` raises."""
        replica = self._replicas[self._route(self._replicas, request) if len(self._replicas) > 1 else 0]
        replica.engine.submit(request)
        replica.routed += 1
        self._where[request.request_id] = replica

    def abort(self, request_id: str) -> None:
        replica = self._where.pop(request_id, None)
        if replica is not None:
            replica.engine.abort(request_id)

    def start_steps(self, now_s: float) -> None:
        """Start a step at ``now_s`` on every replica that has none in flight and has work."""
        for replica in self._replicas:
            if replica.step is None and replica.engine.has_work():
                replica.step = replica.engine.step(now_s)

    def has_idle(self) -> bool:
        return any(replica.step is None for replica in self._replicas)

    def next_step_end_s(self) -> float:
        """When the earliest step in flight ends (infinity when none is)."""
        return min(replica.step_end_s for replica in self._replicas)

    def end_steps(self, now_s: float) -> list[EngineRequest]:
        """Close the steps that end by ``now_s`` (replica order) and return the requests they finished."""
        finished: list[EngineRequest] = []
        for replica in self._replicas:
            if replica.step is not None and replica.step_end_s <= now_s:
                for request in replica.step.finished:
                    self._where.pop(request.request_id, None)
                finished += replica.step.finished
                replica.step = None
        return finished

    def stats(self) -> tuple[ReplicaStats, ...]:
        return tuple(ReplicaStats(r.routed, r.engine.counters.prefix_queries_tokens, r.engine.counters.prefix_hits_tokens,
                                  r.engine.counters.busy_s_total) for r in self._replicas)
