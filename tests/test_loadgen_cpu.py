"""The load generator's own CPU per worker: metered between a worker's reports, carried through Locust's
msgpack with its records, cut to a step's window on the master, and what the search does with a busy one
(and with agentperf's simulator fallen behind real time, the same doubt on the server's side)."""

from __future__ import annotations

import json
import math

import pytest

from agentperf_users.measure import aggregate
from agentperf_users.measure.aggregate import Aggregator, attach_records
from agentperf_users.measure.diagnose import LOADGEN_CPU_BUSY, Cause, CpuReading, LoadGenerator
from agentperf_users.measure.loadgen_cpu import (
    MIN_INTERVAL_S,
    CpuInterval,
    CpuMeter,
    window_load,
)
from agentperf_users.measure.records import RecordLog
from agentperf_users.measure.server_metrics import ServerSample
from agentperf_users.search.shape import format_step
from tests.test_aggregate import local_environment, over_the_wire
from tests.test_shape import shape_environment
from tests.test_slo import record


class FakeProcess:
    """A process clock that the test moves: monotonic wall seconds and CPU seconds, and the epoch."""

    def __init__(self) -> None:
        self.wall_s, self.cpu_s, self.epoch_s = 10.0, 1.0, 1000.0

    def read(self) -> CpuReading:
        return CpuReading(self.wall_s, self.cpu_s)

    def run(self, wall_s: float, cpu_s: float) -> None:
        self.wall_s += wall_s
        self.cpu_s += cpu_s
        self.epoch_s += wall_s


def test_the_meter_gives_the_cpu_since_its_last_interval():
    process = FakeProcess()
    meter = CpuMeter(read=process.read, clock=lambda: process.epoch_s)
    process.run(wall_s=3.0, cpu_s=2.7)
    assert meter.interval("worker-1-7") == CpuInterval("worker-1-7", 1003.0, 3.0, pytest.approx(2.7))
    process.run(wall_s=MIN_INTERVAL_S / 2, cpu_s=0.1)
    assert meter.interval("worker-1-7") is None  # too soon: the next interval covers this time
    process.run(wall_s=2.0, cpu_s=0.5)
    later = meter.interval("worker-1-7")
    assert (later.start_epoch_s, later.wall_s, later.cpu_s) == (1003.0, 2.25, pytest.approx(0.6))


def test_a_window_takes_each_worker_s_intervals_by_their_share_inside_it():
    intervals = [
        CpuInterval("w1", 103.0, 3.0, 3.0),  # 100-103: busy, outside the window but for 1 s
        CpuInterval("w1", 106.0, 3.0, 0.3),  # 103-106: inside
        CpuInterval("w1", 109.0, 3.0, 0.6),  # 106-109: 2 s inside
        CpuInterval("w2", 108.0, 6.0, 5.4),  # 102-108: inside
        CpuInterval("w3", 101.0, 1.0, 1.0),  # before the window
    ]
    load = window_load(intervals, 102.0, 108.0)
    # w1: (1 s of 1.0 + 0.3 + 2 s of 0.2) CPU seconds over 6 s; w2: 0.9 throughout; w3 not in the window
    assert dict(load.worker_cpu) == {"w1": pytest.approx((1.0 + 0.3 + 0.4) / 6), "w2": pytest.approx(0.9)}
    assert load.busiest() == ("w2", pytest.approx(0.9))
    assert window_load(intervals, 200.0, 210.0) is None
    assert LoadGenerator.from_dict(json.loads(json.dumps(load.to_dict()))) == load
    assert LoadGenerator.from_dict(None) is None


def test_cpu_crosses_locust_msgpack_with_the_records_and_the_master_keeps_it_per_worker():
    process = FakeProcess()
    meter = CpuMeter(read=process.read, clock=lambda: process.epoch_s)
    log = RecordLog(writer=None)
    log.add(record(end=1001.0))
    aggregator = Aggregator(active_sources=lambda: ["worker-a"])
    for _ in range(4):  # four reports of 3 s at 95 % of a core
        process.run(wall_s=3.0, cpu_s=2.85)
        report: dict = {}
        attach_records(log, report, meter.interval("worker-1-42"))
        aggregator.receive("worker-a", over_the_wire(report))
    aggregator.receive("worker-b", {aggregate.COVERED_KEY: 0.0, aggregate.RECORDS_KEY: []})  # an older worker
    assert len(aggregator.records()) == 1
    load = aggregator.load_generator(1001.5, 1010.5)
    assert load.worker_cpu == (("worker-1-42", pytest.approx(0.95)),)
    assert aggregator.load_generator(2000.0, 2010.0) is None


def test_a_local_run_meters_its_own_process():
    environment = local_environment()
    live = aggregate.aggregator(environment)
    start = live.covered_until()  # the first pull starts the meter's interval
    spin_until = start + 2 * MIN_INTERVAL_S
    while live.covered_until() < spin_until:  # busy: the process's own CPU, measured
        sum(i * i for i in range(10_000))
    ((worker, cpu),) = live.load_generator(start, math.inf).worker_cpu
    assert worker == aggregate.LOCAL_SOURCE and 0.3 < cpu < 1.5  # this process spun (on a shared machine)


def busy(environment, start_epoch_s: float, cpu: float, worker: str = "worker-1-99") -> None:
    """A worker's report of ``cpu`` of a core for an hour from ``start``, as a master receives it."""
    intervals = [CpuInterval(worker, start_epoch_s + 3.0 * (i + 1), 3.0, 3.0 * cpu).to_wire() for i in range(1200)]
    aggregate.aggregator(environment).receive(
        worker, {aggregate.COVERED_KEY: -math.inf, aggregate.RECORDS_KEY: [], aggregate.CPU_KEY: intervals})


def run_search(environment, shape, clock) -> None:
    """Every agent ends a request a second with TTFT 0.1 s × agents (``test_shape.drive``'s load)."""
    log = aggregate.get_record_log(environment)
    ticks = 0
    while (result := shape.tick()) is not None:
        environment.runner.shape_last_tick = result
        for agent in range(result[0]):
            log.add(record(agent=agent, ttft_s=0.1 * aggregate.current_step(environment).agents, output_tps=50.0,
                           end=clock.now))
        clock.now += 1.0
        ticks += 1
        assert ticks < 2000


def test_a_busy_worker_is_not_a_capacity_fail_measured_again_then_the_search_stops_naming_it(tmp_path):
    """Steps of 2 agents pass, 4 fail the strict tier: with a worker at 95 % of a core the fail is put
    down to the load generator, the count measured once more, then the search ends saying so."""
    environment, shape, clock = shape_environment(tmp_path, early_stop=False)
    busy(environment, clock.now, LOADGEN_CPU_BUSY + 0.05)
    run_search(environment, shape, clock)
    assert [s.agents for s in shape.steps] == [2, 4, 4]
    assert shape.steps[0].verdict.passed and shape.steps[0].diagnoses == ()
    for step in shape.steps[1:]:
        assert step.load_generator.worker_cpu == (("worker-1-99", pytest.approx(0.95)),)
        (diagnosis,) = step.diagnoses
        assert (diagnosis.tier, diagnosis.cause.value) == ("strict", "the load generator")
        assert not diagnosis.about_capacity
        assert "worker worker-1-99 used 95 % of a core" in diagnosis.text
    assert shape.stopped.cause == "the load generator" and shape.stopped.agents == 4
    assert "| load generator: 95 % of a core at most (worker-1-99, 1 worker(s)) | strict why: the load generator" in (
        format_step(shape.steps[1]))
    assert shape.stopped.line().startswith("search stopped at step 2 (4 agents): the load generator is the limit")
    assert shape.capacity()["strict"].first_failing_agents is None  # never counted as the tier failing
    environment.events.test_stop.fire(environment=environment)  # the search ended the test: not an interruption
    state = json.loads((tmp_path / "capacity.json").read_text())
    assert state["interrupted"] is False and state["stopped"]["cause"] == "the load generator"
    assert state["steps"][1]["load_generator"] == {"worker_cpu": {"worker-1-99": pytest.approx(0.95)}}


def test_a_simulator_behind_real_time_is_measured_again_then_the_search_stops_naming_its_host(tmp_path):
    """The same load, with the server's readings saying agentperf's simulator lost 20 % of its engine time:
    the strict tier's fail at 4 agents is put down to the simulator's host, measured again, then the search
    ends saying so."""
    readings = tmp_path / "server_metrics.jsonl"
    environment, shape, clock = shape_environment(tmp_path, early_stop=False, server_metrics_file=str(readings))
    readings.write_text("".join(
        ServerSample(clock.now - 5 + i, "vllm", {"requests_running": 2.0, "simulator_clock_slip": 0.2 * i}, {})
        .to_json() + "\n" for i in range(400)))
    run_search(environment, shape, clock)
    assert [s.agents for s in shape.steps] == [2, 4, 4]
    for step in shape.steps[1:]:
        assert step.server.simulator_time_lost_share == pytest.approx(0.2)
        (diagnosis,) = step.diagnoses
        assert (diagnosis.tier, diagnosis.cause, diagnosis.about_capacity) == ("strict", Cause.SIMULATOR, False)
    assert shape.stopped.line().startswith("search stopped at step 2 (4 agents): the simulator's host is the limit")
    assert shape.capacity()["strict"].first_failing_agents is None  # never counted as the tier failing


def test_a_worker_below_the_threshold_leaves_the_verdict_to_the_server(tmp_path):
    environment, shape, clock = shape_environment(tmp_path, early_stop=False)
    busy(environment, clock.now, LOADGEN_CPU_BUSY - 0.05)
    run_search(environment, shape, clock)
    assert shape.stopped is None and [s.agents for s in shape.steps] == [2, 4, 6, 5, 3]
    assert {t: c.agents for t, c in shape.capacity().items()} == {"loose": 4, "strict": 2}
    assert all(s.load_generator.busiest()[1] == pytest.approx(0.85) for s in shape.steps)
