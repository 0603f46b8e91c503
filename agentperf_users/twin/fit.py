"""Fit the simulator's step-time constants to measured request timings.

The model is the simulator's own roofline (:class:`agentperf_users.simulator.profile.StepCost`, for a dense
model without sliding-window layers), written with the six numbers that price a step::

    step_s = overhead_s + sequence_s * decodes
             + max(weights_s + kv_s_per_token * kv_tokens,                  # memory-bound
                   compute_s_per_token * tokens + attention_s_per_pair * pairs)  # compute-bound

with ``kv_tokens`` the KV the step reads (each decode's context, each prefill chunk's prior context and
new tokens), ``tokens`` the tokens it computes (prefill tokens plus one per decode) and ``pairs`` the
attended (query, key) pairs (prefill pairs plus each decode's context). ``sequence_s`` is work per
decoding sequence outside the roofline (a CPU server's front end streaming each token on the engine's
cores: ``Efficiency.sequence_overhead_ms``; ~0 on a GPU server). An :class:`Observation` is a
measured duration that is a sum of known steps: one decode step (a median inter-token gap), or the
prefill chunks before a first token. A TTFT also holds ``request_latency_s``: what the server does
before its engine sees the request (HTTP, chat template, tokenizer) and the network both ways, which is
no engine step and so is kept out of the profile.

Why piecewise least squares: given which side of the ``max`` each step is on, the model is linear in
the seven numbers, so the fit alternates (assign each step its side under the current numbers, solve a
least squares on relative errors with non-negative numbers) until the sides stop changing, from a few
starting assignments (steps of at least T tokens compute-bound), and keeps the best; timings far
slower than that fit (a stall of a shared machine) are set aside and the rest fitted again. It needs no
dependency beyond numpy, which pandas already brings.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, fields
from typing import Sequence

import numpy as np

from agentperf_users.errors import AgentperfError

MIN_OBSERVATIONS = 8
"""Fewer measured durations than this cannot pin six numbers and leave a residual to judge them by."""
MAX_RMS_RELATIVE = 0.25
"""A fit whose predictions miss the measurements by more (root mean square of relative errors) is no
model of the server: its timings are too noisy, or it is not a batching engine this model describes."""
MAX_SPIKE_SHARE = 0.15
"""At most this share of the timings may be set aside as spikes (see :func:`fit`)."""
SPIKE_MIN_RELATIVE = 0.15
SPIKE_MEDIANS = 4.0
START_THRESHOLDS_TOKENS = (32, 128, 512, 2048, 8192, math.inf)
MAX_ITERATIONS = 30


class FitError(AgentperfError):
    """The probe's data cannot be fitted (too few points, or too noisy); the message says which and what to do."""


@dataclass(frozen=True)
class StepWork:
    """The work of one engine step, in the terms of ``Profile.step_time_s``; ``repeat`` such steps alike (a
    run's decode phase is hundreds of steps at one mean load, :mod:`agentperf_users.twin.from_run`; a
    fraction is the expected share of a step, e.g. the half step a request arriving mid-step waits).
    A run's mean loads are not whole numbers: the fields are numbers of tokens or sequences, on average."""

    prefill_tokens: float = 0
    prefill_context_tokens: float = 0
    prefill_attention_pairs: float = 0
    decode_batch: float = 0
    decode_context_tokens: float = 0
    repeat: float = 1

    @property
    def kv_tokens(self) -> int:
        return self.decode_context_tokens + self.prefill_context_tokens + self.prefill_tokens

    @property
    def tokens(self) -> int:
        return self.prefill_tokens + self.decode_batch

    @property
    def pairs(self) -> int:
        return self.prefill_attention_pairs + self.decode_context_tokens


@dataclass(frozen=True)
class Observation:
    """A measured duration that is the sum of ``steps`` (plus the request latency when ``kind`` is ttft)."""

    kind: str  # "ttft" (client: request latency + prefill steps), "prefill" (engine clock: the steps) or "itl" (a decode step)
    label: str  # what the probe did, for the sidecar and the messages
    steps: tuple[StepWork, ...]
    measured_s: float
    weight: float = 1.0
    """How much its relative error counts in the least squares: 1 for a probe's timings; a run's weigh each
    kind by the inverse of its variance (a TTFT that waited part of a step is noisier than a decode phase)."""

    def to_dict(self) -> dict:
        return {"kind": self.kind, "label": self.label, "measured_s": self.measured_s, "weight": self.weight,
                "steps": [asdict(step) for step in self.steps]}

    @classmethod
    def from_dict(cls, data: dict) -> Observation:
        return cls(data["kind"], data["label"], tuple(StepWork(**step) for step in data["steps"]),
                   float(data["measured_s"]), float(data.get("weight", 1.0)))


@dataclass(frozen=True)
class StepConstants:
    """The fitted numbers (see the module docstring), in seconds."""

    overhead_s: float
    weights_s: float
    kv_s_per_token: float
    compute_s_per_token: float
    attention_s_per_pair: float
    request_latency_s: float = 0.0
    sequence_s: float = 0.0

    def memory_s(self, work: StepWork) -> float:
        return self.weights_s + self.kv_s_per_token * work.kv_tokens

    def compute_s(self, work: StepWork) -> float:
        return self.compute_s_per_token * work.tokens + self.attention_s_per_pair * work.pairs

    def step_s(self, work: StepWork) -> float:
        return self.overhead_s + self.sequence_s * work.decode_batch + max(self.memory_s(work), self.compute_s(work))

    def predict_s(self, observation: Observation) -> float:
        latency = self.request_latency_s if observation.kind == "ttft" else 0.0
        return latency + sum(self.step_s(step) * step.repeat for step in observation.steps)

    def to_dict(self) -> dict:
        return asdict(self)

    def per_token_of(self, scale: float) -> StepConstants:
        """The same costs counted in another tokenizer's tokens, ``scale`` server tokens each: per-token
        costs ``scale`` times, per-pair costs ``scale ** 2`` times, per-step costs unchanged."""
        return StepConstants(self.overhead_s, self.weights_s, self.kv_s_per_token * scale,
                             self.compute_s_per_token * scale, self.attention_s_per_pair * scale**2,
                             self.request_latency_s, self.sequence_s)

    def ratios_to(self, other: StepConstants) -> dict[str, float | None]:
        """Each number of ``self`` over ``other``'s (None where ``other``'s is 0)."""
        return {f.name: (getattr(self, f.name) / getattr(other, f.name) if getattr(other, f.name) else None)
                for f in fields(self)}


@dataclass(frozen=True)
class FitResult:
    constants: StepConstants
    observations: tuple[Observation, ...]  # the usable ones, in order
    relative_residuals: tuple[float, ...]  # (predicted - measured) / measured, one per observation, in order
    memory_bound_steps: int
    compute_bound_steps: int
    spikes: frozenset[int] = frozenset()  # indices of the observations set aside as spikes (not fitted)

    @property
    def fitted_residuals(self) -> list[float]:
        return [r for i, r in enumerate(self.relative_residuals) if i not in self.spikes]

    @property
    def rms_relative(self) -> float:
        fitted = self.fitted_residuals
        return math.sqrt(sum(r * r for r in fitted) / len(fitted))

    @property
    def max_relative(self) -> float:
        return max(abs(r) for r in self.fitted_residuals)


def fit(observations: Sequence[Observation], max_rms_relative: float = MAX_RMS_RELATIVE) -> FitResult:
    """The constants that best explain ``observations``; :class:`FitError` when too few or too noisy."""
    usable = [obs for obs in observations if obs.measured_s > 0 and math.isfinite(obs.measured_s) and obs.steps]
    if len(usable) < MIN_OBSERVATIONS:
        raise FitError(f"the probe measured {len(usable)} usable timings, the fit needs at least {MIN_OBSERVATIONS}: "
                       "run calibrate with a larger --design (or check that the server streams tokens)")
    best = _best_fit(usable)
    spikes = _spikes(best.relative_residuals)
    if spikes:
        kept = _best_fit([obs for i, obs in enumerate(usable) if i not in spikes])
        residuals = tuple((kept.constants.predict_s(obs) - obs.measured_s) / obs.measured_s for obs in usable)
        best = FitResult(kept.constants, tuple(usable), residuals, kept.memory_bound_steps, kept.compute_bound_steps,
                         spikes)
    if best.rms_relative > max_rms_relative:
        raise FitError(f"the fit misses the measured timings by {best.rms_relative:.0%} (root mean square, more than "
                       f"{max_rms_relative:.0%}): the server's timings are too noisy to calibrate from; run calibrate "
                       "again on an otherwise idle server and load generator (or with a larger --design)")
    return best


def _best_fit(observations: Sequence[Observation]) -> FitResult:
    return min((_fit_from(observations, threshold) for threshold in START_THRESHOLDS_TOKENS), key=_score)


def _spikes(residuals: Sequence[float]) -> frozenset[int]:
    """Timings much *slower* than the fit (another process took the server's core for a while: interference
    only ever adds time), at most ``MAX_SPIKE_SHARE`` of them, the slowest first; set aside and refitted
    without, so one stall does not bend every constant. Timings faster than the model are never dropped."""
    typical = sorted(abs(r) for r in residuals)[len(residuals) // 2]
    limit = max(SPIKE_MIN_RELATIVE, SPIKE_MEDIANS * typical)
    slow = sorted((r, i) for i, r in enumerate(residuals) if r < -limit)
    return frozenset(i for _, i in slow[:int(MAX_SPIKE_SHARE * len(residuals))])


def _score(result: FitResult) -> float:
    return sum(obs.weight * r * r for obs, r in zip(result.observations, result.relative_residuals))


def _fit_from(observations: Sequence[Observation], threshold_tokens: float) -> FitResult:
    """Alternate side assignment and least squares, from "steps of >= threshold tokens are compute-bound"."""
    sides = [[step.tokens >= threshold_tokens for step in obs.steps] for obs in observations]
    constants = _solve(observations, sides)
    for _ in range(MAX_ITERATIONS):
        new_sides = [[constants.compute_s(step) > constants.memory_s(step) for step in obs.steps] for obs in observations]
        if new_sides == sides:
            break
        sides = new_sides
        constants = _solve(observations, sides)
    residuals = tuple((constants.predict_s(obs) - obs.measured_s) / obs.measured_s for obs in observations)
    compute = sum(constants.compute_s(step) > constants.memory_s(step) for obs in observations for step in obs.steps)
    total = sum(len(obs.steps) for obs in observations)
    return FitResult(constants, tuple(observations), residuals, total - compute, compute)


def _solve(observations: Sequence[Observation], sides: Sequence[Sequence[bool]]) -> StepConstants:
    """Non-negative least squares on relative errors, for the given sides (True: compute-bound)."""
    rows = []
    for obs, obs_sides in zip(observations, sides):
        row = np.zeros(7)  # overhead, weights, kv per token, compute per token, per pair, request latency, per sequence
        for step, compute_bound in zip(obs.steps, obs_sides):
            repeat = step.repeat
            row[0] += repeat
            row[6] += step.decode_batch * repeat
            if compute_bound:
                row[3] += step.tokens * repeat
                row[4] += step.pairs * repeat
            else:
                row[1] += repeat
                row[2] += step.kv_tokens * repeat
        row[5] = obs.kind == "ttft"
        # every observation's error counts relative to its size, times the square root of its weight
        rows.append(row / obs.measured_s * math.sqrt(obs.weight))
    matrix = np.array(rows)
    target = np.sqrt([obs.weight for obs in observations])
    return StepConstants(*_nonnegative_lstsq(matrix, target))


def _nonnegative_lstsq(matrix: np.ndarray, target: np.ndarray) -> list[float]:
    """Least squares with every coefficient >= 0: columns whose coefficient comes out negative are dropped
    (fixed at 0), most negative first, and the rest solved again (a small active-set method; the six
    columns make it exact enough). Columns are scaled to unit norm first, as their units differ by 1e7."""
    norms = np.linalg.norm(matrix, axis=0)
    free = [j for j in range(matrix.shape[1]) if norms[j] > 0]
    solution = np.zeros(matrix.shape[1])
    while free:
        scaled = matrix[:, free] / norms[free]
        coefficients, *_ = np.linalg.lstsq(scaled, target, rcond=None)
        values = coefficients / norms[free]
        if (values >= 0).all():
            solution[free] = values
            break
        free.pop(int(np.argmin(coefficients)))
    return [float(v) for v in solution]


MIN_FRONT_END_POINTS = 4
"""Agent-shaped timings needed to fit a line (a fixed cost and a cost per token) and see its scatter."""
FRONT_END_SPIKE_S = 0.005
"""A front-end timing this much (or ``SPIKE_MEDIANS`` typical residuals, if more) slower than the line is a
stall of the shared machine, set aside like the step fit's spikes."""


@dataclass(frozen=True)
class FrontEndFit:
    """A server's per-request front-end work (``Efficiency.frontend_ms`` and ``frontend_ms_per_1k_tokens``):
    ``fixed_s + per_token_s * prompt_tokens``, fitted to (prompt tokens, seconds) points."""

    fixed_s: float
    per_token_s: float
    points: tuple[tuple[int, float], ...]
    spikes: frozenset[int] = frozenset()
    rms_s: float = 0.0  # root mean square of the kept points' residuals

    def predict_s(self, prompt_tokens: float) -> float:
        return self.fixed_s + self.per_token_s * prompt_tokens

    def per_token_of(self, scale: float) -> FrontEndFit:
        """The same cost counted in another tokenizer's tokens, ``scale`` server tokens each."""
        return FrontEndFit(self.fixed_s, self.per_token_s * scale, self.points, self.spikes, self.rms_s)


def fit_front_end(points: Sequence[tuple[int, float]]) -> FrontEndFit | None:
    """The line under the front-end timings (non-negative least squares on absolute errors: a few ms each,
    so relative errors would make the noisiest, smallest ones count most), with the much slower ones set
    aside as stalls and the rest fitted again; None where there are too few points or one length only."""
    usable = [(n, s) for n, s in points if n > 0 and math.isfinite(s)]
    if len(usable) < MIN_FRONT_END_POINTS or len({n for n, _ in usable}) < 2:
        return None
    first = _line(usable)
    residuals = [s - first.predict_s(n) for n, s in usable]
    typical = sorted(abs(r) for r in residuals)[len(residuals) // 2]
    limit = max(FRONT_END_SPIKE_S, SPIKE_MEDIANS * typical)
    slow = sorted(((r, i) for i, r in enumerate(residuals) if r > limit), reverse=True)
    spikes = frozenset(i for _, i in slow[:int(MAX_SPIKE_SHARE * len(usable))])
    kept = [point for i, point in enumerate(usable) if i not in spikes]
    line = _line(kept) if spikes else first
    rms = math.sqrt(sum((s - line.predict_s(n)) ** 2 for n, s in kept) / len(kept))
    return FrontEndFit(line.fixed_s, line.per_token_s, tuple(usable), spikes, rms)


def _line(points: Sequence[tuple[int, float]]) -> FrontEndFit:
    matrix = np.array([[1.0, float(n)] for n, _ in points])
    fixed, per_token = _nonnegative_lstsq(matrix, np.array([s for _, s in points]))
    return FrontEndFit(fixed, per_token, tuple(points))


def token_scale(sizes: Sequence[tuple[int, int]]) -> float:
    """The slope of the server's prompt count over agentperf's (least squares with an intercept: a template
    preamble costs every prompt alike); 1 where the counts agree or there is no spread to draw a line."""
    if all(ours == theirs for ours, theirs in sizes) or len(sizes) < 2:
        return 1.0
    mean_ours = statistics.fmean(o for o, _ in sizes)
    mean_theirs = statistics.fmean(t for _, t in sizes)
    spread = sum((o - mean_ours) ** 2 for o, _ in sizes)
    if spread == 0:
        return 1.0
    return sum((o - mean_ours) * (t - mean_theirs) for o, t in sizes) / spread
