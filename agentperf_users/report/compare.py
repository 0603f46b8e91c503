"""``agentperf compare RUN_DIR RUN_DIR [...]``: systems side by side, the question a planner asks.

Per SLO tier: each run's capacity, agents per accelerator and agents per megawatt, and each one's ratio
to the first run's (the baseline: ``2.10×`` means twice as many agents and a bit more), in the terminal
and, with ``--out FILE``, as one self-contained HTML page with every run's curves overlaid. Runs are
compared only when the comparison means something: the same SLO tiers (a 20 tok/s capacity is not a
60 tok/s one) and the same trajectory set (short contexts hold more agents); otherwise one line and
exit 2, unless ``--force``.

Each run's report is read from its ``report.json``, or built in memory from the folder alone where a
run was killed before writing one (``report.read_run``); compare never writes into a run folder.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path

from agentperf_users import files
from agentperf_users.errors import AgentperfError
from agentperf_users.report.build import build_report, read_run
from agentperf_users.report.html import PAGE_CSS, target_words
from agentperf_users.report.svg import PALETTE, Chart, Point, Rule, Series, render
from agentperf_users.search.headline import (
    TierHeadline,
    headlines,
    number_words,
    power_basis_words,
    watts_words,
)
from agentperf_users.search.policy import CapacityStatus

RATIO_COLUMNS = (("agents", "agents"), ("per accelerator", "per_accelerator"), ("agents/MW", "per_megawatt"))


@dataclass(frozen=True)
class ComparedRun:
    name: str  # the folder's name
    folder: Path
    report: dict

    @property
    def tiers(self) -> dict[str, TierHeadline]:
        return {tier.tier: tier for tier in headlines(self.report)}


def load_run(folder: Path) -> ComparedRun:
    """A run's report: its report.json, or, where there is none, one built in memory from the folder."""
    path = folder / "report.json"
    if path.is_file():
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise AgentperfError(f"{path}: not a readable report ({exc})") from None
        if not isinstance(report, dict) or not isinstance(report.get("capacity"), dict):
            raise AgentperfError(f"{path}: expected agentperf's report.json (an object with capacity per tier)")
    else:
        run = read_run(folder)
        report = build_report(run.summary, run.records, run.spec, run.context, run.ground_truth)
    return ComparedRun(folder.resolve().name, folder, report)


def check_comparable(runs: list[ComparedRun]) -> None:
    """The runs judged the same tiers on the same trajectories, or one line naming the first difference."""
    first = runs[0]
    for run in runs[1:]:
        for what, value in (("SLO tiers", _tiers), ("trajectory set", lambda r: r.report.get("trajectories"))):
            if value(run) != value(first):
                raise AgentperfError(
                    f"{run.folder}: its {what} ({_words(value(run))}) differ from {first.folder}'s "
                    f"({_words(value(first))}); capacities are comparable only under the same ones "
                    "(--force compares them anyway)")


NOTED_SETTINGS = (("warmup_s", "warm-up", "s"), ("window_s", "window", "s"), ("resolution_agents", "resolution", "agents"))


def setting_notes(runs: list[ComparedRun]) -> list[str]:
    """Search settings that differ between the runs: allowed, but a shorter window judges fewer requests,
    so a reader should know (``note: window differs: A 20 s, B 15 s``)."""
    notes = []
    for key, words, unit in NOTED_SETTINGS:
        values = [(run.report.get("search") or {}).get(key) for run in runs]
        if len(set(values)) > 1:
            notes.append(f"note: {words} differs: " + ", ".join(
                f"{letter(i)} {'?' if v is None else f'{v:g}'} {unit}" for i, v in enumerate(values)))
    return notes


def _tiers(run: ComparedRun) -> list[dict]:
    """The tiers as judged (every threshold, not the name a file gave them)."""
    tiers = (run.report.get("slo") or {}).get("tiers") or []
    return [{key: value for key, value in tier.items() if key not in ("name", "label")} for tier in tiers]


def _words(value) -> str:
    if isinstance(value, list):
        return "; ".join(f"{t.get('output_tps_min'):g} tok/s at TTFT ≤ {t.get('ttft_max_s'):g} s, "
                         f"p{100 * t.get('quantile', 0):g} per {t.get('scope')}" for t in value) or "none"
    return str(value)


def ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def _value(tier: TierHeadline | None, key: str) -> float | None:
    if tier is None or tier.capacity["status"] not in (CapacityStatus.FOUND, CapacityStatus.NEVER_FAILED):
        return None
    return tier.capacity.get("agents") if key == "agents" else getattr(tier, key)


def terminal_lines(runs: list[ComparedRun]) -> list[str]:
    """Per tier a small table: each run's numbers and its ratio to the first run's."""
    lines = [f"{letter(i)} = {run.name}: {target_words(run.report)}" for i, run in enumerate(runs)]
    lines += setting_notes(runs)
    for name in tier_names(runs):
        tiers = [run.tiers.get(name) for run in runs]
        lines += ["", f"capacity @ {_label(tiers)}"]
        rows = [["run", *[words for title, _ in RATIO_COLUMNS for words in (title, f"×{letter(0)}")], "power"]]
        rows += [_row(i, run, tier, tiers[0], " ") for i, (run, tier) in enumerate(zip(runs, tiers))]
        lines += _aligned(rows)
    return lines


def tier_names(runs: list[ComparedRun]) -> list[str]:
    """Every tier any run judged, the first run's first: under ``--force`` the runs' tiers may differ, and
    a tier only a later run judged is shown too (against a first run without it, its ratios are n/a)."""
    return list(dict.fromkeys(tier.tier for run in runs for tier in headlines(run.report)))


def _label(tiers: list[TierHeadline | None]) -> str:
    return next(tier.label for tier in tiers if tier is not None)


def _row(index: int, run: ComparedRun, tier: TierHeadline | None, base: TierHeadline | None, sep: str) -> list[str]:
    """One run's cells under a tier: its name, each number and its ratio to the baseline's, its power."""
    cells = [f"{letter(index)} {run.name}"]
    for _, key in RATIO_COLUMNS:
        value = _value(tier, key)
        shown = tier.answer if key == "agents" and tier is not None else number_words(value)
        cells += [shown, _ratio_words(ratio(value, _value(base, key)))]
    power = (f"{watts_words(tier.power_watts)}{sep}{power_basis_words(tier.power_basis)}"
             if tier is not None and tier.power_watts else "–")
    return cells + [power]


def letter(index: int) -> str:
    return chr(ord("A") + index) if index < 26 else f"#{index + 1}"


def _ratio_words(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}×"


def _aligned(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[col]) for row in rows) for col in range(len(rows[0]))]
    return ["  " + "   ".join(cell.ljust(width) if col in (0, len(row) - 1) else cell.rjust(width)
                              for col, (cell, width) in enumerate(zip(row, widths))).rstrip() for row in rows]


def render_page(runs: list[ComparedRun]) -> str:
    """One self-contained page: the side-by-side table per tier, then each tier's overlaid curves."""
    title = "agentperf compare: " + " vs ".join(run.name for run in runs)
    body = [f"<h1>{html.escape(title)}</h1><p class=sub>Ratios against {letter(0)} ({html.escape(runs[0].name)})."
            "</p><dl>" + "".join(f"<dt>{letter(i)} {html.escape(run.name)}</dt><dd>"
                                 f"{html.escape(target_words(run.report))}; trajectories "
                                 f"{html.escape(str(run.report.get('trajectories')))}; accelerators "
                                 f"{html.escape(str(run.report.get('accelerators') or 'not given'))}</dd>"
                                 for i, run in enumerate(runs)) + "</dl>"]
    body += [f"<p class=warn>{html.escape(note)}</p>" for note in setting_notes(runs)]
    for name in tier_names(runs):
        tiers = [run.tiers.get(name) for run in runs]
        body.append(f"<h2>{html.escape(_label(tiers))}</h2>" + _tier_table(runs, tiers))
        body.append("<div class=charts>" + "".join(render(chart) for chart in overlaid_charts(runs, name)) + "</div>")
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<style>{PAGE_CSS}</style></head><body><main>{"".join(body)}</main></body></html>')


def _tier_table(runs: list[ComparedRun], tiers: list[TierHeadline | None]) -> str:
    head = "<tr><th class=l>run</th>" + "".join(f"<th>{html.escape(title)}</th><th>×{letter(0)}</th>"
                                                for title, _ in RATIO_COLUMNS) + "<th class=l>power</th></tr>"
    rows = []
    for i, (run, tier) in enumerate(zip(runs, tiers)):
        cells = _row(i, run, tier, tiers[0], ", ")
        shown = [f"<td class=l>{html.escape(cells[0])}</td>"]
        shown += [f"<td>{'<b>' if col % 2 else ''}{html.escape(cell)}{'</b>' if col % 2 else ''}</td>"
                  for col, cell in enumerate(cells[1:-1], 1)]
        rows.append("<tr>" + "".join(shown) + f"<td class=l>{html.escape(cells[-1])}</td></tr>")
    return f"<div class=scroll><table>{head}{''.join(rows)}</table></div>"


def overlaid_charts(runs: list[ComparedRun], tier_name: str) -> list[Chart]:
    """The tier's TTFT and speed curves of every run on one pair of charts, the tier's limits drawn."""
    tier = next(t for run in runs for t in run.report["slo"]["tiers"] if t["name"] == tier_name)
    charts = []
    for key, limit, words, unit, log_y in (
            ("ttft_quantile_s", tier["ttft_max_s"], f"TTFT p{100 * tier['quantile']:g}", "s", True),
            ("output_tps_quantile", tier["output_tps_min"], f"output speed p{100 * (1 - tier['quantile']):g}",
             "tok/s", False)):
        series = []
        for i, run in enumerate(runs):
            steps = sorted(run.report["steps"], key=lambda s: s["agents"])
            points = tuple(Point(s["agents"], _number(s.get("judged", {}).get(tier_name, {}).get(key)),
                                 s["passed"].get(tier_name), f"{letter(i)} at {s['agents']} agents: "
                                 f"{number_words(_number(s.get('judged', {}).get(tier_name, {}).get(key)))} {unit}")
                           for s in steps)
            series.append(Series(f"{letter(i)} {run.name}", points, PALETTE[i % len(PALETTE)], dashed=i > 0))
        charts.append(Chart(f"{tier['label']}: {words}", "concurrent agents", f"{words} ({unit})", tuple(series),
                            (Rule("y", limit, f"{'limit ≤' if log_y else 'floor ≥'} {limit:g} {unit}"),), log_y))
    return charts


def _number(value) -> float | None:
    return None if value is None else float(value)


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare", help="set capacity runs side by side: per tier, per accelerator, per megawatt, ratios",
        description="Compare run folders (agentperf capacity's): each SLO tier's capacity, agents per accelerator "
        "and per megawatt, with ratios against the first run; overlaid curves with --out.")
    parser.add_argument("run_dirs", metavar="RUN_DIR", nargs="+", help="run folders; the first is the baseline")
    parser.add_argument("--out", default="", help="also write the comparison as one self-contained HTML file here")
    parser.add_argument("--force", action="store_true",
                        help="compare runs whose SLO tiers or trajectory sets differ")
    parser.set_defaults(func=compare_command)


def compare_command(args) -> int:
    if len(args.run_dirs) < 2:
        raise AgentperfError(f"expected at least two run folders to compare, got {len(args.run_dirs)}")
    runs = [load_run(Path(folder)) for folder in args.run_dirs]
    if not args.force:
        check_comparable(runs)
    if args.out:
        files.atomic_write(Path(args.out), render_page(runs))
        print(f"agentperf: comparison {args.out}")
    for line in terminal_lines(runs):
        print(line)
    return 0
