"""report.html as a browser shows it: headless Chromium lays the page out, and its text and a
screenshot are checked against report.json (``tests/browser.py``; skipped where Chromium is missing).
Set AGENTPERF_SHOTS to a folder to keep the screenshots for a person to look at."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from agentperf_users.search.headline import headlines, number_words
from tests.browser import distinct_colours, page_text, screenshot
from tests.runs import FAST, make_run


def keep(png: Path) -> None:
    if os.environ.get("AGENTPERF_SHOTS"):
        Path(os.environ["AGENTPERF_SHOTS"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(png, Path(os.environ["AGENTPERF_SHOTS"]) / png.name)


def test_the_page_a_browser_shows_leads_with_each_tiers_headline_numbers(tmp_path):
    report = make_run(tmp_path / "run", FAST)
    page = tmp_path / "run" / "report.html"
    text = page_text(page)
    for tier in headlines(report):  # every tier's answer, per accelerator, per megawatt, in report.json's numbers
        words = [tier.label, tier.answer, tier.bracket]
        if tier.capacity["status"] == "found":
            words += [f"{number_words(tier.per_accelerator)} agents per accelerator",
                      f"{number_words(tier.per_megawatt)} agents per megawatt"]
        assert all(word in text for word in words), (words, text[:2000])
    assert text.index("7.5 agents per accelerator") < text.index("Capacity curve per tier") < text.index("Steps")
    assert "8,333 agents per megawatt" in text  # FAST holds 15 agents at 1.8 kW measured
    assert "from 2 agents, ×2 per step up to 16" in text and "TTFT p95 ≤ 10 s and output speed p5 ≥ 20 tok/s" in text
    assert "00:53:20" in text and "e+09" not in text  # clock times, not epochs
    png = screenshot(page, tmp_path / "report-synthetic.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert distinct_colours(png) > 50  # text, charts and verdict colours, not a blank page
    keep(png)
