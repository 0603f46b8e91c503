"""The simulator's Prometheus endpoint: vLLM's metric names, a simulated DCGM power gauge, injected faults.

Why collect lazily: the engine already keeps running totals (``engine.counters``), so a custom
collector reads them when ``/metrics`` is scraped and the token path pays nothing. The latency
histograms are observed from the engine's own clock (its step boundaries), as vLLM's V1 engine
observes them from its engine core's timestamps (``vllm/v1/metrics/stats.py``, ``IterationStats``,
read at a recent main branch; the names are those a real 0.32 exported). vLLM starts TTFT and e2e at
the frontend's arrival and queue time at the engine core's QUEUED event; the simulator has no
frontend, so both are the request's arrival:

* ``time_to_first_token_seconds``: arrival to the first token, as each request gets its first token;
* ``inter_token_latency_seconds``: the gap between two successive tokens of a request, one observation
  per gap (so ``count`` is output tokens minus one per request);
* ``request_queue_time_seconds`` (arrival to the start of the step that first admitted it),
  ``request_prefill_time_seconds`` (that start to the first token, preemptions included),
  ``request_decode_time_seconds`` (first to last token) and ``e2e_request_latency_seconds`` (arrival
  to last token): once per request that completed normally, the ones ``vllm:request_success`` counts.

With ``--replicas N`` (N > 1) the endpoint is :class:`FleetMetrics`: every replica's series, each
labelled ``engine`` with the replica's index, as a data-parallel vLLM labels its engines' series, so that
a reader sums them (the harness's server metrics do; the KV usage it takes as the fullest engine's);
``vllm:cache_config_info`` gives each replica's own blocks. One replica's endpoint is unchanged.

``agentperf_sim_faults_total{kind}`` counts failures ``--fault`` injects (see :mod:`.faults`), and
``vllm:cache_config_info`` (a gauge at 1, as vLLM emulates an info metric) labels the KV cache's
``num_gpu_blocks`` and ``block_size``.

Whether the simulator kept real time (:mod:`.replica`): ``agentperf_sim_write_late_seconds`` is how long
after its step's end (the modelled moment its tokens exist) each step's tokens were written, and
``agentperf_sim_clock_slip_seconds_total`` the modelled engine time lost when the server fell so far
behind that its clock jumped to now. A load test of a simulator that did not keep real time measured the
simulator's host, not the modelled server.

Why the inter-token histogram is not a ``prometheus_client.Histogram``: it is observed once per token,
tens of thousands of times a second on the server's one core, and that class takes a lock per bucket
and per sum update (about 2 us an observation); :class:`GapHistogram` adds to plain numbers (the
server and its scrapes share one thread) and takes a run of equal gaps in one call.

Power model (``DCGM_FI_DEV_POWER_USAGE``, watts, one series per accelerator of the profile)::

    watts = idle_w + (tdp_w - idle_w) * busy_fraction

``busy_fraction`` is the share of wall time the engine spent in steps over roughly the last
``POWER_WINDOW_S`` seconds: each scrape records ``(time, engine busy seconds)``, and the fraction is
taken against the newest sample at least ``POWER_WINDOW_S`` old (or the server's start, before
there is one). All accelerators of a tensor-parallel replica work in lockstep, so they draw the same.
"""

from __future__ import annotations

import socket
import time
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from agentperf_users.simulator.engine import EngineCounters, EngineRequest

POWER_WINDOW_S = 5.0
TTFT_BUCKETS_S = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # vLLM's buckets for vllm:time_to_first_token_seconds
REQUEST_LATENCY_BUCKETS_S = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
)  # vLLM's buckets for vllm:e2e_request_latency_seconds and the request queue, prefill and decode times
WRITE_LATE_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
"""agentperf_sim_write_late_seconds: from a timer's rounding (under 1 ms) to a server past its clock slip."""
ITL_BUCKETS_S = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # vLLM's buckets for vllm:inter_token_latency_seconds


@dataclass(frozen=True)
class CacheInfo:
    """What ``vllm:cache_config_info`` says about the KV cache (vLLM's ``CacheConfig`` fields of that name)."""

    num_gpu_blocks: int
    block_size: int
    gpu_memory_utilization: float
    enable_prefix_caching: bool = True


@dataclass(frozen=True)
class PowerSpec:
    """What the power gauge needs to know about the accelerators."""

    gpu_count: int
    gpu_name: str
    idle_w: float
    tdp_w: float


class PowerModel:
    """Accelerator power from the engine's busy time; see the module docstring for the formula."""

    def __init__(self, spec: PowerSpec, busy_s: Callable[[], float], clock: Callable[[], float] = time.monotonic):
        self.spec = spec
        self._busy_s = busy_s
        self._clock = clock
        self._samples: deque[tuple[float, float]] = deque([(clock(), busy_s())])

    def busy_fraction(self) -> float:
        now_s, busy_s = self._clock(), self._busy_s()
        # Keep one sample older than the window as the anchor; drop the ones before it.
        while len(self._samples) > 1 and self._samples[1][0] <= now_s - POWER_WINDOW_S:
            self._samples.popleft()
        anchor_t, anchor_busy = self._samples[0]
        self._samples.append((now_s, busy_s))
        if now_s <= anchor_t:
            return 0.0
        return min(1.0, max(0.0, (busy_s - anchor_busy) / (now_s - anchor_t)))

    def watts(self) -> float:
        """Draw of one accelerator now."""
        return self.spec.idle_w + (self.spec.tdp_w - self.spec.idle_w) * self.busy_fraction()


class _EngineCollector(Collector):
    """Reads the engine's running totals at scrape time."""

    def __init__(self, counters: EngineCounters, model_name: str, power: PowerModel):
        self._counters = counters
        self._model_name = model_name
        self._power = power
        self._hostname = socket.gethostname()

    def collect(self) -> Iterator[Metric]:
        c = self._counters
        labels = ["model_name"]
        value = [self._model_name]
        gauge, counter = GaugeMetricFamily, CounterMetricFamily
        for family, name, doc, number in (
            (gauge, "vllm:num_requests_running", "Number of requests in model execution batches.", c.num_running),
            (gauge, "vllm:num_requests_waiting", "Number of requests waiting to be processed.", c.num_waiting),
            (gauge, "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", c.kv_usage),
            (counter, "vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
             c.prefix_queries_tokens),
            (counter, "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
             c.prefix_hits_tokens),
            (counter, "vllm:num_preemptions", "Cumulative number of preemptions from the engine.", c.preemptions_total),
            (counter, "vllm:prompt_tokens", "Number of prefill tokens processed.", c.prompt_tokens_total),
            (counter, "vllm:prompt_tokens_cached", "Number of cached prompt tokens (local + external).",
             c.prompt_tokens_cached_total),
            (counter, "vllm:generation_tokens", "Number of generation tokens processed.", c.generation_tokens_total),
        ):
            metric = family(name, doc, labels=labels)
            metric.add_metric(value, number)
            yield metric
        spec = self._power.spec
        power = GaugeMetricFamily(
            "DCGM_FI_DEV_POWER_USAGE",
            "Power draw (in W), simulated from engine busy time.",
            labels=["gpu", "UUID", "device", "modelName", "Hostname"],
        )
        watts = self._power.watts()
        for gpu in range(spec.gpu_count):
            uuid = f"GPU-00000000-0000-0000-0000-{gpu:012d}"
            power.add_metric([str(gpu), uuid, f"nvidia{gpu}", spec.gpu_name, self._hostname], watts)
        yield power


class GapHistogram(Collector):
    """A histogram with one label set, observed without locks and a run of equal values at a time.

    Only for a single-threaded owner: the server's event loop both observes and renders it.
    """

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...], labels: dict[str, str]):
        self._name, self._documentation = name, documentation
        self._bounds = buckets
        self._labels = labels
        self._counts = [0] * (len(buckets) + 1)  # the last: above every bound
        self._sum = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        """``times`` observations of ``value``."""
        self._counts[bisect_left(self._bounds, value)] += times
        self._sum += value * times

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=list(self._labels))
        cumulative, running = [], 0
        for bound, count in zip((*map(floatToGoString, self._bounds), "+Inf"), self._counts):
            running += count
            cumulative.append((bound, running))
        family.add_metric(list(self._labels.values()), cumulative, self._sum)
        yield family


class SimulatorMetrics:
    """The registry behind ``GET /metrics``: engine totals, latency histograms, cache config, power."""

    def __init__(self, model_name: str, counters: EngineCounters, power: PowerModel, cache: CacheInfo,
                 fault_kinds: Iterable[str] = ()):
        self.registry = CollectorRegistry(auto_describe=False)
        registry = self.registry

        def request_histogram(name: str, documentation: str,
                              buckets: tuple[float, ...] = REQUEST_LATENCY_BUCKETS_S) -> Histogram:
            return Histogram(name, documentation, ["model_name"], buckets=buckets, registry=registry).labels(model_name)

        self._ttft = request_histogram("vllm:time_to_first_token_seconds",
                                       "Histogram of time to first token in seconds.", TTFT_BUCKETS_S)
        self._e2e = request_histogram("vllm:e2e_request_latency_seconds",
                                      "Histogram of e2e request latency in seconds.")
        self._queue = request_histogram("vllm:request_queue_time_seconds",
                                        "Histogram of time spent in WAITING phase for request.")
        self._prefill = request_histogram("vllm:request_prefill_time_seconds",
                                          "Histogram of time spent in PREFILL phase for request.")
        self._decode = request_histogram("vllm:request_decode_time_seconds",
                                         "Histogram of time spent in DECODE phase for request.")
        self._itl = GapHistogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                                 ITL_BUCKETS_S, {"model_name": model_name})
        registry.register(self._itl)
        info = {"block_size": str(cache.block_size), "enable_prefix_caching": str(cache.enable_prefix_caching),
                "gpu_memory_utilization": str(cache.gpu_memory_utilization),
                "num_gpu_blocks": str(cache.num_gpu_blocks), "engine": "0"}
        Gauge("vllm:cache_config_info", "Information of the LLMEngine CacheConfig", list(info),
              registry=registry).labels(**info).set(1)
        self._success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            ["model_name", "finished_reason"],
            registry=self.registry,
        )
        self._faults = Counter(
            "agentperf_sim_faults",
            "Failures injected by agentperf simulate --fault, by kind; these requests are not in vllm:request_success.",
            ["kind"],
            registry=self.registry,
        )
        for kind in fault_kinds:  # every configured kind is exported from the start, at 0
            self._faults.labels(kind)
        self._write_late = GapHistogram("agentperf_sim_write_late_seconds",
                                        "Time from a simulated step's end to the writing of its tokens.",
                                        WRITE_LATE_BUCKETS_S, {})
        registry.register(self._write_late)
        self._clock_slip = Counter("agentperf_sim_clock_slip_seconds",
                                   "Simulated engine time lost when the server fell behind real time.",
                                   registry=registry)
        self._model_name = model_name
        self.registry.register(_EngineCollector(counters, model_name, power))

    def observe_first_token(self, ttft_s: float) -> None:
        self._ttft.observe(ttft_s)

    def observe_finished(self, e2e_s: float, finish_reason: str) -> None:
        self._e2e.observe(e2e_s)
        self._success.labels(self._model_name, finish_reason).inc()

    def observe_token_gaps(self, gap_s: float, count: int) -> None:
        """``count`` tokens that each came ``gap_s`` after their request's previous token (engine clock)."""
        self._itl.observe(gap_s, count)

    def observe_phases(self, request: EngineRequest) -> None:
        """Queue, prefill and decode time of a request that completed normally, from its engine timestamps."""
        scheduled_s, first_s = request.scheduled_s, request.first_token_s
        self._queue.observe(scheduled_s - request.queued_s)  # from the engine's queue, as vLLM: after the front end
        self._prefill.observe(first_s - scheduled_s)
        self._decode.observe(request.finished_s - first_s)

    def observe_write_late(self, late_s: float) -> None:
        """A step's tokens were written ``late_s`` after the step's modelled end."""
        self._write_late.observe(late_s)

    def count_clock_slip(self, lost_s: float) -> None:
        """The engine's clock jumped ``lost_s`` forward: modelled time in which the engine did nothing."""
        self._clock_slip.inc(lost_s)

    def count_fault(self, kind: str) -> None:
        self._faults.labels(kind).inc()

    def render(self) -> bytes:
        """The exposition text (Prometheus text format 0.0.4)."""
        return generate_latest(self.registry)


class FleetMetrics:
    """The ``/metrics`` of replicas behind one router: each replica's series labelled ``engine`` with its
    index (module docstring); one replica's are rendered as they are."""

    def __init__(self, replicas: Sequence[SimulatorMetrics]):
        self._replicas = tuple(replicas)

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for index, metrics in enumerate(self._replicas):
            for family in metrics.registry.collect():
                into = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                             family.unit))
                into.samples += [sample._replace(labels={**sample.labels, "engine": str(index)})
                                 for sample in family.samples]
        yield from merged.values()

    def render(self) -> bytes:
        if len(self._replicas) == 1:
            return self._replicas[0].render()
        return generate_latest(self)  # type: ignore[arg-type]  # what it reads of a registry: collect()
