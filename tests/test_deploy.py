"""The deployment files: the Helm chart (rendered and linted by Helm's own Go SDK, no cluster) and
docker-compose.yml (no Docker engine here). Beyond their shape, the commands they give each container
are run for real: the chart's simulator, its master's wait for it, the master and two workers, each
worker in a folder of its own as on a host of its own, with the Services' names resolved to 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from agentperf_users.cli.main import build_parser
from agentperf_users.measure.records import read_records
from tests.support import free_port, wait_for

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
    assert unknown == ["--expect-workers-max-wait", "300"]  # Locust's own, passed on as it is
    assert (args.metrics_port, args.metrics_host) == (9646, "0.0.0.0")  # capacity's, forwarded to its master


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
    _, unknown = build_parser().parse_known_args(simulator[1:])
    assert unknown == []
    args, unknown = build_parser().parse_known_args(master[1:])  # served for Prometheus
    assert (args.warmup_s, args.window_s, args.max_agents) == (10.0, 20.0, 256)
    assert unknown == [] and (args.metrics_port, args.metrics_host) == (9646, "0.0.0.0")
    scrape = yaml.safe_load((REPO / "docker" / "prometheus.yml").read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in scrape["scrape_configs"]}
    assert targets == {"agentperf": ["master:9646"], "target": [option(master, "--host").removeprefix("http://")]}
    dockerfile = (REPO / "Dockerfile").read_text()
    assert f"WORKDIR {IMAGE_ROOT.rstrip('/')}" in dockerfile and "COPY locustfiles ./locustfiles" in dockerfile
    # One base for both images, the Dockerfile's default unless AGENTPERF_BASE_IMAGE names another.
    (default,) = re.findall(r"^ARG BASE_IMAGE=(\S+)$", dockerfile, re.MULTILINE)
    assert default == "python:3.11-slim"
    for service in ("simulator", "prometheus"):
        assert services[service]["build"]["args"]["BASE_IMAGE"] == default
    assert services["prometheus"]["ports"] == ["127.0.0.1:9090:9090"]  # published on this host only
    # The master starts as root only to take its run folder: nothing but what that needs.
    assert (services["master"]["cap_drop"], sorted(services["master"]["cap_add"])) == (["ALL"], ["CHOWN", "SETGID", "SETUID"])
    assert services["master"]["security_opt"] == ["no-new-privileges:true"]
    for service, script in (("master", "own-runs-folder"), ("worker", "worker-until-master-ends")):
        (entrypoint,) = services[service]["entrypoint"]
        assert (REPO / entrypoint.removeprefix(IMAGE_ROOT)).is_file() and f"docker/{script}" in dockerfile


def _local(command: list[str], hosts: list[str]) -> list[str]:
    """A container's command on this machine: the Services' names are 127.0.0.1, the image's files are
    the checkout, and ``agentperf`` and ``locust`` are this interpreter's."""
    text = json.dumps(command)
    for host in hosts:
        text = text.replace(host, "127.0.0.1")
    command = json.loads(text.replace(IMAGE_ROOT, f"{REPO}/"))
    program = {"agentperf": [sys.executable, "-m", "agentperf_users.cli.main"], "locust": [sys.executable, "-m", "locust"]}
    return program.get(command[0], command[:1]) + command[1:]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_charts_commands_run_a_distributed_search(tmp_path):
    """Each worker writes its records where the master never looks (its own folder); the master's run
    folder still holds every record, from both workers, and its report equals its live verdicts."""
    slo = tmp_path / "slo.yaml"
    slo.write_text("tiers:\n  - {name: aa-20tps, ttft_max_s: 10, output_tps_min: 20, scope: request}\n")
    objects = render({
        "simulator": {"port": free_port()},
        "master": {"port": free_port(), "metricsPort": free_port(), "expectWorkersMaxWaitS": 60},
        "capacity": {"trajectories": "demo", "args": [
            "--slo", str(slo), "--start-agents", "2", "--max-agents", "4", "--warmup-s", "3", "--window-s", "6",
            "--recheck", "off"]},
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
        wait = subprocess.run(_local(container(master_job, init=True)["command"], hosts), env=env, timeout=60, check=False)
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


BAD_VALUES = [  # (values, what Helm's one line must name)
    ({"worker": {"replicas": 0}}, "/worker/replicas"),
    ({"mode": "gui"}, "/mode"),
    ({"target": {"host": "vllm:8000"}}, "/target/host"),
    ({"master": {"metricsPorts": 9646}}, "metricsPorts"),
    ({"master": {"port": 70000}}, "/master/port"),
    ({"capacity": {"args": ["--window-s", 30]}}, "/capacity/args/1"),
    ({"webui": {"locustfile": "other.py"}}, "/webui/locustfile"),
]


@pytest.mark.parametrize(("values", "named"), BAD_VALUES)
def test_bad_values_are_refused_by_the_schema_naming_the_value(values, named):
    with pytest.raises(Exception, match="schema") as refused:
        render(values)
    assert named in str(refused.value)


def _chart_min_kube_version() -> tuple[int, int]:
    kube_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]
    (major, minor), = re.findall(r"^>=\s*(\d+)\.(\d+)\.0-0$", kube_version)
    return int(major), int(minor)


@pytest.mark.parametrize("values", [
    {}, {"mode": "webui"},
    {"target": {"host": "http://vllm:8000", "apiKeySecret": {"name": "llm-key"}},
     "master": {"runsVolume": {"persistentVolumeClaim": {"claimName": "agentperf-runs"}}, "metricsPort": 0,
                "resources": {"requests": {"cpu": "1", "memory": "1Gi"}}},
     "tolerations": [{"key": "gpu", "operator": "Exists"}], "nodeSelector": {"pool": "load"}},
    {"mode": "webui", "webui": {"serviceType": "LoadBalancer", "locustfile": "capacity.py"}},
], ids=["headless", "webui", "headless-real-target", "webui-capacity"])
def test_every_rendered_object_is_valid_for_the_oldest_and_newest_kubernetes(values):
    """Against the Kubernetes API's own schemas (strict: no unknown field), for the oldest version the
    chart's kubeVersion admits and the newest the validator knows."""
    validator = pytest.importorskip("kubernetes_validate.utils", reason="comes with the test extras")
    major, minor = _chart_min_kube_version()
    oldest = f"{major}.{minor}.0"
    assert oldest in validator.all_versions()  # the pinned validator knows the chart's oldest Kubernetes
    objects = render(values)
    assert objects
    for version in (oldest, validator.latest_version()):
        for obj in objects.values():
            validator.validate(obj, version, strict=True)  # raises, naming the field


def test_the_validator_refuses_what_kubernetes_would():
    """The check above can fail: a field Kubernetes does not know, or a wrong type, is refused."""
    validator = pytest.importorskip("kubernetes_validate.utils", reason="comes with the test extras")
    job = render()[("Job", "cap-agentperf-master")]
    container(job)["workDir"] = "/runs"
    with pytest.raises(validator.ValidationError, match="workDir"):
        validator.validate(job, validator.latest_version(), strict=True)
    job = render()[("Job", "cap-agentperf-master")]
    job["spec"]["backoffLimit"] = "none"
    with pytest.raises(validator.ValidationError, match="none"):
        validator.validate(job, validator.latest_version(), strict=True)


def test_webui_mode_serves_the_ui_from_a_master_deployment_with_worker_deployments():
    objects = render({"mode": "webui", "worker": {"replicas": 3}, "webui": {"port": 8100, "serviceType": "NodePort"}})
    assert ("Job", "cap-agentperf-master") not in objects and ("Job", "cap-agentperf-worker") not in objects
    master = objects[("Deployment", "cap-agentperf-master")]
    workers = objects[("Deployment", "cap-agentperf-worker")]
    command = container(master)["command"]
    assert command[:3] == ["locust", "-f", f"{IMAGE_ROOT}locustfiles/agents.py"] and "--master" in command
    assert (option(command, "--web-host"), option(command, "--web-port")) == ("0.0.0.0", "8100")
    assert option(command, "--host") == "http://cap-agentperf-simulator:8000"
    assert workers["spec"]["replicas"] == 3
    assert option(container(workers)["command"], "-f") == option(command, "-f")  # the same locustfile
    service = objects[("Service", "cap-agentperf-master")]
    assert service["spec"]["type"] == "NodePort"
    assert {"name": "web", "port": 8100, "targetPort": "web"} in service["spec"]["ports"]
    assert {"name": "web", "containerPort": 8100} in container(master)["ports"]
    assert service["spec"]["selector"].items() <= master["spec"]["template"]["metadata"]["labels"].items()
    assert master["spec"]["selector"]["matchLabels"] == master["spec"]["template"]["metadata"]["labels"]
    assert container(master)["readinessProbe"]["httpGet"]["port"] == "web"


def _notes(values: dict) -> str:
    chart = helm.Chart.load(str(CHART))
    try:
        return chart.render(values, name="cap", namespace="loadtest")["agentperf/templates/NOTES.txt"]
    finally:
        chart.close()


def test_the_notes_say_how_to_reach_the_ui_or_fetch_the_report():
    webui = _notes({"mode": "webui", "webui": {"port": 8100}})
    assert "kubectl port-forward --namespace loadtest service/cap-agentperf-master 8100:8100" in webui
    assert "http://127.0.0.1:8100/" in webui and "kubectl cp --namespace loadtest" in webui
    headless = _notes({})
    assert "kubectl logs -f job/cap-agentperf-master --namespace loadtest" in headless
    assert "emptyDir" in headless and "master.runsVolume" in headless
    kept = _notes({"master": {"runsVolume": {"persistentVolumeClaim": {"claimName": "runs"}}}})
    fetch = [line.strip() for line in kept.splitlines() if line.strip().startswith("kubectl")]
    assert fetch[-3:] == ["kubectl wait --namespace loadtest --for=condition=Ready pod/cap-agentperf-fetch",
                          "kubectl cp loadtest/cap-agentperf-fetch:/runs/agentperf-runs ./agentperf-runs",
                          "kubectl delete pod --namespace loadtest cap-agentperf-fetch"]
    overrides = json.loads(re.search(r"--overrides='(.*)'", kept).group(1))  # a pod that mounts the claim
    assert overrides["spec"]["volumes"] == [{"name": "runs", "persistentVolumeClaim": {"claimName": "runs"}}]
    assert overrides["spec"]["containers"][0]["volumeMounts"] == [{"name": "runs", "mountPath": "/runs"}]
    validator = pytest.importorskip("kubernetes_validate.utils", reason="comes with the test extras")
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "cap-agentperf-fetch"}, **overrides}
    validator.validate(pod, validator.latest_version(), strict=True)
    other = _notes({"master": {"runsVolume": {"hostPath": {"path": "/data/runs"}}}})
    assert "on the volume you gave" in other and "kubectl cp" not in other


def test_every_pod_runs_as_the_images_user_and_a_runs_volume_is_theirs():
    objects = render({"mode": "webui"})
    for (kind, name), obj in [*objects.items(), *render().items()]:
        if kind in ("Job", "Deployment"):
            context = obj["spec"]["template"]["spec"]["securityContext"]
            assert context == {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000}, name


def _web(port: int, path: str, form: dict | None = None) -> dict | None:
    """The master's web UI answer as JSON (a POST with ``form``), or None while it is not up yet."""
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", data=data, timeout=5) as response:
            return json.load(response)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_webui_modes_commands_serve_a_ramp_by_hand(tmp_path):
    """mode: webui, its pods' commands as processes: the master's UI sees both workers, a ramp started
    from it runs agents on both, the SLO now tab judges their records, and the master's records folder
    (under /runs, its volume) holds both workers' records."""
    web_port = free_port()
    objects = render({"mode": "webui", "simulator": {"port": free_port()}, "webui": {"port": web_port},
                      "master": {"port": free_port(), "metricsPort": free_port()},
                      "capacity": {"trajectories": "demo"}})
    hosts = ["cap-agentperf-simulator", "cap-agentperf-master"]
    master_deployment = objects[("Deployment", "cap-agentperf-master")]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    folders = {name: tmp_path / name for name in ("master", "worker-a", "worker-b")}
    for folder in folders.values():
        folder.mkdir()
    master_command = _local(container(master_deployment)["command"], hosts)  # in /runs, its volume
    processes = [subprocess.Popen(
        _local(container(objects[("Deployment", "cap-agentperf-simulator")])["command"], hosts),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        wait = subprocess.run(_local(container(master_deployment, init=True)["command"], hosts), env=env, timeout=60,
                              check=False)
        assert wait.returncode == 0
        processes.append(subprocess.Popen(master_command, cwd=folders["master"], env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        worker_command = _local(container(objects[("Deployment", "cap-agentperf-worker")])["command"], hosts)
        processes += [subprocess.Popen(worker_command, cwd=folders[name], env=env, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL) for name in ("worker-a", "worker-b")]
        wait_for(lambda: (_web(web_port, "/stats/requests") or {}).get("worker_count") == 2, 60,
                 "the web UI shows both workers")
        started = _web(web_port, "/swarm", {"user_count": "2", "spawn_rate": "2"})
        assert started and started["success"], started
        records = folders["master"] / "records"

        def judged_from_both_workers():
            stats = _web(web_port, "/stats/requests") or {}
            rows = {tab["key"]: tab["data"] for tab in stats.get("extended_stats", [])}.get("agentperf-slo-now", [])
            kept = read_records([records]) if records.is_dir() else []
            return rows if len({r.worker_id for r in kept}) == 2 and any(row["requests"] for row in rows) else None

        rows = wait_for(judged_from_both_workers, 120, "records from both workers, judged in the SLO now tab")
        assert {row["verdict"] for row in rows} <= {"pass", "FAIL"}
        assert _web(web_port, "/stop", {}) is not None
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
                process.wait(10)
    assert [path.name for path in records.iterdir()] == ["records-master.jsonl"]
    kept = read_records([records])
    for name in ("worker-a", "worker-b"):  # each worker's own file, on its own "host" (no /runs there)
        (own,) = (folders[name] / "records").iterdir()
        assert {r.worker_id for r in read_records([own])} <= {r.worker_id for r in kept}
