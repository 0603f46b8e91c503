"""``agentperf capacity`` end to end: the embedded simulator, a real Locust master and real worker
processes, the search, the report and the ground truth."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import pytest

from agentperf_users import files
from agentperf_users.errors import AgentperfError
from agentperf_users.measure.records import read_records
from agentperf_users.simulator.profile import load_profile

QUICK_SEARCH = ["--profile", "l4-llama3.2-3b", "--trajectories", "demo", "--start-agents", "6",
                "--max-agents", "24", "--warmup-s", "5", "--window-s", "15", "--workers", "2"]


@pytest.fixture
def headline_slo(tmp_path):
    """Only AA's headline tier (the stricter ones have no capacity on an L4 and would add steps), pooled
    over requests: a test's short windows hold one or two requests per agent, too few for agent scope."""
    path = tmp_path / "slo.yaml"
    path.write_text("tiers:\n  - {name: aa-20tps, ttft_max_s: 10, output_tps_min: 20, scope: request}\n")
    return str(path)


def agentperf(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "agentperf_users.cli.main", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_capacity_search_finds_the_ground_truth(tmp_path, headline_slo):
    out = tmp_path / "run"
    process = agentperf("capacity", *QUICK_SEARCH, "--slo", headline_slo, "--out", str(out))
    stdout, stderr = process.communicate(timeout=400)
    report = json.loads((out / "report.json").read_text())
    headline = report["capacity"]["aa-20tps"]
    truth = report["ground_truth"]["capacity"]["aa-20tps"]
    assert headline["status"] == truth["status"] == "found", stdout + stderr
    # The truth's verdict at every count: the live answer lies where the true verdicts turn from pass to
    # fail (±1: 15-second windows judge a few dozen requests; benchmarks/capacity_accuracy.py measures
    # the accuracy against the ±5 % target).
    band = report["ground_truth"]["bands"]["aa-20tps"]
    assert band["passes_up_to"] - 1 <= headline["agents"] <= band["fails_above"] + 1, (band, stdout)
    assert band["passes_up_to"] - 1 <= truth["agents"] <= band["fails_above"]
    # each live step beside the truth's same step: the harness's own error flips at most one verdict
    twins = [step for step in report["steps"] if "ground_truth" in step]
    assert len(twins) == len(report["steps"]) > 2
    assert sum(step["passed"] != step["ground_truth"]["passed"] for step in twins) <= 1, stdout
    assert process.returncode == 0  # every tier located
    assert all(step["live_verdict_matches_records"] for step in report["steps"])
    # records: the merged file is the union of the per-process files, all from this run, two workers
    per_process = read_records([out / "records"])
    assert len(read_records([out / "records.jsonl"])) == len(per_process) == report["records"] > 0
    assert {r.run_id for r in per_process} == {out.name}
    assert len({r.worker_id for r in per_process}) == 2
    assert "capacity @ 20 tok/s, TTFT ≤ 10 s:" in stdout and "; ground truth " in stdout
    assert "step 0 (step): 6 agents" in stdout  # live progress
    assert "capacity 20 tok/s" not in stdout and "capacity 20 tok/s" in (out / "locust.log").read_text()  # said once
    assert (out / "report.html").read_text().count("<svg") == 2 + 3  # one tier's 2 curves; throughput, cache, power
    # agents per megawatt from the power the simulator's gauge showed at the capacity step, not its nameplate
    gpu = load_profile("l4-llama3.2-3b").gpu
    assert headline["power_basis"] == "measured" and report["power_measured"]["samples"] > 0
    assert gpu.count * gpu.idle_w < headline["power_watts"] <= gpu.count * gpu.tdp_w
    assert headline["agents_per_megawatt"] == pytest.approx(headline["agents"] / (headline["power_watts"] / 1e6))
    assert all(step["power_watts"] is not None for step in report["steps"])
    # the server's own numbers per step (the simulator's vLLM metrics, read every second), and each failing
    # step named with its cause: the same in the live search's state and in the report made from the files
    assert "server qualified: model" in stdout and report["server_metrics"]["samples"] > 0
    state = json.loads((out / "search.json").read_text())
    for step, live in zip(report["steps"], state["steps"]):
        assert step["server"]["server"] == "vllm" and step["server"]["readings"] > 0  # the simulator speaks vLLM
        assert step["server"]["requests_finished"] >= 0 and step["server"]["ttft_mean_s"] > 0
        failed = [name for name, passed in step["passed"].items() if not passed]
        assert [found["tier"] for found in step["diagnoses"]] == failed
        assert [found["cause"] for found in step["diagnoses"]] == [found["cause"] for found in live["diagnoses"]]
        assert all(found["about_capacity"] for found in step["diagnoses"])  # a healthy server: capacity verdicts
    assert any(step["diagnoses"] for step in report["steps"]) and "why: " in stdout
    # agentperf report rebuilds the same report from the folder alone, field for field (the ground truth
    # comes from run.json, where the live run kept it)
    rebuilt = subprocess.run([sys.executable, "-m", "agentperf_users.cli.main", "report", str(out)], capture_output=True,
                             text=True, timeout=120)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert json.loads((out / "report.json").read_text()) == report
    assert [line for line in rebuilt.stdout.splitlines() if line.startswith("capacity @")] == [
        line for line in stdout.splitlines() if line.startswith("capacity @")]


@pytest.mark.slow
def test_a_failing_server_stops_the_search_with_its_own_words_not_a_capacity_of_none(tmp_path, headline_slo):
    """70 % of requests fail (HTTP 500): no count can be located against such a server, and "none (fails
    already at 1 agents)" would read as a slow one. Seed 3 lets the qualification probe's two requests
    through (the simulator draws faults in arrival order from the seed), so the search meets the failures."""
    out = tmp_path / "run"
    process = agentperf("capacity", "--profile", "l4-llama3.2-3b", "--trajectories", "demo", "--warmup-s", "2",
                        "--window-s", "6", "--max-agents", "4", "--workers", "1", "--no-truth", "--slo", headline_slo,
                        "--simulator-fault", "500:0.7", "--seed", "3", "--out", str(out))
    stdout, stderr = process.communicate(timeout=240)
    assert process.returncode == 4, stdout + stderr
    report = json.loads((out / "report.json").read_text())
    stopped = report["stopped"]
    assert (stopped["step"], stopped["cause"]) == (0, "server errors") and len(report["steps"]) == 1
    assert stopped["error"].startswith("HTTP 500: simulated fault 500")
    final = stdout.split("capacity @")[0].strip().splitlines()[-1]  # the line before the capacity lines
    assert final.startswith("search stopped at step 0 (1 agents): the server is failing, not a capacity")
    assert "most frequent error: HTTP 500" in final and "fails already" not in stdout


def test_a_server_that_cannot_be_reached_is_one_line_and_leaves_no_run_folder(tmp_path):
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "run"
    process = agentperf("capacity", "--host", f"http://user:pa55@127.0.0.1:{port}", "--out", str(out))
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 2, stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr and "pa55" not in stderr
    assert "refused" in stderr and not out.exists()


def test_bad_input_is_one_line_and_starts_nothing(tmp_path):
    out = tmp_path / "run"
    slo = tmp_path / "slo.yaml"
    slo.write_text("tiers:\n  - {name: x, ttft_max_s: fast, output_tps_min: 20}\n")
    process = agentperf("capacity", "--slo", str(slo), "--out", str(out))
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 2
    assert len(stderr.strip().splitlines()) == 1 and str(slo) in stderr and "ttft_max_s" in stderr
    assert "Traceback" not in stderr and not out.exists()


def test_a_search_without_workers_is_one_line(tmp_path):
    process = agentperf("capacity", "--workers", "0", "--out", str(tmp_path / "r"))
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 2 and len(stderr.strip().splitlines()) == 1 and "--remote-workers" in stderr
    assert not (tmp_path / "r").exists()


def test_unknown_trajectory_set_is_one_line(tmp_path):
    process = agentperf("capacity", "--trajectories", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "r"))
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 2 and len(stderr.strip().splitlines()) == 1 and "missing.jsonl" in stderr


def test_twin_steps_end_windows_by_the_truths_own_rule_unless_the_live_step_ended_early():
    """An extended live window (``--min-requests``) is not cut at its live length in the truth, where the
    request that ended it may end milliseconds later and leave the twin's window empty."""
    from agentperf_users.cli.capacity import twin_windows
    from agentperf_users.search.state import SearchState

    def step(agents, start, end, early):
        return {"agents": agents, "window_start_epoch_s": start, "window_end_epoch_s": end, "early_stop": early}

    summary = {"steps": [step(1, 100.0, 145.7, False), step(16, 200.0, 211.5, True), step(8, 300.0, 320.0, False)]}
    assert twin_windows(SearchState.from_dict(summary)) == [(1, None), (16, pytest.approx(11.5)), (8, None)]


def test_out_holding_an_earlier_run_is_refused_before_anything_starts(tmp_path):
    """Reusing --out would read the earlier run's records as this run's."""
    out = tmp_path / "run"
    (out / "records").mkdir(parents=True)
    earlier = out / "records" / "records-master.jsonl"
    earlier.write_text("{}\n")
    process = agentperf("capacity", "--out", str(out), "--workers", "1")
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert f"--out {out}: already holds a run (records)" in stderr
    assert "embedded simulator" not in stdout and sorted(p.name for p in out.rglob("*")) == [
        "records", "records-master.jsonl"]
    assert earlier.read_text() == "{}\n"


def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path):
    now = datetime(2026, 12, 2, 19, 0, 0)
    with ThreadPoolExecutor(8) as pool:  # at once, as two processes started together would
        folders = list(pool.map(lambda _: files.new_run_folder(tmp_path, now), range(8)))
    assert len(set(folders)) == 8 and all(folder.is_dir() and not any(folder.iterdir()) for folder in folders)
    assert sorted(folder.name for folder in folders) == sorted(
        ["20261202-190000"] + [f"20261202-190000-{n}" for n in range(2, 9)])
    assert files.new_run_folder(tmp_path, datetime(2026, 12, 2, 19, 0, 1)).name == "20261202-190001"


def test_claiming_out_accepts_a_new_or_empty_folder_and_refuses_a_run(tmp_path):
    assert files.claim_run_folder(tmp_path / "new" / "run").is_dir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("mine")  # not a run's file
    assert files.claim_run_folder(tmp_path / "empty") == tmp_path / "empty"
    for marker in ("search.json", "report.json", "records.jsonl"):
        folder = tmp_path / marker.split(".")[0]
        folder.mkdir()
        (folder / marker).write_text("{}")
        with pytest.raises(AgentperfError, match=f"already holds a run \\({marker}\\)"):
            files.claim_run_folder(folder)
