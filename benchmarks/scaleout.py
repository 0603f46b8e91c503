"""Scale-out of the load generator: streamed tokens/s and agents held at one fixed, SLO-passing load, run
with 1 and then 2 Locust worker processes, and whether the master's verdicts are bit-exact against the
workers' own record files.

The target is the simulator with a profile where the server cannot be the limit (``simulator_throughput``'s:
a constant engine step, no roofline, room for every agent in one batch, a KV cache far larger than the
agents' contexts), so each agent is asked to stream at 1000 / ``--step-ms`` tokens/s and any shortfall is
the load generator's. Agents replay the bundled demo trajectories with no tool waits. The load is one
search step (``agentperf capacity --start-agents N --max-agents N --resolution-agents N``: no bisecting
below it) against one tier the server's pace passes with room (``--speed-fraction`` of the asked speed;
TTFT <= 2 s, p90 per agent, 90 % of agents). Where agentperf finds the load generator the limit it
measures the step again: the first measurement is reported, every one compared. The simulator runs on
CPU 0 and ``agentperf capacity`` (the master and its local workers) on the others (``taskset``), where
the machine has more than one.

Printed per run: tokens streamed per second inside the measurement window (each request's tokens spread
over its streaming time, the part inside the window counted), the agents that met the tier, the CPU each
process used in the window and how long it waited for one (``/proc/PID/schedstat``), the machine's busy
and stolen CPU, and each step's numbers as the master judged them beside the same recomputed from the
union of the workers' record files (==, not approximately). Then the 2-worker / 1-worker ratio, and
where the machine was the limit: the workers wanted (ran plus waited) about every core they were given.

    PYTHONPATH=. python benchmarks/scaleout.py [--agents 240] [--step-ms 10] [--warmup-s 4] [--window-s 10]

Target: >= 1.8x with 2 workers where each worker and the simulator have a core of their own (3+ cores).
On a 2-core machine both workers share one core: no ratio measured there is scale-out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agentperf_users.measure.records import RequestRecord, read_records  # noqa: E402
from agentperf_users.measure.slo import evaluate_step, load_slo, records_in_window  # noqa: E402
from agentperf_users.simulator.cli import SimulatorProcess  # noqa: E402
from benchmarks.simulator_throughput import cpu_seconds, write_profile  # noqa: E402

TARGET_RATIO = 1.8
SIMULATOR_CPUS = frozenset({0})
SAMPLE_INTERVAL_S = 0.25
MACHINE_BOUND = 0.9  # workers wanting this share of their cores between them (used + waited): none to scale onto
MACHINE = -1  # the sampler's key for the whole machine's busy CPU time
KV_MEMORY_GIB = 2_000  # a KV cache no agent mix fills: no preemption, the server never the limit
TIER = "bench"


@dataclass(frozen=True)
class ProcessCpu:
    label: str  # simulator, cli, master, worker
    cores: float  # CPU seconds per second inside the window
    waiting: float  # seconds per second its threads were ready to run but waited for a CPU (the machine: steal)


@dataclass(frozen=True)
class RunResult:
    workers: int
    agents: int
    tok_s: float
    agents_held: int | None  # agents that met the tier
    agents_judged: int | None  # agents with requests in the window
    tier_passed: bool
    cpu: tuple[ProcessCpu, ...]
    master_numbers: list[dict]  # each step's verdict numbers as the master judged them (search.json)
    recomputed_numbers: list[dict]  # the same from the union of the workers' record files
    exit_code: int
    diagnosis: list[str]  # agentperf's own line where it found the load generator the limit
    coverage_complete: list[bool]  # per step: every worker had reported past the window when it was judged

    @property
    def worker_cores(self) -> float:
        return sum(p.cores for p in self.cpu if p.label == "worker")

    @property
    def worker_demand(self) -> float:
        """Cores the workers would have used: what they ran plus what they waited for a CPU."""
        return sum(p.cores + p.waiting for p in self.cpu if p.label == "worker")

    @property
    def bit_exact(self) -> bool:
        return self.master_numbers == self.recomputed_numbers


class CpuSampler:
    """CPU seconds of a process tree (and of extra processes), read from /proc every SAMPLE_INTERVAL_S in
    a thread, so a window's CPU can be taken afterwards, even of processes that have exited by then."""

    def __init__(self, root_pid: int, extra: dict[int, str]):
        self._root, self._extra = root_pid, extra
        self.samples: dict[int, list[tuple[float, float, float]]] = {}  # (epoch s, CPU s, run-queue wait s)
        self.labels: dict[int, str] = {MACHINE: "machine", **extra}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "CpuSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            now = time.time()
            self.samples.setdefault(MACHINE, []).append((now, *_machine_busy_s()))
            for pid in [*self._extra, *_tree(self._root)]:
                try:
                    sample = (now, cpu_seconds(pid), _waited_s(pid))
                    self.labels.setdefault(pid, _label(pid))
                except (OSError, IndexError, ValueError):
                    continue
                self.samples.setdefault(pid, []).append(sample)

    def cores(self, start: float, end: float) -> tuple[ProcessCpu, ...]:
        """Each process's CPU seconds per second between the samples nearest ``start`` and ``end``."""
        used = []
        for pid, samples in sorted(self.samples.items()):
            first = min(samples, key=lambda s: abs(s[0] - start))
            last = min(samples, key=lambda s: abs(s[0] - end))
            if last[0] > first[0]:
                seconds = last[0] - first[0]
                used.append(ProcessCpu(self.labels[pid], (last[1] - first[1]) / seconds, (last[2] - first[2]) / seconds))
        return tuple(used)


def _tree(root: int) -> list[int]:
    """``root`` and its descendants, from every process's parent in /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        tree += frontier
    return tree


def _machine_busy_s() -> tuple[float, float]:
    """CPU seconds the machine's CPUs ran anyone's work (``/proc/stat``: user, nice, system, irq, softirq), and
    the seconds the hypervisor gave them to other machines (steal): on a VM both take cores from the workers."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = (
        int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9])
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def _waited_s(pid: int) -> float:
    """Seconds the process's threads spent runnable on a run queue, not running (``/proc/PID/task/*/schedstat``,
    second field, ns): CPU time alone cannot tell a process that needed no more from one that got no more."""
    return sum(int((task / "schedstat").read_text().split()[1]) for task in Path(f"/proc/{pid}/task").iterdir()) / 1e9


def _label(pid: int) -> str:
    command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    if b"--worker" in command:
        return "worker"
    return "master" if b"--master" in command else "cli"


def write_slo(folder: Path, speed_tok_s: float) -> Path:
    path = folder / "slo.yaml"
    path.write_text(yaml.safe_dump({
        "defaults": {"quantile": 0.9, "scope": "agent", "agents_passing": 0.9, "max_error_rate": 0.01},
        "tiers": [{"name": TIER, "ttft_max_s": 2.0, "output_tps_min": round(speed_tok_s, 1)}]}))
    return path


def streamed_tok_s(records: list[RequestRecord], start: float, end: float) -> float:
    """Tokens streamed inside [start, end) per second: each request's tokens spread evenly from its first
    token to its end (the simulator streams at a constant pace), the share inside the window counted."""
    tokens = 0.0
    for record in records:
        if record.ttft_s is None or not record.output_tokens:
            continue
        first = record.start_epoch_s + record.ttft_s
        span = record.end_epoch_s - first
        overlap = min(end, record.end_epoch_s) - max(start, first)
        if span <= 0:
            tokens += record.output_tokens if start <= record.end_epoch_s < end else 0
        elif overlap > 0:
            tokens += record.output_tokens * overlap / span
    return tokens / (end - start)


def numbers(verdict_tiers: list[dict]) -> dict:
    keys = ("passed", "requests", "errors", "ttft_quantile_s", "output_tps_quantile", "agents_judged", "agents_passed")
    return {tier["tier"]: {key: tier[key] for key in keys} for tier in verdict_tiers}


def run_search(workers: int, url: str, folder: Path, slo: Path, args: argparse.Namespace, simulator_pid: int) -> RunResult:
    out = folder / f"workers-{workers}"
    load_cpus = os.sched_getaffinity(0) - SIMULATOR_CPUS or os.sched_getaffinity(0)
    command = [sys.executable, "-m", "agentperf_users.cli.main", "capacity", "--host", url, "--workers", str(workers),
               "--trajectories", "demo", "--tool-wait", "none", "--slo", str(slo), "--start-agents", str(args.agents),
               "--max-agents", str(args.agents), "--resolution-agents", str(args.agents),  # no bisecting below it
               "--agent-spawn-rate", str(args.agents), "--warmup-s",
               str(args.warmup_s), "--window-s", str(args.window_s), "--no-early-stop", "--out", str(out)]
    pinned = ["taskset", "-c", ",".join(map(str, sorted(load_cpus))), *command]
    process = subprocess.Popen(pinned, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with CpuSampler(process.pid, {simulator_pid: "simulator"}) as sampler:
        output, _ = process.communicate()
    steps = json.loads((out / "search.json").read_text())["steps"]
    if not steps or {s["agents"] for s in steps} != {args.agents}:
        print(output[-6000:])
        raise SystemExit(f"expected steps of {args.agents} agents, got {[s['agents'] for s in steps]}")
    union = read_records(sorted((out / "records").glob("records-worker-*.jsonl")))
    spec = load_slo(str(slo))
    recomputed = [evaluate_step(records_in_window(union, s["window_start_epoch_s"], s["window_end_epoch_s"]), spec)
                  for s in steps]
    step = steps[0]  # a step the load generator could not hold is measured again (agentperf's own diagnosis)
    start, end = step["window_start_epoch_s"], step["window_end_epoch_s"]
    (tier,) = [t for t in step["verdict"]["tiers"] if t["tier"] == TIER]
    return RunResult(workers, args.agents, streamed_tok_s(union, start, end), tier["agents_passed"], tier["agents_judged"],
                     tier["passed"],
                     sampler.cores(start, end), [numbers(s["verdict"]["tiers"]) for s in steps],
                     [numbers([v.to_dict() for v in verdict.tiers]) for verdict in recomputed], process.returncode,
                     [line.strip() for line in output.splitlines() if "load generator" in line][:1],
                     [s["coverage_complete"] for s in steps])


def show(run: RunResult, cores_given: int) -> None:
    ours = [p for p in run.cpu if p.label != "machine"]
    cpu = ", ".join(f"{p.label} {p.cores:.2f} (waited {p.waiting:.2f})" for p in sorted(ours, key=lambda p: p.label))
    (machine,) = [p for p in run.cpu if p.label == "machine"]
    print(f"{run.workers} worker(s), {run.agents} agents: {run.tok_s:,.0f} tok/s streamed; agents held "
          f"{run.agents_held}/{run.agents_judged} judged (tier {'passed' if run.tier_passed else 'FAILED'}); "
          f"exit {run.exit_code}")
    print(f"  cores used in the window (and s/s waiting for a CPU): {cpu}; the load generator had {cores_given} "
          f"core(s)")
    print(f"  the machine's {os.cpu_count()} CPUs: {machine.cores:.2f} busy ({sum(p.cores for p in ours):.2f} of it "
          f"ours), {machine.waiting:.2f} stolen by the hypervisor")
    print(f"  master's percentiles == recomputed from the workers' files ({len(run.master_numbers)} step(s), coverage "
          f"complete: {run.coverage_complete}): {run.bit_exact}")
    for master, recomputed in zip(run.master_numbers, run.recomputed_numbers, strict=True):
        for name, numbers_ in master.items():
            print(f"    master     {name}: {numbers_}")
            print(f"    recomputed {name}: {recomputed[name]}")
    for line in run.diagnosis:
        print(f"  agentperf said: {line[:300]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=240)
    parser.add_argument("--step-ms", type=float, default=10.0, help="the engine step: each agent is asked 1000/step-ms tok/s")
    parser.add_argument("--speed-fraction", type=float, default=0.7, help="the tier's speed, a share of the asked")
    parser.add_argument("--warmup-s", type=float, default=4)
    parser.add_argument("--window-s", type=float, default=10)
    args = parser.parse_args()
    load_cores = len(os.sched_getaffinity(0) - SIMULATOR_CPUS) or len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="scaleout-") as tmp:
        folder = Path(tmp)
        profile = write_profile(folder, args.step_ms, args.agents)
        data = yaml.safe_load(profile.read_text())
        data["gpu"]["memory_gib"] = KV_MEMORY_GIB
        profile.write_text(yaml.safe_dump(data))
        slo = write_slo(folder, 1000 / args.step_ms * args.speed_fraction)
        cpus = set(SIMULATOR_CPUS) if load_cores < len(os.sched_getaffinity(0)) else None
        with SimulatorProcess(["--profile", str(profile), "--port", "0"], cpus=cpus) as simulator:
            print(f"simulator at {simulator.url} on CPU(s) {sorted(cpus) if cpus else 'all'}; load average "
                  f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
            runs = []
            for workers in (1, 2):
                runs.append(run_search(workers, simulator.url, folder, slo, args, simulator.process.pid))
                show(runs[-1], load_cores)
    one, two = runs
    ratio = two.tok_s / one.tok_s
    print(f"\nscale-out: {ratio:.2f}x tokens/s with 2 workers (target >= {TARGET_RATIO}x); agents held "
          f"{one.agents_held} -> {two.agents_held} of {args.agents}")
    print(f"tokens per worker CPU-second (what a token costs the load generator, whatever share of the machine it "
          f"got): {one.tok_s / one.worker_cores:,.0f} with 1 worker, {two.tok_s / two.worker_cores:,.0f} with 2; the "
          f"master used {max(p.cores for p in two.cpu if p.label == 'master'):.2f} cores with 2")
    for run in runs:
        if run.worker_demand >= MACHINE_BOUND * load_cores:
            print(f"{run.workers} worker(s): the machine was the limit: they wanted {run.worker_demand:.2f} cores (ran "
                  f"{run.worker_cores:.2f}, waited for a CPU the rest) of the {load_cores} they had")
    if two.worker_demand >= MACHINE_BOUND * load_cores and load_cores < 2:
        print(f"the 2 workers shared {load_cores} core(s): the ratio says what share of a busy machine each run got, "
              "not scale-out; a core per worker (and one for the simulator) measures that")
    elif ratio < TARGET_RATIO:
        print(f"below target with cores to spare (the workers wanted {two.worker_demand:.2f} of {load_cores}): "
              "agentperf is the limit, or one worker was not saturated (raise --agents)")
    print(f"bit-exact: {one.bit_exact and two.bit_exact}")


if __name__ == "__main__":
    main()
