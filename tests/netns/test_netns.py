"""The distributed capacity search across hosts without a cluster: the real ``agentperf capacity`` master
(``--workers 0 --remote-workers 2``, as docker-compose.yml runs it), two Locust workers and the simulator,
each in a network namespace of its own (``tests/netns/network.py``), so every report a worker sends and
every request it makes crosses a link. No disk is shared: each process runs in a folder of its own and
writes its run folder relative to it, so the master's run folder holds the workers' records only as they
crossed the network. A short search: two steps of one and two agents, small windows.

* the search completes, not interrupted, with the search's own exit code;
* the master's folder holds every record the search judged, from both workers, and every step verdict
  equals the one recomputed from those records; each worker's own file, in its own folder, holds its
  share of them;
* the bridge received from each worker at least its records' size, and from the target its replies;
* nothing is left: no namespace, link or process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from agentperf_users.cli.capacity import DEFAULT_MASTER_PORT, EXIT_NOT_LOCATED
from agentperf_users.measure.records import RequestRecord, read_records
from agentperf_users.measure.slo import load_slo, recompute
from agentperf_users.simulator.cli import STARTUP_PREFIX
from tests.netns.network import PrivateNetwork, links, namespaces
from tests.support import wait_for

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parent.parent.parent
LOCUSTFILE = REPO / "agentperf_users" / "locustfiles" / "capacity.py"
WORKERS = 2
TARGET_PORT = 8000
PROFILE = "l4-llama3.2-3b"
SEARCH = ["--trajectories", "demo", "--start-agents", "1", "--max-agents", "2", "--warmup-s", "2",
          "--window-s", "5", "--min-requests", "4", "--no-truth", "--recheck", "off"]
STARTUP_WAIT_S = 60
SEARCH_WAIT_S = 150
STOP_WAIT_S = 20


@dataclass(frozen=True)
class NetnsRun:
    exit_code: int
    output: str
    master_dir: Path
    worker_dirs: list[Path]
    sent_bytes: dict[str, int]  # what the bridge received from each host's link
    exit_codes: dict[str, int | None]  # every process the test started, after the teardown
    left_namespaces: set[str]
    left_links: set[str]

    @property
    def run_folder(self) -> Path:
        (folder,) = (self.master_dir / "agentperf-runs").iterdir()
        return folder


def _start(host, argv: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(host.command(argv), cwd=cwd, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)


def _stop(processes: dict[str, subprocess.Popen]) -> None:
    """Master first (it tells the workers to quit), then whatever is left, each by its own pid."""
    for process in processes.values():
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def netns_run(tmp_path_factory) -> NetnsRun:
    tmp = tmp_path_factory.mktemp("netns")
    roles = ["master", "target", *(f"worker{i}" for i in range(1, WORKERS + 1))]
    folders = {role: tmp / role for role in roles}
    for folder in folders.values():
        folder.mkdir()
    links_before = links()
    processes: dict[str, subprocess.Popen] = {}
    network = PrivateNetwork(roles).open_or_skip()
    try:
        master, target = network.hosts["master"], network.hosts["target"]
        target_url = f"http://{target.address}:{TARGET_PORT}"
        sim_log = folders["target"] / "simulator.log"
        processes["target"] = _start(target, [sys.executable, "-m", "agentperf_users.simulator", "--profile", PROFILE,
                                              "--host", target.address, "--port", str(TARGET_PORT)],
                                     folders["target"], sim_log)
        wait_for(lambda: STARTUP_PREFIX in sim_log.read_text(), STARTUP_WAIT_S, "the simulator serving",
                 processes["target"], lambda: sim_log.read_text()[-2000:])
        master_log = folders["master"] / "capacity.log"
        processes["master"] = _start(master, [
            sys.executable, "-m", "agentperf_users.cli.main", "capacity", "--host", target_url,
            "--power-metrics-url", f"{target_url}/metrics", "--workers", "0", "--remote-workers", str(WORKERS),
            "--master-bind-host", master.address, *SEARCH], folders["master"], master_log)
        for role in roles[2:]:
            processes[role] = _start(network.hosts[role], [
                sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--worker", "--master-host", master.address,
                "--master-port", str(DEFAULT_MASTER_PORT)], folders[role], folders[role] / "worker.log")
        try:
            exit_code = processes["master"].wait(SEARCH_WAIT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the search did not end within {SEARCH_WAIT_S} s:\n{master_log.read_text()[-3000:]}")
        # The master told its workers to quit: they end by themselves.
        for role in roles[2:]:
            wait_for(lambda worker=processes[role]: worker.poll() is not None, STOP_WAIT_S, f"{role} ending after the search")
        sent = network.received_bytes()
    finally:
        _stop({role: processes[role] for role in ["master", *roles[2:], "target"] if role in processes})
        network.close()
    return NetnsRun(exit_code, master_log.read_text(), folders["master"], [folders[r] for r in roles[2:]], sent,
                    {role: process.poll() for role, process in processes.items()},
                    {name for name in namespaces() if name.startswith(network.prefix)}, links() - links_before)


def test_the_search_completes_with_its_own_exit_code(netns_run):
    report = json.loads((netns_run.run_folder / "report.json").read_text())
    assert report["search_complete"] and not report["interrupted"], netns_run.output[-3000:]
    located = all(cap["status"] == "found" for cap in report["capacity"].values())
    assert netns_run.exit_code == (0 if located else EXIT_NOT_LOCATED), netns_run.output[-3000:]
    assert [step["agents"] for step in report["steps"]][:2] == [1, 2]
    assert report["power_measured"]["samples"] > 0  # the target's /metrics, read across the bridge
    assert {role: code for role, code in netns_run.exit_codes.items() if role != "target"} == {
        "master": netns_run.exit_code, **{f"worker{i}": 0 for i in range(1, WORKERS + 1)}}


def test_the_masters_folder_holds_every_judged_record_and_the_verdicts_recompute(netns_run):
    run = netns_run.run_folder
    assert [path.name for path in (run / "records").iterdir()] == ["records-master.jsonl"]
    kept = read_records([run / "records"])
    summary = json.loads((run / "search.json").read_text())
    windows = [(s["window_start_epoch_s"], s["window_end_epoch_s"]) for s in summary["steps"]]
    recomputed = recompute(run / "records", windows, load_slo(None), run_id=run.name)
    assert [v.to_dict() for v in recomputed] == [s["verdict"] for s in summary["steps"]]
    assert all(v.tiers[0].requests >= 4 for v in recomputed)  # --min-requests

    own_files = [list(folder.rglob("records-*.jsonl")) for folder in netns_run.worker_dirs]
    assert [len(files) for files in own_files] == [1] * WORKERS  # each worker's, in its own folder only
    assert [f.relative_to(d).parts[:2] for (f,), d in zip(own_files, netns_run.worker_dirs, strict=True)] == [
        ("agentperf-runs", run.name)] * WORKERS
    assert not list(netns_run.master_dir.rglob("records-worker-*"))
    by_worker = [read_records([f]) for (f,) in own_files]
    assert len({records[0].worker_id for records in by_worker}) == WORKERS
    assert {r.worker_id for r in kept} == {records[0].worker_id for records in by_worker}
    union: set[RequestRecord] = set().union(*map(set, by_worker))
    assert set(kept) <= union
    judged = {r for r in union if r.end_epoch_s < windows[-1][1]}
    assert judged and judged <= set(kept)  # everything the search judged crossed to the master
    start, end = windows[1]  # two agents, one on each worker: the step's verdict pooled both hosts' records
    assert len({r.worker_id for r in kept if start <= r.end_epoch_s < end}) == WORKERS


def test_the_traffic_crossed_the_links(netns_run):
    """A worker's one way out is its link: the bridge received from it at least its records' size (its
    reports to the master, besides its requests), and from the target its replies."""
    for index, folder in enumerate(netns_run.worker_dirs, 1):
        (own,) = folder.rglob("records-*.jsonl")
        assert netns_run.sent_bytes[f"worker{index}"] >= own.stat().st_size > 0
    assert netns_run.sent_bytes["target"] > 0


def test_nothing_is_left_behind(netns_run):
    assert netns_run.left_namespaces == set()
    assert netns_run.left_links == set()
    assert None not in netns_run.exit_codes.values()
