"""A real Locust master and two real workers run the capacity search over synthetic agents: the
records the master received and kept must equal the union of the workers' record files, and every
live step verdict must equal the one recomputed from those files."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agentperf_users.records import RequestRecord, read_records
from agentperf_users.slo import load_slo, recompute

HERE = Path(__file__).parent
REPO = HERE.parent.parent
LOCUSTFILE = HERE / "synthetic_locustfile.py"
SLO_FILE = HERE / "slo.yaml"
RUN_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def locust(*args: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--loglevel", "INFO", *args],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"),
    )


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_master_union_and_live_verdicts_equal_the_record_files(tmp_path):
    records_dir = tmp_path / "records"
    port = str(free_port())
    master = locust(
        "--master", "--headless", "--expect-workers", "2", "--expect-workers-max-wait", "30",
        "--master-bind-host", "127.0.0.1", "--master-bind-port", port,
        "--records-dir", str(records_dir), "--run-id", "dist", "--slo", str(SLO_FILE),
        "--start-agents", "2", "--step-agents", "2", "--max-agents", "4", "--agent-spawn-rate", "20",
        "--warmup-s", "1", "--window-s", "2", "--capacity-json", str(tmp_path / "capacity.json"),
        log=tmp_path / "master.log",
    )
    workers = [
        locust("--worker", "--master-host", "127.0.0.1", "--master-port", port, log=tmp_path / f"worker{i}.log")
        for i in range(2)
    ]
    try:
        master_rc = master.wait(timeout=RUN_TIMEOUT_S)
        worker_rcs = [worker.wait(timeout=10) for worker in workers]
    finally:
        for process in [master, *workers]:
            if process.poll() is None:
                process.kill()
                process.wait()
    master_log = (tmp_path / "master.log").read_text()
    assert (master_rc, worker_rcs) == (0, [0, 0]), master_log[-3000:]

    files = read_records(sorted(records_dir.glob("records-worker-*.jsonl")))
    kept = read_records([records_dir / "records-master.jsonl"])  # what the master received, as received
    by_json = RequestRecord.to_json
    assert sorted(kept, key=by_json) == sorted(files, key=by_json)
    assert sorted(read_records([records_dir]), key=by_json) == sorted(files, key=by_json)  # each request once
    assert len({r.worker_id for r in files}) == 2 and all(r.worker_id.startswith("worker-") for r in files)
    assert {r.run_id for r in files} == {"dist"}

    summary = json.loads((tmp_path / "capacity.json").read_text())
    steps = summary["steps"]
    assert [s["agents"] for s in steps] == [2, 4, 3]
    assert all(s["coverage_complete"] for s in steps)
    windows = [(s["window_start_epoch_s"], s["window_end_epoch_s"]) for s in steps]
    recomputed = recompute(records_dir, windows, load_slo(SLO_FILE), run_id="dist")
    assert [v.to_dict() for v in recomputed] == [s["verdict"] for s in steps]
    for index, (start, end) in enumerate(windows):  # the step broadcast reached every worker in time
        in_window = [r for r in files if start <= r.end_epoch_s < end]
        assert in_window and {r.load_step for r in in_window} == {index}
    assert {name: (c["status"], c["agents"]) for name, c in summary["capacity"].items()} == {
        "loose": ("found", 3), "strict": ("found", 2)}
    assert "step 2 (bisect): 3 agents" in master_log
