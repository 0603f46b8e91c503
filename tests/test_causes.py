"""Why a step failed, made to happen: each cause of ``diagnose`` brought about on the embedded simulator and
named by ``agentperf capacity`` end to end (the server's metrics read every second, the live diagnosis in
the progress line and search.json, the report's recomputed one).

Each server cause is one short one-step search (``--start-agents`` = ``--max-agents`` =
``--resolution-agents``) against a profile changed to have it:

* **KV-cache pressure**: a KV cache of ~9K tokens (the activation reserve raised until that is what is
  left), six agents on the demo set, whose contexts of ~3K tokens do not fit together: the engine preempts.
* **queueing**: ``max_num_seqs: 1``, three agents: one request runs, the others wait.
* **prefill**: a tenth of the compute (``mfu``), one agent on one-turn trajectories of ~9K-token tasks
  (``agentperf trajectories synth``): every judged request prefills a cold prompt for seconds, alone.

The two output-speed causes, TTFT unlimited:

* **decode speed**: the prefill run has a second tier, a 1,000 tok/s floor that no single stream of the
  server meets: its one agent's requests decode alone, too slowly.
* **decode stalls**: the slow-prefill profile, four agents without tool waits on one-turn trajectories of
  ~4K-token cold prompts and ~150-token replies, against a 60 tok/s floor that the server's steady decode
  (~8 ms a token) meets: each agent's reply is paused for seconds whenever another agent's prompt is
  prefilled in the engine's steps (chunked prefill shares the step with the decodes).
* **decode batch**: the README's demo deployment (``l4-llama3.2-3b``: one L4 decodes its 3B model at ~33
  tok/s alone, ~23 tok/s with ten agents' requests in a batch), ten agents against a 30 tok/s floor, which a
  request decoding alone meets: the batch's decode steps are what slow every request under it. Without
  tool waits every agent decodes all the time, so a window of a few seconds judges enough requests.

They run one after another, not side by side: on two cores, three simulators and their load generators
at once would put the load generator's own delay into the verdicts this file checks.

**The load generator**: a worker whose process burns CPU beside its agents (``fixtures/locustfiles/
busy_worker.py``: two native threads hashing without pause, at a raised priority where that is allowed),
started by the test as a remote worker of the search's master. Its CPU over the window is at least
``LOADGEN_CPU_BUSY`` of a core, so its failing verdict is not about the server: measured again, then the
search stops naming it. (A worker merely starved of CPU, pinned to a core it shares with a hog, would not
show it: its CPU is low, and its TTFT is taken from kernel receive timestamps, so it measures the server
right; a worker that needs more CPU than it gets is the load generator limiting the verdict.)

**The simulator's host**: the simulator itself stopped (SIGSTOP) for most of each second, as a host that
does not give it the CPU would: its engine clock jumps after each stop, the lost time shows in its
metrics, and the step is not taken for the modelled server's capacity.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from agentperf_users.measure.diagnose import (
    DECODE_ITL_SHARE,
    DECODE_MIN_RUNNING,
    LOADGEN_CPU_BUSY,
    MOST_OF_TTFT,
    SIMULATOR_TIME_LOST_SHARE,
    STALL_SHARE,
)
from agentperf_users.search.headline import agents_words
from agentperf_users.simulator.cli import SimulatorProcess
from agentperf_users.simulator.profile import PROFILES_DIR
from tests.support import free_port

pytestmark = pytest.mark.slow

BASE_PROFILE = "h100-llama3.1-8b"
BUSY_WORKER = Path(__file__).parent / "fixtures" / "locustfiles" / "busy_worker.py"
FIRST_TOKEN_TIER = "tiers:\n  - {name: first-token, ttft_max_s: %s, output_tps_min: 1, scope: request}\n"
SPEED_TIER = "tiers:\n  - {name: speed, ttft_max_s: 600, output_tps_min: %s, scope: request}\n"
ALONE_SPEED_TIER = "  - {name: speed, ttft_max_s: 600, output_tps_min: 1000, scope: request}\n"
DEMO_PROFILE = "l4-llama3.2-3b"
SPEED_STEP = ["--warmup-s", "2", "--window-s", "5", "--tool-wait", "none"]  # every agent decoding all the time
SHORT_STEP = ["--warmup-s", "3", "--window-s", "8", "--workers", "1", "--no-truth"]
RUN_TIMEOUT_S = 150


@dataclass(frozen=True)
class Run:
    """One ``agentperf capacity`` run: its exit code, console, report and live search state."""

    returncode: int
    stdout: str
    report: dict
    state: dict

    def diagnosis(self, step: int = 0, tier: str = "first-token") -> dict:
        """The step's diagnosis of ``tier``, the same live and recomputed from the files."""
        (found,) = [found for found in self.report["steps"][step]["diagnoses"] if found["tier"] == tier]
        (live,) = [live for live in self.state["steps"][step]["diagnoses"] if live["tier"] == tier]
        assert found == live, self.stdout
        return found


def profile(folder: Path, name: str, **changes) -> Path:
    """The base profile with ``section__field`` values changed, as a profile file of its own."""
    data = yaml.safe_load((PROFILES_DIR / f"{BASE_PROFILE}.yaml").read_text())
    data.pop("anchors")  # the published numbers are the base deployment's, not this one's
    for key, value in changes.items():
        section, field = key.split("__")
        data[section][field] = value
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def capacity(folder: Path, *args: str, ttft_max_s: float = 0.5, tiers: str | None = None) -> subprocess.Popen:
    """``agentperf capacity`` of one tier: ``first-token`` (TTFT ≤ ``ttft_max_s``), or ``tiers`` (YAML)."""
    slo = folder / "slo.yaml"
    slo.write_text(tiers or FIRST_TOKEN_TIER % ttft_max_s)
    return subprocess.Popen([sys.executable, "-m", "agentperf_users.cli.main", "capacity", "--slo", str(slo),
                             "--out", str(folder / "run"), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finished(folder: Path, process: subprocess.Popen) -> Run:
    try:
        stdout, _ = process.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    out = folder / "run"
    assert (out / "report.json").is_file(), stdout
    return Run(process.returncode, stdout, json.loads((out / "report.json").read_text()),
               json.loads((out / "search.json").read_text()))


def one_step(folder: Path, agents: int, *args: str, tiers: str | None = None) -> Run:
    count = str(agents)
    return finished(folder, capacity(folder, "--start-agents", count, "--max-agents", count, "--resolution-agents",
                                     count, *SHORT_STEP, *args, tiers=tiers))


@pytest.fixture(scope="module")
def server_causes(tmp_path_factory) -> dict[str, Run]:
    """The three server causes' runs, one after another."""
    runs = {}
    folder = tmp_path_factory.mktemp("kv")
    runs["kv"] = one_step(folder, 6, "--trajectories", "demo", "--profile", str(profile(
        folder, "little-kv", engine__activation_reserve_gib=55.2, model__max_context_tokens=8192)))
    folder = tmp_path_factory.mktemp("queueing")
    runs["queueing"] = one_step(folder, 3, "--trajectories", "demo", "--profile", str(profile(
        folder, "one-seq", engine__max_num_seqs=1)))
    folder = tmp_path_factory.mktemp("prefill")
    cold = synth(folder / "cold.jsonl", 8000, 16, 32)
    runs["prefill"] = one_step(folder, 1, "--trajectories", str(cold), "--profile", str(profile(
        folder, "slow-prefill", efficiency__mfu=0.066)), tiers=FIRST_TOKEN_TIER % 0.5 + ALONE_SPEED_TIER)
    return runs


def assert_failed_about_capacity(run: Run, tier: str = "first-token") -> dict:
    """A one-step search whose step failed its tier as a capacity verdict: none located (exit 3)."""
    assert run.returncode == 3 and run.report["capacity"][tier]["status"] == "none_passed", run.stdout
    found = run.diagnosis(tier=tier)
    assert found["about_capacity"] and found["tier"] == tier
    at = agents_words(run.report["steps"][0]["agents"])
    assert f"at {at}: {found['text'].removeprefix('why: ')}" in run.stdout  # the headline's binding cause
    named = [line.split("why: ", 1)[1].split(", ") for line in run.stdout.splitlines() if "why: " in line]
    assert any(found["cause"] in causes for causes in named), run.stdout  # and the step's progress line
    assert run.report["steps"][0]["server"]["server"] == "vllm"
    return found


def test_a_kv_cache_too_small_for_the_agents_contexts_is_kv_cache_pressure(server_causes):
    run = server_causes["kv"]
    found = assert_failed_about_capacity(run)
    assert found["cause"] == "KV-cache pressure", run.stdout
    server = run.report["steps"][0]["server"]
    assert server["kv_cache_usage_max"] >= 0.95 or server["preemptions"] > 0
    assert found["evidence"]["kv_cache_usage_max"] == server["kv_cache_usage_max"]
    assert found["evidence"]["preemptions"] == server["preemptions"]


def test_one_sequence_at_a_time_is_queueing(server_causes):
    run = server_causes["queueing"]
    found = assert_failed_about_capacity(run)
    assert found["cause"] == "queueing", run.stdout
    server = run.report["steps"][0]["server"]
    assert server["requests_running_max"] == 1 and server["requests_waiting_mean"] > 0
    evidence = found["evidence"]
    assert evidence["queue_time_mean_s"] / evidence["server_ttft_mean_s"] >= MOST_OF_TTFT
    assert server["kv_cache_usage_max"] < 0.95 and server["preemptions"] == 0  # not the KV cause's doing


def test_long_cold_prompts_on_slow_compute_are_prefill(server_causes):
    run = server_causes["prefill"]
    found = assert_failed_about_capacity(run)
    assert found["cause"] == "prefill", run.stdout
    assert found["text"].endswith("(cold contexts)")
    server = run.report["steps"][0]["server"]
    assert server["prefix_cache_hit_ratio"] < 0.5 and server["requests_waiting_max"] == 0
    assert found["evidence"]["prefill_time_mean_s"] / found["evidence"]["server_ttft_mean_s"] >= MOST_OF_TTFT


@pytest.fixture(scope="module")
def decode_batch(tmp_path_factory) -> Run:
    """Ten agents on the demo deployment against a 30 tok/s floor (module docstring)."""
    folder = tmp_path_factory.mktemp("decode-batch")
    return one_step(folder, 10, "--trajectories", "demo", "--profile", DEMO_PROFILE, *SPEED_STEP,
                    tiers=SPEED_TIER % 30)


def assert_the_speed_floor_failed_on_the_servers_decode(run: Run, floor: float) -> tuple[dict, dict]:
    """The step failed the floor (its TTFT limit is out of reach), and the diagnosis' inter-token latency is
    the server's own for the window, within ``DECODE_ITL_SHARE`` of the floor's gap or above it, with
    nothing else holding (no KV pressure)."""
    found = assert_failed_about_capacity(run, tier="speed")
    server = run.report["steps"][0]["server"]
    assert found["evidence"]["inter_token_latency_mean_s"] == server["inter_token_latency_mean_s"]
    assert server["inter_token_latency_mean_s"] >= DECODE_ITL_SHARE / floor
    assert server["kv_cache_usage_max"] < 0.95 and server["preemptions"] == 0
    assert found["also"] == []
    return found, server


def test_one_agent_decoding_slower_than_the_floor_is_decode_speed(server_causes):
    """The prefill run's second tier, a floor no single stream of the server meets: not "not identified"
    (as for the README's demo at 60 tok/s before), but the server's own decode speed, and the words say
    that no count of agents can pass there."""
    run = server_causes["prefill"]
    found, server = assert_the_speed_floor_failed_on_the_servers_decode(run, 1000)
    assert found["cause"] == "decode speed", run.stdout
    assert found["text"].endswith("so no agent count can pass this tier on this server")
    assert found["evidence"]["floor_inter_token_latency_s"] == pytest.approx(1 / 1000)
    assert server["requests_running_max"] == 1 and found["evidence"]["requests_running_mean"] < DECODE_MIN_RUNNING


def test_ten_agents_decoding_in_a_batch_slower_than_the_floor_is_decode_batch(decode_batch):
    """A floor that a request decoding alone on this deployment meets (~33 tok/s), failed by ten agents whose
    batch slows every decode step past the floor's gap."""
    found, server = assert_the_speed_floor_failed_on_the_servers_decode(decode_batch, 30)
    assert found["cause"] == "decode batch", decode_batch.stdout
    assert found["evidence"]["requests_running_mean"] == server["requests_running_mean"] >= DECODE_MIN_RUNNING
    assert server["inter_token_latency_mean_s"] > 1 / 30  # above the gap itself, not only near it


def synth(path: Path, task_median: int, output_median: int, output_p95: int) -> Path:
    """One-turn trajectories of cold ~``task_median``-token prompts (``agentperf trajectories synth``)."""
    subprocess.run([sys.executable, "-m", "agentperf_users.cli.main", "trajectories", "synth", "--out", str(path),
                    "--count", "40", "--system-tokens", "1000", "--task-median", str(task_median), "--task-sigma",
                    "0.1", "--max-turns", "1", "--output-median", str(output_median), "--output-p95",
                    str(output_p95), "--tool-count", "1"], check=True, capture_output=True, timeout=60)
    return path


def test_replies_paused_by_other_agents_prefills_are_decode_stalls(tmp_path):
    """Four agents on the slow-prefill profile (module docstring): the floor fails although the replies'
    own median gap is well inside it, and what the server did meanwhile was prefill."""
    cold = synth(tmp_path / "cold.jsonl", 3000, 150, 300)
    run = one_step(tmp_path, 4, "--trajectories", str(cold), "--tool-wait", "none", "--profile", str(profile(
        tmp_path, "slow-prefill", efficiency__mfu=0.066)), tiers=SPEED_TIER % 60)
    found = assert_failed_about_capacity(run, tier="speed")
    assert found["cause"] == "decode stalls", run.stdout
    evidence, server = found["evidence"], run.report["steps"][0]["server"]
    assert evidence["slow_median_gap_s"] < 1 / 60 and evidence["stalled_share"] >= STALL_SHARE
    assert evidence["prefill_time_mean_s"] == server["prefill_time_mean_s"] > 0


def test_a_busy_worker_is_the_load_generator_and_the_search_stops_naming_it(tmp_path):
    """Against the unchanged profile, a tier no server meets (TTFT ≤ 1 ms) fails at every count; with the
    worker at a core or more, that is put down to the load generator, not to the server."""
    port = free_port()
    process = capacity(tmp_path, "--trajectories", "demo", "--start-agents", "2", "--max-agents", "2",
                       "--resolution-agents", "2", *SHORT_STEP[:4], "--no-truth", "--workers", "0",
                       "--remote-workers", "1", "--master-bind-host", "127.0.0.1", "--master-bind-port", str(port),
                       ttft_max_s=0.001)
    worker = subprocess.Popen([sys.executable, "-m", "locust", "-f", str(BUSY_WORKER), "--worker", "--master-host",
                               "127.0.0.1", "--master-port", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)  # its priority is its own
    try:
        run = finished(tmp_path, process)
    finally:
        worker.kill()  # the master's quit has normally ended it already
        worker.wait()
    assert run.returncode == 4, run.stdout  # the search did not finish: it stopped
    assert [step["agents"] for step in run.report["steps"]] == [2, 2]  # measured once more, then stopped
    for index, step in enumerate(run.report["steps"]):
        assert list(step["load_generator"]["worker_cpu"]) == [f"worker-0-{worker.pid}"]
        assert step["load_generator"]["worker_cpu"][f"worker-0-{worker.pid}"] >= LOADGEN_CPU_BUSY
        found = run.diagnosis(index)
        assert (found["cause"], found["about_capacity"]) == ("the load generator", False)
    stopped = run.report["stopped"]
    assert (stopped["step"], stopped["cause"]) == (1, "the load generator")
    assert "search stopped at step 1 (2 agents): the load generator is the limit, not a capacity" in run.stdout
    assert run.report["capacity"]["first-token"]["first_failing_agents"] is None  # never a fail of the tier
    assert not run.report["interrupted"] and "interrupted" not in run.stdout  # the search ended it, as it meant to


class Stalls:
    """Stops a process for ``stop_s`` of every ``period_s`` (SIGSTOP, SIGCONT) until the block ends: a host
    that does not give it the CPU. The pauses are the fault injected, not a wait for anything."""

    def __init__(self, pid: int, stop_s: float = 0.8, period_s: float = 1.2):
        self._pid, self._stop_s, self._period_s = pid, stop_s, period_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.stops = 0

    def _run(self) -> None:
        while not self._done.is_set():
            os.kill(self._pid, signal.SIGSTOP)
            self.stops += 1
            self._done.wait(self._stop_s)
            os.kill(self._pid, signal.SIGCONT)
            self._done.wait(self._period_s - self._stop_s)

    def __enter__(self) -> "Stalls":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._done.set()
        self._thread.join()
        os.kill(self._pid, signal.SIGCONT)


def test_a_simulator_whose_host_stalls_it_is_named_not_taken_for_the_modelled_server(tmp_path):
    """The simulator stopped for 0.8 s of every 1.2 s: its clock jumps after each stop, so it loses most of
    its engine time, and a 60 tok/s floor (which the profile's ~100 tok/s for two agents meets) fails; that
    is put down to its host: measured again, then the search stops naming it (as for a busy load
    generator), never a capacity of the modelled server."""
    with SimulatorProcess(["--port", "0"]) as sim, Stalls(sim.process.pid) as stalls:
        run = finished(tmp_path, capacity(tmp_path, "--host", sim.url, "--trajectories", "demo", "--tool-wait", "none",
                                          "--start-agents", "2", "--max-agents", "2", "--resolution-agents", "2",
                                          *SHORT_STEP, tiers=SPEED_TIER % 60))
    assert stalls.stops > 0
    assert run.returncode == 4, run.stdout  # the search did not finish: it stopped
    assert [step["agents"] for step in run.report["steps"]] == [2, 2]  # measured once more, then stopped
    for index, step in enumerate(run.report["steps"]):
        assert step["server"]["simulator_time_lost_share"] >= SIMULATOR_TIME_LOST_SHARE
        found = run.diagnosis(index, tier="speed")
        assert (found["cause"], found["about_capacity"]) == ("the simulator's host", False)
        assert found["evidence"]["simulator_time_lost_share"] == step["server"]["simulator_time_lost_share"]
    assert run.report["stopped"]["cause"] == "the simulator's host"
    assert "search stopped at step 1 (2 agents): the simulator's host is the limit, not a capacity" in run.stdout
    assert run.report["capacity"]["speed"]["first_failing_agents"] is None  # never a fail of the tier
