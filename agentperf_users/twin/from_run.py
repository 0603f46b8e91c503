"""Fit points from a finished run's folder (``agentperf calibrate --from-run RUN_DIR``): no traffic at all.

A capacity run's records say, per request, when it was sent, when its first and last tokens came, its
prompt, cached and output tokens. Together they say what the server was doing at any moment: the
requests *decoding* at time t are those whose first token came before t and whose last did not (a
request's context grows linearly from its prompt over its decode phase), and a request's *prefill*
ended with the step that gave its first token. From that timeline:

* **decode points**: one per request with at least ``MIN_DECODE_TOKENS`` tokens. Where its record has
  the median gap between its tokens (``itl_p50_s``: a live run's), that median is one pure decode step at
  the phase's mean decode batch and mean context (time averages): the steps that also carried another
  request's prefill, and the stalls of a shared machine, are the minority a median ignores. Otherwise
  (the truth's records) its decode phase (last token minus first) is ``output_tokens - 1`` engine steps:
  ``k`` of them also carried another request's prefill (each first token of another request inside the
  phase, with that request's uncached prompt tokens), the rest pure decode steps at that mean load.
* **prefill points**, from the server's own prefill clock where the run kept ``server_metrics.jsonl``
  with vLLM's ``request_prefill_time`` histogram: vLLM observes a request's prefill time when the request
  *finishes*, so between two readings the increase of the histogram's sum is the sum of the prefill
  times of the requests that ended (normally) between them (a window is used only when the records
  count exactly the histogram's increase of count); each is the step(s) that computed its uncached
  tokens, with those of the requests whose first tokens came in the same step, beside the decodes
  running then. No HTTP, tokenizer or queue time in it.
* **TTFT points** where there is no prefill clock: a request's TTFT is the request's latency outside the
  engine (fitted, as the probe's is), the rest of the step in progress when it arrived (half a step at
  the load then, on average: ``repeat`` 0.5) and its prefill step(s). Requests that arrived while the
  sequence slots were full, or whose TTFT is over ``QUEUED_FACTOR`` times what a first fit gives its
  steps (they queued, for blocks or budget), are left out, and each kind of point weighs by the inverse
  of its variance in that first fit (:func:`refine`).

What a run cannot say: the KV cache's size (unless the run filled it, which a capacity run at the knee
rarely does, and even then only as a bound), ``max_num_seqs``, the token budget per step and the context
limit; those come from the probe (``--from-probe``) or the options, and the output says so. Prompt
tokens are the server's (usage), and the profile is priced per agentperf token (what ``predict`` counts
in its trajectories): the server's tokens per agentperf token are the slope of the records' server counts
over agentperf's own (``counted_prompt_tokens``; 1.21 on the engine tests' tiny Llama). Records
from before agentperf kept its own count give none: the profile is then priced per server token.

Approximations (measured on the virtual clock, ``benchmarks/twin_accuracy.py --part c``): a phase's load
is its time average, not each step's; requests whose first tokens came in one step are one step only
when their first-token times agree within ``SAME_STEP_S``.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from agentperf_users.errors import AgentperfError
from agentperf_users.files import RECORDS_DIR, read_json_object
from agentperf_users.measure import server_metrics
from agentperf_users.measure.records import RequestRecord, Status, read_records
from agentperf_users.simulator.profile import attention_pairs
from agentperf_users.twin.fit import Observation, StepConstants, StepWork, token_scale

MIN_DECODE_TOKENS = 8
"""A decode phase of fewer tokens has too few steps for its mean step to say much (and its load average
is of a moment)."""
SAME_STEP_S = 1e-3
"""First tokens this close together came from one engine step (a step takes milliseconds; the chunks of
one step leave the server together)."""
PREFILL_HISTOGRAM = "prefill_time"
DECODE_KINDS = ("decode", "itl")  # a decode phase's sum of steps, or its median gap
QUEUED_FACTOR = 2.0
"""A TTFT more than this many times what a first fit says its steps take waited in the queue (for a
sequence slot, KV blocks or the token budget): queueing only ever adds time, and it is not step cost."""
MIN_MEAN_SQUARE = 1e-4
"""A kind's residuals count as at least 1 % RMS when weighing it (an exact kind would weigh infinitely)."""


MIN_CACHE_REPORTS = 20
"""Requests with a cached-token count, none a hit, that say a server does not cache prefixes: an agent's
second turn already resends its first, so a caching server hits within any agent's first turns."""


@dataclass(frozen=True)
class RunPoints:
    """What a run folder gave the fit, and what it says about the run's reach."""

    observations: tuple[Observation, ...]
    requests: int  # ok requests read
    prefill_source: str  # where the prefill points came from
    max_decode_batch: int  # most requests decoding at once
    decode_batch_range: tuple[float, float]  # mean decode batch of the decode points, min and max
    prefill_tokens_range: tuple[int, int]  # uncached prompt tokens per request, min and max
    token_scale: float | None = None  # the server's prompt tokens per agentperf token; None: records without ours
    scale_requests: int = 0  # the requests it was drawn from
    cache_reported: int = 0  # ok requests whose server said how many of their prompt tokens were cached
    cache_hits: int = 0  # of those, the requests with any

    def prefix_caching(self) -> str:
        """What the run says of the server's prefix caching: ``on`` where a request hit the cache; ``off`` where
        at least :data:`MIN_CACHE_REPORTS` requests had their cached tokens reported and none hit (an agent
        resends its conversation every turn, so a caching server hits within a few turns); else ``unknown``."""
        if self.cache_hits:
            return "on"
        if self.cache_reported >= MIN_CACHE_REPORTS:
            return f"off (the server reported no cached token on any of {self.cache_reported} requests of the run)"
        return "unknown"


@dataclass(frozen=True)
class _Timed:
    """A request with a first token: sent ``start``, first token ``first``, last ``end`` (epoch seconds)."""

    record: RequestRecord
    start: float
    first: float
    end: float
    new_tokens: int  # its prompt tokens computed (uncached; at least the last one)
    cached: int


class _Timeline:
    """Every request's decode phase, as numpy arrays, to ask the mean load over any interval."""

    def __init__(self, timed: Sequence[_Timed]) -> None:
        self.start = np.array([t.start for t in timed])
        self.first = np.array([t.first for t in timed])
        self.end = np.array([t.end for t in timed])
        self.context0 = np.array([t.new_tokens + t.cached + 1.0 for t in timed])
        tokens = np.array([max(t.record.output_tokens - 1, 0) for t in timed], dtype=float)
        span = self.end - self.first
        self.rate = np.divide(tokens, span, out=np.zeros_like(span), where=span > 0)

    def mean_load(self, lo: float, hi: float) -> tuple[float, float]:
        """Mean decode batch and mean decode context (tokens summed over the batch) over ``(lo, hi]``."""
        if hi <= lo:
            return self.load_at(hi)
        start = np.maximum(self.first, lo)
        stop = np.minimum(self.end, hi)
        inside = stop > start
        start, stop = start[inside], stop[inside]
        first, c0, rate = self.first[inside], self.context0[inside], self.rate[inside]
        overlap = stop - start
        context = c0 * overlap + rate * ((stop - first) ** 2 - (start - first) ** 2) / 2
        return float(overlap.sum() / (hi - lo)), float(context.sum() / (hi - lo))

    def load_at(self, t: float) -> tuple[float, float]:
        """Decode batch and context of the step that ends at ``t`` (requests whose first token came
        before it and whose last came with it or later)."""
        decoding = (self.first < t - SAME_STEP_S) & (self.end >= t - SAME_STEP_S)
        context = self.context0[decoding] + self.rate[decoding] * (t - self.first[decoding])
        return float(decoding.sum()), float(context.sum())

    def in_flight(self, t: float) -> int:
        """Requests sent before ``t`` and not ended by it (decoding, prefilling or queued)."""
        return int(((self.start < t) & (self.end > t)).sum())

    def max_batch(self) -> int:
        events = sorted([(f, 1) for f in self.first] + [(e, -1) for e in self.end])
        running = peak = 0
        for _, change in events:
            running += change
            peak = max(peak, running)
        return peak


def read_run_points(folder: Path, budget_tokens: int, max_num_seqs: int) -> RunPoints:
    """The fit points of a run folder (module docstring); one line naming the folder when it has none."""
    records_dir = folder / RECORDS_DIR
    if not records_dir.is_dir():
        raise AgentperfError(f"--from-run {folder}: no {RECORDS_DIR}/ folder; expected the folder of an agentperf "
                             "capacity run")
    records = read_records([records_dir])
    timed = [t for t in map(_timed, records) if t is not None]
    ok = [t for t in timed if t.record.status is Status.OK]
    if not ok:
        raise AgentperfError(f"--from-run {folder}: the run has no request that ended with tokens "
                             f"({len(records)} records); nothing to fit")
    timeline = _Timeline(timed)
    groups = _first_token_groups(timed)
    group_times = [group[0].first for group in groups]
    decode = [obs for t in ok if (obs := _decode_point(t, timeline, groups, group_times, budget_tokens)) is not None]
    samples = server_metrics.read_samples(folder / server_metrics.SERVER_METRICS_FILE)
    by_request = {id(t): group for group in groups for t in group}
    prefill = _clock_points(samples, ok, by_request, timeline, budget_tokens)
    source = f"the server's prefill clock ({server_metrics.SERVER_METRICS_FILE})"
    if not prefill:
        source = "client TTFTs (no prefill clock in the run)"
        prefill = [obs for t in ok if (obs := _ttft_point(t, by_request[id(t)], timeline, budget_tokens, max_num_seqs))]
    batches = [obs.steps[0].decode_batch for obs in decode] or [0.0]  # (a decode point's first step is its pure one)
    news = [t.new_tokens for t in ok]
    sizes = [(r.counted_prompt_tokens, r.prompt_tokens) for r in (t.record for t in ok) if r.counted_prompt_tokens]
    reported = [t for t in ok if t.record.cached_tokens is not None]
    return RunPoints(tuple(decode + prefill), len(ok), source, timeline.max_batch(), (min(batches), max(batches)),
                     (min(news), max(news)), token_scale(sizes) if len(sizes) >= 2 else None, len(sizes),
                     len(reported), sum(t.record.cached_tokens > 0 for t in reported))


def _timed(record: RequestRecord) -> _Timed | None:
    if record.ttft_s is None or record.output_tokens < 1 or not record.prompt_tokens:
        return None
    if record.status not in (Status.OK, Status.CANCELLED):
        return None
    first = record.start_epoch_s + record.ttft_s
    cached = min(record.cached_tokens or 0, record.prompt_tokens - 1)
    return _Timed(record, record.start_epoch_s, first, max(record.end_epoch_s, first), record.prompt_tokens - cached,
                  cached)


def _first_token_groups(timed: Sequence[_Timed]) -> list[list[_Timed]]:
    """Requests whose first tokens came from one step (within ``SAME_STEP_S``), in time order."""
    groups: list[list[_Timed]] = []
    for t in sorted(timed, key=lambda t: t.first):
        if groups and t.first - groups[-1][-1].first <= SAME_STEP_S:
            groups[-1].append(t)
        else:
            groups.append([t])
    return groups


def _prefill_steps(group: Sequence[_Timed], batch: float, context: float, budget_tokens: int) -> list[StepWork]:
    """The steps that computed a group's prompts: earlier chunks of a prompt over the budget on their own,
    the last chunks of the group together, every step beside the decodes running then."""
    room = max(1, budget_tokens - int(batch))
    steps, last = [], StepWork(decode_batch=batch, decode_context_tokens=context)
    for t in group:
        done, todo = t.cached, t.new_tokens
        while todo > room:
            steps.append(StepWork(room, done, attention_pairs(room, done), batch, context))
            done, todo = done + room, todo - room
        last = replace(last, prefill_tokens=last.prefill_tokens + todo,
                       prefill_context_tokens=last.prefill_context_tokens + done,
                       prefill_attention_pairs=last.prefill_attention_pairs + attention_pairs(todo, done))
    return [*steps, last]


def _decode_point(t: _Timed, timeline: _Timeline, groups: list[list[_Timed]], group_times: list[float],
                  budget_tokens: int) -> Observation | None:
    tokens = t.record.output_tokens
    if tokens < MIN_DECODE_TOKENS or t.end <= t.first:
        return None
    batch, context = timeline.mean_load(t.first, t.end)
    mixed: list[StepWork] = []
    lo = bisect.bisect_right(group_times, t.first + SAME_STEP_S)
    hi = bisect.bisect_right(group_times, t.end + SAME_STEP_S)
    for group in groups[lo:hi]:  # other requests' prefills in steps of this decode phase
        mixed += _prefill_steps(group, batch, context, budget_tokens)
    pure = tokens - 1 - len(mixed)
    label = f"decode of {tokens} tokens at batch {batch:.1f}"
    if t.record.itl_p50_s:
        return Observation("itl", label, (StepWork(decode_batch=batch, decode_context_tokens=context),),
                           t.record.itl_p50_s)
    if pure < 1:
        return None
    steps = (StepWork(decode_batch=batch, decode_context_tokens=context, repeat=pure), *mixed)
    return Observation("decode", label, steps, t.end - t.first)


def _ttft_point(t: _Timed, group: list[_Timed], timeline: _Timeline, budget_tokens: int,
                max_num_seqs: int) -> Observation | None:
    """``t``'s TTFT: the rest of the step in progress when it came, then the step(s) of its ``group`` (the
    requests whose first tokens came with its own)."""
    if timeline.in_flight(t.start) >= max_num_seqs:
        return None  # it queued for a slot: its TTFT is not its steps
    waited_batch, waited_context = timeline.load_at(t.start)
    steps = [StepWork(decode_batch=waited_batch, decode_context_tokens=waited_context, repeat=0.5)] if waited_batch else []
    batch, context = timeline.load_at(t.first)
    steps += _prefill_steps(group, batch, context, budget_tokens)
    return Observation("ttft", f"TTFT of {t.new_tokens} new tokens", tuple(steps), t.first - t.start)


def _clock_points(samples: Sequence[server_metrics.ServerSample], ok: Sequence[_Timed],
                  group_of: dict[int, list[_Timed]], timeline: _Timeline, budget_tokens: int) -> list[Observation]:
    """Prefill points from the increase of the server's prefill histogram between readings (module docstring)."""
    readings = [(s.epoch_s, s.histograms[PREFILL_HISTOGRAM]) for s in samples if PREFILL_HISTOGRAM in s.histograms]
    ended = sorted(ok, key=lambda t: t.end)
    times = [t.end for t in ended]
    points = []
    for (t0, h0), (t1, h1) in zip(readings, readings[1:]):
        count, total = round(h1.count - h0.count), h1.sum - h0.sum
        if count <= 0 or total <= 0:
            continue
        inside = ended[bisect.bisect_right(times, t0):bisect.bisect_right(times, t1)]
        if len(inside) != count:
            continue  # a request the client saw end on the other side of a reading: not this window's
        steps = []
        for t in inside:
            group = group_of[id(t)]
            batch, context = timeline.load_at(group[0].first)
            steps += _prefill_steps(group, batch, context, budget_tokens)
        points.append(Observation("prefill", f"prefill clock of {count} requests", tuple(steps), total))
    return points


def refine(observations: Sequence[Observation], constants: StepConstants) -> tuple[Observation, ...]:
    """The points for the final fit, judged by a first fit's ``constants``: less the TTFTs that queued
    (``QUEUED_FACTOR``), each kind weighed by the inverse of its residuals' mean square (a TTFT holds part
    of another request's step, ±half a step, where a decode phase is the sum of hundreds of steps: equal
    weights would let the noisier kind bend the constants the exact kind pins)."""
    kept = [obs for obs in observations
            if obs.kind != "ttft" or obs.measured_s <= QUEUED_FACTOR * constants.predict_s(obs)]
    squares: dict[str, list[float]] = {}
    for obs in kept:
        squares.setdefault(obs.kind, []).append(((constants.predict_s(obs) - obs.measured_s) / obs.measured_s) ** 2)
    weight = {kind: 1 / max(sum(values) / len(values), MIN_MEAN_SQUARE) for kind, values in squares.items()}
    top = max(weight.values(), default=1.0)
    return tuple(replace(obs, weight=obs.weight * weight[obs.kind] / top) for obs in kept)


def describe(points: RunPoints) -> str:
    low, high = points.decode_batch_range
    decode = sum(o.kind in DECODE_KINDS for o in points.observations)
    return (f"{points.requests} requests: {decode} decode points "
            f"(mean batch {low:.1f} to {high:.1f}; at most {points.max_decode_batch} decoding at once), "
            f"{len(points.observations) - decode} prefill points from {points.prefill_source} "
            f"({points.prefill_tokens_range[0]:,} to {points.prefill_tokens_range[1]:,} new prompt tokens)")


@dataclass(frozen=True)
class RecheckDrift:
    """What a run's rechecks measured of the server's own drift: each recheck's change of the headline tier's
    margin (the log of its binding speed or TTFT ratio), and the sigma of the log speed that implies."""

    changes: tuple[float, ...]

    @property
    def speed_spread(self) -> float:
        """``rms(changes) / sqrt 2``: each change is the difference of two measurements that each drew the
        server's speed, so it varies by sqrt 2 times one's sigma. An upper bound: the two windows also drew
        different turns, which a twin's seeds already draw."""
        return math.sqrt(sum(change * change for change in self.changes) / len(self.changes) / 2)

    def words(self) -> str:
        moved = ", ".join(f"{math.expm1(change) * 100:+.0f} %" for change in self.changes)
        return (f"the run's rechecks measured the server's speed move {moved} between two measurements of one "
                f"count: predict --repeats 8 --speed-spread {self.speed_spread:.2f} gives a range that includes "
                "such drift")


def recheck_drift(folder: Path) -> RecheckDrift | None:
    """The rechecks of the run's first (headline) tier from its ``report.json``; None where the run has no
    report or measured no count again (``--recheck off``, or stopped before)."""
    try:
        report = read_json_object(folder / "report.json", missing_ok=True) or {}
    except AgentperfError:
        return None
    capacity = report.get("capacity")
    first = next(iter(capacity.values()), None) if isinstance(capacity, dict) and capacity else None
    drifts = first.get("drift") if isinstance(first, dict) else None
    changes = tuple(float(d["change"]) for d in drifts or () if isinstance(d, dict)
                    and isinstance(d.get("change"), (int, float)) and math.isfinite(d["change"]))
    return RecheckDrift(changes) if changes else None
