"""The report: recomputed from records, normalised, written whole or not at all."""

from __future__ import annotations

import dataclasses
import json
import os
import stat

import pytest

from agentperf_users import files
from agentperf_users.cli.main import main
from agentperf_users.measure.power import PowerSample
from agentperf_users.measure.records import Status
from agentperf_users.measure.slo import evaluate_step, load_slo
from agentperf_users.report.build import (
    RunContext,
    build_report,
    capacity_lines,
    render_html,
    step_stats,
    steps_frame,
    write_context,
    write_run,
)
from agentperf_users.search.headline import number_words, watts_words
from agentperf_users.search.policy import SearchParameters
from agentperf_users.search.state import SearchState
from tests.test_slo import record as slo_record


def record(agent=0, ttft_s=1.0, output_tps=50.0, status=Status.OK, end_epoch_s=100.0, **fields):
    """A verdict-ready record (tests.test_slo) with any other fields replaced."""
    return dataclasses.replace(slo_record(agent, ttft_s, output_tps, status, end_epoch_s), **fields)

SPEC = load_slo(None)
CONTEXT = RunContext(target={"host": "embedded simulator", "model": None, "simulator_profile": "p"},
                     trajectories="demo", accelerators=2, power_watts=1400.0, power_source="test",
                     interrupted=False)


def window_records():
    """20 requests in [100, 130): TTFT 0.1..2.0 s, speed 30..49 tok/s, one failure, half cached."""
    records = [record(agent=i % 4, ttft_s=0.1 * (i + 1), output_tps=30.0 + i, end_epoch_s=100.0 + i,
                      prompt_tokens=1000, cached_tokens=500, output_tokens=100) for i in range(19)]
    records.append(record(agent=0, status=Status.HTTP_5XX, end_epoch_s=125.0, ttft_s=None, output_tps=None))
    records.append(record(agent=1, ttft_s=9.0, output_tps=1.0, end_epoch_s=130.0))  # outside [100, 130)
    return records


def summary_for(records, live_records=None):
    verdict = evaluate_step([r for r in (live_records or records) if 100.0 <= r.end_epoch_s < 130.0], SPEC)
    tier = SPEC.tiers[0].name
    return {
        "run_id": "r1",
        "slo": {"source": SPEC.source, "tiers": [{**dataclasses.asdict(t), "label": t.label} for t in SPEC.tiers]},
        "parameters": dataclasses.asdict(SearchParameters(start_agents=4, step_agents=0, step_factor=2.0, max_agents=8,
                                                          resolution_agents=1, spawn_rate=10.0, warmup_s=5.0,
                                                          window_s=30.0, early_stop=True)),
        "steps": [{"index": 0, "agents": 4, "phase": "step", "window_start_epoch_s": 100.0,
                   "window_end_epoch_s": 130.0, "early_stop": False, "verdict": json.loads(json.dumps(verdict.to_dict()))}],
        "capacity": {t.name: {"tier": t.name, "status": "found" if t.name == tier else "none_passed",
                              "agents": 4 if t.name == tier else None, "first_failing_agents": 5 if t.name == tier else 1}
                     for t in SPEC.tiers},
        "complete": True,
    }


def state_for(records, live_records=None) -> SearchState:
    """summary_for's state read as the report reads a state file."""
    return SearchState.from_dict(summary_for(records, live_records))


def test_step_stats_are_nearest_rank_over_the_window():
    stats = step_stats([r for r in window_records() if 100.0 <= r.end_epoch_s < 130.0], 30.0)
    assert stats["requests"] == 20 and stats["errors"] == 1
    assert stats["ttft_s"]["p50"] == pytest.approx(1.0)  # ceil(0.5 * 19) = 10th of 0.1..1.9
    assert stats["ttft_s"]["p95"] == pytest.approx(1.9)  # ceil(0.95 * 19) = 19th
    assert stats["output_tps"]["p5"] == pytest.approx(30.0)
    assert stats["cached_token_ratio"] == pytest.approx(0.5)
    assert stats["output_tokens_per_s"] == pytest.approx(19 * 100 / 30.0)


def test_report_normalises_capacity_and_checks_live_verdicts():
    records = window_records()
    report = build_report(state_for(records), records, SPEC, CONTEXT)
    first = report["capacity"][SPEC.tiers[0].name]
    assert first["agents_per_accelerator"] == 2.0
    assert first["agents_per_megawatt"] == pytest.approx(4 / 0.0014)
    assert report["capacity"][SPEC.tiers[1].name]["agents_per_megawatt"] is None
    step = report["steps"][0]
    assert step["requests"] == 20 and step["live_verdict_matches_records"] is True
    assert (first["power_watts"], first["power_basis"], step["power_watts"]) == (1400.0, "test", None)


def test_measured_power_at_the_capacity_step_sets_agents_per_megawatt():
    records = window_records()
    samples = tuple(PowerSample(t, w) for t, w in ((95.0, 150.0), (100.0, 900.0), (115.0, 1100.0), (130.0, 2000.0)))
    context = dataclasses.replace(CONTEXT, power_samples=samples, power_measured_from="DCGM at x")
    report = build_report(state_for(records), records, SPEC, context)
    assert report["steps"][0]["power_watts"] == 1000.0  # the readings inside [100, 130)
    first = report["capacity"][SPEC.tiers[0].name]
    assert (first["power_watts"], first["power_basis"]) == (1000.0, "measured")
    assert first["agents_per_megawatt"] == pytest.approx(4 / 0.001)  # not the nameplate's 4 / 0.0014
    assert report["power_measured"] == {"source": "DCGM at x", "samples": 4}
    assert "measured at every step (4 readings of DCGM at x)" in render_html(report)
    assert "power_watts" in steps_frame(report).columns


def test_a_record_missing_from_the_live_union_shows_as_a_mismatch():
    records = window_records()
    live = [r for r in records if r.ttft_s != pytest.approx(1.9)]  # the live search missed one request
    report = build_report(state_for(records, live_records=live), records, SPEC, CONTEXT)
    assert report["steps"][0]["live_verdict_matches_records"] is False


def test_capacity_lines_name_the_tier_the_normalised_numbers_the_cause_and_the_truth():
    records = window_records()
    summary = summary_for(records)
    summary["capacity"][SPEC.tiers[1].name]["first_failing_agents"] = 4  # the step measured: its cause is known
    truth = {"capacity": {SPEC.tiers[0].name: {"status": "found", "agents": 5}}}
    lines = capacity_lines(build_report(SearchState.from_dict(summary), records, SPEC, CONTEXT, truth))
    # the one step (4 agents) passes the first tier in 28 % of its resamples (stable neither way), fails the others in all
    anywhere, below_4 = "no judged verdict held: a rerun may land anywhere", "a rerun may land at 0–3"
    assert lines[0] == f"capacity @ {SPEC.tiers[0].label}: 4 agents (fails at 5; {anywhere}; ground truth 5 agents)"
    assert lines[1] == "    2 per accelerator · 2,857 agents/MW (1.4 kW, nameplate: test)"  # 4 / 0.0014 MW
    assert lines[2] == f"capacity @ {SPEC.tiers[1].label}: none (fails already at 4 agents; {below_4})"
    assert lines[3].startswith("    at 4 agents: server errors — 5 % of 20 requests failed")
    assert lines[4] == f"capacity @ {SPEC.tiers[2].label}: none (fails already at 1 agent; {below_4})"  # never at 1
    truth["bands"] = {SPEC.tiers[0].name: {"passes_up_to": 3, "fails_above": 6, "measured_up_to": 8}}
    lines = capacity_lines(build_report(SearchState.from_dict(summary), records, SPEC, CONTEXT, truth))
    assert lines[0] == (f"capacity @ {SPEC.tiers[0].label}: 4 agents (fails at 5; {anywhere}; "
                        f"ground truth 5 agents, true verdicts flip between 4 and 6 agents)")


@pytest.mark.parametrize("value, words", [(2594.3, "2,594"), (12.44, "12.4"), (10.0, "10"), (1.25, "1.25"),
                                          (0.0312, "0.031"), (None, "n/a"), (float("inf"), "n/a")])
def test_numbers_are_rounded_as_a_person_reads_them(value, words):
    assert number_words(value) == words


@pytest.mark.parametrize("watts, words", [(700.0, "700 W"), (12_400.0, "12.4 kW"), (1_350_000.0, "1.35 MW"),
                                          (132_000.0, "132 kW")])
def test_power_is_worded_with_its_unit(watts, words):
    assert watts_words(watts) == words


def test_write_run_leaves_complete_files_only(tmp_path):
    records = window_records()
    report = build_report(state_for(records), records, SPEC, CONTEXT)
    write_run(tmp_path, report, records)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["records.jsonl", "report.html", "report.json", "steps.csv"]
    assert json.loads((tmp_path / "report.json").read_text())["records"] == len(records)
    assert len((tmp_path / "records.jsonl").read_text().splitlines()) == len(records)
    page = (tmp_path / "report.html").read_text()
    card = page.split("<div class=tier>")[1]  # the first tier's headline, at the top of the page
    assert all(words in card for words in (SPEC.tiers[0].label, "4 agents", "fails at 5", "<b>2</b> agents per accelerator",
                                           "<b>2,857</b> agents per megawatt", "nameplate: test"))
    assert page.count("<svg") == 2 * len(SPEC.tiers) + 2  # TTFT and speed per tier; throughput, cache hits
    assert "e+09" not in page and "<script" not in page and "src=" not in page and "href=" not in page  # readable, offline
    header = (tmp_path / "steps.csv").read_text().splitlines()[0]
    assert "ttft_s.p95" in header and f"passed.{SPEC.tiers[0].name}" in header


def test_ground_truth_steps_sit_beside_the_live_ones(tmp_path):
    records = window_records()
    truth_stats = step_stats([r for r in records if 100.0 <= r.end_epoch_s < 110.0], 30.0)
    truth = {"capacity": {}, "same_steps": [{"agents": 4, **truth_stats, "passed": {SPEC.tiers[0].name: False}}]}
    report = build_report(state_for(records), records, SPEC, CONTEXT, truth)
    step = report["steps"][0]
    assert step["ground_truth"]["ttft_s"]["p95"] == truth_stats["ttft_s"]["p95"] != step["ttft_s"]["p95"]
    assert step["ground_truth"]["passed"] == {SPEC.tiers[0].name: False}
    assert "same_steps" not in report["ground_truth"]  # once, in the steps
    write_run(tmp_path, report, records)
    assert "ground_truth.ttft_s.p95" in (tmp_path / "steps.csv").read_text().splitlines()[0]
    mismatched = {"capacity": {}, "same_steps": [{"agents": 8, **truth_stats, "passed": {}}]}
    assert "ground_truth" not in build_report(state_for(records), records, SPEC, CONTEXT, mismatched)["steps"][0]


def test_atomic_write_replaces_the_whole_file_or_leaves_the_old_one(tmp_path):
    path = tmp_path / "search.json"
    files.atomic_write(path, '{"steps": [1]}')
    previous = os.umask(0o022)
    try:
        files.atomic_write(path, '{"steps": [1, 2]}')
    finally:
        os.umask(previous)
    assert json.loads(path.read_text()) == {"steps": [1, 2]}
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # as open() makes files, not mkstemp's 0600
    with pytest.raises(UnicodeEncodeError):  # fails halfway through writing the new text
        files.atomic_write(path, '{"steps": [1, 2, 3], "note": "\ud800"}')
    assert json.loads(path.read_text()) == {"steps": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["search.json"]  # no temporary file left


def shape_summary(records, **fields) -> dict:
    """summary_for's search state as the shape writes it: each tier whole, so the report can rebuild the
    tiers from it."""
    summary = summary_for(records)
    tiers = [{**dataclasses.asdict(tier), "label": tier.label} for tier in SPEC.tiers]
    return {**summary, "slo": {"source": SPEC.source, "tiers": tiers}, "interrupted": False, "lost_workers": [],
            **fields}


def run_folder(tmp_path, records, summary, samples=(), truth=None):
    """A run folder as agentperf capacity leaves it: records, the search's state, run.json, power."""
    folder = tmp_path / "run"
    (folder / "records").mkdir(parents=True)
    (folder / "records" / "records-worker-a.jsonl").write_text("".join(r.to_json() + "\n" for r in records))
    (folder / "search.json").write_text(json.dumps(summary))
    (folder / "power.jsonl").write_text("".join(json.dumps({"epoch_s": s.epoch_s, "watts": s.watts}) + "\n"
                                                for s in samples))
    write_context(folder, CONTEXT, truth)
    return folder


def test_agentperf_report_rebuilds_the_live_report_field_for_field(tmp_path, capsys):
    records = window_records()
    samples = (PowerSample(100.0, 900.0), PowerSample(115.0, 1100.0))
    lost = [{"worker": "worker-b", "step": 0, "agents": 4, "epoch_s": 104.5}]
    summary = shape_summary(records, lost_workers=lost)
    truth = {"capacity": {SPEC.tiers[0].name: {"status": "found", "agents": 5}},
             "same_steps": [{"agents": 4, **step_stats(records[:5], 30.0), "passed": {SPEC.tiers[0].name: True}}]}
    folder = run_folder(tmp_path, records, summary, samples, truth)
    live = build_report(SearchState.from_dict(summary), records, SPEC, dataclasses.replace(CONTEXT, power_samples=samples), truth)
    assert main(["report", str(folder)]) == 0
    rebuilt = json.loads((folder / "report.json").read_text())
    assert rebuilt == json.loads(json.dumps(live))
    assert rebuilt["lost_workers"] == lost and rebuilt["steps"][0]["live_verdict_matches_records"] is True
    assert rebuilt["steps"][0]["ground_truth"]["passed"] == {SPEC.tiers[0].name: True}
    assert (folder / "steps.csv").read_text() == steps_frame(live).to_csv(index=False)
    assert capacity_lines(live)[0] in capsys.readouterr().out
    page = (folder / "report.html").read_text()
    assert page.count("<svg") == 2 * len(SPEC.tiers) + 3  # with the power measured
    assert "Lost worker worker-b during step 0 (4 agents) at 1970-01-01 00:01:44 UTC" in page


@pytest.mark.parametrize("said", [True, False], ids=["said-so", "killed-before-its-last-word"])
def test_an_interrupted_search_is_reported_as_such(tmp_path, capsys, said):
    """Also where the state never said so: a master killed (SIGKILL, the OOM killer, its parent and workers
    gone at once) keeps the state of its last judged step, neither complete nor stopped by itself."""
    records = window_records()
    capacity = {t.name: {"tier": t.name, "status": "incomplete", "agents": 4, "first_failing_agents": None}
                for t in SPEC.tiers}
    folder = run_folder(tmp_path, records, shape_summary(records, interrupted=said, complete=False, capacity=capacity))
    assert main(["report", str(folder)]) == 0
    report = json.loads((folder / "report.json").read_text())
    assert report["interrupted"] is True and len(report["steps"]) == 1
    out = capsys.readouterr().out
    assert f"capacity @ {SPEC.tiers[0].label}: incomplete (passed at 4 agents)" in out
    assert "interrupted after 1 judged step(s)" in out
    assert "The run was interrupted" in (folder / "report.html").read_text()


@pytest.mark.parametrize("fields", [{"complete": True}, {"complete": False, "stopped": {
    "step": 0, "agents": 4, "cause": "server errors", "text": "why: server errors", "error": None}}],
    ids=["complete", "stopped-itself"])
def test_a_search_that_ended_on_its_own_is_not_interrupted(tmp_path, fields):
    records = window_records()
    folder = run_folder(tmp_path, records, shape_summary(records, **fields))
    assert main(["report", str(folder)]) in (0, 3, 4)
    assert json.loads((folder / "report.json").read_text())["interrupted"] is False


@pytest.mark.parametrize("state, expected", [(None, "search.json: missing"),
                                              ('{"steps": [{"index": 0, "ag', "search.json: not valid JSON"),
                                              ("[]", "search.json: expected a JSON object"),
                                              ('{"slo": null}', "search.json: slo: expected the search's tiers"),
                                              ("valid-but-not-a-state", "search.json: not a search's state")])
def test_a_torn_or_absent_state_file_is_one_line(tmp_path, capsys, state, expected):
    records = window_records()
    folder = run_folder(tmp_path, records, shape_summary(records))
    if state is None:
        (folder / "search.json").unlink()
    elif state == "valid-but-not-a-state":  # whole JSON with the tiers, a step without its fields
        (folder / "search.json").write_text(json.dumps({**shape_summary(records), "steps": [{"index": 0}]}))
    else:
        (folder / "search.json").write_text(state)
    assert main(["report", str(folder)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and expected in err and "Traceback" not in err
    assert not (folder / "report.json").exists()


def test_a_folder_that_is_not_a_run_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: not a run folder" in capsys.readouterr().err


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("steps", 5, "steps: expected list, got int"), ("complete", "yes", "complete: expected bool, got str"),
    ("lost_workers", [1], "lost_workers: expected a list of objects"),
])
def test_a_state_file_with_a_field_of_the_wrong_type_is_one_line_naming_it(tmp_path, capsys, field, value, expected):
    records = window_records()
    folder = run_folder(tmp_path, records, {**shape_summary(records), field: value})
    assert main(["report", str(folder)]) == 2
    error = capsys.readouterr().err.strip()
    assert error == f"agentperf: error: {folder / 'search.json'}: {expected}" and not (folder / "report.json").exists()


def test_the_state_file_reads_back_as_it_was_written(tmp_path):
    state = state_for(window_records())
    state.write(tmp_path / "search.json")
    assert SearchState.read(tmp_path) == state


def test_each_step_carries_the_workers_cpu_from_the_search_and_the_diagnosis_reads_it():
    """The workers' CPU is measured live only (it is in no record): the report takes it from the search's state
    and diagnoses with it, as the live search did."""
    records = window_records()
    summary = summary_for(records)
    plain = build_report(SearchState.from_dict(summary), records, SPEC, CONTEXT)["steps"][0]
    failed = [name for name, passed in plain["passed"].items() if not passed]
    assert failed and plain["load_generator"] is None
    assert {(found["cause"], found["about_capacity"]) for found in plain["diagnoses"]} == {("server errors", True)}
    summary["steps"][0]["load_generator"] = {"worker_cpu": {"worker-1-5": 0.97, "worker-2-6": 0.4}}
    step = build_report(SearchState.from_dict(summary), records, SPEC, CONTEXT)["steps"][0]
    assert step["load_generator"] == {"worker_cpu": {"worker-1-5": 0.97, "worker-2-6": 0.4}}
    assert [found["tier"] for found in step["diagnoses"]] == failed
    assert {(found["cause"], found["about_capacity"]) for found in step["diagnoses"]} == {("the load generator", False)}
    assert "worker worker-1-5 used 97 % of a core" in step["diagnoses"][0]["text"]
    assert steps_frame({"steps": [step]})["load_generator.worker_cpu.worker-1-5"].tolist() == [0.97]
