"""Ground truth: the capacity an ideal load generator would find, computed on the simulator's own engine.

``agentperf truth`` runs the same capacity search as a live run (same ``CapacitySearch`` decisions,
step sizes, spawn rate, warm-up, window and SLO rules, same trajectories dealt in the same order with
the same tool waits) but the agents are closed loops in this process and the engine runs on a virtual
clock: a request's tokens exist at the end of the engine step that made them, with no HTTP, no client
and no scheduling noise. The live answer differs from this one only by what the load generator and the
real-time server add, which is what ``benchmarks/capacity_accuracy.py`` measures.

Modelling choices (each mirrors the live run):

* Requests that arrive during an engine step join the queue at the end of that step, as with the
  real-time server, and keep their true arrival time for TTFT.
* With ``restart_agents`` (the default) every agent stops between steps, at once, and its request in
  flight is aborted (live, a closed connection does it, within ``1 / STOP_RATE`` s per agent).
  Locust starts users in batches (``floor(spawn_rate)`` at once, a batch every ``batch /
  spawn_rate`` seconds) and ticks the shape once a second, so the live warm-up begins at the first
  tick that counts every agent started: a tick after the ramp began, or the tick of the last batch.
  In a step that starts from no agents (``restart_agents``) the agents' first
  requests are spaced ``replay.join_offset_s`` apart, as the live agents space them; agents added to
  running ones start with their batch. Without restarts, a step that lowers the count stops
  the newest agents (Locust stops users in no defined order; newest-first is the deterministic
  choice). Agents and sessions come from a ``replay.Dealer`` as on the master (dealt from the start
  on every restarted step), and a new agent's first session starts at ``replay.start_turn``.
* A step ramps, warms up for ``warmup_s``, then judges the requests that *ended* inside its
  window (``search.window_end``: ``window_s``, extended for ``min_requests``). Early stopping is not
  modelled: it never turns a fail into a pass.
* A recheck (``recheck``: the search's last steps, ``policy``) is measured as any step: a restarted
  step's verdict depends on its count and the seed alone, so it repeats the first measurement of its
  count (to float rounding) and the search decides as the live one does; the truth has no drift.
* A request the engine rejects (queue full, context too long) is a failed record, and the agent goes
  on after its tool wait, as a live agent does after an error.
* ``replicas`` > 1 serves the agents from a :class:`~agentperf_users.simulator.fleet.Fleet`: that many
  engines of the profile behind a router, each stepping on its own boundaries. The clock then stops at
  every step end of any replica and, while one is idle, at every agent's wake; a request is routed when
  the clock reaches it (while every replica is busy: at the next step end, which is when a busy replica
  could first schedule it anyway). One replica steps exactly as the single engine does.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

from agentperf_users.errors import AgentperfError
from agentperf_users.loadgen import replay
from agentperf_users.measure.records import RequestRecord, Status
from agentperf_users.measure.slo import (
    SloSpec,
    StepVerdict,
    evaluate_step,
    load_slo,
    records_in_window,
)
from agentperf_users.options import Group, add_options
from agentperf_users.search.policy import (
    CapacitySearch,
    SearchParameters,
    TierCapacity,
    window_end,
)
from agentperf_users.simulator.engine import Engine, EngineRequest
from agentperf_users.simulator.fleet import MAX_REPLICAS, ROUND_ROBIN, ROUTERS, Fleet, ReplicaStats
from agentperf_users.simulator.profile import (
    DEFAULT_PROFILE,
    Profile,
    SimulatorError,
    load_profile,
)
from agentperf_users.tokens import PromptEncoder
from agentperf_users.workload.readers import load_trajectories
from agentperf_users.workload.trajectory import Trajectory, TrajectorySet

TRUTH_RUN_ID = "truth"
WINDOW_EXTENSION_STEP_S = 1.0  # how far the clock runs on while a window waits for --min-requests
SHAPE_TICK_S = 1.0  # Locust calls a LoadTestShape's tick() once a second


@dataclass(frozen=True)
class TruthStep:
    agents: int
    window_start_s: float
    window_end_s: float
    verdict: StepVerdict
    records: tuple[RequestRecord, ...]  # the requests the window judged


@dataclass(frozen=True)
class TruthResult:
    capacity: dict[str, TierCapacity]
    steps: tuple[TruthStep, ...]
    simulated_s: float
    wall_s: float
    fleet: FleetSummary | None = None  # replicas > 1 only: a single engine's output stays as it always was
    records: tuple[RequestRecord, ...] = ()
    """Every request of the search, cancelled ones too, as a live run's records folder holds them (asked
    for with ``keep_records``: what ``calibrate --from-run`` is tested on)."""

    def to_dict(self, spec: SloSpec) -> dict:
        return {
            "capacity": {
                name: {**cap.to_dict(), "label": spec.tier(name).label} for name, cap in self.capacity.items()
            },
            "steps": [
                {"agents": s.agents, "window_start_s": s.window_start_s, "window_end_s": s.window_end_s,
                 "passed": {v.tier.name: v.passed for v in s.verdict.tiers}}
                for s in self.steps
            ],
            "simulated_s": round(self.simulated_s, 3),
            "wall_s": round(self.wall_s, 3),
            "speedup": round(self.simulated_s / self.wall_s, 1) if self.wall_s else None,
            **({"fleet": self.fleet.to_dict(self.capacity)} if self.fleet else {}),
        }


@dataclass(frozen=True)
class FleetSummary:
    """The replicas a search ran on, their router and what each did over the whole search."""

    router: str
    accelerators_per_replica: int
    replicas: tuple[ReplicaStats, ...]

    @property
    def accelerators(self) -> int:
        """Every replica's accelerators: what a per-accelerator number divides by."""
        return self.accelerators_per_replica * len(self.replicas)

    def to_dict(self, capacity: dict[str, TierCapacity]) -> dict:
        return {"replicas": len(self.replicas), "router": self.router, "accelerators": self.accelerators,
                "agents_per_accelerator": {name: round((cap.agents or 0) / self.accelerators, 3)
                                           for name, cap in capacity.items()},
                "per_replica": [stats.to_dict() for stats in self.replicas]}


@dataclass(eq=False)
class _Agent:
    index: int
    rng: random.Random
    trajectory: Trajectory | None = None
    label: str = ""
    turn: int = 0
    request: EngineRequest | None = None
    scheduled_s: float = 0.0
    stopped: bool = False
    cold_join: bool = True  # its next request is its first since it joined


@dataclass
class _World:
    """The closed loop: agents, the engine (or a fleet of them), and the records they produce, on one virtual clock."""

    engine: Engine | Fleet
    trajectories: TrajectorySet
    settings: replay.ReplaySettings
    encoder: PromptEncoder = field(default_factory=PromptEncoder)
    now_s: float = 0.0
    agents: list[_Agent] = field(default_factory=list)
    wakes: list[tuple[float, int, _Agent]] = field(default_factory=list)  # heap of (time, seq, agent)
    in_flight: dict[str, _Agent] = field(default_factory=dict)
    records: list[RequestRecord] = field(default_factory=list)
    load_step: int = 0
    dealer: replay.Dealer = field(default_factory=replay.Dealer)  # as the master's
    history: list[RequestRecord] | None = None  # every record, cancelled ones too, when kept
    _seq: int = 0

    def __post_init__(self) -> None:
        self.fleet = self.engine if isinstance(self.engine, Fleet) else Fleet([self.engine])

    def measure(self, agents: int, params: SearchParameters, spec: SloSpec, window_s: float | None = None) -> TruthStep:
        """One load step at ``agents``: (restart,) ramp, warm up, and judge the window (``window_s``
        long when given, as a live step's was, else as ``search.window_end`` says)."""
        if params.restart_agents:
            self.set_agents(0, params.spawn_rate)
            self.dealer.restart(self.load_step, agents)
        ramp_end_s = self.set_agents(agents, params.spawn_rate, spaced=params.restart_agents)
        window_start_s = ramp_end_s + params.warmup_s
        if window_s is None:
            self.run_until(window_start_s + params.window_s)
            while (window_end_s := window_end(window_start_s, params, self._judged_ends(window_start_s),
                                              self.now_s)) is None:
                self.run_until(self.now_s + WINDOW_EXTENSION_STEP_S)
        else:
            window_end_s = window_start_s + window_s
            self.run_until(window_end_s)
        judged = tuple(records_in_window(self.records, window_start_s, window_end_s))
        self.records.clear()  # later records belong to the next step's ramp and warm-up
        self.load_step += 1
        return TruthStep(agents, window_start_s, window_end_s, evaluate_step(judged, spec), judged)

    def _judged_ends(self, start_s: float) -> list[float]:
        return [record.end_epoch_s for record in records_in_window(self.records, start_s, math.inf)]

    def set_agents(self, count: int, spawn_rate: float, spaced: bool = False) -> float:
        """Start or stop agents towards ``count``, the new ones' first requests ``spaced`` by
        ``replay.join_offset_s`` or with their batch; returns when the live shape would see the ramp
        done (module docstring)."""
        ramp_end = self.now_s
        while len(self.agents) > count:
            agent = self.agents.pop()
            agent.stopped = True
            if agent.request is not None:
                if self.history is not None:  # as a live run records a request its step's end cut
                    self.history.append(self._make_record(agent, agent.request, Status.CANCELLED, self.now_s))
                self.fleet.abort(agent.request.request_id)
                del self.in_flight[agent.request.request_id]
        batch = max(1, math.floor(spawn_rate))
        new = count - len(self.agents)
        for k in range(new):
            index, session = self.dealer.deal(new_agent=True)
            agent = _Agent(index, replay.agent_rng(self.settings.seed, index))
            self.agents.append(agent)
            self._play(agent, session, first_session=True)
            start_s = replay.join_offset_s(k, spawn_rate) if spaced else k // batch * batch / spawn_rate
            self._wake(agent, self.now_s + start_s)
        if new > 0:
            last_batch_s = (new - 1) // batch * batch / spawn_rate
            ramp_end = self.now_s + max(SHAPE_TICK_S, SHAPE_TICK_S * math.ceil(round(last_batch_s / SHAPE_TICK_S, 9)))
        return ramp_end

    def run_until(self, end_s: float) -> None:
        """Run the clock to ``end_s`` or the end of a step that crosses it (module docstring)."""
        fleet = self.fleet
        while self.now_s < end_s:
            self._submit_due()
            fleet.start_steps(self.now_s)
            next_s = fleet.next_step_end_s()
            if fleet.has_idle():  # an idle replica takes a request as soon as it arrives
                next_s = min(next_s, self.wakes[0][0] if self.wakes else end_s, end_s)
            self.now_s = next_s
            for request in fleet.end_steps(next_s):
                agent = self.in_flight.pop(request.request_id, None)
                if agent is not None:
                    self._finish(agent, request)

    def _play(self, agent: _Agent, session: int, first_session: bool = False) -> None:
        index, rounds = replay.session_trajectory(session, len(self.trajectories))
        trajectory = self.trajectories.trajectory(index)
        marker = replay.namespace_marker(self.settings.cache_namespace, TRUTH_RUN_ID, session, len(self.trajectories),
                                         self.dealer.step)
        agent.trajectory = trajectory.with_namespace(marker) if marker else trajectory
        agent.label = trajectory.id if rounds == 0 else f"{trajectory.id}#{rounds}"
        agent.turn = (replay.start_turn(self.settings.start_turn, self.settings.seed, session, len(trajectory.turns))
                      if first_session else 0)

    def _wake(self, agent: _Agent, at_s: float) -> None:
        agent.scheduled_s = at_s
        self._seq += 1
        heapq.heappush(self.wakes, (at_s, self._seq, agent))

    def _submit_due(self) -> None:
        while self.wakes and self.wakes[0][0] <= self.now_s:
            at_s, _, agent = heapq.heappop(self.wakes)
            if not agent.stopped:
                self._submit(agent, at_s)

    def _submit(self, agent: _Agent, at_s: float) -> None:
        turn = agent.trajectory.turns[agent.turn]
        prompt = self.encoder.encode(turn.messages, replay.request_tools(turn.tools, self.settings))
        output = turn.output_tokens if self.settings.ignore_eos else self.fleet.sample_output_tokens(turn.output_tokens)
        request = EngineRequest(f"{agent.index}-{self._seq}", prompt, output, at_s)
        self._seq += 1
        try:
            self.fleet.submit(request)
        except SimulatorError as exc:
            self._record(agent, request, Status.HTTP_4XX, end_s=at_s, message=str(exc)[:200])
            self._next_turn(agent, at_s)
            return
        agent.request = request
        self.in_flight[request.request_id] = agent

    def _finish(self, agent: _Agent, request: EngineRequest) -> None:
        agent.request = None
        self._record(agent, request, Status.OK, end_s=request.finished_s)
        self._next_turn(agent, request.finished_s)

    def _next_turn(self, agent: _Agent, end_s: float) -> None:
        turn = agent.trajectory.turns[agent.turn]
        wait_s = replay.tool_wait_s(self.settings.tool_wait, turn.tool_wait_s, agent.rng,
                                    self.settings.tool_wait_median_s, self.settings.tool_wait_sigma)
        agent.turn += 1
        if agent.turn == len(agent.trajectory.turns):
            self._play(agent, self.dealer.deal(new_agent=False)[1])
        self._wake(agent, end_s + wait_s)

    def _record(self, agent: _Agent, request: EngineRequest, status: Status, end_s: float, message: str = "") -> None:
        record = self._make_record(agent, request, status, end_s, message)
        self.records.append(record)
        if self.history is not None:
            self.history.append(record)

    def _make_record(self, agent: _Agent, request: EngineRequest, status: Status, end_s: float,
                     message: str = "") -> RequestRecord:
        ok = status is Status.OK
        first = request.first_token_s
        timed = ok or (status is Status.CANCELLED and first is not None)  # a cut request keeps what it got
        speed = None
        if ok and request.generated > 1 and end_s > first:
            speed = (request.generated - 1) / (end_s - first)
        record = RequestRecord(
            run_id=TRUTH_RUN_ID, worker_id="truth", agent=agent.index, trajectory=agent.label, turn=agent.turn,
            load_step=self.load_step, scheduled_start_epoch_s=agent.scheduled_s, start_epoch_s=request.arrival_s,
            end_epoch_s=end_s, ttfb_s=first - request.arrival_s if ok else None,
            ttft_s=first - request.arrival_s if timed else None, e2e_s=end_s - request.arrival_s,
            itl_p50_s=None, itl_p95_s=None, itl_max_s=None,
            output_tokens=request.generated if timed else 0, output_tokens_estimated=False,
            prompt_tokens=request.prompt.num_tokens, cached_tokens=request.cached_tokens if timed else None,
            output_tps=speed, status=status, message=message, cold_join=agent.cold_join,
            counted_prompt_tokens=request.prompt.num_tokens,
        )
        agent.cold_join = False
        return record


def find_capacity(
    profile: Profile,
    trajectories: TrajectorySet,
    spec: SloSpec,
    params: SearchParameters,
    settings: replay.ReplaySettings = replay.ReplaySettings(),
    replicas: int = 1,
    router: str = ROUND_ROBIN,
    keep_records: bool = False,
    predicted: dict[str, TierCapacity] | None = None,
    twin_margins: dict[int, dict[str, float]] | None = None,
) -> TruthResult:
    """Run the capacity search on the virtual clock and return what it finds per tier; ``replicas`` copies
    of the profile's engine behind ``router`` serve the agents (:mod:`agentperf_users.simulator.fleet`),
    and the search starts from ``predicted``, steered by ``twin_margins``, as ``capacity --predict`` starts
    it, when given."""
    started = time.perf_counter()
    fleet = Fleet.of(profile, replicas, router, seed=settings.seed)
    world = _World(fleet, trajectories, settings, history=[] if keep_records else None)
    search = CapacitySearch.from_parameters([t.name for t in spec.tiers], params, predicted, twin_margins)
    steps = []
    while (agents := search.next_agents()) is not None:
        steps.append(world.measure(agents, params, spec))
        search.record_verdict(agents, steps[-1].verdict)
    summary = FleetSummary(router, profile.gpu.count, fleet.stats()) if replicas > 1 else None
    return TruthResult(search.capacity(), tuple(steps), world.now_s, time.perf_counter() - started, summary,
                       tuple(world.history or ()))


def measure_steps(
    profile: Profile,
    trajectories: TrajectorySet,
    spec: SloSpec,
    params: SearchParameters,
    steps: Sequence[tuple[int, float | None]],
    settings: replay.ReplaySettings = replay.ReplaySettings(),
    replicas: int = 1,
    router: str = ROUND_ROBIN,
) -> tuple[TruthStep, ...]:
    """The truth's verdicts on given steps, (agent count, window length or None) each, in order: a live
    run's steps measured without a load generator, so each live step has its ideal counterpart. None
    ends the window by the search's own rule (``search.window_end``, extension included); a length (a
    live step that ended early) ends it there. ``replicas`` and ``router``: as :func:`find_capacity`'s."""
    world = _World(Fleet.of(profile, replicas, router, seed=settings.seed), trajectories, settings)
    return tuple(world.measure(agents, params, spec, window_s) for agents, window_s in steps)


@dataclass(frozen=True)
class VerdictBand:
    """One tier's true verdicts at every count from 1 to ``measured_up_to``: every count up to
    ``passes_up_to`` passes, none above ``fails_above`` does. Where the two differ the true verdict is
    not monotone in the number of agents (which agents sit on long contexts at once matters more than
    one agent more), and any capacity in ``[passes_up_to, fails_above]`` is as true as another."""

    passes_up_to: int
    fails_above: int
    measured_up_to: int

    def to_dict(self) -> dict:
        return asdict(self)


def verdict_bands(
    profile: Profile,
    trajectories: TrajectorySet,
    spec: SloSpec,
    params: SearchParameters,
    up_to: int,
    settings: replay.ReplaySettings = replay.ReplaySettings(),
    replicas: int = 1,
    router: str = ROUND_ROBIN,
) -> dict[str, VerdictBand]:
    """Each tier's band, from the truth's verdict at every count 1 .. ``up_to`` (a +1 ladder)."""
    steps = measure_steps(profile, trajectories, spec, params, [(agents, None) for agents in range(1, up_to + 1)],
                          settings, replicas, router)
    bands = {}
    for tier in spec.tiers:
        passed = [step.verdict.tier(tier.name).passed for step in steps]
        first_fail = passed.index(False) + 1 if False in passed else up_to + 1
        last_pass = max((n for n, ok in enumerate(passed, 1) if ok), default=0)
        bands[tier.name] = VerdictBand(first_fail - 1, last_pass, up_to)
    return bands


def add_arguments(parser, profile_default: str | None = DEFAULT_PROFILE) -> None:
    """The truth's options (``agentperf truth``'s, also ``agentperf predict``'s); ``profile_default`` None makes
    --profile required."""
    parser.add_argument("--profile", default=profile_default, required=profile_default is None,
                        help="simulator profile name or YAML file")
    parser.add_argument("--replicas", default="1", metavar="N",
                        help="data-parallel copies of the profile's server behind a router (default 1)")
    parser.add_argument("--router", default=ROUND_ROBIN, metavar="|".join(ROUTERS),
                        help="how requests are spread over --replicas: round-robin, or prefix-affinity (each to the "
                             "replica caching the longest prefix of its prompt, within a bounded load)")
    add_options(parser, (Group.WORKLOAD, Group.REPLAY, Group.SLO, Group.SEARCH))


@dataclass(frozen=True)
class TruthInputs:
    """What ``add_arguments``' options ask the truth to search, loaded and checked (one line naming a bad
    one): the search (:meth:`capacity`) and the verdict at every count (:meth:`bands`) run on the same."""

    profile: Profile
    trajectories: TrajectorySet
    spec: SloSpec
    params: SearchParameters
    settings: replay.ReplaySettings
    replicas: int = 1
    router: str = ROUND_ROBIN

    @classmethod
    def from_args(cls, args, slower: float = 1.0) -> "TruthInputs":
        """``slower``: the profile's server with every cost that many times as long
        (:meth:`~agentperf_users.simulator.profile.Profile.slower`)."""
        replicas, router = fleet_from_args(args)
        spec = load_slo(args.slo or None)
        try:
            profile = load_profile(args.profile)
        except SimulatorError as exc:
            raise AgentperfError(str(exc)) from None
        return cls(profile.slower(slower) if slower != 1.0 else profile,
                   load_trajectories(args.trajectories, args.trajectory_format), spec,
                   SearchParameters.from_options(args), replay.ReplaySettings.from_options(args), replicas, router)

    def capacity(self) -> TruthResult:
        return find_capacity(self.profile, self.trajectories, self.spec, self.params, self.settings, self.replicas,
                             self.router)

    def bands(self, up_to: int) -> dict[str, VerdictBand]:
        return verdict_bands(self.profile, self.trajectories, self.spec, self.params, up_to, self.settings,
                             self.replicas, self.router)


def capacity_from_args(args, slower: float = 1.0) -> tuple[SloSpec, TruthResult]:
    """The search that ``add_arguments``' options ask for (:class:`TruthInputs`), and its SLO spec."""
    inputs = TruthInputs.from_args(args, slower)
    return inputs.spec, inputs.capacity()


def fleet_from_args(args) -> tuple[int, str]:
    """``--replicas`` and ``--router``, checked: one line naming the option and what it takes (taken as
    text, so a web form's or a script's value is checked by the same rule)."""
    text = str(args.replicas).strip()
    if not text.isdigit() or not 1 <= int(text) <= MAX_REPLICAS:
        raise AgentperfError(f"--replicas: expected a whole number from 1 to {MAX_REPLICAS}, got {args.replicas!r}")
    if args.router not in ROUTERS:
        raise AgentperfError(f"--router: expected one of {', '.join(ROUTERS)}, got {args.router!r}")
    return int(text), args.router
