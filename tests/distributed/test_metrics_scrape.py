"""A real Prometheus server scrapes a real master (two real workers, synthetic agents with known
verdicts) every second: what it stored for each judged step must be that step's verdict, exactly."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from agentperf_users.records import read_records
from tests.distributed.test_distributed import RUN_TIMEOUT_S, SLO_FILE, free_port, locust

PROMETHEUS = shutil.which("prometheus")


def query(port: int, promql: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.fixture
def prometheus(tmp_path):
    """A Prometheus server scraping 127.0.0.1:<metrics port> every second; yields (metrics port, its port)."""
    if PROMETHEUS is None:
        pytest.skip("the prometheus server is not installed (.ci/run installs Debian's)")
    metrics_port, port = free_port(), free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 1s}\n"
        f"scrape_configs: [{{job_name: agentperf, static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]}}]\n")
    server = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("w"))
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, (tmp_path / "prometheus.log").read_text()
                time.sleep(0.2)
        yield metrics_port, port
    finally:
        server.terminate()
        server.wait(10)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_prometheus_stores_every_judged_step_as_judged(tmp_path, prometheus):
    metrics_port, port = prometheus
    records_dir, master_port = tmp_path / "records", str(free_port())
    master = locust(
        "--master", "--headless", "--expect-workers", "2", "--expect-workers-max-wait", "30",
        "--master-bind-host", "127.0.0.1", "--master-bind-port", master_port, "--metrics-port", str(metrics_port),
        "--records-dir", str(records_dir), "--run-id", "prom", "--slo", str(SLO_FILE),
        "--start-agents", "2", "--step-agents", "2", "--max-agents", "4", "--agent-spawn-rate", "20",
        "--warmup-s", "1", "--window-s", "2", "--capacity-json", str(tmp_path / "capacity.json"),
        log=tmp_path / "master.log",
    )
    workers = [locust("--worker", "--master-host", "127.0.0.1", "--master-port", master_port,
                      log=tmp_path / f"worker{i}.log") for i in range(2)]
    try:
        assert master.wait(timeout=RUN_TIMEOUT_S) == 0, (tmp_path / "master.log").read_text()[-3000:]
    finally:
        for process in [master, *workers]:
            if process.poll() is None:
                process.kill()
            process.wait()

    steps = json.loads((tmp_path / "capacity.json").read_text())["steps"]
    stored = {}
    for name in ("passed", "ttft_seconds", "requests"):
        for series in query(port, f"last_over_time(agentperf_step_{name}[10m])"):
            labels = series["metric"]
            stored[name, int(labels["step"]), int(labels["agents"]), labels["tier"]] = float(series["value"][1])
    # Each step was on show for at least its successor's ramp, warm-up and window (3 s of 1 s scrapes);
    # the last one perhaps not before the master quit.
    assert len(steps) == 3 and {key[1] for key in stored} >= {0, 1}
    for step in steps:
        for verdict in step["verdict"]["tiers"]:
            key = (step["index"], step["agents"], verdict["tier"])
            if ("passed", *key) in stored or step["index"] < len(steps) - 1:
                assert stored["passed", *key] == (1.0 if verdict["passed"] else 0.0), key
                assert stored["ttft_seconds", *key] == verdict["ttft_quantile_s"], key  # exact
                assert stored["requests", *key] == verdict["requests"], key

    counted = {series["metric"]["status"]: float(series["value"][1])
               for series in query(port, "max_over_time(agentperf_requests_total[10m])")}
    records = read_records([records_dir])
    assert 0 < counted["http_5xx"] <= sum(r.status.value == "http_5xx" for r in records)  # every 10th fails
    assert 0 < counted["ok"] <= sum(r.ok for r in records) and counted["timeout"] == 0
    (agents,) = query(port, "max_over_time(agentperf_load_step_agents[10m])")
    assert float(agents["value"][1]) == 4  # the largest step, 2 and 2 agents on two workers
