"""How much ``agentperf capacity --predict`` saves: search time with the twin's prediction against without,
the same answer required. Printed, not asserted (issue 14's target: a ratio of at most 0.6).

The server is the embedded simulator on ``--profile`` (default h100-llama3.1-8b); the twin is

* ``perfect``: the server's own profile (a twin that calibrated it exactly), and
* ``calibrated N`` (``--calibrated N``): what ``agentperf calibrate`` fitted to the embedded simulator
  serving that profile, one probe each: the twin ``--predict`` is meant to be given, and
* ``±S % seed N``: the same profile with its five step-cost fields and its memory each scaled by a factor
  drawn in [1 - S, 1 + S] (``--spreads``, one twin per ``--seeds`` seed; ``twin_accuracy.hidden_profile``):
  an imperfect twin, off by what a good (10 %) to a poor (40 %) calibration would be; with ``--memory
  exact`` its memory (the KV cache) stays the server's, as calibrate reads it where the server states it,
  so only the step costs are off.

(1) Virtual clock (seconds): the ground truth's search (``search.truth``) with and without the
    prediction, on the same engine: its load steps and the search's simulated seconds (ramps, warm-ups
    and windows: what a live search spends), each over the unpredicted search's; steered by the twin's
    margin curve (what ``--predict`` does) and, for comparison, from its predicted counts alone.
(2) ``--live``: ``agentperf capacity`` on the embedded simulator, without and with ``--predict`` for the
    perfect twin and the first perturbed one, short windows; wall seconds of the whole command (the
    prediction included) and the steps it measured.

    python benchmarks/predict_speedup.py [--profile h100-llama3.1-8b] [--spreads 0.1,0.2,0.4] [--seeds 0,1,2]
        [--memory perturbed|exact] [--calibrated 3] [--trajectories default] [--live]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import twin_accuracy  # noqa: E402
from twin_accuracy import hidden_profile  # noqa: E402

from agentperf_users.loadgen import replay  # noqa: E402
from agentperf_users.measure.slo import load_slo  # noqa: E402
from agentperf_users.search import predicted, truth  # noqa: E402
from agentperf_users.search.headline import answer_words  # noqa: E402
from agentperf_users.search.policy import SearchParameters  # noqa: E402
from agentperf_users.simulator.profile import load_profile  # noqa: E402
from agentperf_users.workload.readers import load_trajectories  # noqa: E402

SHORT_WINDOWS = ["--warmup-s", "5", "--window-s", "15"]


def twins(folder: Path, spreads: list[float], seeds: list[int]) -> list[tuple[str, str]]:
    """(case, twin profile): the server's own, then one perturbed per spread and seed."""
    cases = [("perfect", twin_accuracy.BASE_PROFILE)]
    for spread in spreads:
        twin_accuracy.SPREAD = spread
        (folder / f"{spread:g}").mkdir()
        cases += [(f"±{spread:.0%} seed {seed}", str(hidden_profile(folder / f"{spread:g}", seed))) for seed in seeds]
    return cases


def calibrated_twins(folder: Path, count: int) -> list[tuple[str, str]]:
    """(case, twin profile): ``count`` twins that ``agentperf calibrate`` fitted to the embedded simulator serving
    the server's profile, each from its own probe (the URL and max_num_seqs, which no server reports): the
    twin a user of ``--predict`` has, off by the probe's noise rather than by a chosen spread."""
    from agentperf_users.simulator.cli import SimulatorProcess

    cases = []
    seqs = str(load_profile(twin_accuracy.BASE_PROFILE).engine.max_num_seqs)
    for index in range(count):
        twin = folder / f"calibrated-{index}.yaml"
        with SimulatorProcess(["--port", "0", "--profile", twin_accuracy.BASE_PROFILE]) as sim:
            twin_accuracy.calibrate(sim.url, twin, "standard", "--max-num-seqs", seqs)
        cases.append((f"calibrated {index}", str(twin)))
    return cases


def answers(capacity: dict) -> str:
    return ", ".join(answer_words(cap.to_dict()) for cap in capacity.values())


def virtual_clock(cases: list[tuple[str, str]], trajectories: str) -> list[tuple[float, float]]:
    """Part 1: the truth's search on the server's profile, from each twin's prediction and without one;
    (steps, simulated seconds) over the unpredicted search's, per twin."""
    parser = argparse.ArgumentParser()
    truth.add_arguments(parser)
    args = parser.parse_args(["--profile", twin_accuracy.BASE_PROFILE, "--trajectories", trajectories, *SHORT_WINDOWS])
    spec, params = load_slo(None), SearchParameters.from_options(args)
    settings, sessions = replay.ReplaySettings.from_options(args), load_trajectories(trajectories, "auto")
    server = load_profile(twin_accuracy.BASE_PROFILE)
    plain = truth.find_capacity(server, sessions, spec, params, settings)
    print(f"\n(1) virtual clock: server {twin_accuracy.BASE_PROFILE}, trajectories {trajectories}, "
          f"{' '.join(SHORT_WINDOWS)}; "
          f"without a prediction: {len(plain.steps)} steps, {plain.simulated_s:,.0f} s searched, "
          f"answer {answers(plain.capacity)}\n")
    print("| twin | predicted | steps with / without | search s with / without | steps ratio | time ratio "
          "| same answer | counts only: steps, time ratio |")
    print("|---|---|---|---|---|---|---|---|")
    ratios = []
    for case, twin in cases:
        prediction = predicted.predict(twin, sessions, spec, params, settings)
        started = truth.find_capacity(server, sessions, spec, params, settings, predicted=prediction.capacity,
                                      twin_margins=prediction.margins)
        counts_only = truth.find_capacity(server, sessions, spec, params, settings, predicted=prediction.capacity)
        steps, seconds = len(started.steps) / len(plain.steps), started.simulated_s / plain.simulated_s
        ratios.append((steps, seconds))
        same = 'yes' if started.capacity == plain.capacity else 'NO: ' + answers(started.capacity)
        print(f"| {case} | {answers(prediction.capacity)} | {len(started.steps)} / {len(plain.steps)} | "
              f"{started.simulated_s:,.0f} / {plain.simulated_s:,.0f} | {steps:.2f} | {seconds:.2f} | {same} | "
              f"{len(counts_only.steps)}, {counts_only.simulated_s / plain.simulated_s:.2f} |", flush=True)
    return ratios


def live_run(folder: Path, name: str, trajectories: str, *extra: str) -> tuple[float, dict]:
    out = folder / name
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "agentperf_users.cli.main", "capacity",
                           "--profile", twin_accuracy.BASE_PROFILE,
                           "--trajectories", trajectories, *SHORT_WINDOWS, "--workers", "1", "--no-truth",
                           "--out", str(out), *extra], capture_output=True, text=True, cwd=REPO)
    wall = time.monotonic() - started
    if done.returncode not in (0, 3):
        raise SystemExit(f"agentperf capacity {name} failed ({done.returncode}): {done.stderr[-2000:]}")
    return wall, json.loads((out / "report.json").read_text())


def live(cases: list[tuple[str, str]], trajectories: str, folder: Path) -> None:
    """Part 2: the live search on the embedded simulator, without and with --predict."""
    print(f"\n(2) live: agentperf capacity --profile {twin_accuracy.BASE_PROFILE} --trajectories {trajectories} "
          f"{' '.join(SHORT_WINDOWS)} --workers 1 --no-truth [--predict TWIN]\n")
    plain_s, plain = live_run(folder, "without", trajectories)
    plain_answer = {name: cap["agents"] for name, cap in plain["capacity"].items()}
    print("| twin | steps with / without | wall s with / without | ratio | answer with / without |")
    print("|---|---|---|---|---|")
    for case, twin in cases:
        wall, report = live_run(folder, case, trajectories, "--predict", twin)
        answer = {name: cap["agents"] for name, cap in report["capacity"].items()}
        print(f"| {case} | {len(report['steps'])} / {len(plain['steps'])} | {wall:.0f} / {plain_s:.0f} | "
              f"{wall / plain_s:.2f} | {answer} / {plain_answer} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default=twin_accuracy.BASE_PROFILE,
                        help="the server's profile, a bundled name or a YAML file (the perturbed twins need "
                             "one with anchors: --spreads '' for another)")
    parser.add_argument("--spreads", default="0.1,0.2,0.4",
                        help="how far the perturbed twins' fields are scaled: a factor in [1 - spread, 1 + spread]")
    parser.add_argument("--seeds", default="0,1,2", help="perturbed twins, one per seed and spread")
    parser.add_argument("--trajectories", default="default")
    parser.add_argument("--memory", choices=("perturbed", "exact"), default="perturbed",
                        help="exact: the perturbed twins keep the server's memory (its KV cache), as calibrate's "
                             "twins do where the server states it (vLLM, SGLang), so only their step costs are off")
    parser.add_argument("--calibrated", type=int, default=0, metavar="N",
                        help="also N twins agentperf calibrate fits to the server (a live probe each, ~1 min)")
    parser.add_argument("--live", action="store_true", help="also run the live searches (perfect, first perturbed)")
    args = parser.parse_args()
    twin_accuracy.BASE_PROFILE = args.profile
    if args.memory == "exact":
        twin_accuracy.PERTURBED = tuple(field for field in twin_accuracy.PERTURBED if field != ("gpu", "memory_gib"))
    with tempfile.TemporaryDirectory(prefix="predict-speedup-") as tmp:
        cases = twins(Path(tmp), [float(s) for s in args.spreads.split(",") if s],
                      [int(seed) for seed in args.seeds.split(",") if seed])
        fitted = calibrated_twins(Path(tmp), args.calibrated)
        ratios = virtual_clock(cases + fitted, args.trajectories)
        perturbed, calibrated = ratios[1:len(cases)], ratios[len(cases):]
        for name, group in (("perturbed twins", perturbed), ("calibrated twins", calibrated)):
            if group:
                print(f"\nwith over without, {name}: steps {statistics.mean(r[0] for r in group):.2f} mean, "
                      f"{max(r[0] for r in group):.2f} worst; search time {statistics.mean(r[1] for r in group):.2f} "
                      f"mean, {max(r[1] for r in group):.2f} worst (target <= 0.6)")
        print(f"perfect twin: search time {ratios[0][1]:.2f}")
        if args.live:
            live(cases[:2], args.trajectories, Path(tmp))


if __name__ == "__main__":
    main()
