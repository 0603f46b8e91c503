"""The fleet model against a live fleet: ``agentperf capacity --host`` on ``agentperf simulate --replicas N
--router R``, beside ``agentperf predict --replicas N --router R`` of the same profile, trajectories and tier.
Printed, not asserted.

``--workload slots`` (the default) is tests/test_replicas.py's: a profile of few sequence slots
(``--max-num-seqs``, default 4), one-turn trajectories of ~100-token prompts and 100-token answers, no tool
waits, and one tier whose TTFT limit (0.1 s) sits above one prefill step and below the wait of one agent
more than the slots. So one replica holds about its slots, and N round-robin replicas about N times that.

``--workload prefix`` is where the routers' prefix-cache hits decide: the default profile, trajectories and
tiers (conversations of tens of thousands of tokens growing a few hundred a turn), where a turn routed
away from its previous turn's replica re-prefills the conversation and stalls that replica's decodes
(docs/twin.md: predict holds 20 agents on two round-robin replicas and 48 on two prefix-affinity ones).

After the table, one row per live step says whether the measurement was of the modelled fleet: the
simulator's engine time lost to falling behind real time and its tokens' write lateness (from its own
metrics, as the harness read them into the step's server numbers), and the load generator's busiest
worker's CPU.

    python benchmarks/fleet_live.py [--workload slots|prefix] [--fleets 1:round-robin,2:round-robin,2:prefix-affinity]
        [--max-num-seqs 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agentperf_users.simulator.cli import SimulatorProcess  # noqa: E402
from tests.simulator import write_profile  # noqa: E402
from tests.test_replicas import SEARCH, write_flat_set, write_tight_slo  # noqa: E402


def agentperf(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agentperf_users.cli.main", *args], capture_output=True, text=True,
                          cwd=REPO)


PREFIX_SEARCH = ["--start-agents", "8", "--max-agents", "128", "--warmup-s", "10", "--window-s", "30"]
"""The prefix workload's search: from 8 agents (the fleets hold 16-100), the engine benchmarks' windows."""


def workload(folder: Path, name: str, max_num_seqs: int) -> list[str]:
    """The profile and options of the workload ``name`` (module docstring)."""
    if name == "prefix":
        return ["h100-llama3.1-8b", *PREFIX_SEARCH]
    profile = write_profile(folder, {"engine.max_num_seqs": max_num_seqs})
    return [str(profile), "--trajectories", str(write_flat_set(folder)), "--slo", str(write_tight_slo(folder)), *SEARCH]


def agents(capacity: dict) -> str:
    """Each tier's answer, ``found 8`` (one tier) or ``found 20 / found 7 / none_passed None``."""
    return " / ".join(f"{tier.get('status')} {tier.get('agents')}" for tier in capacity.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fleets", default="1:round-robin,2:round-robin,2:prefix-affinity")
    parser.add_argument("--max-num-seqs", type=int, default=4, help="the slots workload's sequence slots")
    parser.add_argument("--workload", choices=("slots", "prefix"), default="slots")
    args = parser.parse_args()
    print("| replicas | router | predicted | measured live | live wall |\n|---|---|---|---|---|", flush=True)
    kept: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        profile, *options = workload(folder, args.workload, args.max_num_seqs)
        for fleet in args.fleets.split(","):
            replicas, router = fleet.split(":")
            done = agentperf("predict", "--profile", profile, "--replicas", replicas, "--router", router, *options,
                             "--json")
            if done.returncode != 0:
                raise SystemExit(f"agentperf predict failed: {done.stderr[-2000:]}")
            predicted = json.loads(done.stdout)["capacity"]
            out = folder / f"run-{replicas}-{router}"
            started = time.monotonic()
            with SimulatorProcess(["--port", "0", "--profile", profile, "--replicas", replicas,
                                   "--router", router]) as sim:
                done = agentperf("capacity", "--host", sim.url, *options, "--workers", "1", "--out", str(out))
            if not (out / "report.json").exists():
                raise SystemExit(f"agentperf capacity failed: {done.stderr[-2000:]}")
            report = json.loads((out / "report.json").read_text())
            print(f"| {replicas} | {router} | {agents(predicted)} | {agents(report['capacity'])} | "
                  f"{time.monotonic() - started:.0f} s |", flush=True)
            kept.extend(f"| {fleet} | {row}" for row in real_time_rows(report))
    print("\nWhether the simulator kept real time, per step (engine time lost to clock jumps per second, summed "
          "over replicas; tokens' mean write lateness; the load generator's busiest worker):\n\n"
          "| fleet | agents | headline margin | engine time lost | write late | load generator CPU |\n"
          "|---|---|---|---|---|---|", *kept, sep="\n")


def real_time_rows(report: dict) -> list[str]:
    """Per step of a live run: its headline margin, and whether the simulator and the load generator kept up."""
    first_tier = next(iter(report["capacity"]))
    rows = []
    for step in report["steps"]:
        server, loadgen = step["server"], (step.get("load_generator") or {}).get("worker_cpu") or {}
        lost, late = server.get("simulator_time_lost_share"), server.get("simulator_write_late_mean_s")
        margin = step["margin"].get(first_tier)
        margin = margin if isinstance(margin, (int, float)) else None
        rows.append(f"{step['agents']} | {'n/a' if margin is None else f'{margin:+.2f}'} | "
                    f"{'n/a' if lost is None else f'{lost * 100:.1f} %'} | "
                    f"{'n/a' if late is None else f'{late * 1000:.1f} ms'} | "
                    f"{f'{max(loadgen.values()) * 100:.0f} %' if loadgen else 'n/a'} |")
    return rows


if __name__ == "__main__":
    main()
