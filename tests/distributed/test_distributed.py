"""A real Locust master (with its web UI and its metrics) and two real workers run the capacity search
over synthetic agents with known verdicts, once for this module; a real Prometheus server scrapes the
master every second and a real headless Chromium renders its SLO tabs once the search is done.

* the records the master received and kept must equal the union of the workers' record files, and
  every live step verdict the one recomputed from those files;
* what Prometheus stored for each judged step must be that step's verdict, exactly;
* the tables the web UI renders must say what the search decided, step by step and tier by tier.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from html import unescape
from pathlib import Path

import pytest

from agentperf_users.measure.records import RequestRecord, read_records
from agentperf_users.measure.slo import load_slo, recompute
from agentperf_users.report import search_tabs
from tests.browser import CHROMIUM_FLAGS
from tests.support import free_port, wait_for

HERE = Path(__file__).parent
REPO = HERE.parent.parent
LOCUSTFILE = HERE / "synthetic_locustfile.py"
SLO_FILE = HERE / "slo.yaml"
RUN_TIMEOUT_S = 60
PROMETHEUS = shutil.which("prometheus")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def locust(*args: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--loglevel", "INFO", *args],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"),
    )


def wait_until_ready(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            assert time.monotonic() < deadline and process.poll() is None, log.read_text()
            time.sleep(0.2)


def start_prometheus(folder: Path, target_port: int) -> tuple[subprocess.Popen, int]:
    """A Prometheus server scraping 127.0.0.1:<target_port> every second."""
    port = free_port()
    config = folder / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 1s}\n"
        f"scrape_configs: [{{job_name: agentperf, static_configs: [{{targets: ['127.0.0.1:{target_port}']}}]}}]\n")
    log = folder / "prometheus.log"
    server = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={folder / 'tsdb'}",
                               f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=log.open("w"))
    wait_until_ready(f"http://127.0.0.1:{port}/-/ready", server, log)
    return server, port


def rendered_rows(url: str, profile_dir: Path) -> list[list[str]]:
    """The page's table rows as text, after its scripts ran and fetched their data."""
    dom = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}", "--virtual-time-budget=8000",
                          "--dump-dom", url], capture_output=True, text=True, timeout=60).stdout
    return [[unescape(re.sub(r"<[^>]+>", "", cell)).strip() for cell in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, re.S)]
            for row in re.findall(r"<tr[^>]*>(.*?)</tr>", dom, re.S)]


@dataclass
class SearchRun:
    folder: Path
    exit_codes: list[int]  # master, then the workers
    master_log: str
    summary: dict
    prometheus_port: int | None  # the server stays up for the module's tests
    tabs: dict[str, list[list[str]]]  # the web UI's tables by tab key, as rendered

    @property
    def records_dir(self) -> Path:
        return self.folder / "records"


@pytest.fixture(scope="module")
def search_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distributed")
    metrics_port, web_port, master_port = free_port(), free_port(), str(free_port())
    prometheus = start_prometheus(folder, metrics_port) if PROMETHEUS else None
    summary_path = folder / "capacity.json"
    master = locust(
        "--master", "--autostart", "--web-host", "127.0.0.1", "--web-port", str(web_port),
        "--expect-workers", "2", "--master-bind-host", "127.0.0.1", "--master-bind-port", master_port,
        "--metrics-port", str(metrics_port), "--records-dir", str(folder / "records"), "--run-id", "dist",
        "--slo", str(SLO_FILE), "--start-agents", "2", "--step-agents", "2", "--max-agents", "4", "--recheck", "off",
        "--agent-spawn-rate", "20", "--warmup-s", "1", "--window-s", "2", "--capacity-json", str(summary_path),
        log=folder / "master.log",
    )
    workers = [locust("--worker", "--master-host", "127.0.0.1", "--master-port", master_port,
                      log=folder / f"worker{i}.log") for i in range(2)]
    tabs = {}
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        # the state file is written whole from the search's start on; the web UI stays up after it ends
        while not (summary_path.exists() and json.loads(summary_path.read_text()).get("complete")):
            assert time.monotonic() < deadline and master.poll() is None, (folder / "master.log").read_text()[-3000:]
            time.sleep(0.5)
        if CHROMIUM:
            for tab in ("agentperf-steps", "agentperf-capacity", "agentperf-slo-now"):
                tabs[tab] = rendered_rows(f"http://127.0.0.1:{web_port}/?tab={tab}", folder / f"chromium-{tab}")
        master.send_signal(signal.SIGTERM)  # as a user ends a web UI run
        exit_codes = [master.wait(timeout=20)] + [worker.wait(timeout=10) for worker in workers]
    finally:
        for process in [master, *workers]:
            if process.poll() is None:
                process.kill()
                process.wait()
    try:
        yield SearchRun(folder, exit_codes, (folder / "master.log").read_text(),
                        json.loads(summary_path.read_text()), prometheus and prometheus[1], tabs)
    finally:
        if prometheus:
            prometheus[0].terminate()
            prometheus[0].wait(10)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_master_union_and_live_verdicts_equal_the_record_files(search_run):
    assert search_run.exit_codes == [0, 0, 0], search_run.master_log[-3000:]
    records_dir = search_run.records_dir
    files = read_records(sorted(records_dir.glob("records-worker-*.jsonl")))
    kept = read_records([records_dir / "records-master.jsonl"])  # what the master received, as received
    by_json = RequestRecord.to_json
    assert sorted(kept, key=by_json) == sorted(files, key=by_json)
    assert sorted(read_records([records_dir]), key=by_json) == sorted(files, key=by_json)  # each request once
    assert len({r.worker_id for r in files}) == 2 and all(r.worker_id.startswith("worker-") for r in files)
    assert {r.run_id for r in files} == {"dist"}

    steps = search_run.summary["steps"]
    assert [s["agents"] for s in steps] == [2, 4, 3]
    assert all(s["coverage_complete"] for s in steps)
    windows = [(s["window_start_epoch_s"], s["window_end_epoch_s"]) for s in steps]
    recomputed = recompute(records_dir, windows, load_slo(SLO_FILE), run_id="dist")
    assert [v.to_dict() for v in recomputed] == [s["verdict"] for s in steps]
    for index, (start, end) in enumerate(windows):  # the step broadcast reached every worker in time
        in_window = [r for r in files if start <= r.end_epoch_s < end]
        assert in_window and {r.load_step for r in in_window} == {index}
    assert {name: (c["status"], c["agents"]) for name, c in search_run.summary["capacity"].items()} == {
        "loose": ("found", 3), "strict": ("found", 2)}
    assert "step 2 (bisect): 3 agents" in search_run.master_log


def query(port: int, promql: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.skipif(PROMETHEUS is None, reason="the prometheus server is not installed (.ci/run installs Debian's)")
def test_prometheus_stores_every_judged_step_as_judged(search_run):
    port, steps = search_run.prometheus_port, search_run.summary["steps"]
    stored = {}
    for name in ("passed", "ttft_seconds", "requests"):
        for series in query(port, f"last_over_time(agentperf_step_{name}[10m])"):
            labels = series["metric"]
            stored[name, int(labels["step"]), int(labels["agents"]), labels["tier"]] = float(series["value"][1])
    # Each step was on show for at least its successor's ramp, warm-up and window (3 s of 1 s scrapes);
    # the last one perhaps not before the search ended, but the web UI keeps the master up after it.
    assert len(steps) == 3 and {key[1] for key in stored} == {0, 1, 2}
    for step in steps:
        for verdict in step["verdict"]["tiers"]:
            key = (step["index"], step["agents"], verdict["tier"])
            assert stored[("passed", *key)] == (1.0 if verdict["passed"] else 0.0), key
            assert stored[("ttft_seconds", *key)] == verdict["ttft_quantile_s"], key  # exact
            assert stored[("requests", *key)] == verdict["requests"], key

    counted = {series["metric"]["status"]: float(series["value"][1])
               for series in query(port, "max_over_time(agentperf_requests_total[10m])")}
    records = read_records([search_run.records_dir])
    assert 0 < counted["http_5xx"] <= sum(r.status.value == "http_5xx" for r in records)  # every 10th fails
    assert 0 < counted["ok"] <= sum(r.ok for r in records) and counted["timeout"] == 0
    (agents,) = query(port, "max_over_time(agentperf_load_step_agents[10m])")
    assert float(agents["value"][1]) == 4  # the largest step, 2 and 2 agents on two workers
    judged_now = {series["metric"]["tier"]: float(series["value"][1])
                  for series in query(port, "max_over_time(agentperf_slo_now_requests[10m])")}
    assert set(judged_now) == {"loose", "strict"} and min(judged_now.values()) > 0  # the rolling verdict too
    capacity = {series["metric"]["tier"]: float(series["value"][1])
                for series in query(port, "last_over_time(agentperf_capacity_agents[10m])")}
    assert capacity == {name: c["agents"] for name, c in search_run.summary["capacity"].items()}


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs Debian's)")
def test_the_slo_tabs_show_what_the_search_decided(search_run):
    summary, tabs = search_run.summary, search_run.tabs
    labels = {tier["name"]: tier["label"] for tier in summary["slo"]["tiers"]}
    steps_table = tabs["agentperf-steps"]
    assert steps_table[0] == ["Step", "Phase", "Agents", "SLO tier", "Verdict", "TTFT", "Output speed", "Requests",
                              "Errors", *[column["title"] for column in search_tabs.SERVER_COLUMNS], "Why", "Evidence"]
    expected = [[str(step["index"]), step["phase"], str(step["agents"]), labels[verdict["tier"]],
                 "pass" if verdict["passed"] else "FAIL", verdict["requests"], verdict["errors"]]
                for step in reversed(summary["steps"]) for verdict in step["verdict"]["tiers"]]
    shown = [row[:5] + [int(row[7]), int(row[8])] for row in steps_table[1:]]
    assert shown == expected and len(shown) == 6  # three steps, two tiers, newest first
    # no server metrics in this run ("-"); the workers' CPU, measured; a failing tier's cause, as the search's
    causes = [next((found["cause"] for found in step["diagnoses"] if found["tier"] == verdict["tier"]), "")
              for step in reversed(summary["steps"]) for verdict in step["verdict"]["tiers"]]
    assert [row[-2] for row in steps_table[1:]] == causes and "not available" in causes
    busiest = [max(step["load_generator"]["worker_cpu"].items(), key=lambda item: item[1])
               for step in reversed(summary["steps"]) for _ in step["verdict"]["tiers"]]
    assert [row[-3] for row in steps_table[1:]] == [f"{cpu * 100:.0f} % of a core ({name})" for name, cpu in busiest]
    assert {row[9] for row in steps_table[1:]} == {"-"}

    capacity_table = tabs["agentperf-capacity"]
    assert capacity_table[0][:3] == ["SLO tier", "Capacity", "Latest step: agents"]
    capacity = {row[0]: row[1] for row in capacity_table[1:]}
    assert capacity == {labels[name]: f"{c['agents']} agents (fails at {c['first_failing_agents']})"
                        for name, c in summary["capacity"].items()}
    assert capacity[labels["loose"]] == "3 agents (fails at 4)"  # the synthetic agents' known answer

    now_table = tabs["agentperf-slo-now"]  # the last 60 s: the whole search, every agent stopped by now
    assert now_table[0] == ["SLO tier", "Verdict", "TTFT", "Output speed", "Requests", "Errors", "Agents running",
                            "Window"]
    assert [row[0] for row in now_table[1:]] == [labels[name] for name in labels]
    judged = sum(step["verdict"]["tiers"][0]["requests"] for step in summary["steps"])
    assert all(int(row[4]) >= judged and row[6] == "0" and row[7] == "last 60 s" for row in now_table[1:])


def _workers_with_records_of_step(records_dir: Path, step: int) -> set[str]:
    """The worker record files that hold a record of load step ``step`` (a line being written is skipped)."""
    found = set()
    for path in records_dir.glob("records-worker-*.jsonl"):
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("load_step") == step:
                    found.add(path.name)
                    break
            except json.JSONDecodeError:
                continue
    return found


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_step_that_loses_a_worker_is_measured_again_on_the_others(tmp_path):
    """Locust does not give a lost worker's agents to the others: judged as it stood, the step would name
    more agents than ran. Killed (SIGKILL) once the second step's agents run, the step is measured again
    on the worker left, and every record either worker took is still on disk."""
    from tests.distributed.synthetic_locustfile import REQUEST_S

    records_dir, master_port, log = tmp_path / "records", str(free_port()), tmp_path / "master.log"
    master = locust(
        "--master", "--headless", "--expect-workers", "2", "--expect-workers-max-wait", "30",
        "--master-bind-host", "127.0.0.1", "--master-bind-port", master_port, "--records-dir", str(records_dir),
        "--run-id", "lost", "--slo", str(SLO_FILE), "--start-agents", "2", "--step-agents", "2", "--max-agents", "4",
        "--recheck", "off",
        "--agent-spawn-rate", "20", "--warmup-s", "1", "--window-s", "3", "--capacity-json", str(tmp_path / "c.json"),
        log=log,
    )
    workers = [locust("--worker", "--master-host", "127.0.0.1", "--master-port", master_port,
                      log=tmp_path / f"worker{i}.log") for i in range(2)]
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while "Sending spawn jobs of 4 users" not in log.read_text():  # the second step's ramp
            assert time.monotonic() < deadline and master.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        # its agents run on both workers (a step lost before its ramp just ramps on the workers left)
        wait_for(lambda: len(_workers_with_records_of_step(records_dir, 1)) == 2, RUN_TIMEOUT_S,
                 "both workers' records of the second step", master, lambda: log.read_text()[-3000:])
        workers[1].kill()
        master_rc = master.wait(timeout=RUN_TIMEOUT_S + 30)
    finally:
        for process in [master, *workers]:
            if process.poll() is None:
                process.kill()
            process.wait()
    master_log = log.read_text()
    assert master_rc == 0, master_log[-3000:]
    assert "lost 1 worker(s)" in master_log and "measuring its 4 agents again" in master_log
    summary = json.loads((tmp_path / "c.json").read_text())
    assert [s["agents"] for s in summary["steps"]] == [2, 4, 3]
    for step in summary["steps"]:  # each agent ends a request every REQUEST_S: as many agents ran as named
        window_s = step["window_end_epoch_s"] - step["window_start_epoch_s"]
        requests = step["verdict"]["tiers"][0]["requests"]
        assert requests == pytest.approx(step["agents"] * window_s / REQUEST_S, rel=0.2), step["agents"]
    files = sorted(records_dir.glob("records-worker-*.jsonl"))
    assert len(files) == 2  # the killed worker's file too: flushed per record, nothing it took is lost
    kept = set(read_records([records_dir / "records-master.jsonl"]))
    assert kept <= set(read_records(files)) and len(read_records([files[0]])) and len(read_records([files[1]]))
