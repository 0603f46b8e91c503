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

The prediction is kept in the search's state (``search.json``), so the report sets it against what was
measured, tier by tier, and ``agentperf report`` rebuilds the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterable

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

    def to_dict(self) -> dict[str, Any]:
        return {"profile": self.profile, "capacity": {name: cap.to_dict() for name, cap in self.capacity.items()},
                "load_steps": self.load_steps, "simulated_s": round(self.simulated_s, 3),
                "wall_s": round(self.wall_s, 3),
                "margins": {str(agents): {tier: round(margin, 4) for tier, margin in margins.items()}
                            for agents, margins in sorted(self.margins.items())}}


def margin_curve(steps: Iterable[truth.TruthStep]) -> dict[int, dict[str, float]]:
    """Each step's finite margins per tier, by agent count (an infinite one, a window without a first
    token, says nothing about where the tier breaks)."""
    return {step.agents: {verdict.tier.name: verdict.margin for verdict in step.verdict.tiers
                          if verdict.margin is not None and math.isfinite(verdict.margin)} for step in steps}


def check_profile(ref: str) -> Profile:
    """The twin's profile (a bundled name or a YAML file), or one line naming it and what is wrong."""
    try:
        return load_profile(ref)
    except SimulatorError as exc:
        raise AgentperfError(f"--predict: {exc}") from None


def predict(ref: str, trajectories, spec: SloSpec, params: SearchParameters,
            settings: ReplaySettings = ReplaySettings()) -> Prediction:
    """The ground truth's search on profile ``ref``: what the live search with these options would find
    on a server the profile describes exactly. Never rechecked (``--recheck``): a virtual clock does not
    drift, and a repeated virtual step would only cost time before the live search can start."""
    result = truth.find_capacity(check_profile(ref), trajectories, spec, replace(params, recheck=False), settings)
    return Prediction(ref, result.capacity, len(result.steps), result.simulated_s, result.wall_s,
                      margin_curve(result.steps))


def from_options(parsed: Any, spec: SloSpec, params: SearchParameters) -> Prediction | None:
    """The prediction ``--predict`` asks for, from a run's parsed options (Locust's on the master); None
    without one."""
    ref = options.value(parsed, "predict")
    if not ref:
        return None
    trajectories = load_trajectories(options.value(parsed, "trajectories"), options.value(parsed, "trajectory_format"))
    return predict(ref, trajectories, spec, params, ReplaySettings.from_options(parsed))
