"""``agentperf capacity`` end to end: the embedded simulator, a real Locust master and real worker
processes, the search, the report and the ground truth."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agentperf_users.records import read_records

QUICK_SEARCH = ["--profile", "l4-llama3.2-3b", "--trajectories", "demo", "--start-agents", "4",
                "--max-agents", "16", "--warmup-s", "5", "--window-s", "12", "--workers", "2"]


def agentperf(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "agentperf_users.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.slow
def test_capacity_search_finds_the_ground_truth(tmp_path):
    out = tmp_path / "run"
    process = agentperf("capacity", *QUICK_SEARCH, "--out", str(out))
    stdout, stderr = process.communicate(timeout=400)
    report = json.loads((out / "report.json").read_text())
    headline = report["capacity"]["aa-20tps"]
    truth = report["ground_truth"]["capacity"]["aa-20tps"]
    assert headline["status"] == truth["status"] == "found", stdout + stderr
    assert abs(headline["agents"] - truth["agents"]) <= max(1, 0.05 * truth["agents"]), stdout
    # the stricter tiers cannot be met on an L4 at all: both say so
    for tier in ("example-60tps", "example-100tps"):
        assert report["capacity"][tier]["status"] == report["ground_truth"]["capacity"][tier]["status"] == "none_passed"
    assert process.returncode == 3  # a tier was not located
    assert all(step["live_verdict_matches_records"] for step in report["steps"])
    # records: the merged file is the union of the per-process files, all from this run, two workers
    per_process = read_records([out / "records"])
    assert len(read_records([out / "records.jsonl"])) == len(per_process) == report["records"] > 0
    assert {r.run_id for r in per_process} == {out.name}
    assert len({r.worker_id for r in per_process}) == 2
    assert "capacity @ 20 tok/s, TTFT ≤ 10 s:" in stdout and "(ground truth" in stdout
    assert "step 0 (step): 4 agents" in stdout  # live progress
    assert (out / "report.html").read_text().count("data:image/png") == 4


@pytest.mark.slow
def test_interrupted_run_keeps_its_records_and_says_so(tmp_path):
    out = tmp_path / "run"
    process = agentperf("capacity", *QUICK_SEARCH, "--out", str(out))
    records_dir = out / "records"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not any(p.stat().st_size for p in records_dir.glob("*.jsonl")):
        time.sleep(0.5)
    time.sleep(2)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stdout + stderr
    report = json.loads((out / "report.json").read_text())
    assert report["interrupted"] is True
    kept = read_records([records_dir])
    assert report["records"] == len(kept) > 0
    assert "Traceback" not in stderr
    assert not list(out.glob("*.partial"))


def test_bad_input_is_one_line_and_starts_nothing(tmp_path):
    out = tmp_path / "run"
    slo = tmp_path / "slo.yaml"
    slo.write_text("tiers:\n  - {name: x, ttft_max_s: fast, output_tps_min: 20}\n")
    process = agentperf("capacity", "--slo", str(slo), "--out", str(out))
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 2
    assert len(stderr.strip().splitlines()) == 1 and str(slo) in stderr and "ttft_max_s" in stderr
    assert "Traceback" not in stderr and not out.exists()


def test_unknown_trajectory_set_is_one_line(tmp_path):
    process = agentperf("capacity", "--trajectories", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "r"))
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 2 and len(stderr.strip().splitlines()) == 1 and "missing.jsonl" in stderr
