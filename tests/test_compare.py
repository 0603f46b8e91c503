"""``agentperf compare``: runs side by side, ratios against the first, refused when not comparable."""

from __future__ import annotations

import json
from html import escape as html_escape

from agentperf_users.cli.main import main
from agentperf_users.measure.slo import load_slo
from agentperf_users.search.headline import number_words
from tests.browser import distinct_colours, page_text, screenshot
from tests.runs import FAST, SLOW, make_run
from tests.test_report_page import keep

HEADLINE = "aa-20tps"


def two_runs(tmp_path, **fast_options):
    return make_run(tmp_path / "slow", SLOW), make_run(tmp_path / "fast", FAST, **fast_options)


def test_capacity_per_accelerator_and_per_megawatt_side_by_side_with_ratios(tmp_path, capsys):
    slow, fast = two_runs(tmp_path)
    assert main(["compare", str(tmp_path / "slow"), str(tmp_path / "fast")]) == 0
    out = capsys.readouterr().out.splitlines()
    table = out[out.index(f"capacity @ {slow['capacity'][HEADLINE]['label']}") + 1:][:3]
    a, b = slow["capacity"][HEADLINE], fast["capacity"][HEADLINE]
    assert table[1].split() == ["A", "slow", "7", "agents", "1.00×", "7", "1.00×", number_words(a["agents_per_megawatt"]),
                                "1.00×", "580", "W", "measured", "at", "the", "capacity", "step"]
    expected = [f"{b['agents'] / a['agents']:.2f}×", f"{b['agents_per_accelerator'] / a['agents_per_accelerator']:.2f}×",
                f"{b['agents_per_megawatt'] / a['agents_per_megawatt']:.2f}×"]
    assert expected == ["2.14×", "1.07×", "0.69×"]  # twice the agents on two accelerators, at 3 times the power
    assert [cell for cell in table[2].split() if cell.endswith("×")] == expected
    second = out[out.index(f"capacity @ {slow['capacity']['example-60tps']['label']}") + 3]
    assert second.split()[:6] == ["B", "fast", "5", "agents", "n/a", "2.5"]  # no ratio against A's none


def test_runs_under_different_tiers_or_trajectories_are_refused_in_one_line_unless_forced(tmp_path, capsys):
    make_run(tmp_path / "slow", SLOW)
    make_run(tmp_path / "aa", FAST, spec=load_slo("aa-agentperf"))
    make_run(tmp_path / "other", FAST, trajectories="default")
    html = tmp_path / "compare.html"
    for other, what in (("aa", "SLO tiers"), ("other", "trajectory set")):
        assert main(["compare", str(tmp_path / "slow"), str(tmp_path / other), "--out", str(html)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and f"its {what} (" in err and "--force" in err, err
        assert not html.exists()
    capsys.readouterr()
    # the one-tier run first: the other's two example tiers are shown too
    assert main(["compare", str(tmp_path / "aa"), str(tmp_path / "slow"), "--force", "--out", str(html)]) == 0
    shown = capsys.readouterr().out
    for spec in (load_slo(None), load_slo("aa-agentperf")):  # every tier of either run, not only the first's
        for tier in spec.tiers:
            assert f"capacity @ {tier.label}" in shown and html_escape(tier.label) in html.read_text()


def test_search_settings_that_differ_are_noted_not_refused(tmp_path, capsys):
    slow, _ = two_runs(tmp_path)
    report = tmp_path / "fast" / "report.json"
    report.write_text(json.dumps({**json.loads(report.read_text()), "search": {**slow["search"], "window_s": 15.0}}))
    assert main(["compare", str(tmp_path / "slow"), str(tmp_path / "fast")]) == 0
    assert "note: window differs: A 30 s, B 15 s" in capsys.readouterr().out.splitlines()
    assert main(["compare", str(tmp_path / "slow"), str(tmp_path / "slow")]) == 0
    assert "note:" not in capsys.readouterr().out


def test_a_run_without_its_report_is_compared_from_its_files_and_left_as_it_was(tmp_path, capsys):
    slow, _ = two_runs(tmp_path)
    for name in ("report.json", "report.html", "steps.csv", "records.jsonl"):
        (tmp_path / "slow" / name).unlink()
    before = sorted(p.name for p in (tmp_path / "slow").iterdir())
    assert main(["compare", str(tmp_path / "slow"), str(tmp_path / "fast")]) == 0
    assert [line.split()[:4] for line in capsys.readouterr().out.splitlines() if line.startswith("  A slow")][0] == [
        "A", "slow", "7", "agents"]
    assert sorted(p.name for p in (tmp_path / "slow").iterdir()) == before
    assert main(["compare", str(tmp_path / "slow")]) == 2
    assert "at least two run folders" in capsys.readouterr().err


def test_the_comparison_page_a_browser_shows(tmp_path, capsys):
    slow, fast = two_runs(tmp_path)
    html = tmp_path / "compare.html"
    assert main(["compare", str(tmp_path / "slow"), str(tmp_path / "fast"), "--out", str(html)]) == 0
    text = page_text(html)
    for report in (slow, fast):
        cap = report["capacity"][HEADLINE]
        assert f"{cap['agents']} agents" in text and number_words(cap["agents_per_megawatt"]) in text
    assert "2.14×" in text and "0.69×" in text and "Ratios against A (slow)" in text
    page = html.read_text()
    assert page.count("<svg") == 2 * len(slow["capacity"]) and "<script" not in page
    assert json.loads((tmp_path / "slow" / "report.json").read_text()) == slow  # compare wrote nothing there
    png = screenshot(html, tmp_path / "compare-synthetic.png", height=1400)
    assert distinct_colours(png) > 50
    keep(png)
