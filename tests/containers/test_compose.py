"""docker-compose.yml run for real, by the README's command, with Compose v2 (``docker compose``) and v1
(Debian's ``docker-compose``), whichever are installed: the image built, the simulator, a master and two
workers in containers of their own, with a short search. The run folder lands in a host folder that does
not exist beforehand (the daemon creates it as root: the master must still write there), and the command
returns the search's own exit code (a worker quitting before the master's report must not cut it short).
Afterwards the stack's Prometheus, started again on its stored data, holds the run's series.

Needs a Docker daemon (``.ci/install-docker`` installs and starts one, and builds the base image offline):
skipped without one, unless ``AGENTPERF_REQUIRE_CONTAINERS=1`` (CI), where that is a failure. Everything
the test starts is removed (containers, network, volume) before its assertions run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from agentperf_users.cli.capacity import EXIT_NOT_LOCATED
from agentperf_users.measure.records import RequestRecord, read_records
from agentperf_users.measure.slo import load_slo, recompute
from tests.containers.docker import REPO, base_image, docker_or_skip, runs, unavailable
from tests.support import free_port

pytestmark = [pytest.mark.containers, pytest.mark.slow, pytest.mark.timeout(900)]

README_COMMAND = ["up", "--build", "--abort-on-container-exit", "--exit-code-from", "master"]
WORKERS = 2
WORKER_RUNS = "/home/agentperf/agentperf-runs"  # a worker's own run folders (its working directory's)
COMPOSE_TIMEOUT_S = 480
PROMETHEUS_WAIT_S = 60
IMPLEMENTATIONS = {"v2": ["docker", "compose"], "v1": ["docker-compose"]}


def _compose_command(implementation: str) -> list[str]:
    """The implementation's command, or a skip: only a missing Docker engine, or no Compose at all, fails
    under AGENTPERF_REQUIRE_CONTAINERS (Debian ships v1 only)."""
    docker_or_skip()
    installed = {name: command for name, command in IMPLEMENTATIONS.items()
                 if shutil.which(command[0]) and runs([*command, "version"]).returncode == 0}
    if not installed:
        unavailable("neither `docker compose` (v2) nor `docker-compose` (v1) is installed")
    if implementation not in installed:
        pytest.skip(f"Compose {implementation} ({' '.join(IMPLEMENTATIONS[implementation])}) is not installed")
    return installed[implementation]


def _project_objects(project: str) -> list[str]:
    """Containers (running or not), networks and volumes Compose labelled as the project's."""
    label = f"label=com.docker.compose.project={project}"
    found = []
    for kind in (["ps", "-a"], ["network", "ls"], ["volume", "ls"]):
        listed = runs(["docker", *kind, "-q", "--filter", label])
        assert listed.returncode == 0, listed.stderr
        found += [f"{kind[0]} {line}" for line in listed.stdout.split()]
    return found


def _copy_workerruns(project: str, destination: Path) -> list[Path]:
    """Each worker container's own run folders, as that "host" left them."""
    listed = runs(["docker", "ps", "-a", "-q", "--filter", f"label=com.docker.compose.project={project}",
                    "--filter", "label=com.docker.compose.service=worker"])
    destination.mkdir()
    folders = []
    for container in listed.stdout.split():
        folder = destination / container
        copied = runs(["docker", "cp", f"{container}:{WORKER_RUNS}", str(folder)])
        assert copied.returncode == 0, copied.stderr
        folders.append(folder)
    return folders


def _query(port: int, promql: str) -> list[dict] | None:
    """The query's result, or None while Prometheus is not up yet."""
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.load(response)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None
    assert body["status"] == "success", body
    return body["data"]["result"]


def _stored_series(port: int, promql: str) -> list[dict]:
    """Poll (bounded) until the restarted Prometheus has replayed its stored data and answers with it."""
    deadline = time.monotonic() + PROMETHEUS_WAIT_S
    while time.monotonic() < deadline:
        result = _query(port, promql)
        if result:
            return result
        time.sleep(1)
    return []


@dataclass(frozen=True)
class ComposeRun:
    exit_code: int
    output: str
    run_folders: list[Path]
    worker_folders: list[Path]
    stored_steps: list[dict]  # agentperf_step_passed series from the stack's Prometheus
    target_up: list[dict]  # the target's best scrape health as Prometheus stored it
    target_series: list[dict]  # the simulator's own request counter as Prometheus stored it
    left_behind: list[str]  # the project's containers, networks and volumes after `down`


@pytest.fixture(scope="module", params=sorted(IMPLEMENTATIONS))
def compose_run(request, tmp_path_factory) -> ComposeRun:
    compose = _compose_command(request.param)
    tmp = tmp_path_factory.mktemp(f"compose-{request.param}")
    project = f"agentperf-test-{uuid.uuid4().hex[:8]}"
    runs, port = tmp / "runs-not-there-yet", free_port()
    env = {**os.environ, "AGENTPERF_RUNS": str(runs), "AGENTPERF_PROMETHEUS_PORT": str(port),
           "AGENTPERF_WORKERS": str(WORKERS), "AGENTPERF_START_AGENTS": "1", "AGENTPERF_MAX_AGENTS": "2",
           "AGENTPERF_WARMUP_S": "3", "AGENTPERF_WINDOW_S": "8", "COMPOSE_PROJECT_NAME": project}
    env.setdefault("AGENTPERF_BASE_IMAGE", base_image())
    base = [*compose, "--project-name", project, "--file", str(REPO / "docker-compose.yml")]
    try:
        run = subprocess.run([*base, *README_COMMAND], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=COMPOSE_TIMEOUT_S, check=False)
        output = run.stdout + run.stderr
        (tmp / "compose.log").write_text(output)
        worker_folders = _copy_workerruns(project, tmp / "workers")
        # The stack's Prometheus stopped with the stack; started again, it serves what it stored.
        restarted = subprocess.run([*base, "up", "-d", "--no-deps", "prometheus"], cwd=REPO, env=env,
                                   capture_output=True, text=True, timeout=120, check=False)
        assert restarted.returncode == 0, restarted.stderr
        stored = _stored_series(port, "last_over_time(agentperf_step_passed[1h])")
        # max, not last: the stack stops the simulator before Prometheus, whose last scrape may then fail.
        target_up = _query(port, 'max_over_time(up{job="target"}[1h])') or []
        target_series = _query(port, 'last_over_time(vllm:request_success_total[1h])') or []
    finally:
        subprocess.run([*base, "down", "--volumes", "--remove-orphans", "--timeout", "5"], cwd=REPO, env=env,
                       capture_output=True, timeout=120, check=False)
    return ComposeRun(run.returncode, output, sorted(runs.iterdir()) if runs.is_dir() else [], worker_folders,
                      stored, target_up, target_series, _project_objects(project))


def test_the_readme_command_returns_the_searchs_own_exit_code(compose_run):
    (run,) = compose_run.run_folders  # written although the daemon, not the user, created the host folder
    report = json.loads((run / "report.json").read_text())
    assert report["search_complete"] and not report["interrupted"], compose_run.output[-4000:]
    located = all(cap["status"] == "found" for cap in report["capacity"].values())
    assert compose_run.exit_code == (0 if located else EXIT_NOT_LOCATED), compose_run.output[-4000:]
    agents = [step["agents"] for step in report["steps"]]
    assert agents[0] == 1 and max(agents) <= 2  # AGENTPERF_START_AGENTS, AGENTPERF_MAX_AGENTS
    assert report["power_measured"]["samples"] > 0  # the simulator's /metrics, across the network


def test_every_workers_records_reach_the_masters_folder_and_the_verdicts_recompute(compose_run):
    (run,) = compose_run.run_folders
    summary = json.loads((run / "search.json").read_text())
    records = read_records([run / "records"])
    assert [path.name for path in (run / "records").iterdir()] == ["records-master.jsonl"]
    assert len({r.worker_id for r in records}) == WORKERS and json.loads((run / "report.json").read_text())[
        "records"] == len(records) > 0
    windows = [(s["window_start_epoch_s"], s["window_end_epoch_s"]) for s in summary["steps"]]
    recomputed = recompute(run / "records", windows, load_slo(None), run_id=run.name)
    assert [v.to_dict() for v in recomputed] == [s["verdict"] for s in summary["steps"]]
    assert len(compose_run.worker_folders) == WORKERS
    kept = set(records)
    for folder in compose_run.worker_folders:  # each worker's own file, on its own "host"
        (own,) = (folder / run.name / "records").iterdir()
        own_records: list[RequestRecord] = read_records([own])
        assert own_records and {r for r in kept if r.worker_id == own_records[0].worker_id} <= set(own_records)
        judged = {r for r in own_records if r.end_epoch_s < windows[-1][1]}
        assert judged <= kept  # everything the search judged reached the master


def test_the_stacks_prometheus_stored_the_run(compose_run):
    (run,) = compose_run.run_folders
    steps = json.loads((run / "search.json").read_text())["steps"]
    stored = {(int(s["metric"]["step"]), s["metric"]["tier"]): float(s["value"][1]) for s in compose_run.stored_steps}
    # The first step's verdict was on show for the whole of the next step's ramp, warm-up and window.
    first = steps[0]
    assert stored, compose_run.output[-2000:]
    for verdict in first["verdict"]["tiers"]:
        assert stored[first["index"], verdict["tier"]] == (1.0 if verdict["passed"] else 0.0)
    assert [float(series["value"][1]) for series in compose_run.target_up] == [1.0]  # the simulator's /metrics
    assert sum(float(series["value"][1]) for series in compose_run.target_series) > 0  # its served requests


def test_nothing_is_left_behind(compose_run):
    assert compose_run.left_behind == []
