"""Small line charts as inline SVG, for pages that must open offline as one file.

Why our own: report.html and compare.html want a few line charts with reference lines (a tier's limit,
the capacity found) and points coloured by verdict, readable at any zoom and searchable as text.
Inline SVG does that in ~150 lines with no dependency and no script; each point carries a ``<title>``,
so hovering it shows its numbers (the one piece of interactivity a planner asks of these charts). A
charting library would inline a few hundred kilobytes of JavaScript per page for the same picture;
matplotlib's PNGs cannot be searched, zoomed or hovered.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

PASS_COLOUR, FAIL_COLOUR = "#1a7f37", "#cf222e"
PALETTE = ("#0969da", "#bf8700", "#8250df", "#1b7c83", "#cf222e", "#57606a")
_MARGIN = {"left": 62, "right": 16, "top": 30, "bottom": 42}


@dataclass(frozen=True)
class Point:
    x: float
    y: float | None  # None: nothing measured; inf: off the chart (drawn at its top edge)
    verdict: bool | None = None  # True pass, False fail, None not judged: the marker's colour
    tip: str = ""  # shown on hover


@dataclass(frozen=True)
class Series:
    name: str
    points: tuple[Point, ...]
    colour: str = PALETTE[0]
    dashed: bool = False


@dataclass(frozen=True)
class Rule:
    """A reference line across the chart: a tier's limit (``axis="y"``) or an agent count (``"x"``)."""

    axis: str
    value: float
    label: str
    colour: str = "#57606a"


@dataclass(frozen=True)
class Chart:
    title: str
    x_label: str
    y_label: str
    series: tuple[Series, ...]
    rules: tuple[Rule, ...] = ()
    log_y: bool = False


def render(chart: Chart, width: int = 520, height: int = 300) -> str:
    """The chart as an ``<svg>`` element (a legend below the plot when there are several series)."""
    finite = [p.y for s in chart.series for p in s.points if p.y is not None and math.isfinite(p.y)]
    xs = [p.x for s in chart.series for p in s.points]
    if not xs:
        return ""
    y_refs = [r.value for r in chart.rules if r.axis == "y"]
    x_refs = [r.value for r in chart.rules if r.axis == "x"]
    log_y = chart.log_y and all(v > 0 for v in finite + y_refs) and finite
    x_axis = _Axis(min(xs + x_refs), max(xs + x_refs), False, 0.0)
    y_axis = _Axis(min(finite + y_refs, default=0.0), max(finite + y_refs, default=1.0), bool(log_y),
                   None if log_y else 0.0)
    legend_h = 20 if len(chart.series) > 1 else 0  # a row under the axis label
    height += legend_h
    plot = _Plot(width, height, x_axis, y_axis, legend_h)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
             f'height="{height}" class="chart" role="img" aria-label="{_esc(chart.title)}">',
             f'<text x="{_MARGIN["left"]}" y="18" class="ct">{_esc(chart.title)}</text>']
    parts += plot.grid(chart.x_label, chart.y_label)
    parts += [plot.rule(rule) for rule in chart.rules]
    for series in chart.series:
        parts += plot.series(series)
    if len(chart.series) > 1:
        parts.append(plot.legend(chart.series))
    parts.append("</svg>")
    return "".join(parts)


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


class _Axis:
    """A linear or log axis over [low, high] with round ticks; ``floor``: where a linear axis starts."""

    def __init__(self, low: float, high: float, log: bool, floor: float | None) -> None:
        self.log = log
        if log:
            self.low, self.high = 10 ** math.floor(math.log10(low)), 10 ** math.ceil(math.log10(high))
        else:
            low = min(low, floor) if floor is not None else low
            step = _nice_step(high - low if high > low else abs(high) or 1.0)
            self.low, self.high = math.floor(low / step) * step, math.ceil(high / step) * step
            if self.high == self.low:
                self.high = self.low + step
            self.step = step

    def fraction(self, value: float) -> float:
        if self.log:
            return (math.log10(value) - math.log10(self.low)) / (math.log10(self.high) - math.log10(self.low))
        return (value - self.low) / (self.high - self.low)

    def ticks(self) -> list[float]:
        if self.log:
            decades = range(round(math.log10(self.low)), round(math.log10(self.high)) + 1)
            mantissas = (1, 2, 5) if len(decades) <= 4 else (1,)
            return [m * 10 ** d for d in decades for m in mantissas if self.low <= m * 10 ** d <= self.high]
        count = round((self.high - self.low) / self.step)
        return [self.low + i * self.step for i in range(count + 1)]


def _nice_step(span: float, target_ticks: int = 5) -> float:
    raw = span / target_ticks
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)


def _tick_words(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


class _Plot:
    def __init__(self, width: int, height: int, x_axis: _Axis, y_axis: _Axis, legend_h: int = 0) -> None:
        self.width, self.height, self.x_axis, self.y_axis = width, height - legend_h, x_axis, y_axis
        self.left, self.top = _MARGIN["left"], _MARGIN["top"]
        self.right, self.bottom = width - _MARGIN["right"], self.height - _MARGIN["bottom"]

    def x(self, value: float) -> float:
        return self.left + self.x_axis.fraction(value) * (self.right - self.left)

    def y(self, value: float) -> float:
        if not math.isfinite(value) or value > self.y_axis.high:
            return self.top
        return self.bottom - self.y_axis.fraction(max(value, self.y_axis.low)) * (self.bottom - self.top)

    def grid(self, x_label: str, y_label: str) -> list[str]:
        parts = []
        for tick in self.y_axis.ticks():
            y = self.y(tick)
            parts.append(f'<line x1="{self.left}" x2="{self.right}" y1="{y:.1f}" y2="{y:.1f}" class="g"/>'
                         f'<text x="{self.left - 6}" y="{y + 4:.1f}" class="tk" text-anchor="end">'
                         f'{_tick_words(tick)}</text>')
        for tick in self.x_axis.ticks():
            x = self.x(tick)
            parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{self.top}" y2="{self.bottom}" class="g"/>'
                         f'<text x="{x:.1f}" y="{self.bottom + 16}" class="tk" text-anchor="middle">'
                         f'{_tick_words(tick)}</text>')
        middle = (self.top + self.bottom) / 2
        parts.append(f'<text x="{(self.left + self.right) / 2:.1f}" y="{self.height - 6}" class="al" '
                     f'text-anchor="middle">{_esc(x_label)}</text>'
                     f'<text x="14" y="{middle:.1f}" class="al" text-anchor="middle" '
                     f'transform="rotate(-90 14 {middle:.1f})">{_esc(y_label)}</text>')
        return parts

    def rule(self, rule: Rule) -> str:
        if rule.axis == "y":
            y = self.y(rule.value)
            return (f'<line x1="{self.left}" x2="{self.right}" y1="{y:.1f}" y2="{y:.1f}" stroke="{rule.colour}" '
                    f'stroke-dasharray="6 4" stroke-width="1.5"/><text x="{self.right - 4}" y="{y - 5:.1f}" '
                    f'class="rl" fill="{rule.colour}" text-anchor="end">{_esc(rule.label)}</text>')
        x = self.x(rule.value)
        return (f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{self.top}" y2="{self.bottom}" stroke="{rule.colour}" '
                f'stroke-dasharray="2 3" stroke-width="1.5"/><text x="{x + 4:.1f}" y="{self.top + 10}" '
                f'class="rl" fill="{rule.colour}">{_esc(rule.label)}</text>')

    def series(self, series: Series) -> list[str]:
        shown = sorted((p for p in series.points if p.y is not None), key=lambda p: p.x)
        if not shown:
            return []
        path = " ".join(f"{'M' if i == 0 else 'L'}{self.x(p.x):.1f},{self.y(p.y):.1f}" for i, p in enumerate(shown))
        dash = ' stroke-dasharray="5 4"' if series.dashed else ""
        parts = [f'<path d="{path}" fill="none" stroke="{series.colour}" stroke-width="2"{dash}/>']
        for point in shown:
            fill = {True: PASS_COLOUR, False: FAIL_COLOUR}.get(point.verdict, series.colour)
            off = "" if math.isfinite(point.y) else " (off the chart)"
            parts.append(f'<circle cx="{self.x(point.x):.1f}" cy="{self.y(point.y):.1f}" r="{3 if series.dashed else 4.5}" '
                         f'fill="{fill}" '
                         f'stroke="white" stroke-width="1"><title>{_esc(point.tip + off)}</title></circle>')
        return parts

    def legend(self, series: tuple[Series, ...]) -> str:
        """Under the axis label, centred, so it never hides a point or a limit's label."""
        widths = [40 + 6.3 * len(one.name) for one in series]
        parts, x, y = [], (self.left + self.right - sum(widths)) / 2, self.height + 10
        for one, width in zip(series, widths):
            dash = ' stroke-dasharray="5 4"' if one.dashed else ""
            parts.append(f'<line x1="{x:.1f}" x2="{x + 18:.1f}" y1="{y}" y2="{y}" stroke="{one.colour}" '
                         f'stroke-width="2"{dash}/><text x="{x + 22:.1f}" y="{y + 4}" class="lg">'
                         f'{_esc(one.name)}</text>')
            x += width
        return "".join(parts)


CHART_CSS = """svg.chart{background:#fff;border:1px solid #d0d7de;border-radius:6px;margin:4px}
svg.chart .ct{font:600 13px system-ui,sans-serif;fill:#24292f} svg.chart .tk{font:11px system-ui,sans-serif;fill:#57606a}
svg.chart .al{font:12px system-ui,sans-serif;fill:#24292f} svg.chart .rl{font:11px system-ui,sans-serif}
svg.chart .lg{font:11px system-ui,sans-serif;fill:#24292f} svg.chart .g{stroke:#eaeef2;stroke-width:1}"""
