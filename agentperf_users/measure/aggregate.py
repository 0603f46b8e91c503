"""The exact union of every process's request records, where load steps are judged.

Each process's agents put their records into that process's ``RecordLog`` (``get_record_log``).
A worker drains it into every stats report it sends the master (``events.report_to_master``, key
``agentperf_records``, as plain dicts) together with the wall-clock time it is *covered until*: every
record that ended before that time is in this or an earlier report. The master appends them in
``events.worker_report``. A LocalRunner takes the same path without the network: the aggregator
builds the same report from the local log whenever it is asked for records. Verdicts are therefore
computed on the raw records of all processes, never on averaged per-worker percentiles or on
Locust's bucketed response times. The same report carries the worker's process CPU use since its last
report (``loadgen_cpu``), which the master keeps per worker for a step's "load generator" diagnosis.

Coverage: ``Aggregator.covered_until()`` is the minimum over the *active* workers (ready, spawning
or running) of what each has reported. A worker that went missing or quit is ignored: waiting for it
would stall the search, and its unreported records are still in its file for the recomputation. A
worker that is active but has not reported yet holds coverage at -inf until it does. Windows are in
the master's wall clock and records in the worker's, so hosts need synchronised clocks (NTP), as
Locust itself assumes. Contract for whoever adds records: ``RecordLog.begin`` before the request starts
and ``add(record, ticket)`` after (the agents do), with ``progress(ticket, epoch_s)`` as the response
arrives (a time it cannot end before), or add a record within ``RECORD_ADD_GRACE_S`` of its
``end_epoch_s``. A starved worker's agents can take longer than any fixed grace to add theirs: a
covered time past them once let a window be judged on fewer records than its files held.

After the run the per-process JSONL files are the source of truth (Locust's master waits only
0.5 s for final reports on quit); the master's own file (``records-master.jsonl``) holds a copy of
every record it received, so with workers on other hosts the master's disk alone has every record
that any verdict judged. ``slo.recompute`` judges the same windows from the files (it lives there so
that the report and the ground truth need not import Locust and its monkey-patching).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Collection

from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner

from agentperf_users import options
from agentperf_users.measure.diagnose import LoadGenerator
from agentperf_users.measure.loadgen_cpu import CpuInterval, CpuMeter, window_load
from agentperf_users.measure.records import RecordLog, RecordWriter, RequestRecord
from agentperf_users.measure.slo import (
    SloSpec,
    StepVerdict,
    evaluate_step,
    load_slo,
    records_in_window,
)

RECORDS_KEY = "agentperf_records"
COVERED_KEY = "agentperf_covered_until_epoch_s"
CPU_KEY = "agentperf_cpu"  # the worker's process CPU since its last report (``loadgen_cpu``)
STEP_MESSAGE = "agentperf_step"
LOCAL_SOURCE = "local"
RECORD_ADD_GRACE_S = 0.5  # a record is added at most this long after its end time
_ENV_ATTRIBUTE = "agentperf_aggregation"


@dataclass(frozen=True)
class LoadStep:
    """The load step the search is in: records started now carry ``index`` as ``load_step``. With
    ``fresh_agents`` the step began from no agents, and the dealer deals its agents from the start
    (``replay.Dealer``) and times their first requests from ``ramp_start_epoch_s`` at ``spawn_rate``
    (``replay.join_offset_s``)."""

    index: int
    agents: int
    fresh_agents: bool = False
    ramp_start_epoch_s: float = 0.0
    spawn_rate: float = 0.0


def record_to_wire(record: RequestRecord) -> dict:
    """A record as plain msgpack-able values (the status as its string value)."""
    return {**dataclasses.asdict(record), "status": record.status.value}


def attach_records(log: RecordLog | None, data: dict, cpu: CpuInterval | None = None) -> None:
    """Fill a ``report_to_master`` payload: the log's new records and the time they cover, and the
    process's CPU use since its last report when metered (``cpu``). The time is taken before draining,
    and nothing yields in between (one greenlet)."""
    data[COVERED_KEY] = log.covered_until(time.time(), RECORD_ADD_GRACE_S) if log else time.time() - RECORD_ADD_GRACE_S
    data[RECORDS_KEY] = [record_to_wire(record) for record in log.drain()] if log else []
    data[CPU_KEY] = [cpu.to_wire()] if cpu is not None else []


class Aggregator:
    """The records of every process, as they arrive, and how far in time they are complete."""

    def __init__(
        self,
        active_sources: Callable[[], Collection[str]],
        local_log: Callable[[], RecordLog | None] | None = None,
        received: Callable[[list[RequestRecord]], None] | None = None,
        local_cpu: Callable[[], CpuInterval | None] | None = None,
    ) -> None:
        """:param active_sources: the sources (worker client ids) whose coverage a verdict waits for
        :param local_log: in a LocalRunner, the process's own log, pulled on every query
        :param received: on a master, given every worker report's records as they arrive
        :param local_cpu: in a LocalRunner, the process's CPU since the last pull (``CpuMeter``)"""
        self._active_sources = active_sources
        self._local_log = local_log
        self._received = received
        self._local_cpu = local_cpu
        self._records: list[RequestRecord] = []
        self._covered: dict[str, float] = {}
        self._cpu: list[CpuInterval] = []

    def receive(self, source: str, data: dict) -> None:
        """Take one report (a ``worker_report`` payload); payloads without our keys are ignored."""
        if COVERED_KEY not in data:
            return
        records = [RequestRecord.from_dict(item) for item in data[RECORDS_KEY]]
        self._records.extend(records)
        self._cpu.extend(CpuInterval.from_wire(item) for item in data.get(CPU_KEY, ()))
        if self._received is not None:
            self._received(records)
        self._covered[source] = max(self._covered.get(source, -math.inf), data[COVERED_KEY])

    def _pull_local(self) -> None:
        if self._local_log is not None:
            report: dict = {}
            attach_records(self._local_log(), report, self._local_cpu() if self._local_cpu else None)
            self.receive(LOCAL_SOURCE, report)

    def covered_until(self) -> float:
        """Every record that ended before this epoch time has arrived, from every active source
        (+inf when none is active: nothing more can come)."""
        self._pull_local()
        covered = (self._covered.get(source, -math.inf) for source in self._active_sources())
        return min(covered, default=math.inf)

    def records_between(self, start_epoch_s: float, end_epoch_s: float) -> list[RequestRecord]:
        """The records that ended in ``[start, end)``."""
        self._pull_local()
        return records_in_window(self._records, start_epoch_s, end_epoch_s)

    def load_generator(self, start_epoch_s: float, end_epoch_s: float) -> LoadGenerator | None:
        """Each worker's CPU use over ``[start, end)`` (``loadgen_cpu.window_load``)."""
        self._pull_local()
        return window_load(self._cpu, start_epoch_s, end_epoch_s)

    def records(self) -> list[RequestRecord]:
        self._pull_local()
        return list(self._records)

    def records_from(self, index: int) -> list[RequestRecord]:
        """The records after the first ``index`` to arrive (arrival order never changes)."""
        self._pull_local()
        return self._records[index:]


@dataclass
class _ProcessState:
    """What one process (one Environment) keeps for aggregation; lives on the Environment."""

    aggregator: Aggregator | None  # on the master or a LocalRunner
    log: RecordLog | None = None
    cpu: CpuMeter | None = None  # on a worker or a LocalRunner: the load generator's own CPU
    step: LoadStep = LoadStep(index=0, agents=0)


def install(environment: Environment) -> _ProcessState:
    """Wire aggregation into this environment (idempotent). Runs on Locust's ``init`` event; tests
    that build their own Environment call it themselves."""
    state = getattr(environment, _ENV_ATTRIBUTE, None)
    if state is not None:
        return state
    runner = environment.runner
    if isinstance(runner, MasterRunner):
        state = _ProcessState(Aggregator(lambda: active_workers(environment),
                                         received=lambda records: get_record_log(environment).keep(records)))
        aggregator = state.aggregator
        environment.events.worker_report.add_listener(
            lambda client_id, data, **_: aggregator.receive(client_id, data)
        )
        runner.register_message(  # a worker asks on start-up; the reply goes to it alone
            STEP_MESSAGE,
            lambda msg, **_: runner.send_message(STEP_MESSAGE, dataclasses.asdict(state.step), msg.node_id),
        )
    elif isinstance(runner, WorkerRunner):
        state = _ProcessState(aggregator=None, cpu=CpuMeter())
        environment.events.report_to_master.add_listener(
            lambda client_id, data: attach_records(state.log, data, state.cpu.interval(process_id(environment))))
        runner.register_message(STEP_MESSAGE, lambda msg, **_: _set_step(state, msg.data))
        runner.send_message(STEP_MESSAGE)  # a worker that joins mid-search learns the current step
    else:
        state = _ProcessState(Aggregator(lambda: (LOCAL_SOURCE,), local_log=lambda: state.log,
                                         local_cpu=lambda: state.cpu.interval(LOCAL_SOURCE)), cpu=CpuMeter())
    if not isinstance(runner, WorkerRunner) and environment.parsed_options is not None:
        parsed = environment.parsed_options
        parsed.run_id = getattr(parsed, "run_id", "") or _new_run_id()
    setattr(environment, _ENV_ATTRIBUTE, state)
    return state


def active_workers(environment: Environment) -> frozenset[str]:
    """The workers a master counts on now (ready, spawning or running); none outside a master."""
    runner = environment.runner
    if not isinstance(runner, MasterRunner):
        return frozenset()
    return frozenset(node.id for node in runner.clients.ready + runner.clients.spawning + runner.clients.running)


def _set_step(state: _ProcessState, data: dict) -> None:
    state.step = LoadStep(index=int(data["index"]), agents=int(data["agents"]),
                          fresh_agents=bool(data.get("fresh_agents", False)),
                          ramp_start_epoch_s=float(data.get("ramp_start_epoch_s", 0.0)),
                          spawn_rate=float(data.get("spawn_rate", 0.0)))


def _new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


def aggregator(environment: Environment) -> Aggregator:
    """The union of records on the master or in a LocalRunner (a worker has none)."""
    state = install(environment)
    if state.aggregator is None:
        raise RuntimeError("records are aggregated on the master, not on a worker")
    return state.aggregator


def run_id(environment: Environment) -> str:
    """The run's id (``--run-id``, generated on the master when empty); workers have it from the
    master once the test has started."""
    install(environment)
    return getattr(environment.parsed_options, "run_id", "") or ""


def process_id(environment: Environment) -> str:
    """``local``, ``master`` or ``worker-<index>-<pid>``: names this process's record file and is
    the ``worker_id`` of its records."""
    runner = environment.runner
    if isinstance(runner, WorkerRunner):
        return f"worker-{runner.worker_index}-{os.getpid()}"
    return "master" if isinstance(runner, MasterRunner) else LOCAL_SOURCE


def get_record_log(environment: Environment) -> RecordLog:
    """This process's record log, created on first use. With ``--records-dir`` it also writes
    ``<records-dir>/records-<process_id>.jsonl``; without, records only go to aggregation."""
    state = install(environment)
    if state.log is None:
        directory = getattr(environment.parsed_options, "records_dir", "") or ""
        state.log = RecordLog(RecordWriter(directory, process_id(environment)) if directory else None)
    return state.log


def current_step(environment: Environment) -> LoadStep:
    return install(environment).step


def current_load_step(environment: Environment) -> int:
    """The index of the load step in progress (0 before the first and when no search runs)."""
    return current_step(environment).index


def announce_step(environment: Environment, step: LoadStep) -> None:
    """Make ``step`` current here and, from a master, on every worker (custom message
    ``agentperf_step``; a worker that starts later asks for it with the same message type)."""
    install(environment).step = step
    if isinstance(environment.runner, MasterRunner):
        environment.runner.send_message(STEP_MESSAGE, dataclasses.asdict(step))


@functools.lru_cache(maxsize=4)
def _spec(path: str) -> SloSpec:
    return load_slo(path or None)


def slo_now(environment: Environment) -> tuple[StepVerdict, float]:
    """Each tier's verdict on the requests that ended in the last ``--slo-window-s`` seconds, up to where
    every worker has reported (cold joins left out, as in any window), and that window's length: what the
    web UI's SLO now tab and the metrics show while agents are ramped by hand. Raises ``AgentperfError``
    for a bad ``--slo`` file."""
    parsed = environment.parsed_options
    window_s = options.value(parsed, "slo_window_s")
    spec = _spec(options.value(parsed, "slo"))
    live = aggregator(environment)
    end = min(time.time(), live.covered_until())
    return evaluate_step(live.records_between(end - window_s, end), spec), window_s
