"""report.html: the page a planner opens instead of report.json.

Top to bottom, in the order a reader asks: the answer per tier (``headline``), why the run may be
incomplete, each tier's capacity curve (the numbers it was judged on against agents, its limit drawn,
every step marked pass or fail), the run's settings and target in words, one row per step with each
tier's verdict, and the server-side curves. One self-contained file: inline CSS and SVG (``svg``), no
script, nothing fetched, so it opens offline and from an archive. Every number is rounded for reading;
report.json keeps them exact.
"""

from __future__ import annotations

import html
from datetime import datetime, timezone

from agentperf_users.report.svg import (
    CHART_CSS,
    PALETTE,
    Chart,
    Point,
    Rule,
    Series,
    render,
)
from agentperf_users.search.headline import (
    TierHeadline,
    capacity_words,
    headlines,
    number_words,
    power_basis_words,
    predicted_words,
    watts_words,
)

PAGE_CSS = """body{font:15px/1.45 system-ui,sans-serif;color:#24292f;margin:0;background:#f6f8fa}
main{max-width:1180px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #d0d7de}
.sub{color:#57606a;margin:0 0 16px} .warn{color:#9a6700;background:#fff8c5;padding:6px 10px;border-radius:6px}
.tiers{display:flex;flex-wrap:wrap;gap:12px}
.tier{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:12px 16px;flex:1 1 300px}
.tier h3{margin:0;font-size:14px;color:#57606a;font-weight:600} .big{font-size:30px;font-weight:700;margin:2px 0}
.tier .n{margin:2px 0} .tier .why{color:#57606a;font-size:13px;margin-top:6px}
dl{display:grid;grid-template-columns:max-content 1fr;gap:4px 16px;background:#fff;border:1px solid #d0d7de;
border-radius:8px;padding:12px 16px} dt{color:#57606a} dd{margin:0}
table{border-collapse:collapse;background:#fff;font-size:13px;width:100%}
th,td{padding:4px 6px;border-bottom:1px solid #eaeef2;text-align:right;white-space:nowrap}
th{background:#f6f8fa;position:sticky;top:0;white-space:normal;vertical-align:bottom} td.l,th.l{text-align:left}
th.v,td.v{white-space:normal;text-align:left;min-width:7em} td.v small{font-weight:400}
.pass{color:#1a7f37;font-weight:600} .fail{color:#cf222e;font-weight:600} .muted{color:#57606a}
.scroll{overflow-x:auto;border:1px solid #d0d7de;border-radius:8px} .charts{display:flex;flex-wrap:wrap}
""" + CHART_CSS


def render_html(report: dict, lines_before: list[str] = ()) -> str:
    """The whole page; ``lines_before``: warnings to show under the title (lost workers, a stopped search)."""
    target = target_words(report)
    started = _clock(min((s["window_start_epoch_s"] for s in report["steps"]), default=None), date=True)
    title = f"Capacity of {target}"
    warnings = list(lines_before)
    if report.get("interrupted"):
        warnings.insert(0, "The run was interrupted: steps not measured are missing, and a tier may be incomplete.")
    body = [f"<h1>{_esc(title)}</h1><p class=sub>agentperf run {_esc(str(report.get('run_id') or ''))}"
            f"{', first step judged ' + started if started else ''}</p>",
            "".join(f"<p class=warn>{_esc(line)}</p>" for line in warnings),
            "<section class=tiers>" + "".join(_tier_card(tier) for tier in headlines(report)) + "</section>",
            "<h2>Capacity curve per tier</h2><p class=muted>Each step's numbers the tier was judged on, against "
            "agents: green passed, red failed (on either number, or on errors, so a red point may sit inside one "
            "chart's limit); dashed lines are the tier's limits, dotted the capacity found. Hover a point for its "
            "numbers.</p>",
            "<div class=charts>" + "".join(render(chart) for chart in tier_charts(report)) + "</div>",
            prediction_table(report),
            "<h2>Run settings</h2>" + settings_list(report),
            "<h2>Steps</h2>" + steps_table(report),
            "<h2>Server and power</h2><div class=charts>"
            + "".join(render(chart) for chart in server_charts(report)) + "</div>",
            "<p class=muted>Exact numbers: report.json and steps.csv beside this page; every request: records.jsonl."
            "</p>"]
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{PAGE_CSS}</style></head>'
            f'<body><main>{"".join(body)}</main></body></html>')


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def _clock(epoch_s: float | None, date: bool = False) -> str:
    if epoch_s is None:
        return ""
    return datetime.fromtimestamp(epoch_s, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC" if date else "%H:%M:%S")


def target_words(report: dict) -> str:
    """``the embedded simulator (l4-llama3.2-3b), model meta-llama/...``, or the host and model."""
    target = report.get("target") or {}
    profile = target.get("simulator_profile")
    where = f"the embedded simulator ({profile})" if profile else str(target.get("host") or "an unknown target")
    return where + (f", model {target['model']}" if target.get("model") else "")


def _tier_card(tier: TierHeadline) -> str:
    lines = [f"<h3>{_esc(tier.label)}</h3><div class=big>{_esc(tier.answer)}</div>",
             f"<div class=n>{_esc(tier.bracket)}</div>"]
    if tier.spread:
        lines.append(f"<div class=n title='each judged step&#39;s verdict resampled over its agents'>"
                     f"{_esc(tier.spread[0].upper() + tier.spread[1:])}</div>")
    if tier.per_accelerator is not None:
        lines.append(f"<div class=n><b>{_esc(number_words(tier.per_accelerator))}</b> agents per accelerator</div>")
    if tier.per_megawatt is not None:
        lines.append(f"<div class=n><b>{_esc(number_words(tier.per_megawatt))}</b> agents per megawatt "
                     f"<span class=muted>({_esc(watts_words(tier.power_watts))}, "
                     f"{_esc(power_basis_words(tier.power_basis))})</span></div>")
    if tier.binding_words():
        lines.append(f"<div class=why>Binding {_esc(tier.binding_words())}</div>")
    if tier.truth:
        lines.append(f"<div class=why>Ground truth (the simulator's own engine): {_esc(tier.truth)}</div>")
    return f"<div class=tier>{''.join(lines)}</div>"


def _percentile(quantile: float) -> str:
    return f"p{100 * quantile:g}"


def _number(value) -> float | None:
    """report.json's number: ``"inf"`` (too many misses to have a finite quantile) becomes inf."""
    return float(value) if value is not None else None


def tier_charts(report: dict) -> list[Chart]:
    """Two charts per tier: TTFT at the tier's quantile, and output speed at its low tail, against agents."""
    steps = sorted(report["steps"], key=lambda s: s["agents"])
    charts = []
    for index, tier in enumerate((report.get("slo") or {}).get("tiers", [])):
        name, cap = tier["name"], report["capacity"].get(tier["name"], {})
        judged = [(s, s.get("judged", {}).get(name)) for s in steps]
        marks = [Rule("x", cap["agents"], f"capacity {cap['agents']}", PALETTE[0])] if cap.get("agents") else []
        for axis, key, limit, words, unit in (
                ("TTFT", "ttft_quantile_s", tier["ttft_max_s"], f"TTFT {_percentile(tier['quantile'])}", "s"),
                ("speed", "output_tps_quantile", tier["output_tps_min"],
                 f"output speed {_percentile(1 - tier['quantile'])}", "tok/s")):
            points = tuple(Point(s["agents"], _number(j[key]) if j else None, s["passed"].get(name),
                                 f"{s['agents']} agents: {words} {_value_words(j[key] if j else None)} {unit}, "
                                 f"{'pass' if s['passed'].get(name) else 'FAIL'}")
                           for s, j in judged)
            limit_words = f"limit ≤ {limit:g} s" if axis == "TTFT" else f"floor ≥ {limit:g} tok/s"
            charts.append(Chart(f"{tier['label']}: {words}", "concurrent agents", f"{words} ({unit})",
                                (Series(words, points, PALETTE[index % len(PALETTE)]),),
                                (Rule("y", limit, limit_words, "#57606a"), *marks), log_y=axis == "TTFT"))
    return charts


def _value_words(value) -> str:
    return "∞" if value == "inf" else number_words(value)


def server_charts(report: dict) -> list[Chart]:
    """Output throughput, prefix-cache hits and power against agents, with the ground truth's where known."""
    steps = sorted(report["steps"], key=lambda s: s["agents"])
    panels = [("output throughput", "tok/s", lambda s: s.get("output_tokens_per_s")),
              ("prefix-cache hit ratio", "of prompt tokens", lambda s: s.get("cached_token_ratio")),
              ("power", "W", lambda s: s.get("power_watts"))]
    charts = []
    for title, unit, number in panels:
        if all(number(s) is None for s in steps):
            continue
        series = [Series("measured", tuple(Point(s["agents"], number(s), None, f"{s['agents']} agents: "
                                                 f"{number_words(number(s))} {unit}") for s in steps))]
        truth = [s for s in steps if "ground_truth" in s and number(s["ground_truth"]) is not None]
        if truth:
            series.append(Series("ground truth, same steps", tuple(
                Point(s["agents"], number(s["ground_truth"]), None, f"truth at {s['agents']} agents: "
                      f"{number_words(number(s['ground_truth']))} {unit}") for s in truth), "#24292f", dashed=True))
        charts.append(Chart(title, "concurrent agents", f"{title} ({unit})", tuple(series)))
    return charts


def settings_list(report: dict) -> str:
    """The run's target, trajectories, normalisation, search and SLO, in words."""
    search = report.get("search") or {}
    rows = [("Target", target_words(report)),
            ("Trajectories", str(report.get("trajectories") or "not known")),
            ("Accelerators", str(report.get("accelerators") or "not given: no agents per accelerator")),
            ("Power", _power_words(report))]
    if search:
        growth = (f"+{search['step_agents']} agents per step" if search.get("step_agents")
                  else f"×{search['step_factor']:g} per step")
        rows.append(("Search", f"from {search['start_agents']} agents, {growth} up to {search['max_agents']}, then "
                     f"bisect each tier to within {search['resolution_agents']} agent(s); every step "
                     f"{search['warmup_s']:g} s warm-up (not judged), then a {search['window_s']:g} s window "
                     f"(at least {search['min_requests']} request(s)); agents started at "
                     f"{search['spawn_rate']:g}/s" + ("" if search.get("early_stop") else "; no early stop")))
    for tier in (report.get("slo") or {}).get("tiers", []):
        scope = (f"per agent ({number_words(100 * tier['agents_passing'])} % of agents must pass)"
                 if tier.get("scope") == "agent" else "over all requests")
        rows.append((f"Tier {tier['label']}", f"TTFT {_percentile(tier['quantile'])} ≤ {tier['ttft_max_s']:g} s and "
                     f"output speed {_percentile(1 - tier['quantile'])} ≥ {tier['output_tps_min']:g} tok/s, {scope}; "
                     f"errors at most {number_words(100 * tier['max_error_rate'])} %"))
    if report.get("slo"):
        rows.append(("SLO file", str(report["slo"].get("source"))))
    return "<dl>" + "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in rows) + "</dl>"


def _power_words(report: dict) -> str:
    measured = report.get("power_measured")
    if measured:
        return f"measured at every step ({measured['samples']} readings of {measured['source']})"
    if report.get("power_watts"):
        return f"{watts_words(report['power_watts'])}, nameplate ({report.get('power_source')})"
    return "not known: no agents per megawatt"


def prediction_table(report: dict) -> str:
    """The twin's prediction the search started from against what it measured, per tier; empty without one."""
    prediction = report.get("prediction")
    if not prediction:
        return ""
    rows = "".join(
        f"<tr><td class=l>{_esc(tier['label'])}</td><td>{_esc(predicted_words(tier['predicted']))}</td>"
        f"<td>{_esc(capacity_words(tier['measured']))}</td>"
        f"<td>{number_words(tier['measured_over_predicted'])}</td></tr>" for tier in prediction["tiers"].values())
    return (f"<h2>Predicted against measured</h2><p class=muted>The search started from the capacity the twin "
            f"{_esc(str(prediction.get('profile')))} predicts ({prediction.get('load_steps')} load steps on the "
            f"virtual clock); its first step measured {prediction.get('first_step_agents')} agents, "
            f"{prediction.get('steps')} steps in all.</p><div class=scroll><table><tr><th class=l>tier</th>"
            f"<th>predicted</th><th>measured</th><th>measured / predicted</th></tr>{rows}</table></div>")


def steps_table(report: dict) -> str:
    """One row per step in the order measured: when, how many agents, what was measured, each tier's verdict."""
    steps = report["steps"]
    if not steps:
        return "<p>No step was measured.</p>"
    tiers = (report.get("slo") or {}).get("tiers", [])
    first = steps[0]["window_start_epoch_s"]
    head = ["step", "phase", "agents", "judged from (UTC)", "+s", "requests", "errors",
            "TTFT p50 / p95 s", "speed p5 / p50 tok/s", "output tok/s", "power"] + [t["label"] for t in tiers]
    rows = []
    for step in steps:
        ttft, speed = step["ttft_s"], step["output_tps"]
        phase = step["phase"] + (", ended early" if step.get("early_stop") else "")
        cells = [str(step["index"]), phase, str(step["agents"]), _clock(step["window_start_epoch_s"]),
                 f"{step['window_start_epoch_s'] - first:.0f}", str(step["requests"]),
                 str(step["errors"]), f"{_seconds(ttft.get('p50'))} / {_seconds(ttft.get('p95'))}",
                 f"{_tps(speed.get('p5'))} / {_tps(speed.get('p50'))}", number_words(step.get("output_tokens_per_s")),
                 watts_words(step.get("power_watts")) if step.get("power_watts") is not None else "–"]
        html_cells = [f"<td{' class=l' if i == 1 else ''}>{_esc(c)}</td>" for i, c in enumerate(cells)]
        html_cells += [_verdict_cell(step, tier["name"]) for tier in tiers]
        rows.append("<tr>" + "".join(html_cells) + "</tr>")
    header = "".join(f"<th class='{'l ' if i == 1 else ''}{'v' if i >= len(head) - len(tiers) else ''}'>{_esc(h)}</th>"
                     for i, h in enumerate(head))
    note = ("<p class=muted>TTFT in seconds, speed in tok/s per request, over the requests that ended in the step's "
            "window (+s: seconds after the first step's window began); a tier's verdict uses its own quantile (see "
            "Run settings). Hover a FAIL for its cause in full; ≠ truth: the simulator's ground truth judged the same "
            "step the other way.</p>")
    return f"{note}<div class=scroll><table><tr>{header}</tr>{''.join(rows)}</table></div>"


def _seconds(value) -> str:
    return "–" if value is None else f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _tps(value) -> str:
    return "–" if value is None else f"{value:.1f}"


def _verdict_cell(step: dict, tier: str) -> str:
    passed = step["passed"].get(tier)
    if passed is None:
        return "<td>–</td>"
    why = next((d for d in step.get("diagnoses", []) if d["tier"] == tier), None)
    words = "pass" if passed else "FAIL"
    cause = f"<br><small>{_esc(why['cause'])}</small>" if why and not passed else ""
    truth = step.get("ground_truth", {}).get("passed", {}).get(tier)
    differs = truth is not None and truth != passed
    title = why["text"] if why else ""
    if differs:
        title += f" (the ground truth's same step: {'pass' if truth else 'FAIL'})"
        words += " ≠ truth"
    return f"<td class='{'pass' if passed else 'fail'} v' title=\"{_esc(title)}\">{_esc(words)}{cause}</td>"
