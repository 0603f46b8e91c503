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

import base64
import html
import io
import json
from dataclasses import dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import pandas as pd

from agentperf_users import files
from agentperf_users.errors import AgentperfError
from agentperf_users.measure import server_metrics
from agentperf_users.measure.diagnose import LoadGenerator, diagnose_step
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
    quantile,
    records_in_window,
)
from agentperf_users.search.policy import SearchStopped

MEGAWATT_W = 1_000_000.0
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

    summary: dict  # the search's state file (the shape's ``summary()``)
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
    summary = read_search_state(folder, missing_ok=spec is not None)
    if summary:
        spec = _spec_from(summary, folder / files.SEARCH_FILE)
    saved = _read_json(folder / files.CONTEXT_FILE, missing_ok=True)
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


def read_search_state(folder: Path, missing_ok: bool = False) -> dict:
    """The search's state file (``{}`` where it is missing and that is ok: the search never began)."""
    return _read_json(folder / files.SEARCH_FILE, missing_ok) or {}


def _read_json(path: Path, missing_ok: bool) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if missing_ok:
            return None
        raise AgentperfError(f"{path}: missing (the search's state; was the search started?)") from None
    except OSError as exc:
        raise AgentperfError(f"{path}: cannot read: {exc.strerror}") from None
    except ValueError as exc:
        raise AgentperfError(f"{path}: not valid JSON ({exc}); the file is torn or not a run's") from None
    if not isinstance(data, dict):
        raise AgentperfError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _spec_from(summary: dict, path: Path) -> SloSpec:
    """The tiers the search judged, as its state file names them (checked as an SLO file is)."""
    slo = summary.get("slo")
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


def build_report(summary: dict, records: Sequence[RequestRecord], spec: SloSpec, context: RunContext,
                 ground_truth: dict | None = None) -> dict:
    """report.json's content from the search summary (the shape's) and the records from the files."""
    steps = []
    same_steps = (ground_truth or {}).get("same_steps") or []
    for index, live in enumerate(summary.get("steps", [])):
        start, end = live["window_start_epoch_s"], live["window_end_epoch_s"]
        judged = records_in_window(records, start, end)
        verdict = evaluate_step(judged, spec)
        server = (server_metrics.window_summary(context.server_samples, start, end) if context.server_samples
                  else server_metrics.NOT_AVAILABLE)
        loadgen = LoadGenerator.from_dict(live.get("load_generator"))  # measured live only: the workers' CPU
        passed = {v.tier.name: v.passed for v in verdict.tiers}
        live_passed = {v["tier"]: v["passed"] for v in live["verdict"]["tiers"]}
        steps.append({
            "index": live["index"], "agents": live["agents"], "phase": live["phase"],
            "window_start_epoch_s": start, "window_end_epoch_s": end, "early_stop": live["early_stop"],
            **step_stats(judged, end - start),
            "power_watts": mean_watts(context.power_samples, start, end),
            "passed": passed,
            "live_verdict_matches_records": passed == live_passed and verdict.to_dict() == live["verdict"],
            "server": server.to_dict(),
            "load_generator": loadgen and loadgen.to_dict(),
            "diagnoses": [found.to_dict() for found in diagnose_step(verdict, judged, server, loadgen)],
        })
        if index < len(same_steps) and same_steps[index]["agents"] == live["agents"]:
            steps[-1]["ground_truth"] = {key: value for key, value in same_steps[index].items() if key != "agents"}
    capacity = {}
    for name, cap in summary.get("capacity", {}).items():
        agents = cap["agents"]
        per_accelerator = agents / context.accelerators if agents and context.accelerators else None
        watts, basis = _power_at(steps, agents), "measured"
        if watts is None:
            watts, basis = context.power_watts, context.power_source
        per_mw = agents / (watts / MEGAWATT_W) if agents and watts else None
        capacity[name] = {**cap, "label": spec.tier(name).label, "agents_per_accelerator": per_accelerator,
                          "agents_per_megawatt": per_mw, "power_watts": watts if per_mw else None,
                          "power_basis": basis if per_mw else None}
    report = {
        "run_id": summary.get("run_id"),
        "capacity": capacity,
        "steps": steps,
        "slo": summary.get("slo"),
        "search": summary.get("parameters"),
        "search_complete": summary.get("complete", False),
        "target": context.target,
        "trajectories": context.trajectories,
        "accelerators": context.accelerators,
        "power_watts": context.power_watts,
        "power_source": context.power_source,
        "power_measured": {"source": context.power_measured_from, "samples": len(context.power_samples)}
        if context.power_measured_from else None,
        "interrupted": bool(context.interrupted or summary.get("interrupted")),
        "lost_workers": summary.get("lost_workers", []),
        "stopped": summary.get("stopped"),
        "server_metrics": {"source": context.server_metrics_from, "samples": len(context.server_samples)}
        if context.server_metrics_from else None,
        "records": len(records),
    }
    if ground_truth is not None:  # its same_steps went into the steps above
        report["ground_truth"] = {key: value for key, value in ground_truth.items() if key != "same_steps"}
    return report


def _power_at(steps: list[dict], agents: int | None) -> float | None:
    """The power measured at a capacity: at the step with that many agents (the mean, in the rare
    search that measured a count twice)."""
    watts = [s["power_watts"] for s in steps if s["agents"] == agents and s["power_watts"] is not None]
    return sum(watts) / len(watts) if watts else None


def capacity_lines(report: dict) -> list[str]:
    """One line per tier: ``capacity @ 20 tok/s, TTFT ≤ 10 s: 37 agents (ground truth 38)``."""
    stopped = report.get("stopped")
    lines = [stopped_line(stopped)] if stopped else []
    truth = (report.get("ground_truth") or {}).get("capacity", {})
    bands = (report.get("ground_truth") or {}).get("bands", {})
    for name, cap in report["capacity"].items():
        answer = {
            "found": f"{cap['agents']} agents",
            "none_passed": f"none (fails already at {cap['first_failing_agents']} agents)",
            "never_failed": f"at least {cap['agents']} agents (never failed up to the maximum)",
        }.get(cap["status"]) or _incomplete_words(cap)
        if name in truth:
            band = bands.get(name)
            flips = (f"; true verdicts flip between {band['passes_up_to'] + 1} and {band['fails_above']} agents"
                     if band and band["fails_above"] > band["passes_up_to"] else "")
            answer += f" (ground truth {_truth_words(truth[name])}{flips})"
        lines.append(f"capacity @ {cap['label']}: {answer}")
    return lines


def stopped_line(stopped: dict) -> str:
    """Why the search ended before locating its tiers (``shape.SearchStopped``), in its words."""
    return SearchStopped(**stopped).line()


def lost_worker_lines(report: dict) -> list[str]:
    """One line per worker lost during a step (``shape.LostWorker``), in UTC."""
    return [f"Lost worker {lost['worker']} during step {lost['step']} ({lost['agents']} agents) at "
            f"{datetime.fromtimestamp(lost['epoch_s'], timezone.utc):%Y-%m-%d %H:%M:%S} UTC: the step was measured "
            "again on the workers left" for lost in report.get("lost_workers", [])]


def _incomplete_words(cap: dict) -> str:
    """A tier the search did not decide (interrupted, or out of counts): what it had measured."""
    known = [f"{word} at {cap[key]} agents" for word, key in (("passed", "agents"), ("failed", "first_failing_agents"))
             if cap.get(key) is not None]
    return f"incomplete ({', '.join(known) or 'no step judged'})"


def _truth_words(cap: dict) -> str:
    if cap["status"] == "found":
        return str(cap["agents"])
    if cap["status"] == "never_failed":
        return f">= {cap['agents']}"
    return "none" if cap["status"] == "none_passed" else "incomplete"


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
    """A self-contained page: capacity per tier up top, then charts and the step table."""
    title = f"agentperf capacity report {html.escape(str(report.get('run_id') or ''))}"
    lines = "".join(f"<li>{html.escape(line)}</li>" for line in capacity_lines(report))
    note = "<p class=warn>The run was interrupted: steps not measured are missing.</p>" if report["interrupted"] else ""
    note += "".join(f"<p class=warn>{html.escape(line)}</p>" for line in lost_worker_lines(report))
    target = html.escape(json.dumps(report["target"]))
    table = steps_frame(report).to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="", border=0) \
        if report["steps"] else "<p>No step was measured.</p>"
    charts = "".join(f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{png}">' for alt, png in _charts(report))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}} li{{font-size:1.2em;margin:.3em 0}}
.warn{{color:#a00}} img{{max-width:49%}} table{{border-collapse:collapse;font-size:.8em}}
td,th{{padding:2px 6px;border-bottom:1px solid #ddd;text-align:right}}</style></head><body>
<h1>{title}</h1>{note}<h2>Capacity</h2><ul>{lines}</ul>
<p>Target: <code>{target}</code>; trajectories: <code>{html.escape(str(report['trajectories']))}</code>;
accelerators: {report['accelerators']}; power: {_power_words(report)}.</p>
<h2>Steps</h2>{charts}{table}</body></html>"""


def _power_words(report: dict) -> str:
    measured = report.get("power_measured")
    if measured:
        return html.escape(f"measured at every step ({measured['samples']} readings of {measured['source']})")
    return html.escape(f"{report['power_watts']} W ({report['power_source']})")


def _charts(report: dict) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    steps = sorted(report["steps"], key=lambda s: s["agents"])
    if not steps:
        return []
    agents = [s["agents"] for s in steps]
    tiers = (report.get("slo") or {}).get("tiers", [])
    panels = (  # (y label, the number of a step, the tier limits drawn)
        ("TTFT p95 (s)", lambda s: s["ttft_s"]["p95"], [(t["label"], t["ttft_max_s"]) for t in tiers]),
        ("output speed p5 (tok/s per request)", lambda s: s["output_tps"]["p5"],
         [(t["label"], t["output_tps_min"]) for t in tiers]),
        ("output throughput (tok/s)", lambda s: s["output_tokens_per_s"], []),
        ("prefix-cache hit ratio", lambda s: s["cached_token_ratio"], []),
    )
    if any(s["power_watts"] is not None for s in steps):  # (the truth has no power: number() gives None)
        panels += (("power, measured (W)", lambda s: s.get("power_watts"), []),)
    truth_steps = [s for s in steps if "ground_truth" in s]
    charts = []
    for ylabel, number, limits in panels:
        figure, axes = plt.subplots(figsize=(5.2, 3.4), dpi=100)
        axes.plot(agents, [_nan_if_none(number(s)) for s in steps], marker="o", label="measured")
        if truth_steps and any(number(s["ground_truth"]) is not None for s in truth_steps):
            axes.plot([s["agents"] for s in truth_steps], [_nan_if_none(number(s["ground_truth"])) for s in truth_steps],
                      marker="x", linestyle=":", color="black", label="ground truth, same steps")
            axes.legend(fontsize=7)
        for label, limit in limits:
            axes.axhline(limit, linestyle="--", linewidth=1, color="grey")
            axes.annotate(label, (agents[0], limit), fontsize=7, va="bottom")
        axes.set_xlabel("concurrent agents")
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        plt.close(figure)
        charts.append((f"{ylabel} against agents", base64.b64encode(buffer.getvalue()).decode("ascii")))
    return charts


def _nan_if_none(value: float | None) -> float:
    return float("nan") if value is None else value


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
    for line in capacity_lines(report) + lost_worker_lines(report):
        print(line)
    if report["interrupted"]:
        print(f"agentperf: the run was interrupted after {len(report['steps'])} judged step(s)")
    print(f"agentperf: report {folder / 'report.html'}")
    return 0
