"""Why a step failed a tier: the binding cause, named with the numbers that show it.

A failing verdict says *that* TTFT or output speed missed the tier; the server's own metrics for the
same window (``server_metrics.ServerWindow``), what the load generator measured (``ClientWindow``, from
the window's records) and the load generator's CPU use per worker (``LoadGenerator``) say *why*. Each
cause has a test on those numbers; the first that holds, in this order, is the binding cause, and the
later ones that also hold are listed beside it (``also``):

1. **server errors, a failing server** — most requests failed, or the errors are mostly HTTP 4xx
   (the server rejects the requests: its flags or the run's options, not its load). Not a capacity
   verdict: first, because every other number of the window is about requests that did not run.
2. **the load generator** — a worker used ``LOADGEN_CPU_BUSY`` of a core or more, or the client's mean
   TTFT is far above the server's own (``CLIENT_TTFT_EXCESS_*``): the time went before the server saw
   the request. Not a verdict about the server either, so it comes before every server cause. Before it
   comes its counterpart on the other side of the wire, **the simulator's host**: agentperf's own simulator
   lost ``SIMULATOR_TIME_LOST_SHARE`` or more of its modelled engine time to falling behind real time
   (``agentperf_sim_clock_slip_seconds_total``), or wrote its tokens ``SIMULATOR_WRITE_LATE_S`` or more
   after their modelled times on average (``agentperf_sim_write_late_seconds``), so the step measured the
   machine the simulator runs on, not the server it models. (Late tokens also make the client's TTFT far
   above the simulator's own, which the engine clock stamps: the load generator's second test would
   otherwise take the blame.) No other server exports these.
3. **server errors** — more than the tier allows, but a minority, of timeouts, 5xx or broken streams:
   what an overloaded server does; a capacity verdict.
4. **KV-cache pressure** — usage reached ``KV_USAGE_PRESSURE`` or the server preempted requests. Before
   queueing because a full cache is what makes requests wait (and re-prefill when preempted).
5. **queueing** (TTFT) — requests waited, and queue time was ``MOST_OF_TTFT`` of the server's TTFT.
6. **prefill** (TTFT) — prefill time was ``MOST_OF_TTFT`` of the server's TTFT; the prefix-cache hit
   ratio says whether contexts were cold. Where the server has no prefill histogram (SGLang) it is
   taken as TTFT minus queue time, and the evidence says so.
7. **decode stalls** (output speed) — the requests under the floor streamed at a median gap the floor
   allows, but lost ``STALL_SHARE`` or more of their decode time to longer pauses (from the client's own
   records: a stream's median gap times its speed is the share of its time spent at that gap). What
   pauses a running request's decoding is the engine computing something else in its steps: other
   requests' prefills (vLLM and SGLang put a prefill chunk into the decode batch's step, up to the token
   budget), so the server's prefill time is named beside it. A mean inter-token latency cannot show
   this: a few long pauses among many short gaps leave the mean near the floor's gap or under it.
8. **decode batch** (output speed) — the speed floor failed while the server's inter-token latency was
   near the floor's own (``DECODE_ITL_SHARE``) with a batch of requests running (``DECODE_MIN_RUNNING``);
   where the server's mean over every request is lower, the requests under the floor decoding at such a
   gap themselves (their median, from the records) is the same evidence for the tail that failed.
9. **decode speed** (output speed) — the same inter-token latency with fewer than ``DECODE_MIN_RUNNING``
   requests running: the server decodes a request (nearly) alone slower than the floor allows, so no
   agent count can pass the tier on this server (an L4 decoding a 3B model at ~33 tok/s against a
   60 tok/s floor). Its TTFT counterpart needs no cause of its own: with nothing waiting, a TTFT is
   queue time and prefill, and prefill is then most of it (6).

When none holds the cause is **not identified** (the server's numbers are there but none reaches its
threshold), or **not available** when the server gave no metrics: then only the client's numbers
(errors, its TTFT against the tier, the workers' CPU) could name a cause.

Which limit failed comes from the verdict's pooled quantiles; in agent scope, where the pooled
quantiles may both pass while too few agents do, the one they came closer to (``_failed_limits``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from enum import Enum
from typing import Callable, Iterable, Sequence

from agentperf_users.measure.records import RequestRecord, Status
from agentperf_users.measure.server_metrics import ServerWindow, seconds
from agentperf_users.measure.slo import StepVerdict, TierVerdict
from agentperf_users.stats import interpolated_quantile

SERVER_FAILING_ERROR_RATE = 0.5
"""At least this share of failed requests makes a step a failing server, not a capacity verdict: most of
the window's requests did not run, so its TTFT and speed say nothing of how the server holds its load."""

LOADGEN_CPU_BUSY = 0.90
"""A worker at this share of one core or more is saturated: its event loop sends requests late and
reads them late, so what it measured is partly its own queueing. (Locust's own warning is at 90 %.)"""

CLIENT_TTFT_EXCESS_RATIO = 1.5
CLIENT_TTFT_EXCESS_MIN_S = 0.25
"""The client's mean TTFT is "far above" the server's when it is both this many times the server's and
this many seconds more. What a client adds in the normal case is HTTP and the server's front end (its
chat template and tokenizer): ~10 ms on a real vLLM (122.9 ms against vLLM's 113.4 ms in the team's
measurement); a quarter second more, and half again the server's own TTFT, is time spent before the
engine saw the request."""

SIMULATOR_TIME_LOST_SHARE = 0.10
"""agentperf's simulator lost this share of its modelled engine time or more: its clock jumps only after a
stall of more than a quarter second (``simulator.replica.MAX_CLOCK_SLIP_S``), and a tenth of a window is
more than one such stall in the tests' 5-s windows, so this is a simulator whose host cannot keep up, not
one hiccup (a 2-replica fleet at 64 agents on two shared cores lost 0.0 %)."""
SIMULATOR_WRITE_LATE_S = 0.05
"""agentperf's simulator wrote its tokens this long after their modelled times or more, on average: a whole
token gap of the 20 tok/s headline floor (the same fleet: 0.4-1.3 ms)."""

KV_USAGE_PRESSURE = 0.95
"""KV-cache usage at which the engine has no room left to admit a request or grow a running one (vLLM
preempts when a running request cannot get its next block): ~95 % counts as full, since blocks are
allocated whole and some are always partly empty."""

MOST_OF_TTFT = 0.5
"""A phase that is at least half of the server's TTFT is what the TTFT is made of ("most of TTFT")."""

COLD_HIT_RATIO = 0.5
"""Below this prefix-cache hit ratio (cached / prompt tokens) the contexts are called cold: most of each
prompt was computed, not reused. Agents that resend a growing conversation normally reuse far more."""

DECODE_ITL_SHARE = 0.8
"""The server's mean inter-token latency is "high" at this share of the gap the speed floor allows
(1 / floor): its decode steps themselves then leave the slowest requests under the floor."""

STALL_SHARE = 0.3
"""The requests under the floor lost this share of their decode time (median over them) to pauses longer
than their median gap: with a steady gap the floor allows, that is what put them under it (a third of
the time stalled turns 30 tok/s into 21)."""

DECODE_MIN_RUNNING = 2.0
"""At least this many requests running on average: the decode steps are shared by a batch (a single
request decoding slowly is not a batching limit, but the server's own speed: ``decode speed``)."""
LONE_RUNNING = 1.25
"""At most this many requests running on average: a request decodes (nearly) alone, so a ``decode speed``
finding may say that no agent count passes. Between this and ``DECODE_MIN_RUNNING`` the steps are still the
server's own speed, but a lower count, sharing them less, may pass (the real vLLM's 3-agent step failed
60 tok/s at 1.8 running while 2 agents passed it)."""


class Cause(str, Enum):
    SERVER_ERRORS = "server errors"
    LOAD_GENERATOR = "the load generator"
    SIMULATOR = "the simulator's host"
    KV_CACHE = "KV-cache pressure"
    QUEUEING = "queueing"
    PREFILL = "prefill"
    DECODE_STALLS = "decode stalls"
    DECODE_BATCH = "decode batch"
    DECODE_SPEED = "decode speed"
    NOT_IDENTIFIED = "not identified"
    NOT_AVAILABLE = "not available"


# --- what the load generator measured -----------------------------------------------------------

@dataclass(frozen=True)
class ClientWindow:
    """The client's side of the window: the records its verdict judged (``slo.records_in_window``)."""

    requests: int
    errors_by_status: tuple[tuple[str, int], ...]  # (status, count) of failed requests, most first
    ttft_mean_s: float | None  # over requests that got a first token
    cached_fraction: float | None  # cached prompt tokens / prompt tokens, where the server reported both
    streams: tuple[tuple[float, float], ...] = ()  # (output speed, median inter-token gap) of each OK stream

    @property
    def errors(self) -> int:
        return sum(count for _, count in self.errors_by_status)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


def client_window(records: Iterable[RequestRecord]) -> ClientWindow:
    """``ClientWindow`` of the records a window judges. A cancelled request (cut by the load generator)
    says nothing of the server and is left out, as the verdict leaves it out."""
    records = [record for record in records if record.status is not Status.CANCELLED]
    errors: dict[str, int] = {}
    for record in records:
        if not record.ok:
            errors[record.status.value] = errors.get(record.status.value, 0) + 1
    ttfts = [record.ttft_s for record in records if record.ok and record.ttft_s is not None]
    counted = [record for record in records if record.prompt_tokens and record.cached_tokens is not None]
    prompt = sum(record.prompt_tokens for record in counted)
    return ClientWindow(
        requests=len(records),
        errors_by_status=tuple(sorted(errors.items(), key=lambda item: (-item[1], item[0]))),
        ttft_mean_s=sum(ttfts) / len(ttfts) if ttfts else None,
        cached_fraction=sum(record.cached_tokens for record in counted) / prompt if prompt else None,
        streams=tuple((record.output_tps, record.itl_p50_s) for record in records
                      if record.ok and record.output_tps is not None and record.itl_p50_s is not None),
    )


@dataclass(frozen=True)
class CpuReading:
    """This process's CPU time (every thread) and a monotonic wall time, read together."""

    wall_s: float
    cpu_s: float


def read_cpu() -> CpuReading:
    return CpuReading(time.monotonic(), time.process_time())


def cpu_fraction(earlier: CpuReading, later: CpuReading) -> float | None:
    """The process's CPU use between two readings, as a fraction of one core (above 1 when several of
    its threads ran at once). None when no wall time passed. (A worker meters its CPU between its reports
    and the master cuts that to a step's window: ``loadgen_cpu``.)"""
    wall = later.wall_s - earlier.wall_s
    return (later.cpu_s - earlier.cpu_s) / wall if wall > 0 else None


@dataclass(frozen=True)
class LoadGenerator:
    """The load generator's own CPU use over the window, per worker (fraction of one core)."""

    worker_cpu: tuple[tuple[str, float], ...]

    def busiest(self) -> tuple[str, float] | None:
        return max(self.worker_cpu, key=lambda item: item[1], default=None)

    def to_dict(self) -> dict:
        """As a step in search.json and report.json keeps it: ``{"worker_cpu": {worker: fraction}}``."""
        return {"worker_cpu": dict(self.worker_cpu)}

    @classmethod
    def from_dict(cls, data: dict | None) -> LoadGenerator | None:
        """``to_dict``'s form back; None for a step that has none (no worker reported its CPU)."""
        if not data:
            return None
        return cls(tuple(sorted((str(worker), float(cpu)) for worker, cpu in data["worker_cpu"].items())))


# --- the diagnosis --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Diagnosis:
    """One failing tier's binding cause. ``about_capacity`` False: the verdict is not about how much load
    the server holds (a failing server, or the load generator), so a search should not count it as the
    tier failing at that agent count."""

    tier: str
    cause: Cause
    about_capacity: bool
    summary: str  # the evidence in words
    evidence: tuple[tuple[str, float], ...]  # the numbers, named, for report.json
    also: tuple[Cause, ...] = ()  # later causes whose evidence also held

    @property
    def text(self) -> str:
        """``why: queueing — 3.2 requests waiting on average, queue time 77 % of TTFT (4.1 s of 5.3 s)``"""
        return f"why: {self.cause.value} — {self.summary}"

    def to_dict(self) -> dict:
        return {"tier": self.tier, "cause": self.cause.value, "about_capacity": self.about_capacity,
                "text": self.text, "evidence": dict(self.evidence), "also": [cause.value for cause in self.also]}


@dataclass(frozen=True)
class _Inputs:
    verdict: TierVerdict
    client: ClientWindow
    server: ServerWindow
    loadgen: LoadGenerator | None
    ttft_failed: bool
    speed_failed: bool


def diagnose(verdict: TierVerdict, client: ClientWindow, server: ServerWindow,
             loadgen: LoadGenerator | None = None) -> Diagnosis | None:
    """The binding cause of a failing tier verdict (module docstring); None when the tier passed."""
    if verdict.passed:
        return None
    tier = verdict.tier
    inputs = _Inputs(verdict, client, server, loadgen, *_failed_limits(verdict))
    found = [diagnosis for check in _CHECKS if (diagnosis := check(inputs)) is not None]
    if found:
        also = dict.fromkeys(d.cause for d in found[1:] if d.cause is not found[0].cause)
        return replace(found[0], tier=tier.name, also=tuple(also))
    cause = Cause.NOT_IDENTIFIED if server.available else Cause.NOT_AVAILABLE
    said = "; ".join(verdict.reasons)
    summary = (f"no cause reached its threshold ({said})" if server.available
               else f"the server gave no metrics; the client saw {said}")
    return Diagnosis(tier.name, cause, True, summary, ())


def _failed_limits(verdict: TierVerdict) -> tuple[bool, bool]:
    """(TTFT failed, speed failed) by the pooled quantiles. When neither failed although too few agents
    passed (agent scope), the limit the pooled quantiles came closer to (the smaller of the two log
    margins, as ``slo`` measures them) is taken as the one that failed the agents; with no request at
    all, both."""
    tier, ttft_q, speed_q = verdict.tier, verdict.ttft_quantile_s, verdict.output_tps_quantile
    ttft_failed = ttft_q is not None and ttft_q > tier.ttft_max_s
    speed_failed = speed_q is not None and speed_q < tier.output_tps_min
    if ttft_failed or speed_failed or tier.scope != "agent":
        return ttft_failed, speed_failed
    if ttft_q is None:
        return True, True
    if speed_q is None or tier.output_tps_min <= 0:
        return True, False
    ttft_margin = math.log(tier.ttft_max_s / ttft_q) if ttft_q > 0 else math.inf
    speed_margin = math.log(speed_q / tier.output_tps_min) if speed_q > 0 else -math.inf
    return ttft_margin <= speed_margin, speed_margin < ttft_margin


def _finding(cause: Cause, summary: str, about_capacity: bool = True, **evidence: float | None) -> Diagnosis:
    numbers = tuple((name, value) for name, value in evidence.items() if value is not None)
    return Diagnosis("", cause, about_capacity, summary, numbers)


def _failing_server(i: _Inputs) -> Diagnosis | None:
    client = i.client
    rejected = sum(count for status, count in client.errors_by_status if status == Status.HTTP_4XX.value)
    mostly_rejected = client.error_rate > i.verdict.tier.max_error_rate and 2 * rejected > client.errors
    if not client.errors or (client.error_rate < SERVER_FAILING_ERROR_RATE and not mostly_rejected):
        return None
    why = ("the server rejected them: its flags or the run's options, not its load" if mostly_rejected
           else "a failing server, not a capacity verdict")
    return _finding(Cause.SERVER_ERRORS, f"{_errors_text(client)}: {why}", about_capacity=False,
                    error_rate=client.error_rate, errors=client.errors, requests=client.requests,
                    http_4xx=rejected)


def _load_generator(i: _Inputs) -> Diagnosis | None:
    busiest = i.loadgen.busiest() if i.loadgen else None
    if busiest is not None and busiest[1] >= LOADGEN_CPU_BUSY:
        worker, cpu = busiest
        return _finding(Cause.LOAD_GENERATOR, f"worker {worker} used {_percent(cpu)} of a core: the verdict is "
                        "not about the server", about_capacity=False, worker_cpu_max=cpu)
    client_ttft, server_ttft = i.client.ttft_mean_s, i.server.ttft_mean_s
    if (client_ttft is not None and server_ttft is not None and client_ttft >= CLIENT_TTFT_EXCESS_RATIO * server_ttft
            and client_ttft - server_ttft >= CLIENT_TTFT_EXCESS_MIN_S):
        return _finding(Cause.LOAD_GENERATOR, f"client TTFT {seconds(client_ttft)} against the server's own "
                        f"{seconds(server_ttft)} (means): the time went before the server saw the requests",
                        about_capacity=False, client_ttft_mean_s=client_ttft, server_ttft_mean_s=server_ttft)
    return None


def _simulator_behind(i: _Inputs) -> Diagnosis | None:
    lost, late = i.server.simulator_time_lost_share, i.server.simulator_write_late_mean_s
    if (lost is None or lost < SIMULATOR_TIME_LOST_SHARE) and (late is None or late < SIMULATOR_WRITE_LATE_S):
        return None
    return _finding(Cause.SIMULATOR, f"agentperf's simulator lost {_percent(lost or 0.0)} of its engine time to "
                    f"falling behind real time and wrote its tokens {seconds(late or 0.0)} after their steps on "
                    "average: the verdict is about the machine it runs on, not the modelled server",
                    about_capacity=False, simulator_time_lost_share=lost, simulator_write_late_mean_s=late)


def _server_errors(i: _Inputs) -> Diagnosis | None:
    client, limit = i.client, i.verdict.tier.max_error_rate
    if client.error_rate <= limit:
        return None
    return _finding(Cause.SERVER_ERRORS, f"{_errors_text(client)}, more than the tier's {_percent(limit)}",
                    error_rate=client.error_rate, errors=client.errors, requests=client.requests)


def _kv_cache(i: _Inputs) -> Diagnosis | None:
    server = i.server
    full = server.kv_cache_usage_max is not None and server.kv_cache_usage_max >= KV_USAGE_PRESSURE
    preempted = server.preemptions is not None and server.preemptions > 0
    if not full and not preempted:
        return None
    parts = []
    if server.kv_cache_usage_max is not None:
        parts.append(f"KV cache {_percent(server.kv_cache_usage_max)} full at most "
                     f"(mean {_percent(server.kv_cache_usage_mean)})")
    if server.preemptions is not None:
        parts.append(f"{server.preemptions:g} preemptions")
    return _finding(Cause.KV_CACHE, ", ".join(parts), kv_cache_usage_max=server.kv_cache_usage_max,
                    kv_cache_usage_mean=server.kv_cache_usage_mean, preemptions=server.preemptions)


def _queueing(i: _Inputs) -> Diagnosis | None:
    server = i.server
    waiting, queue, ttft = server.requests_waiting_mean, server.queue_time_mean_s, server.ttft_mean_s
    if not i.ttft_failed or not waiting or queue is None or not ttft or queue / ttft < MOST_OF_TTFT:
        return None
    return _finding(Cause.QUEUEING, f"{waiting:.2g} requests waiting on average, queue time "
                    f"{_percent(queue / ttft)} of TTFT ({seconds(queue)} of {seconds(ttft)})",
                    requests_waiting_mean=waiting, queue_time_mean_s=queue, server_ttft_mean_s=ttft)


def _prefill(i: _Inputs) -> Diagnosis | None:
    server = i.server
    ttft, prefill, derived = server.ttft_mean_s, server.prefill_time_mean_s, False
    if prefill is None and ttft is not None and server.queue_time_mean_s is not None:
        prefill, derived = max(0.0, ttft - server.queue_time_mean_s), True
    if not i.ttft_failed or prefill is None or not ttft or prefill / ttft < MOST_OF_TTFT:
        return None
    what = "prefill time (TTFT − queue time)" if derived else "prefill time"
    hits = server.prefix_cache_hit_ratio if server.prefix_cache_hit_ratio is not None else i.client.cached_fraction
    cold = "" if hits is None or hits >= COLD_HIT_RATIO else " (cold contexts)"
    hits_text = "" if hits is None else f", prefix-cache hits {_percent(hits)}{cold}"
    return _finding(Cause.PREFILL, f"{what} {_percent(prefill / ttft)} of TTFT ({seconds(prefill)} of "
                    f"{seconds(ttft)}){hits_text}",
                    prefill_time_mean_s=prefill, server_ttft_mean_s=ttft, prefix_cache_hit_ratio=hits)


@dataclass(frozen=True)
class _SlowDecode:
    """The inter-token latency that put requests under the speed floor: the server's mean, or, where that
    mean is under ``DECODE_ITL_SHARE`` of the floor's gap, the slow requests' own median gap (a mean over
    every request hides a tail of slow ones: the real vLLM's 13-agent step with one agent under 20 tok/s at
    a 41.7 ms gap while the mean was 35.8 ms)."""

    itl_s: float
    allowed_s: float
    running: float
    slow_requests: int | None  # None: the server's mean was high enough

    def text(self, floor: float) -> str:
        what = ("inter-token latency" if self.slow_requests is None else
                f"the {self.slow_requests} request{'s' if self.slow_requests != 1 else ''} under the floor "
                "decoded at a median gap of")
        return f"{what} {seconds(self.itl_s)} (the {floor:g} tok/s floor allows {seconds(self.allowed_s)})"

    def evidence(self) -> dict[str, float | None]:
        if self.slow_requests is None:
            return {"inter_token_latency_mean_s": self.itl_s}
        return {"slow_requests": self.slow_requests, "slow_median_gap_s": self.itl_s}


def _slow_streams(i: _Inputs) -> tuple[int, float, float] | None:
    """(how many, their median gap, their median share of decode time spent in longer pauses) of the OK
    streams under the tier's speed floor; None when none is."""
    floor = i.verdict.tier.output_tps_min
    slow = [(speed, gap) for speed, gap in i.client.streams if speed < floor]
    if not slow:
        return None
    gap = interpolated_quantile(sorted(own_gap for _, own_gap in slow), 0.5)
    # a stream's share of its decode time not spent at its own median gap: 1 - gap x speed
    stalled = interpolated_quantile(sorted(max(0.0, 1.0 - own_gap * speed) for speed, own_gap in slow), 0.5)
    return len(slow), gap, stalled


def _slow_decode(i: _Inputs) -> _SlowDecode | None:
    """Why the floor failed when the decode steps were slow (``_SlowDecode``), with the requests running on
    average; None when the floor did not fail or neither gap reached ``DECODE_ITL_SHARE`` of its own."""
    server, floor = i.server, i.verdict.tier.output_tps_min
    itl, running = server.inter_token_latency_mean_s, server.requests_running_mean
    if not i.speed_failed or floor <= 0 or itl is None or running is None:
        return None
    if itl >= DECODE_ITL_SHARE / floor:
        return _SlowDecode(itl, 1 / floor, running, None)
    slow = _slow_streams(i)
    if slow is not None and slow[1] >= DECODE_ITL_SHARE / floor:
        return _SlowDecode(slow[1], 1 / floor, running, slow[0])
    return None


def _decode_stalls(i: _Inputs) -> Diagnosis | None:
    floor = i.verdict.tier.output_tps_min
    slow = _slow_streams(i) if i.speed_failed and floor > 0 else None
    if slow is None:
        return None
    count, gap, stalled = slow
    if gap >= 1 / floor or stalled < STALL_SHARE:
        return None
    prefill = i.server.prefill_time_mean_s
    beside = (f"; the server prefilled other requests meanwhile ({seconds(prefill)} per prefill on average): "
              "a prefill in the step pauses every request decoding" if prefill else "")
    return _finding(Cause.DECODE_STALLS, f"{count} request{'s' if count != 1 else ''} under the {floor:g} tok/s floor "
                    f"streamed at a median gap of {seconds(gap)} (the floor allows {seconds(1 / floor)}) but spent "
                    f"{_percent(stalled)} of {'its' if count == 1 else 'their'} decode time in longer pauses{beside}",
                    slow_requests=count, slow_median_gap_s=gap, stalled_share=stalled, prefill_time_mean_s=prefill)


def _decode_batch(i: _Inputs) -> Diagnosis | None:
    slow = _slow_decode(i)
    if slow is None or slow.running < DECODE_MIN_RUNNING:
        return None
    server, floor = i.server, i.verdict.tier.output_tps_min
    return _finding(Cause.DECODE_BATCH, f"{slow.text(floor)} with {slow.running:.3g} requests running on average "
                    f"(max {server.requests_running_max:g})", **slow.evidence(),
                    requests_running_mean=slow.running, requests_running_max=server.requests_running_max)


def _decode_speed(i: _Inputs) -> Diagnosis | None:
    slow = _slow_decode(i)
    if slow is None or slow.running >= DECODE_MIN_RUNNING:
        return None
    floor = i.verdict.tier.output_tps_min
    running = f"{slow.running:.2g} request" + ("" if f"{slow.running:.2g}" == "1" else "s")
    meaning = ("the server decodes a request alone slower than the floor, so no agent count can pass this tier on "
               "this server" if slow.running <= LONE_RUNNING else
               "the server's own decode steps are too slow for the floor even with so few requests sharing them; "
               "only fewer agents, if any, can pass this tier")
    return _finding(Cause.DECODE_SPEED, f"{slow.text(floor)} with {running} running on average: {meaning}",
                    **slow.evidence(), floor_inter_token_latency_s=slow.allowed_s, requests_running_mean=slow.running)


_CHECKS: tuple[Callable[[_Inputs], Diagnosis | None], ...] = (
    _failing_server, _simulator_behind, _load_generator, _server_errors, _kv_cache, _queueing, _prefill,
    _decode_stalls, _decode_batch, _decode_speed,
)


def _errors_text(client: ClientWindow) -> str:
    statuses = ", ".join(f"{status} {count}" for status, count in client.errors_by_status)
    return f"{_percent(client.error_rate)} of {client.requests} requests failed ({statuses})"


def _percent(fraction: float) -> str:
    return f"{fraction * 100:.2g} %" if 0 < fraction < 0.1 else f"{fraction * 100:.0f} %"


def diagnose_step(verdict: StepVerdict, records: Sequence[RequestRecord], server: ServerWindow,
                  loadgen: LoadGenerator | None = None) -> tuple[Diagnosis, ...]:
    """Every failing tier's diagnosis for one step's judged ``records`` (``slo.records_in_window``): what
    the live progress line says and what the report recomputes from the run folder, the same way."""
    client = client_window(records)
    return tuple(found for tier in verdict.tiers if (found := diagnose(tier, client, server, loadgen)) is not None)


def not_about_capacity(diagnoses: Iterable[Diagnosis]) -> Diagnosis | None:
    """The first diagnosis that says a step's failure is not about how much load the server holds (a
    failing server, the load generator): the search must not take it as the tier failing there."""
    return next((found for found in diagnoses if not found.about_capacity), None)


def common_error(records: Iterable[RequestRecord]) -> str | None:
    """The most frequent failure message among ``records`` (the server's own words, redacted when the
    record was made), to name beside a failing server."""
    messages: dict[str, int] = {}
    for record in records:
        if not record.ok and record.status is not Status.CANCELLED and record.message:
            messages[record.message] = messages.get(record.message, 0) + 1
    return max(messages, key=lambda message: (messages[message], message), default=None)
