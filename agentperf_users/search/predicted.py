"""The prediction a live search starts from (``--predict PROFILE``): the ground truth's search
(:mod:`truth`) on a calibrated twin's profile, with the run's own trajectories, SLO tiers, replay options
and search options, as ``agentperf predict`` runs it.

Why the live search takes it: on a server that takes minutes per load step, phase 1 (doubling from
``--start-agents``) and the bisection spend most of the run finding a knee the twin already knows to
within its error. ``policy.CapacitySearch`` started from the predicted capacities measures them first,
then steers by the twin's margin curve (each of its search's steps' margins, kept here): a measured margin
against the twin's at the same count says how far off the twin is, so a disproved prediction moves to
the estimated knee instead of galloping blindly. A right twin is verified in two steps per tier, one
whose step costs are 10-40 % off costs a few more (``benchmarks/predict_speedup.py``); verdicts, never the
prediction, decide the answer.

Why ``--predict-speed-spread``: the repeats' seeds draw the workload, not the server, whose speed moves between
two measurements of one count on a shared machine; with a spread the twin's searches run on its profile slowed
or sped (:func:`speed_factors`), so the range the report sets beside the measured answer includes that drift.

The prediction is kept in the search's state (``search.json``), so the report sets it against what was
measured, tier by tier, and ``agentperf report`` rebuilds the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from statistics import NormalDist
from typing import Any, Iterable, Sequence

from agentperf_users import options
from agentperf_users.errors import AgentperfError
from agentperf_users.loadgen.replay import ReplaySettings
from agentperf_users.measure.slo import SloSpec
from agentperf_users.search import truth
from agentperf_users.search.policy import SearchParameters, TierCapacity
from agentperf_users.simulator.profile import Profile, SimulatorError, load_profile
from agentperf_users.workload.readers import load_trajectories


@dataclass(frozen=True)
class Prediction:
    """The twin's answer per tier, its margin curve (agents -> tier -> margin, at the counts its search
    measured, finite margins only: what the live search steers by), and what it cost (load steps on the
    virtual clock, wall seconds)."""

    profile: str
    capacity: dict[str, TierCapacity]
    load_steps: int
    simulated_s: float
    wall_s: float
    margins: dict[int, dict[str, float]] = field(default_factory=dict)
    repeats: int = 1  # searches at successive seeds: the capacity is their median's, the margins their mean
    ranges: dict[str, tuple[int, int]] = field(default_factory=dict)  # tier -> the searches' lowest, highest
    speed_factors: tuple[float, ...] = ()  # each search's server this many times as slow as the profile's

    def to_dict(self) -> dict[str, Any]:
        slower = [round(min(self.speed_factors), 2), round(max(self.speed_factors), 2)] if self.speed_factors else None
        capacity = {name: {**cap.to_dict(), **({"range": list(self.ranges[name])} if name in self.ranges else {}),
                           **({"range_slower": slower} if slower and name in self.ranges else {})}
                    for name, cap in self.capacity.items()}
        return {"profile": self.profile, "capacity": capacity, "repeats": self.repeats,
                "speed_factors": [round(factor, 4) for factor in self.speed_factors],
                "load_steps": self.load_steps, "simulated_s": round(self.simulated_s, 3),
                "wall_s": round(self.wall_s, 3),
                "margins": {str(agents): {tier: round(margin, 4) for tier, margin in margins.items()}
                            for agents, margins in sorted(self.margins.items())}}


def margin_curve(steps: Iterable[truth.TruthStep]) -> dict[int, dict[str, float]]:
    """Each step's finite margins per tier, by agent count (an infinite one, a window without a first
    token, says nothing about where the tier breaks)."""
    return {step.agents: {verdict.tier.name: verdict.margin for verdict in step.verdict.tiers
                          if verdict.margin is not None and math.isfinite(verdict.margin)} for step in steps}


def repeat_seeds(seed: int, repeats: int) -> tuple[int, ...]:
    """The seeds of ``repeats`` searches: ``seed``, ``seed`` + 1, ... (downwards from ``seed`` where that would
    pass the largest seed the replay takes)."""
    step = 1 if seed + repeats - 1 < options.MAX_SEED else -1
    return tuple(seed + step * i for i in range(repeats))


def speed_factors(spread: float, searches: int) -> tuple[float, ...]:
    """How many times as slow each of ``searches`` searches' server is: ``exp(spread * z)`` at the normal
    quantiles (i + 0.5) / searches, nearest 1 first (the faster of a pair first; exactly 1 for the middle
    of an odd count), so the search at the run's seed is the least moved; all 1 without a spread."""
    normal = NormalDist()
    quantiles = sorted((normal.inv_cdf((i + 0.5) / searches) for i in range(searches)), key=lambda z: (abs(round(z, 12)), z))
    return tuple(math.exp(spread * z) for z in quantiles)


def check_speed_spread(spread: float, searches: int, flags: tuple[str, str]) -> float:
    """``spread``, or one line naming its option (``flags``: it and the repeats' option) where it is given to a
    single search, which has no spread to draw."""
    if spread and searches < 2:
        raise AgentperfError(f"{flags[0]}: needs {flags[1]} 2 or more (one search has no spread to draw)")
    return spread


def answer_count(capacity: TierCapacity) -> int:
    """A tier's answer as a count to rank searches by: none passed is 0, never failed the count reached."""
    return capacity.agents or 0


def median_capacity(capacities: Sequence[TierCapacity]) -> TierCapacity:
    """The (lower) median of one tier's answers over several searches: a whole search's answer, with its own
    status and first failing count, never an average of searches."""
    ranked = sorted(range(len(capacities)), key=lambda i: (answer_count(capacities[i]), i))
    return capacities[ranked[(len(ranked) - 1) // 2]]


def answer_range(capacities: Sequence[TierCapacity]) -> tuple[int, int]:
    """The lowest and highest of one tier's answers over several searches (:func:`answer_count`)."""
    counts = [answer_count(capacity) for capacity in capacities]
    return min(counts), max(counts)


def mean_margins(curves: Sequence[dict[int, dict[str, float]]]) -> dict[int, dict[str, float]]:
    """Per count and tier, the mean of the margins the searches that measured it found: a curve with less of
    one draw's coincidences in it than any single search's."""
    pooled: dict[int, dict[str, list[float]]] = {}
    for curve in curves:
        for agents, margins in curve.items():
            for tier, margin in margins.items():
                pooled.setdefault(agents, {}).setdefault(tier, []).append(margin)
    return {agents: {tier: sum(values) / len(values) for tier, values in margins.items()}
            for agents, margins in sorted(pooled.items())}


def check_profile(ref: str) -> Profile:
    """The twin's profile (a bundled name or a YAML file), or one line naming it and what is wrong."""
    try:
        return load_profile(ref)
    except SimulatorError as exc:
        raise AgentperfError(f"--predict: {exc}") from None


def predict(ref: str, trajectories, spec: SloSpec, params: SearchParameters,
            settings: ReplaySettings = ReplaySettings(), repeats: int = 1, speed_spread: float = 0.0) -> Prediction:
    """The ground truth's search on profile ``ref``: what the live search with these options would find
    on a server the profile describes exactly; with ``repeats``, that many searches at seeds from the run's
    on (:func:`median_capacity`, :func:`mean_margins`), each on the profile slowed by its
    :func:`speed_factors` of ``speed_spread``. Never rechecked (``--recheck``): a virtual clock does not
    drift, and a repeated virtual step would only cost time before the live search can start."""
    profile = check_profile(ref)
    check_speed_spread(speed_spread, repeats, ("--predict-speed-spread", "--predict-repeats"))
    factors = speed_factors(speed_spread, repeats)
    results = [truth.find_capacity(profile.slower(factor) if factor != 1 else profile, trajectories, spec,
                                   replace(params, recheck=False), replace(settings, seed=seed))
               for seed, factor in zip(repeat_seeds(settings.seed, repeats), factors)]
    tiers = results[0].capacity
    capacity = {name: median_capacity([result.capacity[name] for result in results]) for name in tiers}
    ranges = {name: answer_range([r.capacity[name] for r in results]) for name in tiers} if repeats > 1 else {}
    return Prediction(ref, capacity, sum(len(result.steps) for result in results),
                      sum(result.simulated_s for result in results), sum(result.wall_s for result in results),
                      mean_margins([margin_curve(result.steps) for result in results]), repeats, ranges,
                      factors if speed_spread else ())


def from_options(parsed: Any, spec: SloSpec, params: SearchParameters) -> Prediction | None:
    """The prediction ``--predict`` asks for, from a run's parsed options (Locust's on the master); None
    without one."""
    ref = options.value(parsed, "predict")
    if not ref:
        return None
    trajectories = load_trajectories(options.value(parsed, "trajectories"), options.value(parsed, "trajectory_format"))
    return predict(ref, trajectories, spec, params, ReplaySettings.from_options(parsed),
                   options.value(parsed, "predict_repeats"), options.value(parsed, "predict_speed_spread"))
