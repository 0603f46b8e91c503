"""Exact aggregation: the wire format through Locust's own msgpack, coverage, the LocalRunner path,
and recomputation from the record files."""

from __future__ import annotations

import argparse
import math
import time

from locust import User, constant
from locust.env import Environment
from locust.event import Events
from locust.rpc.protocol import Message

from agentperf_users.measure import aggregate
from agentperf_users.measure.aggregate import Aggregator, LoadStep, attach_records
from agentperf_users.measure.records import (
    RecordLog,
    RecordWriter,
    Status,
    read_records,
)
from agentperf_users.measure.slo import SloSpec, SloTier, evaluate_step, recompute
from tests.test_slo import record

SPEC = SloSpec("x", (SloTier(name="a", ttft_max_s=2.0, output_tps_min=10.0, max_error_rate=0.5),))


class IdleUser(User):
    wait_time = constant(1)


def local_environment(records_dir: str = "", run_id: str = "") -> Environment:
    environment = Environment(
        user_classes=[IdleUser],
        events=Events(),
        parsed_options=argparse.Namespace(records_dir=records_dir, run_id=run_id),
    )
    environment.create_local_runner()
    return environment


def over_the_wire(data: dict) -> dict:
    """What the master's worker_report listener receives for a worker's report payload."""
    return Message.unserialize(Message("stats", data, "worker-a").serialize()).data


def test_records_cross_locust_msgpack_unchanged():
    log = RecordLog(writer=None)
    sent = [record(agent=i, ttft_s=0.1 * i, end=100.0 + i) for i in range(5)]
    sent.append(record(agent=9, ttft_s=None, output_tps=None, status=Status.STALL, end=106.0))
    for item in sent:
        log.add(item)
    report: dict = {}
    before = time.time()
    attach_records(log, report)
    aggregator = Aggregator(active_sources=lambda: ["worker-a"])
    aggregator.receive("worker-a", over_the_wire(report))
    assert aggregator.records() == sent
    assert before - aggregate.RECORD_ADD_GRACE_S <= aggregator.covered_until() <= time.time()
    attach_records(log, report)  # drained: a second report carries no record twice
    aggregator.receive("worker-a", over_the_wire(report))
    assert len(aggregator.records()) == len(sent)


def test_a_request_in_flight_holds_coverage_however_late_its_record_comes():
    """A starved worker's agent may add its record long after the request ended: coverage stays at the
    request's beginning until then, so no window closes without it."""
    log = RecordLog(writer=None)
    ticket = log.begin(100.0)
    report: dict = {}
    attach_records(log, report)
    assert report[aggregate.COVERED_KEY] == 100.0 and report[aggregate.RECORDS_KEY] == []
    late = record(agent=1, ttft_s=0.2, end=101.0)  # ended at 101, added now
    log.add(late, ticket)
    attach_records(log, report)
    assert report[aggregate.COVERED_KEY] > 101.0 and len(report[aggregate.RECORDS_KEY]) == 1
    cut = log.begin(200.0)
    log.end(cut)  # a request that left no record (killed before its client returned) holds nothing
    assert log.covered_until(300.0, 0.5) == 299.5


def test_a_streaming_request_holds_coverage_only_up_to_what_it_has_read():
    """A request streaming across a window's end cannot end before what it has already read: coverage
    follows its progress, so the window closes without waiting for the request to end, and never moves back."""
    log = RecordLog(writer=None)
    ticket = log.begin(100.0)
    log.progress(ticket, 130.0)
    assert log.covered_until(200.0, 0.5) == 130.0
    log.progress(ticket, 120.0)  # an earlier stamp (a stale read) does not move it back
    assert log.covered_until(200.0, 0.5) == 130.0
    log.add(record(agent=1, ttft_s=0.2, end=131.0), ticket)
    log.progress(ticket, 150.0)  # after its record: the ticket is gone, nothing is held
    assert log.covered_until(200.0, 0.5) == 199.5


def test_coverage_is_the_minimum_over_active_workers():
    active = ["a", "b"]
    aggregator = Aggregator(active_sources=lambda: active)
    aggregator.receive("a", {aggregate.COVERED_KEY: 50.0, aggregate.RECORDS_KEY: []})
    assert aggregator.covered_until() == -math.inf  # b is active but has not reported
    aggregator.receive("b", {aggregate.COVERED_KEY: 40.0, aggregate.RECORDS_KEY: []})
    assert aggregator.covered_until() == 40.0
    active.remove("b")  # b went missing: no longer waited for
    assert aggregator.covered_until() == 50.0
    active.clear()
    assert aggregator.covered_until() == math.inf
    aggregator.receive("a", {"stats": []})  # a report without our keys (e.g. an older worker) changes nothing
    assert aggregator.records() == []


def test_records_between_is_half_open_on_end_time():
    aggregator = Aggregator(active_sources=lambda: ["a"])
    wire = [aggregate.record_to_wire(record(end=t)) for t in (9.9, 10.0, 15.0, 20.0)]
    aggregator.receive("a", {aggregate.COVERED_KEY: 99.0, aggregate.RECORDS_KEY: wire})
    assert [r.end_epoch_s for r in aggregator.records_between(10.0, 20.0)] == [10.0, 15.0]


def test_the_masters_copy_and_a_workers_own_file_count_each_request_once(tmp_path):
    """On one disk (local workers, or a volume the hosts share) a request is in two files."""
    reported = [record(agent=i, end=10.0 + i) for i in range(3)]
    worker = RecordLog(RecordWriter(tmp_path, "worker-0-1"))
    for item in reported:
        worker.add(item)
    master = RecordLog(RecordWriter(tmp_path, "master"))
    master.keep(reported[:2])  # the last report did not reach the master
    assert master.drain() == []  # kept records are not the master's own to report
    assert len(read_records([tmp_path / "records-master.jsonl"])) == 2
    assert sorted(read_records([tmp_path]), key=lambda r: r.agent) == reported


def test_local_runner_takes_the_report_path_and_matches_the_files(tmp_path):
    environment = local_environment(records_dir=str(tmp_path))
    log = aggregate.get_record_log(environment)
    assert aggregate.get_record_log(environment) is log
    assert aggregate.process_id(environment) == "local"
    assert log.path == tmp_path / "records-local.jsonl"
    run = aggregate.run_id(environment)
    assert run  # generated for a local run
    now = time.time()
    added = [record(agent=i % 3, ttft_s=0.5 + i * 0.1, end=now - 30 + i) for i in range(20)]
    for item in added:
        log.add(item)
    live = aggregate.aggregator(environment)
    assert live.covered_until() >= now - aggregate.RECORD_ADD_GRACE_S
    assert live.records() == added == read_records([tmp_path])
    windows = [(now - 30, now - 20), (now - 20, now)]
    live_verdicts = [evaluate_step(live.records_between(*window), SPEC) for window in windows]
    assert recompute(tmp_path, windows, SPEC) == live_verdicts
    assert [v.tiers[0].requests for v in live_verdicts] == [10, 10]
    assert live_verdicts[0].passed and not live_verdicts[1].passed  # TTFTs above 2 s only in the second
    assert recompute(tmp_path, windows, SPEC, run_id="other")[0].tiers[0].requests == 0


def test_no_records_dir_means_no_file_and_an_explicit_run_id_is_kept():
    environment = local_environment(run_id="mine")
    assert aggregate.get_record_log(environment).path is None
    assert aggregate.run_id(environment) == "mine"


def test_announced_step_is_current_locally():
    environment = local_environment()
    assert aggregate.current_load_step(environment) == 0
    aggregate.announce_step(environment, LoadStep(index=3, agents=12))
    assert aggregate.current_load_step(environment) == 3
    assert aggregate.current_step(environment) == LoadStep(3, 12)



def test_a_record_file_that_is_not_text_or_nests_too_deep_is_one_line(tmp_path):
    import pytest

    from agentperf_users.errors import AgentperfError

    latin1 = tmp_path / "records-a.jsonl"
    latin1.write_bytes(b'{"run_id": "caf\xe9"}\n')
    with pytest.raises(AgentperfError, match=r"records-a.jsonl: cannot read the records file \('utf-8' codec"):
        read_records([latin1])
    deep = tmp_path / "records-b.jsonl"
    deep.write_text("[" * 100_000 + "]" * 100_000 + "\n{}\n")
    with pytest.raises(AgentperfError, match=r"records-b.jsonl:1: not a request record \(maximum recursion depth"):
        read_records([deep])
