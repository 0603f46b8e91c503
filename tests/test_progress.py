"""The console's progress: compact lines from the master's events, in place on a terminal only."""

from __future__ import annotations

import io
import json

from agentperf_users.measure.slo import evaluate_step, load_slo
from agentperf_users.search.progress import (
    PLAIN_INTERVAL_S,
    PROGRESS_PREFIX,
    ConsoleProgress,
    expected_duration_words,
    judged_event,
    live_event,
)
from tests.test_report import window_records

SPEC = load_slo(None)
VERDICT = evaluate_step([r for r in window_records() if 100.0 <= r.end_epoch_s < 130.0], SPEC)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def live(elapsed_s: float = 35.0, stage: str = "window") -> str:
    return live_event(3, "bisect", 16, stage, elapsed_s, 48.0, 20, VERDICT if stage == "window" else None)


def test_a_terminal_gets_one_live_line_rewritten_in_place_and_cut_to_its_width():
    stream = io.StringIO()
    console = ConsoleProgress(stream, tty=True, width=200)
    assert console.message(live(10.0, "warmup")) and console.message(live(35.0))
    first, second = stream.getvalue().split("\r")[1:]
    assert first.startswith("step 3 (bisect) 16 agents · warmup · 10 of ~48 s") and "\n" not in stream.getvalue()
    assert second.startswith("step 3 (bisect) 16 agents · window · 35 of ~48 s · 20 requests so far · TTFT p95 1.9 s, "
                             "p5 30 tok/s · 20 tok/s FAIL · 60 tok/s FAIL · 100 tok/s FAIL")  # the numbers said once
    console = ConsoleProgress(stream, tty=True, width=60)
    console.message(live(35.0))
    assert len(stream.getvalue().rsplit("\r", 1)[1].removesuffix("\x1b[K")) == 59  # never wraps: \r rewrites it
    console.message(judged_event(3, "bisect", 16, VERDICT, ["server errors"]))
    judged = stream.getvalue().rsplit("\r\x1b[K", 1)[1]  # the live line cleared first
    assert judged.startswith("step 3 (bisect): 16 agents, 20 requests, 1 errors | TTFT p95 1.9 s, p5 30 tok/s | "
                             "20 tok/s FAIL | 60 tok/s FAIL")
    assert judged.endswith(" | why: server errors\n")


def test_a_pipe_gets_plain_lines_and_at_most_one_live_line_per_interval():
    stream, clock = io.StringIO(), Clock()
    console = ConsoleProgress(stream, tty=False, clock=clock)
    console.message(live(2.0))
    clock.now += PLAIN_INTERVAL_S / 2
    console.message(live(17.0))  # too soon: not shown
    clock.now += PLAIN_INTERVAL_S / 2
    console.message(live(32.0))
    console.message(judged_event(3, "bisect", 16, VERDICT, []))
    lines = stream.getvalue().splitlines()
    assert [line.split(" · ")[2] for line in lines[:2]] == ["2 of ~48 s", "32 of ~48 s"] and len(lines) == 3
    assert "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue()
    assert "why" not in lines[2]


def test_a_step_running_past_its_expected_time_says_so_rather_than_counting_past_it():
    """A window is extended until enough requests ended in it, and judged once every worker reported."""
    stream = io.StringIO()
    console = ConsoleProgress(stream, tty=False)
    console.message(live(52.0))
    assert stream.getvalue().split(" · ")[2] == "52 s, past the ~48 s expected"


def test_other_lines_are_not_taken_for_progress():
    console = ConsoleProgress(io.StringIO(), tty=False)
    assert not console.message("capacity 20 tok/s, TTFT ≤ 10 s: 4 agents (fails at 5)")
    assert not console.message(PROGRESS_PREFIX + "{not json")
    assert not console.message(PROGRESS_PREFIX + json.dumps({"kind": "live"}))  # missing fields


def test_the_expected_duration_says_the_quick_demo_only_for_the_long_defaults():
    long = expected_duration_words(30.0, 90.0, suggest_demo=True)
    assert "each load step takes about 2.1 min" in long and "expect about 12-25 min" in long
    assert long.endswith("--warmup-s 10 --window-s 20")
    assert "quick demo" not in expected_duration_words(10.0, 20.0, suggest_demo=False)
