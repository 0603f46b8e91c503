"""A capacity search's progress on the console: one compact line per step, live while it runs.

The master (``shape``) logs two kinds of event, each a JSON object behind ``PROGRESS_PREFIX``: ``live``
every ``LIVE_INTERVAL_S`` during a step (its stage, seconds elapsed and expected, requests judged so
far, each tier's numbers so far) and ``judged`` when the step is judged. ``agentperf capacity`` reads
them in the master's output and prints compact lines (``ConsoleProgress``): on a terminal the live line
is rewritten in place (``\\r``, cut to the terminal's width so it never wraps); elsewhere (a pipe,
Kubernetes logs) as plain lines, a live one at most every ``PLAIN_INTERVAL_S``. The full line of a
judged step (the server's numbers, every tier's cause) goes to locust.log only, under the logger
``STEPS_LOGGER``, which the console does not show.

Why events and not the lines themselves: the console's line is a rendering choice of the process that
owns the terminal; the master, in a pipe, cannot know whether there is one.
"""

from __future__ import annotations

import json
import shutil
import time
from typing import Callable, TextIO

from agentperf_users.measure.slo import StepVerdict, speed_text, ttft_text

PROGRESS_PREFIX = "agentperf-progress "
STEPS_LOGGER = "agentperf.steps"  # the full per-step lines: locust.log only
LIVE_INTERVAL_S = 2.0
PLAIN_INTERVAL_S = 30.0


TYPICAL_STEPS = (6, 12)  # rough: the README's l4 demo measures 7-9 steps; one locating all three tiers about 12
STEP_OVERHEAD_S = 5.0  # per step beyond warm-up and window: stopping, ramping, the workers' last reports
QUICK_DEMO = "agentperf capacity --profile l4-llama3.2-3b --trajectories demo --warmup-s 10 --window-s 20"


def expected_duration_words(warmup_s: float, window_s: float, suggest_demo: bool) -> str:
    """What a person starting a search should know first: how long it will take, and, where the
    windows are the long defaults on the embedded simulator, the command for a quick demo."""
    step_s = warmup_s + window_s + STEP_OVERHEAD_S
    low, high = (steps * step_s / 60 for steps in TYPICAL_STEPS)
    words = (f"agentperf: each load step takes about {_duration(step_s)} ({warmup_s:g} s warm-up, "
             f"{window_s:g} s window); a search usually measures {TYPICAL_STEPS[0]}-{TYPICAL_STEPS[1]} steps: "
             f"expect about {low:.0f}-{high:.0f} min")
    if suggest_demo:
        words += f". For a quick demo (about 5 min): {QUICK_DEMO}"
    return words


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _tiers(verdict: StepVerdict | None) -> list[dict]:
    if verdict is None:
        return []
    return [{"tier": f"{v.tier.output_tps_min:g} tok/s", "passed": v.passed,
             "numbers": f"TTFT {ttft_text(v)}, {speed_text(v)}"} for v in verdict.tiers]


def live_event(step: int, phase: str, agents: int, stage: str, elapsed_s: float, expected_s: float,
               requests: int, verdict: StepVerdict | None) -> str:
    """The message the master logs during a step (``verdict``: on the window's requests so far)."""
    return PROGRESS_PREFIX + json.dumps({
        "kind": "live", "step": step, "phase": phase, "agents": agents, "stage": stage,
        "elapsed_s": round(elapsed_s, 1), "expected_s": round(expected_s, 1), "requests": requests,
        "tiers": _tiers(verdict)})


def judged_event(step: int, phase: str, agents: int, verdict: StepVerdict, causes: list[str]) -> str:
    """The message the master logs when a step is judged (``causes``: the distinct binding causes)."""
    first = verdict.tiers[0]
    return PROGRESS_PREFIX + json.dumps({
        "kind": "judged", "step": step, "phase": phase, "agents": agents, "requests": first.requests,
        "errors": first.errors, "tiers": _tiers(verdict), "causes": causes})


def live_line(event: dict) -> str:
    """``step 3 (bisect) 16 agents · window · 35 of ~48 s · 18 requests so far · TTFT p95 0.17 s, p5 19.4 tok/s ·
    20 tok/s FAIL · 60 tok/s FAIL``"""
    elapsed, expected = event["elapsed_s"], event["expected_s"]
    # a window is extended until enough requests ended in it (--min-requests), and judged once every worker reported
    timing = (f"{elapsed:.0f} of ~{expected:.0f} s" if elapsed <= expected
              else f"{elapsed:.0f} s, past the ~{expected:.0f} s expected")
    parts = [f"step {event['step']} ({event['phase']}) {event['agents']} agents", event["stage"], timing]
    if event["stage"] == "window":
        parts.append(f"{event['requests']} requests so far")
        parts += _tier_words(event["tiers"])
    return " · ".join(parts)


def _tier_words(tiers: list[dict]) -> list[str]:
    """Each tier's verdict with its numbers, or the numbers once when every tier reads the same ones
    (tiers judged at one quantile: the usual case)."""
    verdicts = [f"{tier['tier']} {'pass' if tier['passed'] else 'FAIL'}" for tier in tiers]
    if len({tier["numbers"] for tier in tiers}) == 1:
        return [tiers[0]["numbers"], *verdicts]
    return [f"{verdict} ({tier['numbers']})" for verdict, tier in zip(verdicts, tiers)]


def judged_line(event: dict) -> str:
    """``step 3 (bisect): 16 agents, 24 requests, 0 errors | TTFT p95 0.17 s, p5 19.4 tok/s | 20 tok/s FAIL | why: ...``"""
    line = (f"step {event['step']} ({event['phase']}): {event['agents']} agents, {event['requests']} requests, "
            f"{event['errors']} errors | " + " | ".join(_tier_words(event["tiers"])))
    return line + (f" | why: {', '.join(event['causes'])}" if event["causes"] else "")


class ConsoleProgress:
    """Writes progress to ``stream``: live lines in place on a terminal, plain lines elsewhere."""

    def __init__(self, stream: TextIO, tty: bool | None = None, clock: Callable[[], float] = time.monotonic,
                 width: int | None = None) -> None:
        self._stream, self._clock = stream, clock
        self._tty = stream.isatty() if tty is None else tty
        self._width = width or shutil.get_terminal_size().columns
        self._live_shown = False  # a live line is on the terminal, not yet ended by a newline
        self._last_plain = -PLAIN_INTERVAL_S

    def message(self, text: str) -> bool:
        """Show ``text`` if it is a progress event (True), or do nothing (False)."""
        if not text.startswith(PROGRESS_PREFIX):
            return False
        try:
            event = json.loads(text[len(PROGRESS_PREFIX):])
            kind = event["kind"]
            rendered = live_line(event) if kind == "live" else judged_line(event)
        except (ValueError, KeyError, TypeError):
            return False  # not ours after all: shown as any other line
        if kind == "judged":
            self.line(rendered)
        elif self._tty:
            self._write("\r" + rendered[: self._width - 1] + "\x1b[K")
            self._live_shown = True
        elif self._clock() - self._last_plain >= PLAIN_INTERVAL_S:
            self._last_plain = self._clock()
            self.line(rendered)
        return True

    def line(self, text: str) -> None:
        """A whole line, after ending any live line in place."""
        self.end()
        self._write(text + "\n")

    def end(self) -> None:
        """Clear a live line left in place (the search ended or was interrupted mid-step)."""
        if self._live_shown:
            self._write("\r\x1b[K")
            self._live_shown = False

    def _write(self, text: str) -> None:
        self._stream.write(text)
        self._stream.flush()
