"""The run's Prometheus metrics, read back through prometheus_client's own text parser: request counts
by status and the histograms equal what the records say, counted once however often Prometheus scrapes.
(tests/distributed/test_metrics_scrape.py has a real Prometheus server scrape a real master.)"""

from __future__ import annotations

import time

import pytest
from prometheus_client import generate_latest
from prometheus_client.core import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from agentperf_users.measure import aggregate
from agentperf_users.measure.records import Status
from agentperf_users.measure.server_metrics import HistogramValue, ServerSample
from agentperf_users.measure.slo import evaluate_step, load_slo
from agentperf_users.report.prometheus import (
    SERVER_NUMBERS,
    TTFT_BUCKETS_S,
    RunCollector,
    metric_name,
)
from tests.test_aggregate import local_environment
from tests.test_loadgen_cpu import busy, run_search
from tests.test_shape import shape_environment
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


def histogram(total_s: float, count: float) -> HistogramValue:
    return HistogramValue(total_s, count, ((1.0, count), (float("inf"), count)))


def server_readings(path, start_epoch_s: float, seconds: int = 400) -> None:
    """agentperf's simulator's readings once a second (vLLM's names and its own real-time numbers): a queue
    that grows and shrinks (0..6 waiting), KV usage under the pressure mark, queue time 0.8 s of every
    request's 1 s server TTFT, and 1 % of the engine's time lost to falling behind."""
    lines = []
    for i in range(seconds):
        values = {"requests_running": 4.0 + i % 3, "requests_waiting": float(i % 7),
                  "kv_cache_usage": 0.5 + (i % 5) / 20,
                  "prefix_cache_queries": 1000.0 * i, "prefix_cache_hits": 900.0 * i, "preemptions": 0.0,
                  "requests_finished": float(i), "simulator_clock_slip": 0.01 * i}
        histograms = {"queue_time": histogram(0.8 * i, i), "prefill_time": histogram(0.15 * i, i),
                      "decode_time": histogram(2.0 * i, i), "ttft": histogram(1.0 * i, i),
                      "inter_token_latency": histogram(0.02 * 50 * i, 50 * i),
                      "simulator_write_late": histogram(0.001 * 50 * i, 50 * i)}
        lines.append(ServerSample(start_epoch_s + i, "vllm", values, histograms).to_json())
    path.write_text("\n".join(lines) + "\n")


def searched(tmp_path):
    """A whole search on a LocalRunner (``test_shape``'s load: the strict tier fails from 3 agents, the loose
    one from 5), with the server's readings and a worker at 50 % of a core: every step has server numbers,
    the load generator's CPU, and each failing tier a diagnosis (queueing)."""
    readings = tmp_path / "server_metrics.jsonl"
    environment, shape, clock = shape_environment(tmp_path, early_stop=False, server_metrics_file=str(readings))
    server_readings(readings, clock.now - 5)
    busy(environment, clock.now, 0.5)
    run_search(environment, shape, clock)
    assert [s.agents for s in shape.steps] == [2, 4, 6, 5, 3]
    return environment, shape


def test_each_step_s_server_numbers_load_generator_and_diagnoses_are_the_step_s(tmp_path):
    environment, shape = searched(tmp_path)
    registry = CollectorRegistry()
    registry.register(RunCollector(environment))
    samples = scrape(registry)
    for step in shape.steps:
        labels = (("agents", str(step.agents)), ("step", str(step.index)))
        assert step.server.available and step.server.requests_waiting_mean > 0
        for name in SERVER_NUMBERS:
            assert samples[(f"agentperf_step_server_{metric_name(name)}", labels)] == getattr(step.server, name), name
        assert samples[("agentperf_step_load_generator_cpu_max", labels)] == step.load_generator.busiest()[1]
        assert samples[("agentperf_step_load_generator_cpu_max", labels)] == pytest.approx(0.5)
        failed = {verdict.tier.name for verdict in step.verdict.tiers if not verdict.passed}
        assert {found.tier for found in step.diagnoses} == failed
        for found in step.diagnoses:
            tier = tuple(sorted((*labels, ("cause", found.cause.value), ("tier", found.tier))))
            assert samples[("agentperf_step_diagnosis", tier)] == 1.0
            assert samples[("agentperf_step_diagnosis_about_capacity", tier)] == 1.0
            for name, value in found.evidence:
                assert samples[(f"agentperf_step_diagnosis_evidence_{metric_name(name)}", tier)] == value
    diagnosed = [(s.index, d.tier, d.cause.value) for s in shape.steps for d in s.diagnoses]
    assert diagnosed == [(1, "strict", "queueing"), (2, "loose", "queueing"), (2, "strict", "queueing"),
                         (3, "loose", "queueing"), (3, "strict", "queueing"), (4, "strict", "queueing")]
    assert ("agentperf_step_server_queue_time_mean_seconds", (("agents", "2"), ("step", "0"))) in samples
    assert {name for name, labels in samples if name.startswith("agentperf_step_diagnosis")} == {
        "agentperf_step_diagnosis", "agentperf_step_diagnosis_about_capacity",
        "agentperf_step_diagnosis_evidence_requests_waiting_mean",
        "agentperf_step_diagnosis_evidence_queue_time_mean_seconds",
        "agentperf_step_diagnosis_evidence_server_ttft_mean_seconds"}
    label_names = {name for _, labels in samples for name, _ in labels}
    assert label_names <= {"step", "agents", "tier", "cause", "status", "le"}  # never free text
