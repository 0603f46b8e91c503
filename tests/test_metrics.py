"""The run's Prometheus metrics, read back through prometheus_client's own text parser: request counts
by status and the histograms equal what the records say, counted once however often Prometheus scrapes.
(tests/distributed/test_metrics_scrape.py has a real Prometheus server scrape a real master.)"""

from __future__ import annotations

import time

from prometheus_client import generate_latest
from prometheus_client.core import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from agentperf_users.measure import aggregate
from agentperf_users.measure.records import Status
from agentperf_users.measure.slo import evaluate_step, load_slo
from agentperf_users.report.prometheus import TTFT_BUCKETS_S, RunCollector
from tests.test_aggregate import local_environment
from tests.test_slo import record


def scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple], float]:
    samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_counts_and_histograms_follow_the_records_once_each():
    environment = local_environment()
    registry = CollectorRegistry()
    registry.register(RunCollector(environment))
    log = aggregate.get_record_log(environment)
    ttfts = [0.05, 0.3, 0.3, 4.0, 50.0]
    for i, ttft in enumerate(ttfts):
        log.add(record(agent=i, ttft_s=ttft, output_tps=25.0, end=100.0 + i))
    log.add(record(agent=9, ttft_s=None, output_tps=None, status=Status.TIMEOUT, end=110.0))
    first = scrape(registry)
    assert first == scrape(registry)  # a second scrape adds nothing
    assert first[("agentperf_requests_total", (("status", "ok"),))] == 5
    assert first[("agentperf_requests_total", (("status", "timeout"),))] == 1
    assert first[("agentperf_requests_total", (("status", "stall"),))] == 0  # every status, from the start
    for bound in TTFT_BUCKETS_S:
        expected = sum(ttft <= bound for ttft in ttfts)
        assert first[("agentperf_request_ttft_seconds_bucket", (("le", str(bound)),))] == expected, bound
    assert first[("agentperf_request_ttft_seconds_count", ())] == 5
    assert first[("agentperf_request_ttft_seconds_sum", ())] == sum(ttfts)

    log.add(record(agent=1, ttft_s=0.3, output_tps=25.0, end=120.0))
    later = scrape(registry)
    assert later[("agentperf_requests_total", (("status", "ok"),))] == 6
    assert later[("agentperf_request_ttft_seconds_bucket", (("le", "0.5"),))] == 4
    assert later[("agentperf_load_step", ())] == 0 and later[("agentperf_agents_running", ())] == 0
    assert not [name for name, _ in later if name.startswith("agentperf_step_")]  # no search in this run


def test_slo_now_is_the_verdict_on_the_last_window():
    environment = local_environment()
    environment.parsed_options.slo, environment.parsed_options.slo_window_s = "", 30.0
    registry = CollectorRegistry()
    registry.register(RunCollector(environment))
    now = time.time()
    log = aggregate.get_record_log(environment)
    added = [record(agent=i % 3, ttft_s=0.5 * i, output_tps=40.0 - i, end=now - 44.25 + i * 2) for i in range(20)]
    for item in added:
        log.add(item)
    samples = scrape(registry)
    expected = evaluate_step([r for r in added if r.end_epoch_s >= now - 30.5], load_slo(None))  # 13 of 20
    for tier in expected.tiers:
        labels = (("tier", tier.tier.name),)
        assert samples[("agentperf_slo_now_passed", labels)] == (1.0 if tier.passed else 0.0)
        assert samples[("agentperf_slo_now_requests", labels)] == 13
        assert samples[("agentperf_slo_now_ttft_seconds", labels)] == tier.ttft_quantile_s
    assert {tier.passed for tier in expected.tiers} == {True, False}
