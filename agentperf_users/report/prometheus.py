"""Prometheus metrics of a run, served by the master (or a local run) with ``--metrics-port``.

They show, while a search runs, what its verdicts see: every request of every worker by status, TTFT and
output-speed histograms, and each judged step's numbers and pass/fail per SLO tier, then the capacity.
Each judged step also has the server's own numbers over its window (``agentperf_step_server_<number>``,
named after ``server_metrics.ServerWindow``'s fields, seconds as ``_seconds``), the load generator's CPU
(``agentperf_step_load_generator_cpu_max``/``_mean``, of its workers) and, per failing tier, the
diagnosis (``agentperf_step_diagnosis{cause}`` 1, ``..._about_capacity``, and each number of its evidence
as ``agentperf_step_diagnosis_evidence_<name>``). A collector reads them when Prometheus scrapes, from
the aggregator's union of records and the shape's step results, which already hold them exactly; nothing
is added to the path a record takes, and no number here is an average of workers' numbers. Only status,
tier, cause, step and agent count are labels, never a message, a header, a URL or a worker's name, so no
secret (and no unbounded set of series) can reach a metric.
"""

from __future__ import annotations

import bisect
import logging
from collections import Counter
from typing import Iterable, Iterator

from locust.env import Environment
from locust.runners import WorkerRunner
from prometheus_client import start_http_server
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from agentperf_users import options
from agentperf_users.errors import AgentperfError
from agentperf_users.measure import aggregate
from agentperf_users.measure.records import RequestRecord, Status
from agentperf_users.measure.slo import TierVerdict
from agentperf_users.search.policy import CapacityStatus
from agentperf_users.search.shape import CapacitySearchShape, StepResult

logger = logging.getLogger(__name__)

TTFT_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
STEP_LABELS = ["step", "agents"]
TIER_LABELS = [*STEP_LABELS, "tier", "cause"]
SERVER_NUMBERS = {  # ServerWindow's numbers, as each step's gauge documents them
    "readings": "Readings of the server's metrics endpoint in the step's window",
    "requests_running_mean": "Requests the server was running, mean over the window",
    "requests_running_max": "Requests the server was running, max over the window",
    "requests_waiting_mean": "Requests waiting in the server's queue, mean over the window",
    "requests_waiting_max": "Requests waiting in the server's queue, max over the window",
    "kv_cache_usage_mean": "KV-cache usage (0..1), mean over the window",
    "kv_cache_usage_max": "KV-cache usage (0..1), max over the window (the fullest engine)",
    "prefix_cache_hit_ratio": "Server-side prefix-cache hits / queries, tokens, over the window",
    "preemptions": "Requests the server preempted in the window",
    "requests_finished": "Requests the server finished in the window",
    "queue_time_mean_s": "Mean queue time, from the server's histogram, over the window",
    "prefill_time_mean_s": "Mean prefill time, from the server's histogram, over the window",
    "decode_time_mean_s": "Mean decode time, from the server's histogram, over the window",
    "ttft_mean_s": "Mean time to first token as the server measured it, over the window",
    "inter_token_latency_mean_s": "Mean inter-token latency as the server measured it, over the window",
    "simulator_time_lost_share": "agentperf's simulator only: modelled engine time lost to falling behind real "
                                 "time, per second of the window (summed over its replicas)",
    "simulator_write_late_mean_s": "agentperf's simulator only: mean delay from a step's modelled end to the "
                                   "writing of its tokens, over the window",
}
OUTPUT_TPS_BUCKETS = (5.0, 10.0, 20.0, 30.0, 40.0, 60.0, 80.0, 100.0, 150.0, 200.0, 300.0)


class _Histogram:
    """Cumulative bucket counts, grown record by record as they arrive (never recounted)."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)  # the last: above every bound
        self._sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self._bounds, value)] += 1
        self._sum += value

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        cumulative, running = [], 0
        for bound, count in zip((*map(str, self._bounds), "+Inf"), self._counts):
            running += count
            cumulative.append((bound, running))
        return HistogramMetricFamily(name, documentation, buckets=cumulative, sum_value=self._sum)


class RunCollector(Collector):
    """The run's metrics, computed at each scrape from the records and verdicts so far."""

    def __init__(self, environment: Environment) -> None:
        self._environment = environment
        self._taken = 0  # records already counted (the aggregator's list only grows)
        self._statuses: Counter[str] = Counter()
        self._output_tokens = 0
        self._ttft = _Histogram(TTFT_BUCKETS_S)
        self._output_tps = _Histogram(OUTPUT_TPS_BUCKETS)

    def collect(self) -> Iterator[Metric]:
        self._take(aggregate.aggregator(self._environment).records_from(self._taken))
        requests = CounterMetricFamily("agentperf_requests", "Requests completed, of every worker, by how they ended",
                                       labels=["status"])
        for status in Status:
            requests.add_metric([status.value], self._statuses[status.value])
        yield requests
        yield CounterMetricFamily("agentperf_output_tokens", "Output tokens received", value=self._output_tokens)
        yield self._ttft.family("agentperf_request_ttft_seconds", "Time to first token of successful requests")
        yield self._output_tps.family("agentperf_request_output_tokens_per_second",
                                      "Output speed of successful requests: (tokens - 1) / (last token - first token)")
        runner = self._environment.runner
        yield GaugeMetricFamily("agentperf_agents_running", "Agents (Locust users) running now", value=runner.user_count)
        step = aggregate.current_step(self._environment)
        yield GaugeMetricFamily("agentperf_load_step", "Index of the load step in progress", value=step.index)
        yield GaugeMetricFamily("agentperf_load_step_agents", "Agents of the load step in progress", value=step.agents)
        yield from _slo_now_metrics(self._environment)
        if isinstance(self._environment.shape_class, CapacitySearchShape):
            yield from _search_metrics(self._environment.shape_class)

    def _take(self, records: list[RequestRecord]) -> None:
        for record in records:
            self._statuses[record.status.value] += 1
            self._output_tokens += record.output_tokens
            if record.ok and record.ttft_s is not None:
                self._ttft.observe(record.ttft_s)
            if record.ok and record.output_tps is not None:
                self._output_tps.observe(record.output_tps)
        self._taken += len(records)


def _verdict_families(prefix: str, about: str, labels: list[str],
                      verdicts: Iterable[tuple[list[str], TierVerdict]]) -> tuple[Metric, ...]:
    """Tier verdicts as four gauges (``<prefix>_passed``, ``_ttft_seconds``, ``_output_tokens_per_second``,
    ``_requests``), a series per label values."""
    passed = GaugeMetricFamily(f"{prefix}_passed", f"1 if the tier holds {about}, else 0", labels=labels)
    ttft = GaugeMetricFamily(f"{prefix}_ttft_seconds", f"TTFT at the tier's quantile {about}", labels=labels)
    speed = GaugeMetricFamily(f"{prefix}_output_tokens_per_second",
                              f"Output speed at the tier's low-tail quantile {about}", labels=labels)
    requests = GaugeMetricFamily(f"{prefix}_requests", f"Requests judged {about}", labels=labels)
    for key, verdict in verdicts:
        passed.add_metric(key, 1.0 if verdict.passed else 0.0)
        requests.add_metric(key, verdict.requests)
        if verdict.ttft_quantile_s is not None:
            ttft.add_metric(key, verdict.ttft_quantile_s)
        if verdict.output_tps_quantile is not None:
            speed.add_metric(key, verdict.output_tps_quantile)
    return passed, ttft, speed, requests


def _slo_now_metrics(environment: Environment) -> Iterator[Metric]:
    """Each tier's verdict on the last ``--slo-window-s`` seconds (``aggregate.slo_now``); none while the
    ``--slo`` file is bad (the web UI's tab says why)."""
    try:
        verdict, window_s = aggregate.slo_now(environment)
    except AgentperfError:
        return
    yield from _verdict_families("agentperf_slo_now", f"over the requests that ended in the last {window_s:g} s",
                                 ["tier"], (([tier.tier.name], tier) for tier in verdict.tiers))


def _search_metrics(shape: CapacitySearchShape) -> Iterator[Metric]:
    """Every judged step's numbers per tier (labelled by step: a search has tens of steps, not thousands),
    and each tier's capacity as far as it is known."""
    yield from _verdict_families(
        "agentperf_step", "in the judged step", ["step", "agents", "tier"],
        (([str(step.index), str(step.agents), verdict.tier.name], verdict)
         for step in shape.steps for verdict in step.verdict.tiers))
    capacity = GaugeMetricFamily("agentperf_capacity_agents",
                                 "Agents the tier holds: located, or as far as the search has got (see status)",
                                 labels=["tier"])
    status = GaugeMetricFamily("agentperf_capacity_status", "1 for the tier's current capacity status",
                               labels=["tier", "status"])
    for name, tier in shape.capacity().items():
        if tier.agents is not None:
            capacity.add_metric([name], tier.agents)
        for value in CapacityStatus:
            status.add_metric([name, value.value], 1.0 if tier.status is value else 0.0)
    yield from (capacity, status)
    yield from _step_server_metrics(shape.steps)
    yield from _step_diagnosis_metrics(shape.steps)


def metric_name(name: str) -> str:
    """A number's name in Prometheus' style: seconds spelt out (``queue_time_mean_s`` -> ``..._seconds``)."""
    return name[:-2] + "_seconds" if name.endswith("_s") else name


def _step_key(step: StepResult) -> list[str]:
    return [str(step.index), str(step.agents)]


def _step_server_metrics(steps: list[StepResult]) -> Iterator[Metric]:
    """Each judged step's server numbers (a series only where the server gave the number) and its load
    generator's CPU, as fractions of one core (above 1: several threads at once)."""
    for name, documentation in SERVER_NUMBERS.items():
        family = GaugeMetricFamily(f"agentperf_step_server_{metric_name(name)}", documentation, labels=STEP_LABELS)
        for step in steps:
            value = getattr(step.server, name)
            if value is not None:
                family.add_metric(_step_key(step), float(value))
        yield family
    busiest = GaugeMetricFamily("agentperf_step_load_generator_cpu_max",
                                "The busiest worker's process CPU over the step's window, fraction of one core",
                                labels=STEP_LABELS)
    mean = GaugeMetricFamily("agentperf_step_load_generator_cpu_mean",
                             "The workers' mean process CPU over the step's window, fraction of one core",
                             labels=STEP_LABELS)
    for step in steps:
        if step.load_generator is not None and step.load_generator.worker_cpu:
            cpu = [fraction for _, fraction in step.load_generator.worker_cpu]
            busiest.add_metric(_step_key(step), max(cpu))
            mean.add_metric(_step_key(step), sum(cpu) / len(cpu))
    yield from (busiest, mean)


def _step_diagnosis_metrics(steps: list[StepResult]) -> Iterator[Metric]:
    """Each failing tier's binding cause (1 under its ``cause`` label), whether its verdict is about capacity,
    and the numbers of its evidence, a gauge per evidence name (the names ``diagnose`` gives: a fixed set)."""
    cause = GaugeMetricFamily("agentperf_step_diagnosis", "1 for a failing tier's binding cause in the step",
                              labels=TIER_LABELS)
    about = GaugeMetricFamily("agentperf_step_diagnosis_about_capacity",
                              "1 if the failing verdict is about the server's capacity; 0: a failing server or the "
                              "load generator, not counted by the search", labels=TIER_LABELS)
    evidence: dict[str, GaugeMetricFamily] = {}
    for step in steps:
        for found in step.diagnoses:
            key = [*_step_key(step), found.tier, found.cause.value]
            cause.add_metric(key, 1.0)
            about.add_metric(key, 1.0 if found.about_capacity else 0.0)
            for name, value in found.evidence:
                family = evidence.get(name)
                if family is None:
                    family = evidence[name] = GaugeMetricFamily(
                        f"agentperf_step_diagnosis_evidence_{metric_name(name)}",
                        f"Evidence of a failing tier's diagnosis: {name}", labels=TIER_LABELS)
                family.add_metric(key, float(value))
    yield from (cause, about, *evidence.values())


def serve(environment: Environment, **_) -> None:
    """Start the metrics server on Locust's ``init`` (not on a worker: its records are the master's)."""
    port = options.value(environment.parsed_options, "metrics_port")
    host = options.value(environment.parsed_options, "metrics_host") or options.BY_DEST["metrics_host"].default
    if not port or isinstance(environment.runner, WorkerRunner):
        return
    registry = CollectorRegistry()
    registry.register(RunCollector(environment))
    try:
        start_http_server(port, addr=host, registry=registry)
    except OSError as exc:  # the run goes on without metrics rather than not at all
        logger.error("agentperf: --metrics-port %d: cannot serve metrics on %s: %s", port, host, exc.strerror)
        return
    logger.info("agentperf: Prometheus metrics at http://%s:%d/metrics", host, port)
