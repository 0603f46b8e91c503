"""How far a capacity answer could move if the same search ran again: the spread a report states.

Against the simulator the ground truth says where a tier's verdicts flip; against a real server nothing
does, and two runs of one system differ because each step's window saw a sample of its agents' requests.
So each judged step's verdict is resampled over its agents (``slo.pass_fraction``: whole agents, with
replacement) and a count's verdict is **stable** when at least ``STABLE`` of the resamples agree with
it and its margin (``slo``: the binding quantile's log ratio to its limit) is at least ``STABLE_MARGIN``
on its side. The margin is needed because a resample only reshuffles what was seen: where every agent
met the floor by 0.2 %, every resample passes too, yet a rerun that times its requests a little
differently fails. A rerun bisects to where verdicts flip, so it can land anywhere between the highest stable pass at
or below the answer and the count below the lowest stable fail above it:

* ``low``: the largest judged count at or below the answer that passed in ``STABLE`` of the resamples
  (0 when none did: a rerun may find no count that holds);
* ``high``: one below the smallest judged count above the answer that failed in ``STABLE`` of them;
  None when none did (a rerun may find more, up to the search's maximum).

What resampling does not see: a server whose own speed drifts (a shared machine, thermal limits, another
tenant), which no resampling of one window's records can show. ``--recheck`` measures the first tier's
capacity and first failing count once more after the search (``policy``); a count measured more than
once is stable only when every measurement of it is stable on the same side, so a recheck that flips a
verdict widens the spread past it, and ``capacity_drift`` states, per rechecked count, how far the margin
moved between the two measurements: the server's speed, as the tier judges it, ``exp(change) - 1``.
``benchmarks/engine_capacity.py`` sets the stated spread against repeated runs of a real engine.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable

from agentperf_users.search.policy import RECHECK, CapacityStatus

RESAMPLES = 200
"""Resamples per step and tier: a pass share near ``STABLE`` is then known to about ±2 %, and a report
of a dozen steps and three tiers resamples in well under a second."""
STABLE = 0.9
STABLE_MARGIN = 0.03
"""3 % of a limit: on the embedded simulator a live step's judged quantiles differ from the ground truth's
same step by a median 0.5 % (output speed) and 3-4 % (TTFT) (``benchmarks/capacity_accuracy.py``), and a
README run's step at 14 agents passed by 0.2 % where the truth's same step failed."""


@dataclass(frozen=True)
class Spread:
    low: int
    high: int | None  # None: no stable fail above the answer was judged

    def to_dict(self) -> dict:
        return asdict(self)


def capacity_spread(steps: Iterable[tuple[int, float | None, float | None]], capacity: dict) -> Spread | None:
    """The spread of one tier's ``capacity`` (a ``TierCapacity.to_dict()``) from its judged steps as
    (agents, pass share of the resamples, margin: a number, or ``"inf"``/``"-inf"`` as report.json writes
    it); None for a search that located nothing (incomplete)."""
    status = capacity["status"]
    if status not in (CapacityStatus.FOUND, CapacityStatus.NONE_PASSED, CapacityStatus.NEVER_FAILED):
        return None
    answer = 0 if status == CapacityStatus.NONE_PASSED else capacity.get("agents") or 0
    judged: dict[int, list[tuple[float, float]]] = {}  # agents -> every measurement of it that judged requests
    for agents, share, margin in steps:
        if share is not None and margin is not None:
            judged.setdefault(agents, []).append((share, float(margin)))
    stable_passes = [agents for agents, measured in judged.items() if agents <= answer
                     and all(share >= STABLE and margin >= STABLE_MARGIN for share, margin in measured)]
    stable_fails = [agents for agents, measured in judged.items() if agents > answer
                    and all(share <= 1 - STABLE and margin <= -STABLE_MARGIN for share, margin in measured)]
    return Spread(max(stable_passes, default=0), min(stable_fails) - 1 if stable_fails else None)


@dataclass(frozen=True)
class Drift:
    """One count measured again (``--recheck``): the first measurement and the recheck, for one tier."""

    agents: int
    steps: tuple[int, int]  # the step indices: the first measurement of the count, the recheck
    margins: tuple[float | str | None, float | str | None]  # each step's margin, as report.json writes it
    change: float | None  # the recheck's margin minus the first's (a log ratio); None: either not a number

    @property
    def speed_change(self) -> float | None:
        """How much faster (> 0) or slower the server met the tier's binding quantile at the recheck:
        ``exp(change) - 1`` (the margin is the log ratio of that quantile to its limit)."""
        return None if self.change is None else math.expm1(self.change)

    def to_dict(self) -> dict:
        return {**asdict(self), "steps": list(self.steps), "margins": list(self.margins),
                "speed_change": self.speed_change}


def capacity_drift(steps: Iterable[tuple[int, int, str, float | str | None]]) -> list[Drift]:
    """Each recheck of one tier beside the first measurement of its count, from the judged steps as
    (index, agents, phase, margin: a number, ``"inf"``/``"-inf"`` or None, as report.json writes it)."""
    first: dict[int, tuple[int, float | str | None]] = {}
    drifts = []
    for index, agents, phase, margin in steps:
        if phase == RECHECK and agents in first:
            earlier, earlier_margin = first[agents]
            drifts.append(Drift(agents, (earlier, index), (earlier_margin, margin), _change(earlier_margin, margin)))
        else:
            first.setdefault(agents, (index, margin))
    return drifts


def _change(first: float | str | None, repeat: float | str | None) -> float | None:
    if not all(isinstance(m, (int, float)) and math.isfinite(m) for m in (first, repeat)):
        return None
    return repeat - first


DRIFT_HELD = 0.01
"""A speed change under 1 % is said as held: rounded to a whole percent it would read as ``+0 %``."""


def spread_words(spread: dict | None) -> str:
    """``a rerun may land at 9–12``; empty when the answer has no spread to state."""
    if not spread:
        return ""
    low, high = spread["low"], spread["high"]
    if high is None:
        return f"a rerun may land at {low:,} or more" if low else "no judged verdict held: a rerun may land anywhere"
    return "a rerun lands here too" if low == high else f"a rerun may land at {low:,}–{high:,}"


def drift_words(capacity: dict) -> str:
    """``the server's speed moved -27 % between two measurements of 8 agents``: the largest drift at a
    tier's own capacity or first failing count (report.json's ``capacity.<tier>``: the rechecks are the
    first tier's counts; another tier's numbers at them are in its ``drift`` only); empty when neither
    was rechecked or no change is a number."""
    own = (capacity.get("agents"), capacity.get("first_failing_agents"))
    measured = [drift for drift in capacity.get("drift") or []
                if drift["agents"] in own and drift.get("speed_change") is not None]
    if not measured:
        return ""
    drift = max(measured, key=lambda found: round(abs(found["speed_change"]) * 100))  # as said; a tie: the first
    between = f"between two measurements of {drift['agents']:,} agent" + ("" if drift["agents"] == 1 else "s")
    if abs(drift["speed_change"]) < DRIFT_HELD:
        return f"the server's speed held within {DRIFT_HELD * 100:.0f} % {between}"
    return f"the server's speed moved {drift['speed_change'] * 100:+.0f} % {between}"
