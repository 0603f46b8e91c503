"""The answer a planner reads: one headline per SLO tier, worded in one place.

A tier's capacity is said the same way everywhere (the live search's log, the web UI, the terminal's
last lines, report.html, ``agentperf compare``), so a person who has read one of them has read them
all: ``capacity_words``. The headline adds what a planner compares systems by: agents per accelerator
and per megawatt (with the power they were computed from, measured or nameplate), the counts the
search bisected between, and the binding cause at the first failing count (``diagnose``'s words for
that step). Numbers are rounded as a person reads them (``2,594 agents/MW``, ``12.4 kW``), never as
``1.796e+09``; report.json keeps them exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from agentperf_users.search.policy import CapacityStatus
from agentperf_users.search.spread import drift_words, spread_words

MEGAWATT_W = 1_000_000.0


def number_words(value: float | None) -> str:
    """A count or ratio as a person reads it: ``2,594``, ``12.4``, ``1.25``, ``0.031``; ``n/a`` if unknown."""
    if value is None or not math.isfinite(value):
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}".removesuffix(".0")
    if value == int(value):
        return str(int(value))
    return f"{value:.3g}" if abs(value) >= 1 else f"{value:.2g}"


def watts_words(watts: float | None) -> str:
    """Power as a person reads it: ``700 W``, ``12.4 kW``, ``1.35 MW``."""
    if watts is None or not math.isfinite(watts):
        return "n/a"
    for scale, unit in ((MEGAWATT_W, "MW"), (1000.0, "kW")):
        if abs(watts) >= scale:
            return f"{number_words(watts / scale)} {unit}"
    return f"{watts:.0f} W"


def agents_words(count: int | None) -> str:
    return f"{count:,} agent" + ("" if count == 1 else "s")


def answer_words(cap: dict) -> str:
    """A tier's answer alone: ``10 agents``, ``none``, ``at least 256 agents``, ``incomplete``."""
    status, agents = cap["status"], cap.get("agents")
    if status == CapacityStatus.FOUND:
        return agents_words(agents)
    if status == CapacityStatus.NEVER_FAILED:
        return f"at least {agents_words(agents)}"
    return "none" if status == CapacityStatus.NONE_PASSED else "incomplete"


def bracket_words(cap: dict) -> str:
    """What the search bisected between: ``fails at 11``, ``fails already at 1 agent``, ..."""
    status, agents, failing = cap["status"], cap.get("agents"), cap.get("first_failing_agents")
    if status == CapacityStatus.FOUND:
        return f"fails at {failing:,}"
    if status == CapacityStatus.NONE_PASSED:
        return f"fails already at {agents_words(failing)}"
    if status == CapacityStatus.NEVER_FAILED:
        return "never failed up to the maximum"
    known = [f"{word} at {agents_words(count)}" for word, count in (("passed", agents), ("failed", failing))
             if count is not None]
    return ", ".join(known) or "no step judged"


def capacity_words(cap: dict) -> str:
    """The one wording of a tier's capacity (a ``TierCapacity.to_dict()`` or report.json's entry):
    ``10 agents (fails at 11)``, ``none (fails already at 1 agent)``, ``incomplete (passed at 4 agents)``."""
    return f"{answer_words(cap)} ({bracket_words(cap)})"


@dataclass(frozen=True)
class TierHeadline:
    """One tier's headline, every number already chosen (report.json's ``capacity`` entry, its steps'
    diagnoses and the ground truth, if any)."""

    tier: str
    label: str
    capacity: dict  # status, agents, first_failing_agents
    per_accelerator: float | None
    per_megawatt: float | None
    power_watts: float | None
    power_basis: str | None  # "measured", or where the nameplate figure came from
    binding: str | None  # the diagnosis at the first failing count: "queueing — 3.2 requests waiting ..."
    truth: str | None  # the ground truth's words, with its verdict band, against the simulator
    spread: str = ""  # where a rerun may land, and how far the server's speed drifted (``spread``)

    @property
    def answer(self) -> str:
        return answer_words(self.capacity)

    @property
    def bracket(self) -> str:
        return bracket_words(self.capacity)

    def normalised_words(self) -> str:
        """``10 per accelerator · 2,594 agents/MW (3.9 kW, measured at the capacity step)``; empty with nothing to normalise by."""
        parts = []
        if self.per_accelerator is not None:
            parts.append(f"{number_words(self.per_accelerator)} per accelerator")
        if self.per_megawatt is not None:
            parts.append(f"{number_words(self.per_megawatt)} agents/MW ({watts_words(self.power_watts)}, "
                         f"{power_basis_words(self.power_basis)})")
        return " · ".join(parts)

    def binding_words(self) -> str:
        failing = self.capacity.get("first_failing_agents")
        return f"at {agents_words(failing)}: {self.binding}" if self.binding and failing else ""

    def lines(self) -> list[str]:
        """The terminal's lines: ``capacity @ LABEL: ANSWER (BRACKET; ground truth ...)``, then the
        normalised numbers and the binding cause, indented."""
        spread = f"; {self.spread}" if self.spread else ""
        truth = f"; ground truth {self.truth}" if self.truth else ""
        lines = [f"capacity @ {self.label}: {self.answer} ({self.bracket}{spread}{truth})"]
        lines += [f"    {words}" for words in (self.normalised_words(), self.binding_words()) if words]
        return lines


def prediction_line(tier: dict) -> str:
    """``predicted @ 20 tok/s, TTFT ≤ 10 s: 24 agents (fails at 25), measured 26 agents (x1.08)``: one
    tier of report.json's ``prediction`` (the twin's answer the search started from)."""
    ratio = tier.get("measured_over_predicted")
    against = f" (x{ratio:.2f})" if ratio else ""
    return (f"predicted @ {tier['label']}: {predicted_words(tier['predicted'])}, measured "
            f"{answer_words(tier['measured'])}{against}")


def predicted_words(predicted: dict) -> str:
    """A prediction's capacity words, with the range its searches found where it is the median of several
    (``--predict-repeats``): ``14 agents (fails at 15); the twin's searches found 12-16``, and the servers
    they ran on where their speed was spread (``--predict-speed-spread``): ``... on servers 0.81-1.23x as slow``."""
    low, high = predicted.get("range") or (None, None)
    if low is None:
        return capacity_words(predicted)
    slower = predicted.get("range_slower")
    on = f" on servers {slower[0]:.2f}-{slower[1]:.2f}x as slow" if slower else ""
    return capacity_words(predicted) + f"; the twin's {range_words(low, high)}{on}"


def range_words(low: int, high: int) -> str:
    """``searches found 12-16`` (``none`` for 0, one number when all agree): what repeated searches answered."""
    return f"searches found {low or 'none'}" + ("" if low == high else f"-{high}")


def power_basis_words(basis: str | None) -> str:
    return "measured at the capacity step" if basis == "measured" else f"nameplate: {basis}" if basis else "basis unknown"


def headlines(report: dict) -> list[TierHeadline]:
    """One headline per tier of a report (report.json's content), in the SLO file's order."""
    truth = (report.get("ground_truth") or {}).get("capacity", {})
    bands = (report.get("ground_truth") or {}).get("bands", {})
    return [TierHeadline(
        tier=name, label=cap["label"], capacity=cap, per_accelerator=cap.get("agents_per_accelerator"),
        per_megawatt=cap.get("agents_per_megawatt"), power_watts=cap.get("power_watts"),
        power_basis=cap.get("power_basis"), binding=_binding(report["steps"], name, cap.get("first_failing_agents")),
        truth=_truth_words(truth[name], bands.get(name)) if name in truth else None,
        spread="; ".join(words for words in (spread_words(cap.get("spread")), drift_words(cap))
                         if words),
    ) for name, cap in report["capacity"].items()]


def _binding(steps: list[dict], tier: str, failing: int | None) -> str | None:
    """The binding cause of ``tier`` at its first failing count: the last step there that diagnosed it
    (a count measured twice, after a load-generator doubt, is said by its later measurement)."""
    found = [d for step in steps if step["agents"] == failing for d in step.get("diagnoses", []) if d["tier"] == tier]
    return found[-1]["text"].removeprefix("why: ") if found else None


def _truth_words(cap: dict, band: dict | None) -> str:
    """``10 agents`` and, where the truth's verdicts are not monotone, where they flip."""
    flips = flip_words(band) if band else None
    return answer_words(cap) + (f", {flips}" if flips else "")


def flip_words(band: dict) -> str | None:
    """``true verdicts flip between 7 and 9 agents``: where a tier's verdict band (``truth.VerdictBand``'s
    dict) is not monotone in agents, any capacity in it as true as another; None where it is."""
    if band["fails_above"] <= band["passes_up_to"]:
        return None
    return f"true verdicts flip between {band['passes_up_to'] + 1} and {band['fails_above']} agents"


def band_words(band: dict) -> str:
    """A verdict band in words: where it flips (:func:`flip_words`), or ``verdicts monotone to 49 agents``
    (every count measured up to there)."""
    return flip_words(band) or f"verdicts monotone to {band['measured_up_to']} agents"
