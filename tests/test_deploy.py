"""The deployment files: the Helm chart (rendered and linted by Helm's own Go SDK, no cluster) and
docker-compose.yml (no Docker engine here). Beyond their shape, the commands they give each container
are run for real: the chart's simulator, its master's wait for it, the master and two workers, each
worker in a folder of its own as on a host of its own, with the Services' names resolved to 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agentperf_users.cli import build_parser
from agentperf_users.records import read_records

helm = pytest.importorskip("helm_python", reason="Helm's SDK comes with the test extras")

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "helm" / "agentperf"
IMAGE_ROOT = "/opt/agentperf/"  # where the Dockerfile puts the repository's files


def render(values: dict | None = None, release: str = "cap") -> dict[tuple[str, str], dict]:
    """The chart's objects by (kind, name)."""
    chart = helm.Chart.load(str(CHART))
    try:
        rendered = chart.render(values or {}, name=release, namespace="loadtest")
    finally:
        chart.close()
    objects = {}
    for path, text in rendered.items():
        if path.endswith(".yaml"):
            for doc in yaml.safe_load_all(text):
                if doc:
                    objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def container(obj: dict, init: bool = False) -> dict:
    (only,) = obj["spec"]["template"]["spec"]["initContainers" if init else "containers"]
    return only


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_the_chart_lints_clean_and_the_strictest_way():
    for values in ({}, {"target": {"host": "http://vllm:8000", "apiKeySecret": {"name": "llm-key"}}}):
        report = helm.lint(str(CHART), values, strict=True, kube_version="v1.30.0")
        assert report["errors"] == [] and report["total_charts_linted"] == 1
        assert [m for m in report["messages"] if m["severity"] >= 2] == []  # no warning, no error


def test_workers_find_the_master_and_the_master_waits_for_all_of_them():
    objects = render({"worker": {"replicas": 5}, "master": {"port": 6001}})
    master = container(objects[("Job", "cap-agentperf-master")])["command"]
    workers = objects[("Job", "cap-agentperf-worker")]
    worker = container(workers)["command"]
    service = objects[("Service", "cap-agentperf-master")]
    assert master[:2] == ["agentperf", "capacity"] and option(master, "--workers") == "0"
    assert option(master, "--remote-workers") == "5" == str(workers["spec"]["parallelism"])
    assert workers["spec"]["completions"] == 5
    assert option(worker, "--master-host") == service["metadata"]["name"]
    assert option(worker, "--master-port") == option(master, "--master-bind-port") == "6001"
    assert service["spec"]["ports"][0]["port"] == 6001
    master_pod = objects[("Job", "cap-agentperf-master")]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= master_pod.items()
    assert option(worker, "-f").startswith(IMAGE_ROOT)
    assert (REPO / option(worker, "-f").removeprefix(IMAGE_ROOT)).is_file()
    args, unknown = build_parser().parse_known_args(master[1:])  # capacity's own options, and Locust's
    assert (args.warmup_s, args.window_s) == (30.0, 90.0)
    assert unknown == ["--expect-workers-max-wait", "300", "--metrics-port", "9646", "--metrics-host", "0.0.0.0"]


def test_the_masters_metrics_are_served_announced_and_optional():
    objects = render({"master": {"metricsPort": 9700}})
    job = objects[("Job", "cap-agentperf-master")]
    master = container(job)
    assert option(master["command"], "--metrics-port") == "9700"
    assert option(master["command"], "--metrics-host") == "0.0.0.0"  # the pod's IP, for Prometheus' discovery
    assert {"name": "metrics", "containerPort": 9700} in master["ports"]
    assert job["spec"]["template"]["metadata"]["annotations"] == {"prometheus.io/scrape": "true",
                                                                   "prometheus.io/port": "9700"}
    ports = objects[("Service", "cap-agentperf-master")]["spec"]["ports"]
    assert {"name": "metrics", "port": 9700, "targetPort": "metrics"} in ports
    off = render({"master": {"metricsPort": 0}})[("Job", "cap-agentperf-master")]
    assert "--metrics-port" not in container(off)["command"] and "annotations" not in off["spec"]["template"]["metadata"]


def test_the_simulator_is_the_target_unless_a_host_is_given():
    objects = render({"simulator": {"port": 8100, "profile": "h100-llama3.1-8b"}})
    master = objects[("Job", "cap-agentperf-master")]
    simulator = container(objects[("Deployment", "cap-agentperf-simulator")])["command"]
    assert option(simulator, "--profile") == "h100-llama3.1-8b" and option(simulator, "--port") == "8100"
    assert objects[("Service", "cap-agentperf-simulator")]["spec"]["ports"][0]["port"] == 8100
    assert option(container(master)["command"], "--host") == "http://cap-agentperf-simulator:8100"
    assert option(container(master)["command"], "--power-metrics-url") == "http://cap-agentperf-simulator:8100/metrics"
    assert "http://cap-agentperf-simulator:8100/health" in container(master, init=True)["command"][-1]

    real = render({"target": {"host": "http://vllm.inference:8000"}})
    assert not [key for key in real if "simulator" in key[1]]
    master = real[("Job", "cap-agentperf-master")]
    assert option(container(master)["command"], "--host") == "http://vllm.inference:8000"
    assert "--power-metrics-url" not in container(master)["command"]  # no power endpoint unless named
    dcgm = render({"target": {"host": "http://vllm:8000"},
                   "capacity": {"powerMetricsUrl": "http://dcgm:9400/metrics", "powerMetric": "DCGM_FI_DEV_POWER_USAGE"}})
    command = container(dcgm[("Job", "cap-agentperf-master")])["command"]
    assert (option(command, "--power-metrics-url"), option(command, "--power-metric")) == (
        "http://dcgm:9400/metrics", "DCGM_FI_DEV_POWER_USAGE")
    assert "initContainers" not in master["spec"]["template"]["spec"]


def test_the_api_key_comes_only_from_the_named_secret():
    objects = render({"target": {"host": "https://api.example", "apiKeySecret": {"name": "llm-key", "key": "token"}}})
    for name in ("cap-agentperf-master", "cap-agentperf-worker"):
        (env,) = container(objects[("Job", name)])["env"]
        assert env == {"name": "OPENAI_API_KEY", "valueFrom": {"secretKeyRef": {"name": "llm-key", "key": "token"}}}
    assert "env" not in container(render()[("Job", "cap-agentperf-worker")])
    assert not [obj for (kind, _), obj in objects.items() if kind == "Secret"]  # the chart never holds a key


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ``${NAME:-default}``."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m.group(1)) or m.group(2), text)


def test_compose_wires_the_same_roles():
    compose = yaml.safe_load(_interpolate((REPO / "docker-compose.yml").read_text(), {"AGENTPERF_WORKERS": "3"}))
    services = compose["services"]
    master, worker = services["master"]["command"], services["worker"]["command"]
    simulator = services["simulator"]["command"]
    assert option(master, "--remote-workers") == "3" == str(services["worker"]["deploy"]["replicas"])
    assert option(master, "--workers") == "0" and option(worker, "--master-host") == "master"
    assert option(master, "--host") == f"http://simulator:{option(simulator, '--port')}"
    assert option(master, "--power-metrics-url") == option(master, "--host") + "/metrics"
    assert option(simulator, "--host") == "0.0.0.0"
    assert (REPO / option(worker, "-f").removeprefix(IMAGE_ROOT)).is_file()
    for command in (master, simulator):
        _, unknown = build_parser().parse_known_args(command[1:])
        assert unknown == []
    dockerfile = (REPO / "Dockerfile").read_text()
    assert f"WORKDIR {IMAGE_ROOT.rstrip('/')}" in dockerfile and "COPY locustfiles ./locustfiles" in dockerfile


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _local(command: list[str], hosts: list[str]) -> list[str]:
    """A container's command on this machine: the Services' names are 127.0.0.1, the image's files are
    the checkout, and ``agentperf`` and ``locust`` are this interpreter's."""
    text = json.dumps(command)
    for host in hosts:
        text = text.replace(host, "127.0.0.1")
    command = json.loads(text.replace(IMAGE_ROOT, f"{REPO}/"))
    program = {"agentperf": [sys.executable, "-m", "agentperf_users.cli"], "locust": [sys.executable, "-m", "locust"]}
    return program.get(command[0], command[:1]) + command[1:]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_charts_commands_run_a_distributed_search(tmp_path):
    """Each worker writes its records where the master never looks (its own folder); the master's run
    folder still holds every record, from both workers, and its report equals its live verdicts."""
    slo = tmp_path / "slo.yaml"
    slo.write_text("tiers:\n  - {name: aa-20tps, ttft_max_s: 10, output_tps_min: 20, scope: request}\n")
    objects = render({
        "simulator": {"port": _free_port()},
        "master": {"port": _free_port(), "metricsPort": _free_port(), "expectWorkersMaxWaitS": 60},
        "capacity": {"trajectories": "demo", "args": [
            "--slo", str(slo), "--start-agents", "2", "--max-agents", "4", "--warmup-s", "3", "--window-s", "6"]},
    })
    hosts = ["cap-agentperf-simulator", "cap-agentperf-master"]
    master_job = objects[("Job", "cap-agentperf-master")]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    folders = {name: tmp_path / name for name in ("master", "worker-a", "worker-b")}
    for folder in folders.values():
        folder.mkdir()
    processes = [subprocess.Popen(
        _local(container(objects[("Deployment", "cap-agentperf-simulator")])["command"], hosts),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        wait = subprocess.run(_local(container(master_job, init=True)["command"], hosts), env=env, timeout=60)
        assert wait.returncode == 0  # the init container's wait ends once the simulator answers
        master = subprocess.Popen(_local(container(master_job)["command"], hosts), cwd=folders["master"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        processes.append(master)
        worker_command = _local(container(objects[("Job", "cap-agentperf-worker")])["command"], hosts)
        processes += [subprocess.Popen(worker_command, cwd=folders[name], env=env, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL) for name in ("worker-a", "worker-b")]
        output, _ = master.communicate(timeout=200)
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
                process.wait(10)
    assert master.returncode == 3, output  # 4 agents hold the headline tier on an L4: it never failed
    (run,) = (folders["master"] / "agentperf-runs").iterdir()
    report = json.loads((run / "report.json").read_text())
    records = read_records([run / "records"])
    assert [path.name for path in (run / "records").iterdir()] == ["records-master.jsonl"]
    assert len({r.worker_id for r in records}) == 2 and report["records"] == len(records) > 0
    assert [step["agents"] for step in report["steps"]] == [2, 4]
    assert all(step["live_verdict_matches_records"] for step in report["steps"])
    assert report["power_measured"]["samples"] > 0 and all(step["power_watts"] for step in report["steps"])
    last_window_end = json.loads((run / "search.json").read_text())["steps"][-1]["window_end_epoch_s"]
    for name in ("worker-a", "worker-b"):  # each worker's own file, on its own "host"
        (own,) = (folders[name] / "agentperf-runs" / run.name / "records").iterdir()
        own_records = read_records([own])
        assert {r for r in records if r.worker_id == own_records[0].worker_id} <= set(own_records)
        assert {r for r in own_records if r.end_epoch_s < last_window_end} <= set(records)  # all it judged
