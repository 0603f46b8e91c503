"""The simulator's Prometheus endpoint: vLLM's metric names, a simulated DCGM power gauge, injected faults.

Why collect lazily: the engine already keeps running totals (``engine.counters``), so a custom
collector reads them when ``/metrics`` is scraped and the token path pays nothing. Only the two
latency histograms are observed as requests reach their first token and finish (once per request),
and ``agentperf_sim_faults_total{kind}`` as ``--fault`` injects a failure (see :mod:`.faults`).

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
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from agentperf_users.simulator.engine import EngineCounters

POWER_WINDOW_S = 5.0
TTFT_BUCKETS_S = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # vLLM's buckets for vllm:time_to_first_token_seconds
E2E_BUCKETS_S = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
)  # vLLM's buckets for vllm:e2e_request_latency_seconds


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


class SimulatorMetrics:
    """The registry behind ``GET /metrics``: engine totals, latency histograms, power."""

    def __init__(self, model_name: str, counters: EngineCounters, power: PowerModel, fault_kinds: Iterable[str] = ()):
        self.registry = CollectorRegistry(auto_describe=False)
        self._ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            ["model_name"],
            buckets=TTFT_BUCKETS_S,
            registry=self.registry,
        ).labels(model_name)
        self._e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            ["model_name"],
            buckets=E2E_BUCKETS_S,
            registry=self.registry,
        ).labels(model_name)
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
        self._model_name = model_name
        self.registry.register(_EngineCollector(counters, model_name, power))

    def observe_first_token(self, ttft_s: float) -> None:
        self._ttft.observe(ttft_s)

    def observe_finished(self, e2e_s: float, finish_reason: str) -> None:
        self._e2e.observe(e2e_s)
        self._success.labels(self._model_name, finish_reason).inc()

    def count_fault(self, kind: str) -> None:
        self._faults.labels(kind).inc()

    def render(self) -> bytes:
        """The exposition text (Prometheus text format 0.0.4)."""
        return generate_latest(self.registry)
