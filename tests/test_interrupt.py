"""Interruptions with real processes: Ctrl-C, SIGTERM, a second signal and SIGKILL of ``agentperf
capacity`` (the embedded simulator, a real Locust master and workers), and a plain Locust master running
the search. Whatever stops a run, every step it judged stays in search.json, report.json and steps.csv,
marked interrupted, and no process of the run outlives it."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agentperf_users.measure.records import Status, read_records
from tests.simulator import simulator
from tests.support import wait_for
from tests.test_capacity import agentperf

# A few seconds a step (2 s warm-up, 5 s window): the first judged step comes about 15 s after the start.
TINY_SEARCH = ["--profile", "l4-llama3.2-3b", "--trajectories", "demo", "--start-agents", "2", "--max-agents", "24",
               "--warmup-s", "2", "--window-s", "5", "--workers", "2", "--no-truth"]
FIRST_STEP_TIMEOUT_S = 120.0
GONE_TIMEOUT_S = 30.0
# What a request may end as when the load generator stops first: nothing the server did (the lead's
# ``cancelled`` status, where records.py has it, is a request cut by the end of the run).
NOT_THE_SERVERS_DOING = {status for status in Status if status.value in ("ok", "cancelled")}


@pytest.fixture
def headline_slo(tmp_path):
    """One tier pooled over requests: the tiny windows hold a request or two per agent."""
    path = tmp_path / "slo.yaml"
    path.write_text("tiers:\n  - {name: aa-20tps, ttft_max_s: 10, output_tps_min: 20, scope: request}\n")
    return str(path)


def judged_steps(search_json: Path) -> list[dict]:
    """The steps in the search's state file so far (whole or absent: it is written atomically)."""
    try:
        return json.loads(search_json.read_text())["steps"]
    except FileNotFoundError:
        return []


def children_of(pid: int) -> set[int]:
    """The live processes whose parent is ``pid`` (from /proc: Linux)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


def alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` still running (a zombie, dead and waiting to be reaped, is not)."""
    running = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            continue
        if state != "Z":
            running.add(pid)
    return running


def pending_signals(pid: int) -> set[int]:
    """The signals waiting for a (stopped) process, from /proc/PID/status."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    mask = int(status["ShdPnd"], 16) | int(status["SigPnd"], 16)
    return {number for number in range(1, 65) if mask & (1 << (number - 1))}


def command_lines(pids: set[int]) -> str:
    return "; ".join(Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")[:120] for pid in alive(pids))


def kill_leftovers(pids: set[int]) -> None:
    for pid in alive(pids):
        os.kill(pid, signal.SIGKILL)


def start_and_wait_for_a_judged_step(out: Path, slo: str, signum: int | None = None, own_group: bool = False):
    """agentperf capacity, once its first step is judged: (process, its children's pids). With ``signum``,
    that signal's disposition is set to ignore first, as a shell does for a background job; with
    ``own_group``, it leads a process group of its own, as a shell's foreground job does (a terminal's
    Ctrl-C goes to the whole group)."""
    preexec = (lambda: signal.signal(signum, signal.SIG_IGN)) if signum else None
    process = agentperf("capacity", *TINY_SEARCH, "--slo", slo, "--out", str(out), preexec_fn=preexec,
                        start_new_session=own_group)
    wait_for(lambda: judged_steps(out / "search.json"), FIRST_STEP_TIMEOUT_S, "a judged step", process)
    children = children_of(process.pid)
    assert len(children) == 4  # simulator, master, two workers
    return process, children


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_started_by_agentperf_dies_with_it_even_under_sigkill(tmp_path):
    """What keeps master, workers and simulator from outliving a killed agentperf, on one child."""
    parent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys\n"
        "from agentperf_users.cli.capacity import _dies_with_parent\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], "
        "preexec_fn=_dies_with_parent(), start_new_session=True)\n"
        "print(child.pid, flush=True)\n"
        "child.wait()\n")], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        assert alive({child})
        parent.kill()
        parent.wait(timeout=10)
        wait_for(lambda: not alive({child}), GONE_TIMEOUT_S, "the child gone with its parent")
    finally:
        kill_leftovers({child})


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("signum, to_group", [(signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGINT, True)],
                         ids=["SIGINT", "SIGTERM", "Ctrl-C-to-the-terminal-group"])
def test_a_signal_keeps_every_judged_step_and_stops_every_process(tmp_path, headline_slo, signum, to_group):
    out = tmp_path / "run"
    process, children = start_and_wait_for_a_judged_step(out, headline_slo, signum, own_group=to_group)
    try:
        if to_group:
            os.killpg(process.pid, signum)
        else:
            process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 130, stdout + stderr
        assert not alive(children)  # stopped by agentperf before it exited, not left to the kernel
    finally:
        kill_leftovers(children)
    search = json.loads((out / "search.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert search["interrupted"] is True and report["interrupted"] is True and search["complete"] is False
    assert len(report["steps"]) == len(search["steps"]) >= 1  # every step judged, none lost
    assert [step["agents"] for step in report["steps"]] == [step["agents"] for step in search["steps"]]
    with open(out / "steps.csv", newline="") as file:
        assert len(list(csv.DictReader(file))) == len(report["steps"])
    records = read_records([out / "records"])
    assert report["records"] == len(records) > 0
    # The simulator outlived the load generator: no request was cut by the server going first.
    assert {record.status for record in records} <= NOT_THE_SERVERS_DOING, stdout
    assert "Traceback" not in stderr and not list(out.rglob("*.partial"))
    assert "keeping every judged step" in stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_second_signal_exits_at_once_and_leaves_whole_files(tmp_path, headline_slo):
    """The master is held stopped (SIGSTOP), so agentperf is surely still waiting for it when the second
    signal comes, as it would for a master slow to stop."""
    out = tmp_path / "run"
    process, children = start_and_wait_for_a_judged_step(out, headline_slo)
    master = next(pid for pid in children if "--master" in Path(f"/proc/{pid}/cmdline").read_text())
    try:
        os.kill(master, signal.SIGSTOP)
        process.send_signal(signal.SIGTERM)
        wait_for(lambda: signal.SIGTERM in pending_signals(master), 30, "agentperf's SIGTERM to its master", process)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
        assert process.returncode == 130, stdout + stderr
        wait_for(lambda: not alive(children), GONE_TIMEOUT_S, "every child gone")
    finally:
        kill_leftovers(children)
    assert "SIGTERM again" in stderr and f"agentperf report {out}" in stderr and "Traceback" not in stderr
    assert not (out / "report.json").exists()  # at once: no report, rather than one that waits for the master
    assert len(judged_steps(out / "search.json")) >= 1  # whole, with what was judged
    result = subprocess.run([sys.executable, "-m", "agentperf_users.cli.main", "report", str(out)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(json.loads((out / "report.json").read_text())["steps"]) >= 1


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_of_agentperf_leaves_no_process_and_a_folder_that_reports(tmp_path, headline_slo):
    out = tmp_path / "run"
    process, children = start_and_wait_for_a_judged_step(out, headline_slo)
    try:
        process.kill()
        process.wait(timeout=10)
        wait_for(lambda: not alive(children), GONE_TIMEOUT_S, "every child of agentperf gone",
                 describe=lambda: f": still running: {command_lines(children)}")
    finally:
        kill_leftovers(children)
    result = subprocess.run([sys.executable, "-m", "agentperf_users.cli.main", "report", str(out)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["interrupted"] is True  # the master, told by the kernel, ended its search as interrupted
    assert len(report["steps"]) >= 1 and report["records"] > 0
    assert "incomplete (passed at 2 agents)" in result.stdout or "incomplete (failed at 2 agents)" in result.stdout


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigterm_while_the_master_waits_for_workers_quits_without_a_traceback(tmp_path):
    """Locust's own wait for ``--expect-workers`` has no way out but its time limit; the search's
    handler quits there too."""
    log = tmp_path / "master.log"
    with open(log, "w") as file:
        master = subprocess.Popen(
            [sys.executable, "-m", "locust", "-f", "agentperf_users/locustfiles/capacity.py", "--master", "--headless",
             "--expect-workers", "1", "--expect-workers-max-wait", "100", "--master-bind-host", "127.0.0.1",
             "--master-bind-port", "0", "--host", "http://127.0.0.1:9", "--capacity-json", str(tmp_path / "s.json")],
            stdout=file, stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent)
    try:
        # Locust says "Starting Locust" before its init event (where the handler is installed): wait for the
        # loop that waits for workers, which comes after it
        wait_for(lambda: "Waiting for workers" in log.read_text(), 60, "the master waiting for workers", master)
        master.send_signal(signal.SIGTERM)
        assert master.wait(timeout=30) == 130, log.read_text()
    finally:
        if master.poll() is None:
            master.kill()
    assert "SIGTERM while waiting for workers" in log.read_text() and "Traceback" not in log.read_text()
    assert not (tmp_path / "s.json").exists()  # nothing was judged, and no empty state pretends otherwise


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_ctrl_c_of_a_plain_locust_run_of_the_search_keeps_its_judged_steps(tmp_path, headline_slo):
    """The search under plain Locust (a LocalRunner, headless), as a person runs it and stops it. With no
    ``agentperf capacity`` to keep the server's metrics, the master reads them itself (into a temporary
    folder it removes), so its judged steps carry the server's numbers."""
    state, log, temporary = tmp_path / "search.json", tmp_path / "locust.log", tmp_path / "tmp"
    temporary.mkdir()
    with simulator("--profile", "l4-llama3.2-3b") as sim, open(log, "w") as file:
        run = subprocess.Popen(
            [sys.executable, "-m", "locust", "-f", "agentperf_users/locustfiles/capacity.py", "--headless",
             "--host", sim.url, "--trajectories", "demo", "--slo", headline_slo, "--start-agents", "2",
             "--warmup-s", "2", "--window-s", "5", "--capacity-json", str(state),
             "--records-dir", str(tmp_path / "records")],
            stdout=file, stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent,
            env={**os.environ, "TMPDIR": str(temporary)})
        try:
            wait_for(lambda: judged_steps(state), FIRST_STEP_TIMEOUT_S, "a judged step", run)
            run.send_signal(signal.SIGINT)
            assert run.wait(timeout=60) == 130, log.read_text()[-3000:]
        finally:
            if run.poll() is None:
                run.kill()
    saved = json.loads(state.read_text())
    assert saved["interrupted"] is True and saved["complete"] is False and len(saved["steps"]) >= 1
    assert "SIGINT: ending the search" in log.read_text() and "Traceback" not in log.read_text()
    server = saved["steps"][0]["server"]
    assert server["server"] == "vllm" and server["readings"] >= 1 and server["requests_running_mean"] > 0, server
    assert not list(temporary.glob("agentperf-server-metrics-*"))  # its reader's folder, removed at the stop
