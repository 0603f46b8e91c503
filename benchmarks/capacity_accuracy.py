"""Capacity accuracy: the live search's answer against the ground truth, and its cost against a ladder.

For each (profile, trajectory set) it runs the real ``agentperf capacity`` (embedded simulator, Locust
master and local workers) and reads its report, which carries the ground truth from ``agentperf truth``
run with the same search options. It prints, per tier, the live capacity, the truth and whether they
agree within ±5 % (at least ±1 agent); and the search's wall time as a ratio of a linear ladder
(+1 agent per step, same ramp/warm-up/window per step) that reaches the same resolution: the ladder
measures every count from ``--start-agents`` up to the largest first-failing count, and each of its steps
costs the mean step time this run measured.

    python benchmarks/capacity_accuracy.py                       # the two default cases, ~10 minutes
    python benchmarks/capacity_accuracy.py --case l4-llama3.2-3b:demo --window-s 30
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_CASES = ("l4-llama3.2-3b:demo", "h100-llama3.1-8b:default")
TOLERANCE = 0.05


def run_case(profile: str, trajectories: str, args: argparse.Namespace, out: Path) -> tuple[dict, float]:
    command = [sys.executable, "-m", "agentperf_users.cli", "capacity", "--profile", profile,
               "--trajectories", trajectories, "--out", str(out), "--start-agents", str(args.start_agents),
               "--max-agents", str(args.max_agents), "--warmup-s", str(args.warmup_s),
               "--window-s", str(args.window_s), "--workers", str(args.workers)]
    started = time.monotonic()
    subprocess.run(command, check=False, stdout=subprocess.DEVNULL if args.quiet else None)
    wall_s = time.monotonic() - started
    return json.loads((out / "report.json").read_text()), wall_s


def agrees(live: dict, truth: dict) -> bool:
    if live["status"] != truth["status"]:
        return False
    if live["status"] != "found":
        return True
    return abs(live["agents"] - truth["agents"]) <= max(1, TOLERANCE * truth["agents"])


def ladder_steps(report: dict, start_agents: int) -> int:
    """Steps a +1 ladder needs to bracket every tier to one agent: up to the largest first failure."""
    tops = [cap["first_failing_agents"] or cap["agents"] for cap in report["capacity"].values()]
    return max(tops) - start_agents + 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", help="PROFILE:TRAJECTORIES (repeatable)")
    parser.add_argument("--start-agents", type=int, default=2)
    parser.add_argument("--max-agents", type=int, default=64)
    parser.add_argument("--warmup-s", type=float, default=10.0)
    parser.add_argument("--window-s", type=float, default=20.0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--quiet", action="store_true", help="hide the runs' own progress")
    args = parser.parse_args()
    rows, all_agree = [], True
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.case or DEFAULT_CASES:
            profile, trajectories = case.split(":")
            report, wall_s = run_case(profile, trajectories, args, Path(tmp) / case.replace(":", "-"))
            truth = report["ground_truth"]["capacity"]
            steps = report["steps"]
            step_s = (steps[-1]["window_end_epoch_s"] - steps[0]["window_start_epoch_s"]
                      + args.warmup_s) / len(steps) if steps else float("nan")
            ladder = ladder_steps(report, args.start_agents)
            for name, live in report["capacity"].items():
                ok = agrees(live, truth[name])
                all_agree &= ok
                rows.append((case, live["label"], live["status"], live["agents"], truth[name]["status"],
                             truth[name]["agents"], "yes" if ok else "NO"))
            print(f"{case}: {len(steps)} steps, {wall_s:.0f} s wall; a +1 ladder needs {ladder} steps "
                  f"(~{ladder * step_s:.0f} s): search/ladder time ratio {len(steps) * step_s / (ladder * step_s):.2f}",
                  flush=True)
    print(f"\n{'case':28} {'tier':24} {'live':>18} {'truth':>18}  within ±5 % (≥ ±1)")
    for case, label, status, agents, t_status, t_agents, ok in rows:
        print(f"{case:28} {label:24} {status + ' ' + str(agents):>18} {t_status + ' ' + str(t_agents):>18}  {ok}")
    return 0 if all_agree else 1


if __name__ == "__main__":
    sys.exit(main())
