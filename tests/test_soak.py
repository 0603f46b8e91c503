"""Soak: five minutes of one distributed run (a Locust master and one worker, separate processes) at about
twice the embedded simulator's true capacity, with faults injected, must lose nothing and leak nothing.

Why: the fault matrix (``tests/test_faults.py``) shows each failure handled once, for 20 seconds; a load
generator that is run for hours must also keep doing so at a load where the server queues. Here:

* records = what the simulator counted: per injected kind, what ``agentperf_sim_faults_total{kind}``
  says less what the records show is between 0 and the run's cancelled requests (the end of the run cut
  them), and so are ``vllm:request_success_total`` and the OK records with the server's usage; every record
  is one injected kind or a success. ``429`` is not injected, so a 429 could only be the engine's own
  refusal (its waiting queue full); the simulator has no counter of those, and they cannot happen here
  (see ``_engine_refusals``);
* the master's and the worker's memory stay flat: resident set sizes sampled every ``SAMPLE_EVERY_S``,
  printed as a series, and the growth from the first sample after ``SETTLE_S`` to the last within a
  budget (``_memory_budget``) that allows for the records the master keeps by design;
* no agent dies: every agent has a record that ended in the last ``ALIVE_WITHIN_S`` of the run;
* the run ends on time (recorded timestamps, Locust's exit code 0) and no process prints a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tracemalloc
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from urllib.request import urlopen

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agentperf_users.cli.main import main as agentperf
from agentperf_users.measure.records import RequestRecord, Status, read_records
from agentperf_users.simulator.cli import SimulatorProcess
from agentperf_users.simulator.profile import load_profile
from tests.support import free_port
from tests.test_faults import fault_kind

REPO = Path(__file__).resolve().parent.parent
PROFILE = "l4-llama3.2-3b"  # an L4's few hundred tokens a second: twice its capacity is cheap to generate on 2 cores
TRAJECTORIES = "demo"
HEADLINE_TIER = "aa-20tps"  # the default SLO's headline tier: "capacity" below is its capacity
LOAD_FACTOR = 2
RUN_S = 300
SUCCESS = "success"  # an OK record with the server's usage (see _kind)
FAULTS = {"500": 0.04, "reset-mid-stream": 0.04, "malformed-sse": 0.04, "missing-usage": 0.04}  # 16 % in all
REQUEST_TIMEOUT_S = 120  # 5x the longest request at this load (~24 s: 400 tokens at ~17 tok/s): never reached
STALL_TIMEOUT_S = 20  # no kind injected here goes silent; a stall record would be a defect
ALIVE_WITHIN_S = 30  # above the longest request, so a live agent always has a record this recent
SAMPLE_EVERY_S = 10
SETTLE_S = 60  # imports, first connections, Locust's stats caches: the baseline is taken after this
FIXED_GROWTH_BUDGET_MIB = 8  # allocator slack, Locust's stats history (one small dict per 5 s), gevent's pools
RECORD_OVERHEAD_FACTOR = 2  # pymalloc arenas, list growth: measured ~1.7 KB of RSS per kept record, ~0.8 KB traced
START_TIMEOUT_S = 60  # the worker connecting and the first spawn
STOP_TIMEOUT_S = 60  # the master's quit and the worker following it


@dataclass(frozen=True)
class Sample:
    """One reading of both processes' resident set sizes, ``at_s`` after the master started (at
    ``epoch_s``, to compare with the records' times)."""

    at_s: float
    epoch_s: float
    master_kib: int
    worker_kib: int


def _rss_kib(pid: int) -> int:
    """VmRSS of a live process, from /proc (kB, as the kernel reports it)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"/proc/{pid}/status has no VmRSS line")


def _true_capacity(capfd) -> int:
    """The headline tier's capacity on the simulator's own engine (``agentperf truth``, virtual clock),
    with the same trajectories and no tool waits, as the agents below run."""
    assert agentperf(["truth", "--profile", PROFILE, "--trajectories", TRAJECTORIES, "--tool-wait", "none"]) == 0
    capacity = json.loads(capfd.readouterr().out)["capacity"][HEADLINE_TIER]
    assert capacity["status"] == "found" and capacity["agents"] >= 1, capacity
    return capacity["agents"]


def _locust(role_args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    """A Locust process of the agents' locustfile, its stdout and stderr in ``cwd/locust.out``."""
    cwd.mkdir()
    with (cwd / "locust.out").open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "locust", "-f", str(REPO / "locustfiles" / "agents.py"),
                                 *role_args], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)


def _sample_until_exit(master: subprocess.Popen, worker: subprocess.Popen, started_s: float) -> list[Sample]:
    """Both processes' RSS every ``SAMPLE_EVERY_S`` until the master exits (the wait between samples is
    the master's own exit, so the loop ends as soon as the run does, bounded by the run's length)."""
    samples = []
    deadline_s = started_s + START_TIMEOUT_S + RUN_S + STOP_TIMEOUT_S
    while True:
        try:
            samples.append(Sample(time.monotonic() - started_s, time.time(), _rss_kib(master.pid), _rss_kib(worker.pid)))
        except (FileNotFoundError, ProcessLookupError):  # one of them is exiting between two reads
            pass
        try:
            master.wait(timeout=SAMPLE_EVERY_S)
            return samples
        except subprocess.TimeoutExpired:
            assert time.monotonic() < deadline_s, "the master did not end within its run time and timeouts"


def _bytes_per_record(records: list[RequestRecord]) -> float:
    """What one record the master keeps costs in memory: records rebuilt from their serialized form (so
    their strings are their own, as the master's from a worker's report are), counted by tracemalloc."""
    lines = [record.to_json() for record in records]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [RequestRecord.from_dict(json.loads(line)) for line in lines]
        return (tracemalloc.get_traced_memory()[0] - before) / len(kept)
    finally:
        tracemalloc.stop()


def _memory_budget(records_kept: int, bytes_per_record: float) -> int:
    """KiB the master may grow by while it keeps ``records_kept`` more records (the aggregator holds every
    record for the verdicts, by design); a worker keeps none (it drains them into its reports), so its
    budget is the fixed part alone (``records_kept`` 0)."""
    return int(FIXED_GROWTH_BUDGET_MIB * 1024 + RECORD_OVERHEAD_FACTOR * bytes_per_record * records_kept / 1024)


def _simulator_counts(url: str) -> tuple[Counter, int]:
    """(injected faults by kind, successes summed over finish reasons) from the simulator's /metrics."""
    with urlopen(f"{url}/metrics", timeout=10) as response:
        families = list(text_string_to_metric_families(response.read().decode()))
    samples = [sample for family in families for sample in family.samples]
    injected = Counter({s.labels["kind"]: int(s.value) for s in samples if s.name == "agentperf_sim_faults_total"})
    successes = sum(int(s.value) for s in samples if s.name == "vllm:request_success_total")
    return injected, successes


def _kind(record: RequestRecord) -> str:
    """``fault_kind``, where an OK record with the server's usage is a success: that function assumes
    every request drew a fault and names it "missing-done", a kind not injected here."""
    kind = fault_kind(record)
    return SUCCESS if kind == "missing-done" and kind not in FAULTS else kind


def _engine_refusals(records: list[RequestRecord], agents: int) -> list[RequestRecord]:
    """The engine's own 429s (``fault_kind`` says "429"; none is injected): the simulator answers 429 only
    when its waiting queue holds ``max_waiting_requests``, and exposes no counter of them (only the
    ``vllm:num_requests_waiting`` gauge). Each agent has at most one request in flight, so with fewer
    agents than that limit the queue cannot fill: the exact count is 0, and the records must show 0."""
    limit = load_profile(PROFILE).engine.max_waiting_requests
    assert agents < limit, (agents, limit)
    return [record for record in records if record.status is not Status.CANCELLED and fault_kind(record) == "429"]


@pytest.mark.slow
@pytest.mark.timeout(START_TIMEOUT_S + RUN_S + 2 * STOP_TIMEOUT_S + 60)  # the subprocess bounds, and the truth's seconds
def test_five_minutes_at_twice_capacity_with_faults_lose_no_record_and_leak_no_memory(tmp_path, capfd):
    agents = LOAD_FACTOR * _true_capacity(capfd)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    port = str(free_port())
    faults = [arg for kind, rate in FAULTS.items() for arg in ("--fault", f"{kind}:{rate}")]
    common = ["--records-dir", "records", "--loglevel", "INFO"]
    with SimulatorProcess(["--port", "0", "--profile", PROFILE, "--seed", "12", *faults], env=env) as simulator:
        started_s = time.monotonic()
        master = _locust(["--master", "--master-bind-host", "127.0.0.1", "--master-bind-port", port,
                          "--expect-workers", "1", "--headless", "--exit-code-on-error", "0",
                          "-u", str(agents), "-r", "50", "-t", f"{RUN_S}s", "--stop-timeout", "0",
                          "--host", simulator.url, "--trajectories", TRAJECTORIES, "--tool-wait", "none",
                          "--request-timeout", str(REQUEST_TIMEOUT_S), "--stall-timeout", str(STALL_TIMEOUT_S),
                          "--no-probe", *common], tmp_path / "master", env)  # the simulator's counts: the agents' only
        worker = _locust(["--worker", "--master-host", "127.0.0.1", "--master-port", port, *common],
                         tmp_path / "worker", env)
        try:
            samples = _sample_until_exit(master, worker, started_s)
            worker_code = worker.wait(timeout=STOP_TIMEOUT_S)
            injected, successes = _simulator_counts(simulator.url)
        finally:
            for process in (master, worker):
                if process.poll() is None:
                    process.kill()
                process.wait(timeout=STOP_TIMEOUT_S)
    wall_s = time.monotonic() - started_s
    simulator_err = capfd.readouterr().err
    outputs = {role: (tmp_path / role / "locust.out").read_text() for role in ("master", "worker")}

    master_records = read_records([tmp_path / "master" / "records"])
    worker_records = read_records([tmp_path / "worker" / "records"])
    records = read_records([tmp_path / "master" / "records", tmp_path / "worker" / "records"])
    cancelled = [r for r in records if r.status is Status.CANCELLED]
    seen = Counter(_kind(r) for r in records if r.status is not Status.CANCELLED)
    refusals = _engine_refusals(records, agents)
    run_start = min(r.start_epoch_s for r in records)
    run_end = max(r.end_epoch_s for r in records)
    last_end: dict[int, float] = defaultdict(lambda: float("-inf"))
    for record in records:
        if record.status is not Status.CANCELLED:
            last_end[record.agent] = max(last_end[record.agent], record.end_epoch_s)
    settled = [s for s in samples if s.at_s >= SETTLE_S]
    baseline, last = settled[0], settled[-1]
    kept_after_baseline = sum(1 for r in master_records if r.end_epoch_s >= baseline.epoch_s)
    bytes_per_record = _bytes_per_record(records)
    master_budget = _memory_budget(kept_after_baseline, bytes_per_record)
    worker_budget = _memory_budget(0, bytes_per_record)

    with capfd.disabled():
        print(f"\nsoak: {agents} agents ({LOAD_FACTOR}x the {HEADLINE_TIER} capacity of {PROFILE} on {TRAJECTORIES}), "
              f"{RUN_S} s run, wall {wall_s:.0f} s, exit codes master {master.returncode} worker {worker_code}")
        print(f"records {len(records)} (master {len(master_records)}, worker file {len(worker_records)}) by status: "
              f"{dict(Counter(r.status.value for r in records))}")
        print(f"records by kind: {dict(seen)}; cancelled {len(cancelled)}; engine refusals {len(refusals)}")
        print(f"simulator: injected {dict(injected)}, successes {successes}")
        print(f"recorded span {run_end - run_start:.1f} s; agents' last record before the end: "
              f"{ {agent: round(run_end - end, 1) for agent, end in sorted(last_end.items())} }")
        print("RSS MiB (t s: master / worker): "
              + ", ".join(f"{s.at_s:.0f}: {s.master_kib / 1024:.1f} / {s.worker_kib / 1024:.1f}" for s in samples))
        print(f"growth after {SETTLE_S} s: master {(last.master_kib - baseline.master_kib) / 1024:.1f} MiB "
              f"(budget {master_budget / 1024:.1f}: {bytes_per_record:.0f} B x {RECORD_OVERHEAD_FACTOR} x "
              f"{kept_after_baseline} records + {FIXED_GROWTH_BUDGET_MIB}), worker "
              f"{(last.worker_kib - baseline.worker_kib) / 1024:.1f} MiB (budget {worker_budget / 1024:.1f})")

    # (4) on time, cleanly: Locust's own verdict, then the recorded timestamps
    assert master.returncode == 0 and worker_code == 0, (outputs["master"][-3000:], outputs["worker"][-3000:])
    assert RUN_S - 5 <= run_end - run_start <= RUN_S + 10, (run_start, run_end)
    # (5) no traceback in either Locust process, nor in the simulator
    for role, text in {**outputs, "simulator": simulator_err}.items():
        assert "Traceback" not in text, (role, text[-3000:])
    # (1) records = what the simulator counted
    assert not refusals, [(r.agent, r.message) for r in refusals]
    assert set(seen) <= set(FAULTS) | {SUCCESS}, seen  # every record is an injected kind or a success
    assert len(cancelled) <= agents and all(injected[kind] >= 1 for kind in FAULTS), (cancelled, injected)
    for kind in FAULTS:  # every injected fault has its record, except the requests the end cut
        assert 0 <= injected[kind] - seen[kind] <= len(cancelled), (kind, injected[kind], seen[kind])
    assert 0 <= successes - seen[SUCCESS] <= len(cancelled), (successes, seen[SUCCESS])
    assert 0 <= sum(injected.values()) + successes - sum(seen.values()) <= len(cancelled)
    assert set(worker_records) <= set(master_records) | set(cancelled), "a worker record never reached the master"
    # (3) no agent dies
    assert sorted(last_end) == list(range(agents)), sorted(last_end)
    assert all(run_end - end <= ALIVE_WITHIN_S for end in last_end.values()), dict(last_end)
    # (2) memory flat: growth after the first minute within what the master's kept records explain
    assert last.at_s - baseline.at_s >= RUN_S / 2, samples  # a baseline early enough to mean something
    assert last.master_kib - baseline.master_kib <= master_budget, samples
    assert last.worker_kib - baseline.worker_kib <= worker_budget, samples
