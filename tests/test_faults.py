"""A server that breaks, every way the simulator can break (``simulate --fault``), against real agents: each
fault becomes records of its own status, the agents go on, a 429/503's Retry-After is honoured, the run
ends on time, and the failures count against every SLO tier. Nothing is lost: what the simulator says it
injected, kind by kind, is what the records show, less the requests the end of the run cancelled."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path
from urllib.request import urlopen

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agentperf_users.loadgen.agent import RETRY_AFTER_MAX_S
from agentperf_users.measure.records import RequestRecord, Status, read_records
from agentperf_users.measure.slo import evaluate_step, load_slo
from agentperf_users.simulator.cli import SimulatorProcess
from agentperf_users.simulator.faults import KINDS
from tests.test_agent import _write_set

REPO = Path(__file__).resolve().parent.parent
AGENTS = 8
RUN_S = 20
RETRY_AFTER_S = 2
REQUEST_TIMEOUT_S = 4  # ends a drip (1 token/s) of a turn's 9+ tokens
STALL_TIMEOUT_S = 2  # twice a drip's gap, so a drip is never taken for a stall


def fault_kind(record: RequestRecord) -> str:
    """Which injected fault a record shows, from its status and message alone (every request drew one)."""
    status, message = record.status, record.message
    if status is Status.HTTP_4XX and message.startswith("HTTP 429"):
        return "429"
    if status is Status.HTTP_5XX:
        return message[len("HTTP "):len("HTTP 500")]
    if status is Status.DISCONNECT:
        return "reset-before-headers" if record.ttft_s is None else "reset-mid-stream"
    if status is Status.STALL:
        return "stall"
    if status is Status.TIMEOUT and message.startswith("the response did not end within"):
        return "drip"
    if status is Status.BAD_STREAM:
        if message == "unparseable JSON in the stream":
            return "malformed-sse"
        if message.startswith("a stream chunk of the wrong shape") or message == "a stream chunk that is not a JSON object":
            return "wrong-shape-json"
        if message.startswith("usage.completion_tokens 100000"):
            return "absurd-usage"
    if status is Status.OK:
        return "missing-usage" if record.output_tokens_estimated else "missing-done"
    return f"unexpected: {status.value} {message}"


@pytest.mark.slow
def test_every_fault_kind_becomes_its_own_records_and_the_agents_go_on(tmp_path):
    _write_set(tmp_path / "set.jsonl")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    faults = [arg for kind in KINDS for arg in ("--fault", kind)]  # equal shares: every request draws one
    with SimulatorProcess(["--port", "0", "--seed", "3", "--fault-retry-after", str(RETRY_AFTER_S), *faults],
                          env=env) as simulator:
        completed = subprocess.run(
            [sys.executable, "-m", "locust", "-f", str(REPO / "locustfiles" / "agents.py"), "--host", simulator.url,
             "--headless", "--exit-code-on-error", "0", "-u", str(AGENTS), "-r", "50", "-t", f"{RUN_S}s", "--stop-timeout", "0",
             "--trajectories", str(tmp_path / "set.jsonl"), "--records-dir", str(tmp_path / "records"),
             "--tool-wait", "none", "--request-timeout", str(REQUEST_TIMEOUT_S),
             "--stall-timeout", str(STALL_TIMEOUT_S), "--no-probe"],  # the probe too would draw a fault
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=RUN_S + 60)
        with urlopen(f"{simulator.url}/metrics", timeout=10) as response:
            exposition = response.read().decode()
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "Traceback" not in completed.stderr
    injected = Counter({sample.labels["kind"]: int(sample.value)
                        for family in text_string_to_metric_families(exposition)
                        for sample in family.samples if sample.name == "agentperf_sim_faults_total"})
    records = read_records([tmp_path / "records"])
    cancelled = [r for r in records if r.status is Status.CANCELLED]
    seen = Counter(fault_kind(r) for r in records if r.status is not Status.CANCELLED)

    assert set(seen) <= set(KINDS), seen  # every record is classified as exactly one injected kind
    assert all(injected[kind] >= 1 for kind in KINDS), injected  # the run met every kind
    for kind in KINDS:  # every injected fault has its record, except requests the run's end cut
        assert 0 <= injected[kind] - seen[kind] <= len(cancelled), (kind, injected[kind], seen[kind])
    # A cut request either reached the fault draw (counted, no classified record) or was cut before the
    # server drew its fault (sending its body, or before the handler ran): counted nowhere.
    assert 0 <= sum(injected.values()) - sum(seen.values()) <= len(cancelled) <= AGENTS

    by_agent: dict[int, list[RequestRecord]] = defaultdict(list)
    for record in sorted(records, key=lambda r: r.start_epoch_s):
        by_agent[record.agent].append(record)
    assert sorted(by_agent) == list(range(AGENTS)) and all(len(played) >= 3 for played in by_agent.values())
    for played in by_agent.values():  # Retry-After honoured: no request sooner than the server asked
        for before, after in zip(played, played[1:]):
            if fault_kind(before) in ("429", "503"):
                assert after.scheduled_start_epoch_s - before.end_epoch_s >= min(RETRY_AFTER_S, RETRY_AFTER_MAX_S) - 1e-6
    ends = [r.end_epoch_s for r in records]
    assert max(ends) - min(r.start_epoch_s for r in records) < RUN_S + REQUEST_TIMEOUT_S + 5  # recorded times
    verdict = evaluate_step([r for r in records if r.status is not Status.CANCELLED], load_slo(None))
    assert not verdict.passed and all(tier.error_rate > 0.5 for tier in verdict.tiers)
