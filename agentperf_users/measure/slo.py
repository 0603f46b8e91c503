"""SLO tiers, and whether a set of request records meets them.

A tier pairs a TTFT ceiling with a per-request output-speed floor (AA-AgentPerf's "20 tok/s, TTFT
≤ 10 s"). Every verdict (live on the master, recomputed from the record files after the run, and in
the ground truth) comes from the functions here, so the three can only disagree if their inputs do.

Quantiles are **nearest-rank**: the q-quantile of n values is the k-th smallest, k = ceil(q·n). Unlike
interpolating methods it always returns an observed value (so a failed request's infinite TTFT shows
up as ``inf`` instead of poisoning a blend), and it reads as attainment: "p95 TTFT ≤ 10 s" holds
exactly when at least ceil(0.95·n) requests had TTFT ≤ 10 s. The speed floor is judged on the low
tail by the same function applied to the negated speeds, so "p5 output speed ≥ 20 tok/s" holds
exactly when at least ceil(0.95·n) requests ran at ≥ 20 tok/s: both criteria tolerate the same
number of misses.

What counts:

* a failed request (status other than ``ok``) is a miss for both criteria: TTFT = inf, speed = 0;
* an ``ok`` request without a first token (``ttft_s`` is None) is a TTFT miss;
* an ``ok`` request without a speed (one output token, or every token in one chunk, so
  ``output_tps`` is None) is left out of the speed quantile but counts for TTFT; when no request in
  the set has a speed, the speed criterion is not applicable and only TTFT decides;
* a set with no requests at all fails (nothing was shown to meet the tier);
* an agent's cold join (its first request in a load step, sending the whole conversation so far with
  nothing cached) is never in a window's set: ``records_in_window``;
* separately, the step fails a tier when its error rate exceeds ``max_error_rate``.

Scope ``request`` judges the pooled requests. Scope ``agent`` judges each agent on its own requests
(same quantiles) and passes when at least ``agents_passing`` of the agents that completed a request
pass; an agent with no completed request in the set is not judged (its verdict is unknown, not good).

Every verdict also carries a **margin**: how far inside (> 0) or outside (< 0) the quantile criteria
the step was, as the natural log of the binding criterion's ratio (``ln(ttft_max / TTFT quantile)``
or ``ln(speed quantile / speed_min)``, the smaller); in agent scope, the margin that ``agents_passing``
of the agents reach. Its sign is the quantile criteria's verdict, and its size is what lets the
capacity search interpolate where a tier breaks instead of only bisecting (``search``).
"""

from __future__ import annotations

import math
import os
import random
from collections import defaultdict
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

from agentperf_users.bounded import (
    InputError,
    is_single_line_text,
    load_yaml,
    one_line,
    read_text,
    short,
)
from agentperf_users.errors import AgentperfError
from agentperf_users.measure.records import RequestRecord, Status, read_records

SCOPES = ("request", "agent")
DEFAULT_SLO_FILE = "slo-default.yaml"
SLO_PRESETS = {"default": DEFAULT_SLO_FILE, "aa-agentperf": "slo-aa-agentperf.yaml"}
"""Bundled tier files by name (``--slo aa-agentperf``); a file of that name in the working folder wins."""
_RANK_DIGITS = 9  # q·n is rounded before ceil so that 0.95 * 100 is rank 95, not 96


def quantile(values: Sequence[float], q: float) -> float:
    """Nearest-rank q-quantile: the ceil(q·n)-th smallest value (1-based). ``values`` is non-empty."""
    ordered = sorted(values)
    return ordered[_rank(len(ordered), q) - 1]


def low_quantile(values: Sequence[float], q: float) -> float:
    """The (1 - q) tail judged like the upper one: -quantile(-values, q), the value at least
    ceil(q·n) of the values reach or exceed."""
    return -quantile([-value for value in values], q)


def _rank(n: int, q: float) -> int:
    return max(1, math.ceil(round(q * n, _RANK_DIGITS)))


def percentile_label(q: float) -> str:
    """``0.95`` -> ``p95``; ``0.999`` -> ``p99.9``."""
    return f"p{round(q * 100, 6):g}"


@dataclass(frozen=True)
class SloTier:
    """One tier: a TTFT ceiling and an output-speed floor, judged at ``quantile`` over ``scope``."""

    name: str
    ttft_max_s: float
    output_tps_min: float
    quantile: float = 0.95
    scope: str = "request"  # "request" or "agent"
    agents_passing: float = 0.95  # agent scope: fraction of judged agents that must pass
    max_error_rate: float = 0.01

    @property
    def label(self) -> str:
        return tier_label(self.output_tps_min, self.ttft_max_s)


def tier_label(output_tps_min: float, ttft_max_s: float) -> str:
    """How a tier is shown (and named when its file gives no name): ``20 tok/s, TTFT ≤ 10 s``."""
    return f"{output_tps_min:g} tok/s, TTFT ≤ {ttft_max_s:g} s"


@dataclass(frozen=True)
class SloSpec:
    """The tiers a capacity search reports, in file order."""

    source: str
    tiers: tuple[SloTier, ...]

    def tier(self, name: str) -> SloTier:
        return next(tier for tier in self.tiers if tier.name == name)


@dataclass(frozen=True)
class TierVerdict:
    """One tier's verdict on one set of records, with the numbers it was decided on.

    ``ttft_quantile_s`` and ``output_tps_quantile`` are pooled over all requests in the set for both
    scopes (the numbers a person reads); in agent scope the pass/fail comes from the agent counts."""

    tier: SloTier
    passed: bool
    requests: int
    errors: int
    error_rate: float
    ttft_quantile_s: float | None  # None: no requests; inf: too many misses to have a finite value
    output_tps_quantile: float | None  # the low tail; None: no request had a speed
    agents_judged: int | None  # agent scope only
    agents_passed: int | None
    agents_passed_fraction: float | None
    reasons: tuple[str, ...]  # why it failed; empty when it passed
    margin: float | None = None  # >= 0 exactly when the quantile criteria hold (module docstring); None: no requests

    def to_dict(self) -> dict:
        return {
            "tier": self.tier.name,
            "label": self.tier.label,
            "passed": self.passed,
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": self.error_rate,
            "ttft_quantile_s": _json_number(self.ttft_quantile_s),
            "output_tps_quantile": self.output_tps_quantile,
            "agents_judged": self.agents_judged,
            "agents_passed": self.agents_passed,
            "agents_passed_fraction": self.agents_passed_fraction,
            "reasons": list(self.reasons),
            "margin": _json_number(self.margin),
        }


def ttft_text(verdict: TierVerdict) -> str:
    """``p95 1.23 s``: the TTFT a tier's verdict was decided on (progress lines, the web UI)."""
    value = "-" if verdict.ttft_quantile_s is None else f"{verdict.ttft_quantile_s:.3g} s"
    return f"{percentile_label(verdict.tier.quantile)} {value}"


def speed_text(verdict: TierVerdict) -> str:
    """``p5 31.2 tok/s``: the output speed a tier's verdict was decided on."""
    value = "-" if verdict.output_tps_quantile is None else f"{verdict.output_tps_quantile:.3g} tok/s"
    return f"{percentile_label(1 - verdict.tier.quantile)} {value}"


@dataclass(frozen=True)
class StepVerdict:
    """Every tier's verdict on the same set of records (one load step's measurement window)."""

    tiers: tuple[TierVerdict, ...]

    @property
    def passed(self) -> bool:
        return all(verdict.passed for verdict in self.tiers)

    def tier(self, name: str) -> TierVerdict:
        return next(verdict for verdict in self.tiers if verdict.tier.name == name)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "tiers": [verdict.to_dict() for verdict in self.tiers]}


def _json_number(value: float | None) -> float | str | None:
    """JSON has no infinities: they are written as the strings ``inf`` and ``-inf``."""
    if value is not None and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def _ttft(record: RequestRecord) -> float:
    return record.ttft_s if record.ok and record.ttft_s is not None else math.inf


def _speed(record: RequestRecord) -> float | None:
    return record.output_tps if record.ok else 0.0


def _speeds(records: Iterable[RequestRecord]) -> list[float]:
    return [speed for speed in map(_speed, records) if speed is not None]


def _log_ratio(numerator: float, denominator: float) -> float:
    """ln(numerator / denominator) for non-negative values, with 0 and inf at either end allowed."""
    if numerator == denominator:
        return 0.0
    if numerator == 0 or math.isinf(denominator):
        return -math.inf
    if denominator == 0 or math.isinf(numerator):
        return math.inf
    return math.log(numerator / denominator)


def _criteria_margin(ttft_q: float, speed_q: float | None, tier: SloTier) -> float:
    """The pooled criteria's margin: >= 0 exactly when TTFT quantile <= max and speed quantile >= min."""
    ttft_margin = _log_ratio(tier.ttft_max_s, ttft_q)
    return ttft_margin if speed_q is None else min(ttft_margin, _log_ratio(speed_q, tier.output_tps_min))


def _margin(records: Sequence[RequestRecord], tier: SloTier) -> float:
    """The per-request criteria's margin over ``records`` (non-empty): >= 0 exactly when they meet them."""
    speeds = _speeds(records)
    ttft_q = quantile([_ttft(r) for r in records], tier.quantile)
    return _criteria_margin(ttft_q, low_quantile(speeds, tier.quantile) if speeds else None, tier)


def evaluate(records: Iterable[RequestRecord], tier: SloTier) -> TierVerdict:
    """Whether ``records`` (typically those completed in one step's window) meet ``tier``."""
    records = list(records)
    errors = sum(not record.ok for record in records)
    error_rate = errors / len(records) if records else 0.0
    speeds = _speeds(records)
    ttft_q = quantile([_ttft(r) for r in records], tier.quantile) if records else None
    speed_q = low_quantile(speeds, tier.quantile) if speeds else None
    agents_judged = agents_passed = fraction = margin = None
    reasons = []
    if not records:
        reasons.append("no request completed in the window")
    if error_rate > tier.max_error_rate:
        reasons.append(f"error rate {error_rate:.1%} > {tier.max_error_rate:.1%}")
    if tier.scope == "request" and records:
        margin = _criteria_margin(ttft_q, speed_q, tier)
        if ttft_q > tier.ttft_max_s:
            reasons.append(f"TTFT {percentile_label(tier.quantile)} {ttft_q:.3g} s > {tier.ttft_max_s:g} s")
        if speed_q is not None and speed_q < tier.output_tps_min:
            low = percentile_label(1 - tier.quantile)
            reasons.append(f"output speed {low} {speed_q:.3g} tok/s < {tier.output_tps_min:g} tok/s")
    if tier.scope == "agent" and records:
        margins = [_margin(agent_records, tier) for agent_records in _by_agent(records).values()]
        agents_judged = len(margins)
        agents_passed = sum(agent_margin >= 0 for agent_margin in margins)
        fraction = agents_passed / agents_judged
        margin = low_quantile(margins, tier.agents_passing)
        if fraction < tier.agents_passing:
            reasons.append(
                f"{agents_passed}/{agents_judged} agents meet the tier, {tier.agents_passing:.0%} needed"
            )
    return TierVerdict(
        tier=tier,
        passed=not reasons,
        requests=len(records),
        errors=errors,
        error_rate=error_rate,
        ttft_quantile_s=ttft_q,
        output_tps_quantile=speed_q,
        agents_judged=agents_judged,
        agents_passed=agents_passed,
        agents_passed_fraction=fraction,
        reasons=tuple(reasons),
        margin=margin,
    )


def evaluate_step(records: Iterable[RequestRecord], spec: SloSpec) -> StepVerdict:
    records = list(records)
    return StepVerdict(tuple(evaluate(records, tier) for tier in spec.tiers))


def recompute(
    records_dir: str | os.PathLike,
    windows: Sequence[tuple[float, float]],
    spec: SloSpec,
    run_id: str | None = None,
) -> list[StepVerdict]:
    """Judge each ``(start, end)`` window (records that ended in ``[start, end)``) again from the
    per-process record files, of ``run_id`` when given, as the live search judged it from the
    records the master aggregated. No Locust here: the report and the ground truth use it."""
    records = [r for r in read_records([Path(records_dir)]) if run_id is None or r.run_id == run_id]
    return [evaluate_step(records_in_window(records, start, end), spec) for start, end in windows]


def records_in_window(records: Iterable[RequestRecord], start_epoch_s: float, end_epoch_s: float) -> list[RequestRecord]:
    """The requests a window judges: those that *ended* in ``[start, end)``, but no agent's cold join
    (``RequestRecord.cold_join``): like the warm-up, it is the step getting to its steady state, and
    with long contexts it often ends after the warm-up. Nor a request the load generator cancelled (its
    step ended under it): that is no answer of the server's."""
    return [record for record in records if start_epoch_s <= record.end_epoch_s < end_epoch_s and not record.cold_join
            and record.status is not Status.CANCELLED]


def _by_agent(records: Iterable[RequestRecord]) -> dict[int, list[RequestRecord]]:
    groups: dict[int, list[RequestRecord]] = defaultdict(list)
    for record in records:
        groups[record.agent].append(record)
    return groups


@dataclass(frozen=True)
class _AgentDraw:
    """One agent of a step, as much of it as a verdict needs: what a resample draws, whole."""

    requests: int
    errors: int
    margin: float  # its own criteria's margin (agent scope)
    ttfts: tuple[float, ...]  # its requests' TTFTs and speeds, pooled with the others' (request scope)
    speeds: tuple[float, ...]


def pass_fraction(records: Sequence[RequestRecord], tier: SloTier, resamples: int, seed: int) -> float | None:
    """The share of ``resamples`` bootstrap resamples of the records' agents in which ``tier`` passes;
    None without records. Whole agents are drawn, with replacement, as many as were judged: an agent's
    requests are not independent (one trajectory, one growing context, one place in the batch), so
    drawing requests one by one would understate how much a window's verdict rests on which agents it
    happened to see. Each resample is judged as ``evaluate`` judges (the identity resample gives its
    verdict, tested): error rate, then the quantile criteria, pooled or per agent."""
    draws = [_AgentDraw(len(group), sum(not r.ok for r in group), _margin(group, tier),
                        tuple(_ttft(r) for r in group), tuple(_speeds(group)))
             for group in _by_agent(records).values()]
    if not draws:
        return None
    rng = random.Random(seed)
    passed = sum(_resample_passes([rng.choice(draws) for _ in draws], tier) for _ in range(resamples))
    return passed / resamples


def _resample_passes(sample: Sequence[_AgentDraw], tier: SloTier) -> bool:
    if sum(d.errors for d in sample) / sum(d.requests for d in sample) > tier.max_error_rate:
        return False
    if tier.scope == "agent":
        return sum(d.margin >= 0 for d in sample) / len(sample) >= tier.agents_passing
    speeds = [speed for d in sample for speed in d.speeds]
    ttft_q = quantile([ttft for d in sample for ttft in d.ttfts], tier.quantile)
    return _criteria_margin(ttft_q, low_quantile(speeds, tier.quantile) if speeds else None, tier) >= 0


def surely_fails(records: Sequence[RequestRecord], tier: SloTier, agents: int, extra_fraction: float) -> bool:
    """Whether ``tier`` would still fail if ``extra_fraction`` × len(records) more requests (spread
    over the agents in proportion to what each completed) all met it perfectly.

    This is the early-stop test for a step still in its window: a True answer is a fail that more
    good data can no longer turn around (within that projection). It implies ``evaluate`` fails on
    ``records`` too, since that is the same test without the extra requests. ``agents`` is how many
    agents run in the step (agents not yet judged are assumed to pass)."""
    if not records:
        return False
    extra = math.ceil(len(records) * extra_fraction)
    errors = sum(not record.ok for record in records)
    if errors > tier.max_error_rate * (len(records) + extra):
        return True
    if tier.scope == "request":
        return _short_of_hits(records, tier, extra)
    by_agent = _by_agent(records)
    failing = sum(
        _short_of_hits(agent_records, tier, math.ceil(len(agent_records) * extra_fraction))
        for agent_records in by_agent.values()
    )
    population = max(agents, len(by_agent))
    return (population - failing) / population < tier.agents_passing


def _short_of_hits(records: Sequence[RequestRecord], tier: SloTier, extra: int) -> bool:
    """Too few TTFT or speed hits to reach rank ceil(q·n) even with ``extra`` more hits."""
    ttft_hits = sum(_ttft(record) <= tier.ttft_max_s for record in records)
    if ttft_hits + extra < _rank(len(records) + extra, tier.quantile):
        return True
    speeds = _speeds(records)
    speed_hits = sum(speed >= tier.output_tps_min for speed in speeds)
    return bool(speeds) and speed_hits + extra < _rank(len(speeds) + extra, tier.quantile)


# --- the SLO file -------------------------------------------------------------------------------

_TIER_DEFAULT_KEYS = ("quantile", "scope", "agents_passing", "max_error_rate")
_TOP_LEVEL_KEYS = ("tiers", "defaults")
MAX_SLO_BYTES = 1024 * 1024
"""An SLO file is a few tiers; a larger file is refused unread rather than parsed into memory."""
MAX_SLO_NODES = 10_000
"""YAML values an SLO file may hold with its aliases expanded: an alias bomb fails here, at once."""
MAX_TTFT_S = 86_400.0
"""Longest TTFT ceiling: a day. Beyond it a tier is no latency objective, and 1e300 is a typo."""
MAX_OUTPUT_TPS = 1_000_000.0
"""Highest output-speed floor, tokens/s per request: far above any server, below float trouble."""
MAX_TIER_NAME_CHARS = 100


def load_slo(path: str | Path | None = None) -> SloSpec:
    """Tiers from a YAML file, or a bundled preset by name (``SLO_PRESETS``; ``None``: ``default``)."""
    preset = "default" if path is None else str(path) if str(path) in SLO_PRESETS and not Path(path).exists() else None
    if preset is not None:
        name = SLO_PRESETS[preset]
        resource = resources.files("agentperf_users") / "data" / name
        source, text = f"<bundled {name}>", resource.read_text(encoding="utf-8")
    else:
        source = one_line(str(path))
        try:
            text = read_text(path, MAX_SLO_BYTES)
        except OSError as exc:
            raise AgentperfError(f"{source}: cannot read the SLO file: {exc.strerror or exc}") from None
        except InputError as exc:
            raise AgentperfError(f"{source}: {exc}; expected an SLO file (YAML)") from None
    try:
        data = load_yaml(text, max_nodes=MAX_SLO_NODES, name=source)
    except InputError as exc:
        raise AgentperfError(f"{source}: {exc}") from None
    return parse_slo(data, source)


def parse_slo(data: object, source: str) -> SloSpec:
    """Validate already-parsed YAML. Every problem is one line naming the file and the field."""

    def fail(where: str, message: str) -> AgentperfError:
        return AgentperfError(f"{source}: {where}: {message}")

    if not isinstance(data, dict):
        raise fail("top level", f"expected a mapping with a 'tiers' list, got {type(data).__name__}")
    _reject_unknown(data, _TOP_LEVEL_KEYS, "top level", fail)
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise fail("defaults", f"expected a mapping, got {short(defaults)}")
    _reject_unknown(defaults, _TIER_DEFAULT_KEYS, "defaults", fail)
    tiers_data = data.get("tiers")
    if not isinstance(tiers_data, list) or not tiers_data:
        raise fail("tiers", f"expected a non-empty list of tiers, got {short(tiers_data)}")
    tier_keys = tuple(field.name for field in fields(SloTier))
    tiers = []
    for index, tier_data in enumerate(tiers_data):
        where = f"tiers[{index}]"
        if not isinstance(tier_data, dict):
            raise fail(where, f"expected a mapping, got {short(tier_data)}")
        _reject_unknown(tier_data, tier_keys, where, fail)
        merged = {**defaults, **tier_data}
        for key in ("ttft_max_s", "output_tps_min"):
            if key not in merged:
                raise fail(f"{where}.{key}", "missing (required)")
        values = {}
        for key, value in merged.items():
            origin = f"{where}.{key}" if key in tier_data else f"defaults.{key}"
            values[key] = _checked(key, value, lambda message, origin=origin: fail(origin, message))
        values.setdefault("name", tier_label(values["output_tps_min"], values["ttft_max_s"]))
        tiers.append(SloTier(**values))
    names = [tier.name for tier in tiers]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise fail(f"tiers[{index}].name", f"duplicate tier name {name!r}")
    return SloSpec(source=source, tiers=tuple(tiers))


def _reject_unknown(mapping: dict, allowed: Sequence[str], where: str, fail) -> None:
    for key in mapping:
        if key not in allowed:
            raise fail(where, f"unknown key {short(key)} (expected one of: {', '.join(allowed)})")


def _checked(key: str, value: object, fail) -> object:
    """One field's value, or ``fail`` with what was expected."""
    if key == "name":  # shown in progress lines, reports and metric labels: one printable line
        if not is_single_line_text(value, MAX_TIER_NAME_CHARS):
            raise fail(f"expected a non-empty single line of printable text, at most {MAX_TIER_NAME_CHARS} "
                       f"characters, got {short(value)}")
        return value
    if key == "scope":
        if not isinstance(value, str) or value not in SCOPES:
            raise fail(f"expected one of {', '.join(SCOPES)}, got {short(value)}")
        return value
    expected, accept = _NUMBER_CHECKS[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not accept(value):  # NaN fails accept
        raise fail(f"expected {expected}, got {short(value)}")
    return float(value)


_NUMBER_CHECKS = {
    "ttft_max_s": (f"a positive number of seconds, at most {MAX_TTFT_S:g}", lambda v: 0 < v <= MAX_TTFT_S),
    "output_tps_min": (f"a number >= 0, at most {MAX_OUTPUT_TPS:g}", lambda v: 0 <= v <= MAX_OUTPUT_TPS),
    "quantile": ("a number in (0, 1]", lambda v: 0 < v <= 1),
    "agents_passing": ("a number in (0, 1]", lambda v: 0 < v <= 1),
    "max_error_rate": ("a number in [0, 1]", lambda v: 0 <= v <= 1),
}
