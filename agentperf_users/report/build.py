"""The capacity report: ``report.json``, ``steps.csv``, ``report.html`` and the merged records.

Everything here is recomputed after the run from the per-process record files, the source of truth
that survives a lost worker or a late final report, and checked against what the live search decided
on: each step says whether its recomputed verdict equals the live one. The report is built from the
run folder alone (``write_report``: the records, the search's state file, the run's context and power
readings), the same way after a live run and by ``agentperf report RUN_DIR`` for a run that was
killed before it wrote one, so the two are equal when nothing was lost. Writes go to a temporary name
first and are renamed into place (``files.atomic_write``), so an interrupted run never leaves a
half-written report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import pandas as pd

from agentperf_users import files
from agentperf_users.errors import AgentperfError
from agentperf_users.measure import server_metrics
from agentperf_users.measure.diagnose import LoadGenerator, diagnose_step, not_about_capacity
from agentperf_users.measure.power import (
    POWER_FILE,
    PowerSample,
    mean_watts,
    read_samples,
)
from agentperf_users.measure.records import RequestRecord, read_records
from agentperf_users.measure.slo import (
    SloSpec,
    evaluate_step,
    parse_slo,
    pass_fraction,
    quantile,
    records_in_window,
)
from agentperf_users.report import html as report_html
from agentperf_users.search.headline import MEGAWATT_W, headlines, prediction_line
from agentperf_users.search.policy import SearchStopped
from agentperf_users.search.spread import RESAMPLES, capacity_drift, capacity_spread
from agentperf_users.search.state import SearchState

TTFT_QUANTILES = (0.5, 0.9, 0.95, 0.99)
SPEED_QUANTILES = (0.05, 0.5, 0.95)


@dataclass(frozen=True)
class RunContext:
    """What the report says about the run besides its records."""

    target: dict  # {"host": ..., "model": ..., "simulator_profile": name or None}
    trajectories: str | None  # None: not known (a folder without run.json)
    accelerators: int | None
    power_watts: float | None  # given, or nameplate: per megawatt where nothing was measured
    power_source: str | None  # how power_watts was obtained ("--power-watts", "profile TDP", ...)
    interrupted: bool
    power_samples: tuple[PowerSample, ...] = ()  # measured during the run (``power``)
    power_measured_from: str | None = None  # the endpoint and metric they came from
    server_samples: tuple[server_metrics.ServerSample, ...] = ()  # the server's metrics (``server_metrics``)
    server_metrics_from: str | None = None  # the endpoint they were read from

    def to_dict(self) -> dict:
        """As ``run.json`` keeps it: the samples are in their own files."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.endswith("_samples")}


UNKNOWN_CONTEXT = RunContext(target={"host": None, "model": None, "simulator_profile": None}, trajectories=None,
                             accelerators=None, power_watts=None, power_source=None, interrupted=False)


@dataclass(frozen=True)
class RunFolder:
    """What a run folder holds, read back: everything a report is built from."""

    summary: SearchState  # the search's state file (the shape's ``summary()``)
    records: list[RequestRecord]
    spec: SloSpec
    context: RunContext
    ground_truth: dict | None


def write_context(folder: Path, context: RunContext, ground_truth: dict | None = None) -> None:
    """``run.json``: what the report says besides the records and the search's state (written when the
    run starts, so a run killed early can still be reported, and again with how it ended)."""
    files.atomic_write(folder / files.CONTEXT_FILE, json.dumps(
        {"context": context.to_dict(), "ground_truth": ground_truth}, indent=2, allow_nan=False, default=_finite))


def read_run(folder: Path, spec: SloSpec | None = None) -> RunFolder:
    """A run folder as written by ``agentperf capacity`` (or a Locust master run with ``--records-dir
    FOLDER/records --capacity-json FOLDER/search.json``). The search's state file is required unless
    ``spec`` is given (a live run whose search never began: nothing was judged); a torn or malformed
    one is one line."""
    if not folder.is_dir():
        raise AgentperfError(f"{folder}: not a run folder (expected a folder with {files.SEARCH_FILE} and "
                             f"{files.RECORDS_DIR}/)")
    state = SearchState.read(folder, missing_ok=spec is not None)
    if state is not None:
        spec = _spec_from(state, folder / files.SEARCH_FILE)
    summary = state or SearchState()
    saved = files.read_json_object(folder / files.CONTEXT_FILE, missing_ok=True)
    context, truth = UNKNOWN_CONTEXT, None
    if saved is not None:
        try:
            context = RunContext(**saved["context"])
            truth = saved["ground_truth"]
        except (KeyError, TypeError) as exc:
            raise AgentperfError(f"{folder / files.CONTEXT_FILE}: not a run context ({exc})") from None
    context = replace(context, power_samples=tuple(read_samples(folder / POWER_FILE)),
                      server_samples=tuple(server_metrics.read_samples(folder / server_metrics.SERVER_METRICS_FILE)))
    records_dir = folder / files.RECORDS_DIR
    records = read_records([records_dir]) if records_dir.is_dir() else []
    return RunFolder(summary, records, spec, context, truth)


def read_search_state(folder: Path, missing_ok: bool = False) -> SearchState:
    """The search's state file (an empty state where it is missing and that is ok: the search never began)."""
    return SearchState.read(folder, missing_ok) or SearchState()


def _spec_from(summary: SearchState, path: Path) -> SloSpec:
    """The tiers the search judged, as its state file names them (checked as an SLO file is)."""
    slo = summary.slo
    if not isinstance(slo, dict) or not isinstance(slo.get("tiers"), list):
        raise AgentperfError(f"{path}: slo: expected the search's tiers, got {slo!r}")
    tiers = [{key: value for key, value in tier.items() if key != "label"} if isinstance(tier, dict) else tier
             for tier in slo["tiers"]]
    return parse_slo({"tiers": tiers}, f"{path}: slo")


def write_report(folder: Path, spec: SloSpec | None = None) -> dict:
    """report.json, steps.csv, records.jsonl and report.html from the run folder alone (``read_run``):
    after a live run and by ``agentperf report``, the one way a report is made."""
    run = read_run(folder, spec)
    try:
        report = build_report(run.summary, run.records, run.spec, run.context, run.ground_truth)
    except (KeyError, TypeError, AttributeError, IndexError) as exc:  # the records and context are checked
        raise AgentperfError(f"{folder / files.SEARCH_FILE}: not a search's state "
                             f"({type(exc).__name__}: {exc})") from None
    write_run(folder, report, run.records)
    return report


def step_stats(records: Sequence[RequestRecord], window_s: float) -> dict:
    """The numbers a person reads for one step (nearest-rank quantiles, as the verdicts use)."""
    ok = [r for r in records if r.ok]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    speeds = [r.output_tps for r in ok if r.output_tps is not None]
    prompt = sum(r.prompt_tokens or 0 for r in ok)
    return {
        "requests": len(records),
        "errors": len(records) - len(ok),
        "ttft_s": {f"p{round(q * 100)}": quantile(ttfts, q) if ttfts else None for q in TTFT_QUANTILES},
        "output_tps": {f"p{round(q * 100)}": quantile(speeds, q) if speeds else None for q in SPEED_QUANTILES},
        "cached_token_ratio": sum(r.cached_tokens or 0 for r in ok) / prompt if prompt else None,
        "output_tokens_per_s": sum(r.output_tokens for r in ok) / window_s if window_s > 0 else None,
    }


def build_report(summary: SearchState, records: Sequence[RequestRecord], spec: SloSpec, context: RunContext,
                 ground_truth: dict | None = None) -> dict:
    """report.json's content from the search summary (the shape's) and the records from the files."""
    steps = []
    verdicts = []  # the steps the search took as verdicts: not one whose failure was not about capacity
    same_steps = (ground_truth or {}).get("same_steps") or []
    for index, live in enumerate(summary.steps):
        start, end = live["window_start_epoch_s"], live["window_end_epoch_s"]
        judged = records_in_window(records, start, end)
        verdict = evaluate_step(judged, spec)
        server = (server_metrics.window_summary(context.server_samples, start, end) if context.server_samples
                  else server_metrics.NOT_AVAILABLE)
        loadgen = LoadGenerator.from_dict(live.get("load_generator"))  # measured live only: the workers' CPU
        passed = {v.tier.name: v.passed for v in verdict.tiers}
        shares = {tier.name: pass_fraction(judged, tier, RESAMPLES, seed=live["index"] * len(spec.tiers) + position)
                  for position, tier in enumerate(spec.tiers)}
        live_passed = {v["tier"]: v["passed"] for v in live["verdict"]["tiers"]}
        diagnoses = diagnose_step(verdict, judged, server, loadgen)
        steps.append({
            "index": live["index"], "agents": live["agents"], "phase": live["phase"],
            "window_start_epoch_s": start, "window_end_epoch_s": end, "early_stop": live["early_stop"],
            **step_stats(judged, end - start),
            "power_watts": mean_watts(context.power_samples, start, end),
            "passed": passed,
            "pass_share": shares,  # of the resamples of the step's agents (search/spread.py)
            "margin": {v.tier.name: v.to_dict()["margin"] for v in verdict.tiers},  # the verdict's (slo), as written
            "judged": {v.tier.name: {key: value for key, value in v.to_dict().items()
                                     if key in ("ttft_quantile_s", "output_tps_quantile")} for v in verdict.tiers},
            "live_verdict_matches_records": passed == live_passed and verdict.to_dict() == live["verdict"],
            "server": server.to_dict(),
            "load_generator": loadgen and loadgen.to_dict(),
            "diagnoses": [found.to_dict() for found in diagnoses],
        })
        if not_about_capacity(diagnoses) is None:
            verdicts.append(steps[-1])
        if index < len(same_steps) and same_steps[index]["agents"] == live["agents"]:
            steps[-1]["ground_truth"] = {key: value for key, value in same_steps[index].items() if key != "agents"}
    capacity = {}
    for name, cap in (summary.capacity or {}).items():
        agents = cap["agents"]
        per_accelerator = agents / context.accelerators if agents and context.accelerators else None
        watts, basis = _power_at(steps, agents), "measured"
        if watts is None:
            watts, basis = context.power_watts, context.power_source
        per_mw = agents / (watts / MEGAWATT_W) if agents and watts else None
        spread = capacity_spread(((step["agents"], step["pass_share"][name], step["margin"][name])
                                  for step in verdicts), cap)
        drift = capacity_drift((step["index"], step["agents"], step["phase"], step["margin"][name]) for step in verdicts)
        capacity[name] = {**cap, "label": spec.tier(name).label, "spread": spread and spread.to_dict(),
                          "drift": [found.to_dict() for found in drift],
                          "agents_per_accelerator": per_accelerator,
                          "agents_per_megawatt": per_mw, "power_watts": watts if per_mw else None,
                          "power_basis": basis if per_mw else None}
    report = {
        "run_id": summary.run_id or None,
        "capacity": capacity,
        "steps": steps,
        "slo": summary.slo,
        "search": summary.parameters,
        "search_complete": summary.complete,
        "target": context.target,
        "trajectories": context.trajectories,
        "accelerators": context.accelerators,
        "power_watts": context.power_watts,
        "power_source": context.power_source,
        "power_measured": {"source": context.power_measured_from, "samples": len(context.power_samples)}
        if context.power_measured_from else None,
        "interrupted": bool(context.interrupted or summary.ended_unfinished),
        "lost_workers": list(summary.lost_workers),
        "stopped": summary.stopped,
        "server_metrics": {"source": context.server_metrics_from, "samples": len(context.server_samples)}
        if context.server_metrics_from else None,
        "records": len(records),
    }
    if summary.prediction is not None:
        report["prediction"] = prediction_against_measured(summary.prediction, capacity, steps)
    if ground_truth is not None:  # its same_steps went into the steps above
        report["ground_truth"] = {key: value for key, value in ground_truth.items() if key != "same_steps"}
    return report


def prediction_against_measured(prediction: dict, capacity: dict, steps: list[dict]) -> dict:
    """The twin's prediction the search started from (``--predict``) beside what it measured, per tier:
    each answer (status, agents, first failing count) and measured over predicted agents, where both
    located one; with the first step's count, which the prediction chose."""
    tiers = {}
    for name, cap in capacity.items():
        predicted = (prediction.get("capacity") or {}).get(name)
        if predicted is None:
            continue
        keys = ("status", "agents", "first_failing_agents")
        ratio = cap["agents"] / predicted["agents"] if cap.get("agents") and predicted.get("agents") else None
        tiers[name] = {"label": cap["label"],
                       "predicted": {key: predicted.get(key) for key in (*keys, "range", "range_slower")
                                     if key in predicted},
                       "measured": {key: cap.get(key) for key in keys}, "measured_over_predicted": ratio}
    return {**{key: value for key, value in prediction.items() if key != "capacity"}, "tiers": tiers,
            "first_step_agents": steps[0]["agents"] if steps else None, "steps": len(steps)}


def _power_at(steps: list[dict], agents: int | None) -> float | None:
    """The power measured at a capacity: at the step with that many agents (the mean, in the rare
    search that measured a count twice)."""
    watts = [s["power_watts"] for s in steps if s["agents"] == agents and s["power_watts"] is not None]
    return sum(watts) / len(watts) if watts else None


def capacity_lines(report: dict) -> list[str]:
    """The headline, per tier (``headline.TierHeadline.lines``): ``capacity @ 20 tok/s, TTFT ≤ 10 s: 37
    agents (fails at 38; ground truth 38 agents)``, then agents per accelerator and per megawatt and the
    binding cause at the first failing count; after why the search stopped, if it did, and the twin's
    prediction against the measured answer, if the search started from one."""
    stopped = report.get("stopped")
    lines = [stopped_line(stopped)] if stopped else []
    tiers = (report.get("prediction") or {}).get("tiers", {})
    lines += [prediction_line(tier) for tier in tiers.values()]
    return lines + [line for tier in headlines(report) for line in tier.lines()]


def stopped_line(stopped: dict) -> str:
    """Why the search ended before locating its tiers (``shape.SearchStopped``), in its words."""
    return SearchStopped(**stopped).line()


def lost_worker_lines(report: dict) -> list[str]:
    """One line per worker lost during a step (``shape.LostWorker``), in UTC."""
    return [f"Lost worker {lost['worker']} during step {lost['step']} ({lost['agents']} agents) at "
            f"{datetime.fromtimestamp(lost['epoch_s'], timezone.utc):%Y-%m-%d %H:%M:%S} UTC: the step was measured "
            "again on the workers left" for lost in report.get("lost_workers", [])]


def write_run(directory: Path, report: dict, records: Sequence[RequestRecord]) -> None:
    """report.json, steps.csv, records.jsonl and report.html, each written atomically."""
    files.atomic_write(directory / "report.json", json.dumps(report, indent=2, allow_nan=False, default=_finite))
    files.atomic_write(directory / "steps.csv", steps_frame(report).to_csv(index=False))
    files.atomic_write(directory / "records.jsonl", "".join(r.to_json() + "\n" for r in records))
    files.atomic_write(directory / "report.html", render_html(report))


def _finite(value):
    raise TypeError(f"not JSON serialisable: {value!r}")


def steps_frame(report: dict) -> pd.DataFrame:
    """One row per step, nested numbers flattened (``ttft_s.p95``, ``passed.<tier>``)."""
    rows = [pd.json_normalize(step, sep=".").iloc[0].to_dict() for step in report["steps"]]
    return pd.DataFrame(rows)


def render_html(report: dict) -> str:
    """report.html (``report_html``), with the lines a person must not miss under its title."""
    stopped = report.get("stopped")
    return report_html.render_html(report, ([stopped_line(stopped)] if stopped else []) + lost_worker_lines(report))


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "report", help="rebuild a run folder's report from its records and the search's state",
        description="Rebuild report.json, steps.csv and report.html of a run folder (agentperf capacity's) from "
        "its request records, the search's state file (search.json) and the run's context (run.json): for a run "
        "killed before it wrote its report, or to recompute one.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run folder")
    parser.set_defaults(func=report_command)


def report_command(args) -> int:
    folder = Path(args.run_dir)
    report = write_report(folder)
    if report["interrupted"]:
        print(f"agentperf: the run was interrupted after {len(report['steps'])} judged step(s)")
    print(f"agentperf: report {folder / 'report.html'}")
    for line in lost_worker_lines(report) + capacity_lines(report):  # the headline: the last lines
        print(line)
    return 0
