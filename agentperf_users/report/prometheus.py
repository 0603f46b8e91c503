"""Prometheus metrics of a run, served by the master (or a local run) with ``--metrics-port``.

They show, while a search runs, what its verdicts see: every request of every worker by status, TTFT and
output-speed histograms, and each judged step's numbers and pass/fail per SLO tier, then the capacity.
A collector reads them when Prometheus scrapes, from the aggregator's union of records and the shape's
verdicts, which already hold them exactly; nothing is added to the path a record takes, and no number
here is an average of workers' numbers. Only status and tier names are labels, never a message, a
header or a URL, so no secret can reach a metric.
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
from agentperf_users.search.shape import CapacitySearchShape

logger = logging.getLogger(__name__)

TTFT_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
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
