"""The capacity search's decision policy and its options, with no Locust and no clock.

``CapacitySearch`` decides which agent count to measure next from the verdicts so far. Phase 1 steps
the count up (by ``--step-agents``, or by ``--step-factor`` when that is 0) until every tier has failed
or ``--max-agents`` is reached; phase 2 narrows, tier by tier, the bracket between the largest passing
count below the tier's first failing count and that failing count, until they are at most
``--resolution-agents`` apart. Every step is judged on every tier, so a count measured once serves
every tier's bracket and is never measured again. A tier that fails at the smallest count it is tried
at narrows down towards 1.

Guided (``--guided-search``, the default): each verdict carries a margin per tier (``slo``: how far
inside or outside the tier the step was, as a log ratio), which falls as agents are added. Phase 2
interpolates the count where the margin crosses zero between the bracket's ends (regula falsi) instead
of taking the midpoint. It is safeguarded, so a noisy or curved margin costs steps but never
correctness: after an interpolation that did not halve its tier's bracket, the next count for that
tier is the midpoint, so the bracket at least halves every two steps, as plain bisection's does every
step. Verdicts, never margins, decide the brackets and the answer. (Phase 1 does not extrapolate: on
the simulator's profiles, margins at small counts predicted the break too poorly to save steps.)

Started from a prediction (``agentperf capacity --predict PROFILE``: the ground truth's search on a
calibrated twin, ``search.predicted``), there is no phase 1: each tier in turn, first its predicted
capacity is measured, then the count past it, so a right prediction is verified in two steps per tier.
After that the twin's margin curve steers (``twin_margins``: the margins of its search's steps): a
count's measured margin against the twin's at the same count says how far off the twin is there (step
costs off by a factor move every speed margin by its log), so the tier's knee is estimated where the
twin's curve, shifted by that offset (from the bracket's ends), crosses zero, and the next count is the
one of the estimated pair (largest pass, first fail) that closes the bracket if the estimate is right.
Every step is judged on every tier, so a tier's first estimate already has the offsets of the counts
measured for the tiers before it. The safeguards are verdicts': a count that missed (expected to pass and
failed, or the other way) is followed by a widening of ``PREDICTION_WIDEN_STEP`` of the end moved from,
doubled for each miss (a knee at a memory cliff does not show in the margins below it, and a twin
10-40 % off is 10-25 % off at its knees), and a bracket whose estimates missed twice is narrowed as
without a prediction; where the twin's curve does not fit between a bracket's ends, the secant of
their measured margins estimates instead. Verdicts, never margins, decide the brackets and the
answer, which is the same as without a prediction wherever the tier's verdicts are monotone in agents.
A prediction without a curve (counts only) widens from the disproved prediction by
``PREDICTION_WIDEN_FACTOR``, the ratio squared each time, then halves, and scales each tier's predicted
counts by how far off the twin was on the tiers located before it.

Rechecked (``--recheck``): once every tier is located, the first tier's capacity and its first failing
count are measured once more (phase ``recheck``), so the report can state how far the server's own speed
moved between two measurements of one count (a shared machine, thermal limits, another tenant), which no
resampling of one window's records sees, and count a count whose two verdicts disagree as unstable in the
rerun spread (``spread``). A recheck's verdict is kept apart: the first verdict at each count decides the
brackets and the answer, as without rechecks, so the answer stays the same function of the first
verdicts, and the ground truth (whose repeated step is identical) makes the same decisions.

Why a module of its own: the live search (``shape.CapacitySearchShape``, a Locust LoadTestShape) and
the ground truth (``truth``, the simulator's engine on a virtual clock, which must not import Locust
and its gevent monkey-patching) make exactly the same decisions from the same options.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Iterable, Mapping, Sequence

from agentperf_users import options
from agentperf_users.errors import AgentperfError
from agentperf_users.measure.diagnose import Cause
from agentperf_users.measure.slo import StepVerdict
from agentperf_users.options import MAX_WINDOW_FACTOR, Group
from agentperf_users.search.margin_curve import last_crossing, margin_at

# Counts only (a prediction without the twin's margin curve): the first step away from a prediction
# that a verdict disproved: 1.5x (or 1/1.5x) the count that disproved it, then the ratio to the
# prediction squared each step (2.25x, 5.1x, ...). Small enough that a twin off by 20-40 % is bracketed
# at the first widening, large enough that one off by 2x costs two steps more than a right one, not
# log2(agents).
PREDICTION_WIDEN_FACTOR = 1.5
# Steered by the twin's margin curve: after an estimate that missed, the count moves 10 % of the way from
# the end it moves from, the step doubled for each miss of the tier (1.1x, 1.2x, 1.4x, 1.8x, ...): a
# twin whose step costs are off by 10-40 % puts its knee within 10-25 % of the true one (a memory
# cliff, which the margins do not show, included), so small steps bracket it soonest; one off by far
# still brackets it in log log steps. Measured: benchmarks/predict_speedup.py.
PREDICTION_WIDEN_STEP = 0.1
PREDICTION_WIDEN_GROWTH = 2.0
# Where the twin's curve, shifted to the margin measured at one end of a bracket, misses the margin at
# the other end by more than this (a log ratio: 35 %), it does not fit there (a cliff where the twin has
# none, or the other way): the knee is estimated from the measured margins alone (their secant).
PREDICTION_CURVE_MISFIT = 0.3
# Margins measured twice at one count differ by a few hundredths (0.104 live against the twin's 0.076 at
# 36 agents on the h200 profile, the twin being the server's own profile), which moves a crossing as
# flat as a knee's by an agent: an offset within this says the twin is right there, as far as margins tell.
PREDICTION_MARGIN_NOISE = 0.05


@dataclass(frozen=True)
class SearchParameters:
    """The search's options, validated (one line naming the option on a bad value)."""

    start_agents: int
    step_agents: int
    step_factor: float
    max_agents: int
    resolution_agents: int
    spawn_rate: float
    warmup_s: float
    window_s: float
    early_stop: bool
    restart_agents: bool = True
    guided: bool = True
    min_requests: int = 1
    recheck: bool = False

    @classmethod
    def from_options(cls, parsed, live: bool = False) -> "SearchParameters":
        """Validated parameters from parsed options (or the web UI's strings): every number finite and within
        its declared bounds (``agentperf_users.options``), so ``--window-s inf`` or ``--max-agents 10**100``
        fails at once. ``live``: the search measures a server (the shape), where ``--recheck auto`` is on;
        elsewhere (the ground truth, a prediction: a virtual clock) it is off."""
        values = {option.dest: options.value(parsed, option.dest) for option in options.in_groups([Group.SEARCH])}
        if values["max_agents"] < values["start_agents"]:
            raise AgentperfError(f"--max-agents: expected an integer >= --start-agents, got {values['max_agents']}")
        if not values["step_agents"] and values["step_factor"] <= 1:
            raise AgentperfError("--step-factor: expected a number > 1 when --step-agents is 0, "
                                 f"got {values['step_factor']:g}")
        return cls(
            start_agents=values["start_agents"],
            step_agents=values["step_agents"],
            step_factor=values["step_factor"],
            max_agents=values["max_agents"],
            resolution_agents=values["resolution_agents"],
            spawn_rate=values["agent_spawn_rate"],
            warmup_s=values["warmup_s"],
            window_s=values["window_s"],
            early_stop=values["early_stop"],
            restart_agents=values["restart_agents"],
            guided=values["guided_search"],
            min_requests=values["min_requests"],
            recheck=values["recheck"] == "on" or (values["recheck"] == "auto" and live),
        )


def window_end(start_s: float, params: SearchParameters, ended_s: Iterable[float], seen_until_s: float) -> float | None:
    """Where a step's window ends, given the end times of the requests that ended after ``start_s``
    (all of them up to ``seen_until_s``); None while that is not known yet.

    The window is ``--window-s`` long, extended up to ``MAX_WINDOW_FACTOR`` times that until
    ``--min-requests`` requests ended in it: a window in which nothing ended (one agent on a turn longer
    than the window, say) shows nothing, neither a pass nor a fail. The live shape and the ground truth
    both end their windows here, so they judge the same requests."""
    planned, cap = start_s + params.window_s, start_s + MAX_WINDOW_FACTOR * params.window_s
    ends = sorted(end for end in ended_s if start_s <= end < min(seen_until_s, cap))
    if len(ends) >= params.min_requests:
        needed = ends[params.min_requests - 1] if params.min_requests else start_s
        if needed < planned:
            return planned if seen_until_s >= planned else None
        return math.nextafter(needed, math.inf)  # the window [start, end) holds that request
    return cap if seen_until_s >= cap else None


RECHECK = "recheck"  # the phase of a count measured again after the search located its tiers


class CapacityStatus(str, Enum):
    FOUND = "found"  # passes at `agents`, fails at `first_failing_agents`, within the resolution
    NONE_PASSED = "none_passed"  # failed at every count tried, down to `first_failing_agents`
    NEVER_FAILED = "never_failed"  # passed up to --max-agents (`agents`): capacity is higher
    INCOMPLETE = "incomplete"  # the search stopped before this tier was resolved


@dataclass(frozen=True)
class TierCapacity:
    tier: str
    status: CapacityStatus
    agents: int | None  # the largest count that passed below the first failing one
    first_failing_agents: int | None

    def to_dict(self) -> dict:
        return {**asdict(self), "status": self.status.value}


class CapacitySearch:
    """Which agent count to measure next, from the verdicts so far. Pure: no Locust, no clock."""

    def __init__(
        self,
        tiers: Sequence[str],
        start_agents: int,
        max_agents: int,
        resolution_agents: int = 1,
        step_agents: int = 0,
        step_factor: float = 2.0,
        guided: bool = True,
        predicted: Mapping[str, TierCapacity] | None = None,
        twin_margins: Mapping[int, Mapping[str, float]] | None = None,
        recheck: bool = False,
    ) -> None:
        self._tiers = tuple(tiers)
        self._predicted = dict(predicted) if predicted is not None else None
        self._twin_margins = {agents: dict(margins) for agents, margins in (twin_margins or {}).items()}
        self._expected: dict[str, list[tuple[int, bool]]] = {}  # tier -> (count, expected to pass), as predicted
        self._start, self._max, self._resolution = start_agents, max_agents, resolution_agents
        self._step_agents, self._step_factor = step_agents, step_factor
        self._guided = guided
        self._passed: dict[int, dict[str, bool]] = {}  # agents -> tier name -> passed
        self._margins: dict[int, dict[str, float]] = {}  # agents -> tier name -> margin, where usable
        self._interpolated_width: dict[str, int] = {}  # tier -> its bracket's width at its last interpolation
        self._recheck = recheck
        self._rechecked: dict[int, dict[str, bool]] = {}  # agents -> tier name -> passed, measured again
        self._phase = "step"  # what the next count is for (``phase``)
        self._next: int | None = start_agents if self._predicted is None else self._plan()

    @classmethod
    def from_parameters(cls, tiers: Sequence[str], params: SearchParameters,
                        predicted: Mapping[str, TierCapacity] | None = None,
                        twin_margins: Mapping[int, Mapping[str, float]] | None = None) -> "CapacitySearch":
        """The search the options ask for; ``predicted`` (capacity per tier, as ``capacity()`` gives it)
        starts it from a prediction instead of ``--start-agents``, steered by ``twin_margins`` (the
        prediction's margins: agents -> tier -> margin, finite ones) where given."""
        return cls(tiers, params.start_agents, params.max_agents, params.resolution_agents, params.step_agents,
                   params.step_factor, params.guided, predicted, twin_margins, params.recheck)

    def record_verdict(self, agents: int, verdict: StepVerdict) -> None:
        passed = {tier_verdict.tier.name: tier_verdict.passed for tier_verdict in verdict.tiers}
        if self._phase == RECHECK and agents == self._next:
            self._rechecked[agents] = passed  # the first verdict at a count decides (module docstring)
        else:
            self._passed[agents] = passed
            self._margins[agents] = {
                tier_verdict.tier.name: tier_verdict.margin for tier_verdict in verdict.tiers
                if _usable_margin(tier_verdict.margin, tier_verdict.passed)
            }
        self._next = self._plan()
        if self._next is None and self._recheck:
            self._next = self._plan_recheck()

    def _plan_recheck(self) -> int | None:
        """Once every tier is located: the first tier's capacity, then its first failing count, each
        measured once more (those it has; none for a tier never judged)."""
        low, high = self.bracket(self._tiers[0]) if self._passed else (0, None)
        due = next((count for count in (low, high) if count and count not in self._rechecked), None)
        if due is not None:
            self._phase = RECHECK
        return due

    def bracket(self, tier: str) -> tuple[int, int | None]:
        """(largest count passing below the first failure, or 0; first failing count, or None)."""
        first_fail = min((n for n, passed in self._passed.items() if not passed[tier]), default=None)
        below = (n for n, passed in self._passed.items() if passed[tier] and (first_fail is None or n < first_fail))
        return max(below, default=0), first_fail

    @property
    def stepping(self) -> bool:
        """Phase 1: some tier has not failed yet and --max-agents has not been measured (never, when
        started from a prediction: its steps verify the prediction, then widen or narrow brackets)."""
        if self._predicted is not None:
            return False
        if not self._passed:
            return True
        return max(self._passed) < self._max and any(self.bracket(tier)[1] is None for tier in self._tiers)

    def next_agents(self) -> int | None:
        """The next count to measure; None when every tier is resolved."""
        return self._next

    @property
    def phase(self) -> str:
        """What the next count is for: ``predict`` (a predicted count, measured to verify it), ``step``
        (phase 1, or widening away from a disproved prediction), ``bisect`` (narrowing a bracket) or
        ``recheck`` (a located count measured again, ``--recheck``)."""
        return self._phase

    def _plan(self) -> int | None:
        if self._predicted is not None:
            return self._plan_from_prediction()
        self._phase = "step" if self.stepping else "bisect"
        if self.stepping:
            top = max(self._passed)
            if self._step_agents:
                return min(self._max, top + self._step_agents)
            return min(self._max, max(top + 1, math.ceil(round(top * self._step_factor, 9))))
        for tier in self._tiers:
            low, high = self.bracket(tier)
            if high is not None and high - low > self._resolution:
                return self._narrow(tier, low, high)
        return None

    def _plan_from_prediction(self) -> int | None:
        """The first tier still open: the count its estimated knee says (``_from_estimate``); without an
        estimate (no prediction for the tier), the bracket widened (no fail yet: up; no pass yet: down)
        or halved."""
        for tier in self._tiers:
            low, high = self.bracket(tier)
            if high is None and (self._passed and max(self._passed) >= self._max):
                continue  # passed at --max-agents: never failed
            if high is not None and high - low <= self._resolution:
                continue
            knee = self._estimated_knee(tier, low, high)
            if knee is not None:
                count, expect_pass = self._from_estimate(tier, low, high, knee)
                self._expected.setdefault(tier, []).append((count, expect_pass))
                return count
            guess = self._predicted_inside(tier, low, high)
            self._phase = "predict" if guess is not None else "bisect" if low and high else "step"
            if guess is not None:
                return guess
            if high is None:
                return self._widen(tier, low, up=True)
            if low == 0:
                return self._widen(tier, high, up=False)
            return (low + high) // 2  # halving: regula falsi stalls one agent a step near a knee
        return None

    def _from_estimate(self, tier: str, low: int, high: int | None, knee: float) -> tuple[int, bool]:
        """The count to measure next for ``tier`` whose margin is estimated to cross zero at ``knee``, and
        whether it is expected to pass. Of the pair that would locate that knee (its floor, expected to
        pass, and the count ``--resolution-agents`` past it, expected to fail), the one at the bracket's
        open or nearer side, so a right estimate closes the bracket and a wrong one shows which way it was
        wrong. Safeguarded (``_after_miss``) where the last estimate missed or this one is already
        disproved by the bracket."""
        outcomes = [self._passed[n][tier] == expected for n, expected in self._expected.get(tier, ())
                    if n in self._passed]
        missed = bool(outcomes) and not outcomes[-1]
        if missed or knee < low or (high is not None and knee >= high):
            last_passed = self._passed[self._expected[tier][-1][0]][tier] if missed else knee < low
            return self._after_miss(tier, low, high, outcomes.count(False), last_passed, knee)
        self._phase = "predict"
        top = high if high is not None else self._max + 1
        floor = min(top - 1, max(low, math.floor(knee)))
        above = min(top - 1, floor + self._resolution)  # the pair's other count: they locate the knee
        nearer_low = high is None or above - low <= high - floor
        if floor <= low or (low and nearer_low and above > floor):
            return max(above, low + 1), False
        return floor, True  # nothing measured yet (the prediction itself), the fail already known, or nearer it

    def _after_miss(self, tier: str, low: int, high: int | None, misses: int, too_low: bool,
                    knee: float) -> tuple[int, bool]:
        """After an estimate that missed (``too_low``: a count expected to fail passed, or the estimate lies
        below the bracket), so a twin whose curve is wrong costs steps, never correctness: an open bracket
        widens by ``PREDICTION_WIDEN_STEP`` of the end it moves from, the step doubled for each miss of the
        tier (a gallop: a knee at a memory cliff does not show in the margins below it), and a closed one
        moves so too, at most to its middle, until a second miss shows the estimates cannot be trusted
        there: then it is narrowed as without a prediction (``_narrow``)."""
        closed = high is not None and low
        if closed and misses > 1:
            self._phase = "bisect"
            count = self._narrow(tier, low, high)
            return count, count <= knee
        self._phase = "step"
        step = PREDICTION_WIDEN_STEP * PREDICTION_WIDEN_GROWTH ** max(0, misses - 1)
        if high is None or (low and too_low):  # up from the highest pass
            count = min(self._max, low + max(1, math.ceil(round(low * step, 9))))
            return (min(count, max(low + 1, (low + high) // 2)) if closed else count), False
        count = high - max(1, math.ceil(round(high * step / (1 + step), 9)))  # down from the lowest fail
        return max(count, (low + high + 1) // 2 if low else 1, low + 1), True

    def _estimated_knee(self, tier: str, low: int, high: int | None) -> float | None:
        """Where ``tier``'s margin is expected to cross zero: the twin's margin curve (its search's steps)
        shifted by how far the measured margins at the bracket's ends are from the twin's there (a twin
        whose step costs are off by a factor is off by its log in every speed margin), or, where the two
        ends' offsets differ by more than ``PREDICTION_CURVE_MISFIT``, where the secant of their measured
        margins crosses zero (in log agents); with no margin measured at them yet, or an offset within
        ``PREDICTION_MARGIN_NOISE``, the predicted capacity (scaled by ``_twin_error``). None without a
        twin curve (a prediction of counts only) or a prediction for the tier."""
        if tier not in self._predicted or not self._twin_margins:
            return None
        curve = sorted((agents, margins[tier]) for agents, margins in self._twin_margins.items() if tier in margins)
        offsets = [self._margins[end][tier] - margin_at(curve, end) for end in (low, high)
                   if curve and end and tier in self._margins.get(end, {})]
        if not offsets:  # no twin curve, or nothing measured near it yet: the predicted capacity, scaled
            counts = self._predicted_counts(tier)
            return counts[0] + 0.5 if self._predicted[tier].agents else 0.5
        if len(offsets) == 2 and abs(offsets[0] - offsets[1]) > PREDICTION_CURVE_MISFIT:
            m_low, m_high = self._margins[low][tier], self._margins[high][tier]  # the measured margins' secant
            return low * math.exp(math.log(high / low) * m_low / (m_low - m_high))
        offset = sum(offsets) / len(offsets)
        counts = self._predicted_counts(tier)
        if abs(offset) < PREDICTION_MARGIN_NOISE and counts and self._predicted[tier].agents:
            return counts[0] + 0.5  # the twin is right here, as far as the margins can tell
        crossing = last_crossing(curve, offset)
        return max(0.5, crossing) if crossing is not None else curve[-1][0] + 0.5

    def _predicted_counts(self, tier: str) -> tuple[int, ...]:
        """The tier's predicted capacity and first failing count, within [1, --max-agents], scaled by how
        far off the twin was on the tiers already located (``_twin_error``): a twin that was 30 % low on
        one tier is likely so on the next."""
        predicted = self._predicted.get(tier)
        if predicted is None:
            return ()
        scale = self._twin_error()
        agents, failing = predicted.agents, predicted.first_failing_agents
        if agents:
            scaled = max(1, round(agents * scale))
            counts = (scaled, scaled + (failing - agents)) if failing else (scaled,)
        else:
            counts = (max(1, round(failing * scale)),) if failing else ()
        return tuple(min(self._max, count) for count in counts)

    def _twin_error(self) -> float:
        """Measured over predicted capacity, the geometric mean over the tiers located so far (1: none)."""
        ratios = []
        for tier, predicted in self._predicted.items():
            low, high = self.bracket(tier) if tier in self._tiers else (0, None)
            if predicted.agents and low and high is not None and high - low <= self._resolution:
                ratios.append(math.log(low / predicted.agents))
        return math.exp(sum(ratios) / len(ratios)) if ratios else 1.0

    def _predicted_inside(self, tier: str, low: int, high: int | None) -> int | None:
        """The first predicted count of ``tier`` not measured yet and strictly inside its bracket."""
        return next((count for count in self._predicted_counts(tier)
                     if count not in self._passed and low < count and (high is None or count < high)), None)

    def _widen(self, tier: str, end: int, up: bool) -> int:
        """The next count beyond ``end`` (the tier's highest pass, or its lowest fail) away from the
        prediction: ``PREDICTION_WIDEN_FACTOR`` from the predicted count the bracket left, then the
        ratio to it squared (1.5x, 2.25x, 5.1x, ...): a gallop, so a twin off by a lot costs log log steps."""
        counts = self._predicted_counts(tier) or (self._start,)
        anchor = max(counts) if up else min(counts)
        if not end:  # nothing measured yet (a tier predicted nothing for)
            return anchor
        travelled = max(end / anchor, anchor / end, 1.0)
        factor = max(PREDICTION_WIDEN_FACTOR, travelled)
        if up:
            return min(self._max, max(end + 1, math.ceil(round(end * factor, 9))))
        return max(1, min(end - 1, math.floor(round(end / factor, 9))))

    def _narrow(self, tier: str, low: int, high: int) -> int:
        """The next count inside (low, high) for ``tier``: interpolated where its margin crosses zero,
        or the midpoint when there is nothing to interpolate or the last interpolation did too little."""
        width = high - low
        margins = self._margins.get(low, {}).get(tier), self._margins.get(high, {}).get(tier)
        last_width = self._interpolated_width.pop(tier, None)
        if self._guided and None not in margins and (last_width is None or 2 * width <= last_width):
            m_low, m_high = margins
            self._interpolated_width[tier] = width
            crossing = low + width * m_low / (m_low - m_high)
            return min(high - 1, max(low + 1, round(crossing)))
        return (low + high) // 2

    @property
    def done(self) -> bool:
        return self.next_agents() is None

    def undecided_tiers(self, agents: int) -> tuple[str, ...]:
        """The tiers whose answer a verdict at ``agents`` can still change."""
        brackets = {tier: self.bracket(tier) for tier in self._tiers}
        return tuple(tier for tier, (low, high) in brackets.items() if low < agents and (high is None or agents < high))

    def capacity(self) -> dict[str, TierCapacity]:
        result = {}
        for tier in self._tiers:
            low, high = self.bracket(tier)
            if high is None:
                resolved = bool(self._passed) and max(self._passed) >= self._max
                status = CapacityStatus.NEVER_FAILED if resolved else CapacityStatus.INCOMPLETE
            elif high - low > self._resolution:
                status = CapacityStatus.INCOMPLETE
            else:
                status = CapacityStatus.FOUND if low else CapacityStatus.NONE_PASSED
            result[tier] = TierCapacity(tier, status, low or None, high)
        return result


def _usable_margin(margin: float | None, passed: bool) -> bool:
    """A margin the search can steer by: finite, and on the side of zero that the verdict is (a step
    can fail on its error rate with its quantile criteria met)."""
    return margin is not None and math.isfinite(margin) and (margin >= 0) == passed


_STOPPED_BY = {Cause.SERVER_ERRORS.value: "the server is failing",
               Cause.SIMULATOR.value: "the simulator's host is the limit"}


@dataclass(frozen=True)
class SearchStopped:
    """Why the search ended before locating its tiers: a step whose failure was not about capacity (a
    failing server; the load generator, or the machine of agentperf's simulator, twice at the same count).
    Its words, and the server's own."""

    step: int
    agents: int
    cause: str
    text: str
    error: str | None  # the most frequent failure message of the step, the server's words

    def line(self) -> str:
        what = _STOPPED_BY.get(self.cause, "the load generator is the limit")
        said = f"; most frequent error: {self.error}" if self.error else ""
        return f"search stopped at step {self.step} ({self.agents} agents): {what}, not a capacity ({self.text}{said})"
