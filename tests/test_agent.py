"""End to end: a real headless ``locust`` run of a few agents against the real simulator, checked from
the records it leaves, the trajectory set it replayed and Locust's own statistics."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from agentperf_users.client.chat import bucket_response_time_3sig
from agentperf_users.loadgen.replay import start_turn
from agentperf_users.measure.records import Status, read_records
from agentperf_users.simulator.cli import SimulatorProcess
from agentperf_users.workload.readers import load_trajectories

REPO = Path(__file__).resolve().parent.parent
AGENTS = 4
TRAJECTORIES = 3  # fewer than the agents: the fourth agent starts the second pass (a new cache namespace)
TURNS = 4
RUN_S = 8


def _write_set(path: Path) -> None:
    """Compact-format trajectories whose turns differ in size, output length and tool wait."""
    lines = []
    for i in range(TRAJECTORIES):
        turns = [{"messages": [{"role": "system", "content_tokens": 400, "seed": "system"},
                               {"role": "user", "content_tokens": 150 + 10 * i}],
                  "output_tokens": 12, "tool_wait_s": 0.25}]
        for t in range(1, TURNS):
            turns.append({"messages": [{"role": "assistant", "content_tokens": 12},
                                       {"role": "tool", "content_tokens": 80 * t, "tool_call_id": f"c{t}"}],
                          "output_tokens": 8 + t, "tool_wait_s": 0.1 * t})
        lines.append(json.dumps({"id": f"t{i}", "turns": turns}))
    path.write_text("\n".join(lines) + "\n")


def _locust(tmp: Path, *extra: str) -> tuple[list, str]:
    """Run the locustfile headless against a fresh simulator; returns (records, the process output)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "AGENTPERF_TEST_KEY": "sk-agent-test-0123456789"}
    with SimulatorProcess(["--port", "0", "--api-key", env["AGENTPERF_TEST_KEY"]], env=env) as simulator:
        completed = subprocess.run(
            [sys.executable, "-m", "locust", "-f", str(REPO / "locustfiles" / "agents.py"), "--host", simulator.url,
             "--headless", "-u", str(AGENTS), "-r", "50", "-t", f"{RUN_S}s", "--stop-timeout", "0",
             "--trajectories", str(tmp / "set.jsonl"), "--records-dir", str(tmp / "records"),
             "--api-key-env", "AGENTPERF_TEST_KEY", "--tool-wait", "recorded", *extra],
            cwd=tmp, env=env, capture_output=True, text=True, timeout=RUN_S + 60,
        )
    assert completed.returncode == 0, completed.stderr[-2000:]
    return _finished(read_records([tmp / "records"])), completed.stdout + completed.stderr


def _finished(records: list) -> list:
    """The records of requests that ended by themselves. A request in flight when the run ended has a
    ``cancelled`` record: it must be its agent's last, and at most one per agent."""
    last = {}
    for record in sorted(records, key=lambda r: r.start_epoch_s):
        last[(record.worker_id, record.agent)] = record
    cancelled = [r for r in records if r.status is Status.CANCELLED]
    assert all(last[(r.worker_id, r.agent)] is r for r in cancelled)
    return [r for r in records if r.status is not Status.CANCELLED]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One local run; returns (records, trajectory set, Locust's JSON stats, the process output). Agents
    start at turn 0, so every turn of a first session is checked (random start turns: the two-worker test)."""
    tmp = tmp_path_factory.mktemp("agents")
    _write_set(tmp / "set.jsonl")
    records, output = _locust(tmp, "--json-file", str(tmp / "stats"), "--start-turn", "first")
    stats = json.loads((tmp / "stats.json").read_text())
    return records, load_trajectories(str(tmp / "set.jsonl")), stats, output


def _sessions(records):
    """Records per (agent, trajectory play), in the order they were sent."""
    sessions = defaultdict(list)
    for record in sorted(records, key=lambda r: r.start_epoch_s):
        sessions[(record.agent, record.trajectory)].append(record)
    return sessions


@pytest.mark.slow
def test_every_turn_is_sent_in_order_with_the_trajectorys_messages(run):
    records, trajectories, _, _ = run
    assert records and all(r.status is Status.OK for r in records), {r.message for r in records}
    assert sorted({r.agent for r in records}) == list(range(AGENTS))
    by_id = {trajectories.trajectory_id(i): trajectories.trajectory(i) for i in range(len(trajectories))}
    sessions = _sessions(records)
    first_pass = {label for _, label in sessions if "#" not in label}
    assert first_pass == set(by_id)  # every trajectory was dealt once before any was replayed
    assert len({label for _, label in sessions}) == len(sessions)  # no two agents played the same session
    complete = 0
    for (agent, label), played in sessions.items():
        trajectory = by_id[label.split("#")[0]]
        assert [r.turn for r in played] == list(range(len(played)))
        complete += len(played) == len(trajectory.turns)
        marker_tokens = 0 if "#" not in label else played[0].prompt_tokens - trajectory.turns[0].prompt_tokens
        assert marker_tokens >= 0
        for record in played:  # the prompt the server counted is exactly this turn's conversation
            assert record.prompt_tokens == trajectory.turns[record.turn].prompt_tokens + marker_tokens
            assert record.counted_prompt_tokens == record.prompt_tokens  # ours: the simulator counts as we do
            assert record.output_tokens == trajectory.turns[record.turn].output_tokens  # ignore_eos honoured
    assert complete >= len(by_id)


@pytest.mark.slow
def test_tool_waits_are_honoured_and_records_complete(run):
    records, trajectories, _, _ = run
    waits = {trajectories.trajectory_id(i): [t.tool_wait_s for t in trajectories.trajectory(i).turns]
             for i in range(len(trajectories))}
    by_agent = defaultdict(list)
    for record in sorted(records, key=lambda r: r.start_epoch_s):
        by_agent[record.agent].append(record)
    gaps, lateness = 0, []
    for played in by_agent.values():
        for before, after in zip(played, played[1:]):
            wait_s = waits[before.trajectory.split("#")[0]][before.turn]
            assert after.scheduled_start_epoch_s == pytest.approx(before.end_epoch_s + wait_s, abs=1e-6)
            lateness.append(after.start_epoch_s - after.scheduled_start_epoch_s)
            gaps += 1
    assert gaps >= AGENTS * (TURNS - 1)
    # Never early; on time as a rule (a median, so a noisy machine's odd late wake-up cannot fail it).
    assert min(lateness) >= 0 and statistics.median(lateness) < 0.05, sorted(lateness)
    assert [played[0].cold_join for played in by_agent.values()] == [True] * AGENTS  # each agent's first
    assert not any(r.cold_join for played in by_agent.values() for r in played[1:])  # and only that one
    for r in records:
        assert r.run_id and r.worker_id == "local" and r.load_step == 0
        assert 0 < r.ttfb_s <= r.ttft_s < r.e2e_s
        assert r.end_epoch_s == pytest.approx(r.start_epoch_s + r.e2e_s)
        assert r.itl_p50_s <= r.itl_p95_s <= r.itl_max_s and r.output_tps > 0
        assert not r.output_tokens_estimated and r.cached_tokens is not None and r.message == ""


@pytest.mark.slow
def test_cached_tokens_rise_across_an_agents_turns(run):
    records, _, _, _ = run
    for played in _sessions(records).values():
        cached = [r.cached_tokens for r in played]
        assert all(b > a for a, b in zip(cached, cached[1:])), cached


@pytest.mark.slow
def test_locust_counts_each_request_once_and_never_sees_the_key(run):
    records, _, stats, output = run
    [entry] = stats
    assert entry["name"] == "chat turn" and entry["method"] == "POST"
    assert entry["num_requests"] == len(records) and entry["num_failures"] == 0  # a cancelled request is neither
    assert entry["total_content_length"] == sum(r.output_tokens for r in records)
    # Locust's histogram holds exactly the records' end-to-end times, bucketed to 3 significant digits.
    expected = Counter(str(bucket_response_time_3sig(r.e2e_s * 1000)) for r in records)
    assert Counter({str(k): v for k, v in entry["response_times"].items()}) == expected
    assert "sk-agent-test" not in output


@pytest.mark.slow
def test_requests_in_flight_when_the_run_ends_are_recorded_as_cancelled(tmp_path):
    """Turns of 20,000 output tokens outlast the run: every agent is mid-stream when Locust stops it, and
    each such request gets a record with what had arrived, not silence (the server counted it)."""
    lines = [json.dumps({"id": f"long{i}", "turns": [{"messages": [{"role": "user", "content_tokens": 50 + i}],
                                                      "output_tokens": 20000, "tool_wait_s": 0}]})
             for i in range(AGENTS)]
    (tmp_path / "set.jsonl").write_text("\n".join(lines) + "\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with SimulatorProcess(["--port", "0"], env=env) as simulator:
        completed = subprocess.run(
            [sys.executable, "-m", "locust", "-f", str(REPO / "locustfiles" / "agents.py"), "--host", simulator.url,
             "--headless", "-u", str(AGENTS), "-r", "50", "-t", "4s", "--stop-timeout", "0",
             "--trajectories", str(tmp_path / "set.jsonl"), "--records-dir", str(tmp_path / "records")],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr[-2000:]
    records = read_records([tmp_path / "records"])
    assert sorted(r.agent for r in records) == list(range(AGENTS))  # one request each, none finished
    for record in records:
        assert record.status is Status.CANCELLED and record.message == "cancelled by the end of its load step or run"
        assert record.ttft_s is not None and 0 < record.output_tokens < 20000 and record.output_tokens_estimated
        assert record.end_epoch_s == pytest.approx(record.start_epoch_s + record.e2e_s)


@pytest.mark.slow
def test_agents_on_two_workers_get_distinct_indices_and_trajectories(tmp_path):
    _write_set(tmp_path / "set.jsonl")
    records, _ = _locust(tmp_path, "--processes", "2")
    assert records and all(r.status is Status.OK for r in records)
    workers = {r.worker_id for r in records}
    assert len(workers) == 2 and all(w.startswith("worker-") for w in workers)
    agents = {(r.worker_id, r.agent) for r in records}
    assert sorted(agent for _, agent in agents) == list(range(AGENTS))  # one global index per agent
    sessions = _sessions(records)
    assert {label for _, label in sessions if "#" not in label} == {f"t{i}" for i in range(TRAJECTORIES)}
    assert len({label for _, label in sessions}) == len(sessions)  # no session played twice, on any worker
    # random start turns (the default): agent k's first session k starts at its seeded turn, a cold join
    for (agent, label), played in sessions.items():
        if "#" not in label and played[0].cold_join:
            assert played[0].turn == start_turn("random", seed=0, session=agent, turns=TURNS)
    assert sum(played[0].cold_join for played in sessions.values()) == AGENTS
    assert len({played[0].turn for played in sessions.values() if played[0].cold_join}) > 1


def test_a_restarted_steps_agents_are_dealt_first_requests_one_per_spawn_interval():
    """Locust starts users a batch at a time; the master spaces the first requests of a step that began
    from no agents by the spawn rate instead, from the ramp's start (and leaves other claims alone)."""
    import argparse

    from locust import User, constant
    from locust.env import Environment
    from locust.event import Events

    from agentperf_users.loadgen import agent
    from agentperf_users.measure import aggregate

    class Idle(User):
        wait_time = constant(1)

    environment = Environment(user_classes=[Idle], events=Events(),
                              parsed_options=argparse.Namespace(run_id="r", records_dir=""))
    environment.create_local_runner()
    agent.install(environment)
    aggregate.announce_step(environment, aggregate.LoadStep(index=1, agents=3, fresh_agents=True,
                                                            ramp_start_epoch_s=1000.0, spawn_rate=4.0))
    claims = [agent.claim(environment, new_agent=True) for _ in range(3)]
    assert [(c.agent, c.step, c.start_epoch_s) for c in claims] == [(0, 1, 1000.5), (1, 1, 1000.75), (2, 1, 1001.0)]
    assert agent.claim(environment, new_agent=False).start_epoch_s == 0.0  # a next session: at once
    aggregate.announce_step(environment, aggregate.LoadStep(index=2, agents=5, fresh_agents=False,
                                                            ramp_start_epoch_s=2000.0, spawn_rate=4.0))
    added = agent.claim(environment, new_agent=True)
    assert (added.agent, added.start_epoch_s) == (3, 0.0)  # joins running agents: with its batch


def test_the_event_loop_runs_while_a_set_loads(monkeypatch):
    """Loading a large set takes seconds of CPU; a worker whose loop stopped that long would miss Locust's
    heartbeats and be dropped. The load below ends only once a greenlet has run meanwhile: on the loop
    itself it could never end (bounded: it gives up, and the test fails)."""
    import argparse

    import gevent.monkey
    from locust import User, constant
    from locust.env import Environment
    from locust.event import Events

    from agentperf_users.errors import AgentperfError
    from agentperf_users.loadgen import agent
    from agentperf_users.measure import aggregate

    class Idle(User):
        wait_time = constant(1)

    greenlet_ran = gevent.monkey.get_original("_thread", "allocate_lock")()  # a real lock: blocks its thread
    greenlet_ran.acquire()
    real_load = agent.load_trajectories

    def slow_load(spec, fmt):
        if not greenlet_ran.acquire(timeout=10):
            raise AgentperfError("no greenlet ran while the set loaded")
        return real_load(spec, fmt)

    monkeypatch.setattr(agent, "load_trajectories", slow_load)
    monkeypatch.setattr(agent, "_served_model", lambda host, key: "m")
    environment = Environment(user_classes=[Idle], events=Events(), host="http://127.0.0.1:9",
                              parsed_options=argparse.Namespace(run_id="r", records_dir="", trajectories="demo",
                                                                api_key_env="OPENAI_API_KEY", probe=False))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    environment.create_local_runner()
    aggregate.install(environment)
    agent.install(environment)
    gevent.spawn(greenlet_ran.release)
    agent.on_test_start(environment)
    state = agent._state(environment)
    assert state.error is None and len(state.trajectories) > 0


def test_an_agent_backs_off_from_the_second_failure_in_a_row_and_honours_retry_after():
    """What an agent adds to its tool wait after each result: nothing after one failure (the ground truth
    replays a lone rejected request the same way), then 0.5 s doubling to 8 s; a Retry-After as the server
    says, capped; a success resets the count."""
    from types import SimpleNamespace

    from agentperf_users.loadgen.agent import AgentUser

    agent = SimpleNamespace(_failures_in_a_row=0)

    def backoff(status, retry_after_s=None):
        return AgentUser._backoff_s(agent, SimpleNamespace(status=status, retry_after_s=retry_after_s))

    assert [backoff(Status.HTTP_4XX) for _ in range(7)] == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    assert backoff(Status.OK) == 0.0 and agent._failures_in_a_row == 0
    assert [backoff(Status.HTTP_5XX, 3.0), backoff(Status.HTTP_4XX, 120.0), backoff(Status.DISCONNECT)] == [3.0, 30.0, 1.0]


@pytest.mark.slow
def test_a_workers_error_reaches_the_masters_console_and_stops_the_test(tmp_path):
    """The worker runs elsewhere (here: another folder, without the trajectory file the master has): its
    one-line reason must reach the master's output, where the user is looking, and end the run there."""
    master_dir, worker_dir = tmp_path / "master", tmp_path / "worker"
    master_dir.mkdir()
    worker_dir.mkdir()
    _write_set(master_dir / "set.jsonl")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    locustfile = str(REPO / "locustfiles" / "agents.py")
    with SimulatorProcess(["--port", "0"], env=env) as simulator:
        master = subprocess.Popen(
            [sys.executable, "-m", "locust", "-f", locustfile, "--master", "--master-bind-host", "127.0.0.1",
             "--master-bind-port", str(port), "--expect-workers", "1", "--headless", "-u", "2", "-r", "10",
             "-t", "60s", "--host", simulator.url, "--trajectories", "set.jsonl"],
            cwd=master_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        worker = subprocess.Popen(
            [sys.executable, "-m", "locust", "-f", locustfile, "--worker", "--master-host", "127.0.0.1",
             "--master-port", str(port)], cwd=worker_dir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            output, _ = master.communicate(timeout=60)  # ends long before its -t: the worker's error stopped it
        finally:
            for process in (master, worker):
                process.kill()
                process.wait()
    lines = [line for line in output.splitlines() if "set.jsonl" in line and "(worker " in line]
    assert lines and "agentperf: " in lines[0], output[-3000:]
    assert master.returncode == 2


@pytest.mark.parametrize("field, value, message", [
    ("request_timeout", "inf", "--request-timeout: expected a number > 0, at most 86400, got 'inf'"),
    ("stall_timeout", "1e300", "--stall-timeout: expected a number > 0, at most 86400, got '1e300'"),
    ("tool_wait_sigma", "11", "--tool-wait-sigma: expected a number >= 0, at most 10, got '11'"),
    ("seed", "9" * 5000, "--seed: expected an integer >= -9.22337e+18, at most 9.22337e+18, got '9999999999"),
    ("tool_wait", "x" * 5000, "--tool-wait 'xxxxxxxxxx"),
])
def test_agent_options_from_the_web_ui_are_bounded_in_one_short_line(field, value, message):
    """The web UI sends any string for any option: each must end as one short line, never a 5 KB echo."""
    import argparse

    from agentperf_users.errors import AgentperfError
    from agentperf_users.loadgen.agent import AgentSettings

    options = argparse.Namespace(trajectories="demo", trajectory_format="auto", model="", api_key_env="K",
                                 request_timeout=600, stall_timeout=120, ignore_eos=True, tool_wait="recorded",
                                 tool_wait_median=1.0, tool_wait_sigma=1.0, cache_namespace="on-wrap", seed=0,
                                 start_turn="random", tools=True)
    setattr(options, field, value)
    with pytest.raises(AgentperfError) as raised:
        AgentSettings.from_options(options)
    assert str(raised.value).startswith(message) and len(str(raised.value)) < 200
