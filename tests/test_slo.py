"""SLO tiers: nearest-rank quantiles, request and agent verdicts, failed requests, the YAML file."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest

from agentperf_users.errors import AgentperfError
from agentperf_users.measure.records import RequestRecord, Status
from agentperf_users.measure.slo import (
    SloSpec,
    SloTier,
    evaluate,
    evaluate_step,
    load_slo,
    low_quantile,
    percentile_label,
    quantile,
    records_in_window,
    surely_fails,
)


def record(
    agent: int = 0,
    ttft_s: float | None = 1.0,
    output_tps: float | None = 50.0,
    status: Status = Status.OK,
    end: float = 100.0,
) -> RequestRecord:
    """A request record with the fields a verdict reads set as given (shared by the other tests)."""
    return RequestRecord(
        run_id="t",
        worker_id="local",
        agent=agent,
        trajectory="traj",
        turn=0,
        load_step=0,
        scheduled_start_epoch_s=end - 5,
        start_epoch_s=end - 5,
        end_epoch_s=end,
        ttfb_s=ttft_s,
        ttft_s=ttft_s,
        e2e_s=5.0,
        itl_p50_s=0.02,
        itl_p95_s=0.03,
        itl_max_s=0.05,
        output_tokens=100 if output_tps is not None else 1,
        output_tokens_estimated=False,
        prompt_tokens=1000,
        cached_tokens=0,
        output_tps=output_tps,
        status=status,
    )


TIER = SloTier(name="t20", ttft_max_s=10.0, output_tps_min=20.0, max_error_rate=1.0)


def test_quantile_is_nearest_rank_and_reads_as_attainment():
    values = list(range(1, 101))
    assert quantile(values, 0.95) == 95
    assert quantile(values, 0.5) == 50
    assert quantile(values, 1.0) == 100
    assert quantile(list(range(1, 21)), 0.95) == 19
    assert low_quantile(values, 0.95) == 6  # 95 values (6..100) reach it
    rng = random.Random(7)
    for _ in range(300):
        n = rng.randint(1, 60)
        data = [rng.choice([rng.uniform(0, 10), math.inf]) for _ in range(n)]
        q = rng.choice([0.5, 0.9, 0.95, 0.99, 1.0])
        threshold = rng.uniform(0, 10)
        needed = math.ceil(round(q * n, 9))
        assert (quantile(data, q) <= threshold) == (sum(v <= threshold for v in data) >= needed)
        assert (low_quantile(data, q) >= threshold) == (sum(v >= threshold for v in data) >= needed)


def test_percentile_labels():
    assert percentile_label(0.95) == "p95"
    assert percentile_label(1 - 0.95) == "p5"
    assert percentile_label(0.999) == "p99.9"


def test_request_scope_ttft_quantile_boundary():
    five_slow = [record(ttft_s=1.0) for _ in range(95)] + [record(ttft_s=20.0) for _ in range(5)]
    verdict = evaluate(five_slow, TIER)
    assert verdict.passed and verdict.ttft_quantile_s == 1.0 and verdict.requests == 100
    six_slow = [record(ttft_s=1.0) for _ in range(94)] + [record(ttft_s=20.0) for _ in range(6)]
    verdict = evaluate(six_slow, TIER)
    assert not verdict.passed and verdict.ttft_quantile_s == 20.0
    assert verdict.reasons == ("TTFT p95 20 s > 10 s",)


def test_request_scope_speed_low_quantile_boundary():
    five_slow = [record(output_tps=50.0) for _ in range(95)] + [record(output_tps=10.0) for _ in range(5)]
    assert evaluate(five_slow, TIER).passed
    assert evaluate(five_slow, TIER).output_tps_quantile == 50.0
    six_slow = [record(output_tps=50.0) for _ in range(94)] + [record(output_tps=10.0) for _ in range(6)]
    verdict = evaluate(six_slow, TIER)
    assert not verdict.passed and verdict.output_tps_quantile == 10.0
    assert verdict.reasons == ("output speed p5 10 tok/s < 20 tok/s",)


def test_failed_requests_are_misses_and_count_towards_the_error_rate():
    failed = [record(status=Status.TIMEOUT, ttft_s=None, output_tps=None) for _ in range(6)]
    records = [record() for _ in range(94)] + failed
    verdict = evaluate(records, TIER)  # error rate allowed; TTFT and speed quantiles still miss
    assert verdict.errors == 6 and verdict.error_rate == pytest.approx(0.06)
    assert verdict.ttft_quantile_s == math.inf and verdict.output_tps_quantile == 0.0
    assert not verdict.passed
    assert verdict.to_dict()["ttft_quantile_s"] == "inf"
    strict = SloTier(name="strict", ttft_max_s=10.0, output_tps_min=20.0, max_error_rate=0.01)
    one_failure = [record() for _ in range(99)] + failed[:1]
    assert evaluate(one_failure, strict).passed  # 1 % is allowed
    two_failures = [record() for _ in range(98)] + failed[:2]
    assert evaluate(two_failures, strict).reasons == ("error rate 2.0% > 1.0%",)


def test_requests_without_a_speed_count_for_ttft_only():
    one_token = [record(output_tps=None) for _ in range(50)]
    verdict = evaluate(one_token, TIER)
    assert verdict.passed and verdict.output_tps_quantile is None
    assert not evaluate(one_token + [record(output_tps=5.0)], TIER).passed  # the only speed is too slow
    no_first_token = [record() for _ in range(10)] + [record(ttft_s=None)]
    assert evaluate(no_first_token, TIER).ttft_quantile_s == math.inf


def test_empty_window_fails():
    verdict = evaluate([], TIER)
    assert not verdict.passed and verdict.requests == 0
    assert verdict.reasons == ("no request completed in the window",)


def test_agent_scope_judges_each_agent_on_its_own_requests():
    tier = SloTier(name="a", ttft_max_s=10.0, output_tps_min=20.0, scope="agent", max_error_rate=1.0)
    records = [record(agent=a, ttft_s=1.0) for a in range(20) for _ in range(10)]
    one_bad_agent = records[1:] + [record(agent=0, ttft_s=30.0)]
    verdict = evaluate(one_bad_agent, tier)
    assert (verdict.agents_judged, verdict.agents_passed, verdict.passed) == (20, 19, True)
    two_bad_agents = one_bad_agent[1:] + [record(agent=1, ttft_s=30.0)]
    verdict = evaluate(two_bad_agents, tier)
    assert (verdict.agents_passed, verdict.agents_passed_fraction, verdict.passed) == (18, 0.9, False)
    assert verdict.reasons == ("18/20 agents meet the tier, 95% needed",)
    # Pooled, two slow requests in 200 are within p95: the per-agent view is the stricter one here.
    assert evaluate(two_bad_agents, dataclasses.replace(tier, scope="request")).passed
    slow_agent = [r for r in records if r.agent != 3] + [record(agent=3, output_tps=5.0)] * 10
    assert evaluate(slow_agent, tier).agents_passed == 19


def test_windows_judge_requests_that_ended_in_them_but_no_cold_join():
    inside, joined = record(end=105.0), dataclasses.replace(record(end=106.0), cold_join=True)
    records = [record(end=99.0), inside, joined, record(end=110.0)]
    assert records_in_window(records, 100.0, 110.0) == [inside]


def test_margin_is_the_binding_criterions_log_ratio():
    verdict = evaluate([record(ttft_s=5.0, output_tps=30.0) for _ in range(20)], TIER)
    assert verdict.margin == pytest.approx(math.log(30 / 20))  # speed binds: ln 1.5 < ln 2
    verdict = evaluate([record(ttft_s=8.0, output_tps=80.0) for _ in range(20)], TIER)
    assert verdict.margin == pytest.approx(math.log(10 / 8))
    assert evaluate([record(ttft_s=20.0)], TIER).margin == pytest.approx(math.log(0.5))
    failed = evaluate([record(status=Status.TIMEOUT, ttft_s=None, output_tps=None)], TIER)
    assert failed.margin == -math.inf and failed.to_dict()["margin"] == "-inf"
    assert evaluate([], TIER).margin is None
    agents = [record(agent=a, ttft_s=float(a + 1), output_tps=100.0) for a in range(20)]
    agent_tier = dataclasses.replace(TIER, scope="agent", agents_passing=0.9)
    assert evaluate(agents, agent_tier).margin == pytest.approx(math.log(10 / 18))  # 18 of 20 agents reach it


@pytest.mark.parametrize("scope", ["request", "agent"])
def test_margin_sign_is_the_quantile_verdict(scope):
    """The search steers by the margin and trusts its sign: >= 0 exactly when the criteria hold."""
    rng = random.Random(11)
    for _ in range(300):
        tier = SloTier("t", ttft_max_s=rng.uniform(1, 5), output_tps_min=rng.choice([0.0, 20.0, 40.0]),
                       quantile=rng.choice([0.5, 0.9, 0.95, 1.0]), scope=scope,
                       agents_passing=rng.choice([0.5, 0.8, 0.95, 1.0]), max_error_rate=1.0)
        records = [record(agent=rng.randrange(6), ttft_s=rng.choice([rng.uniform(0, 8), None]),
                          output_tps=rng.choice([rng.uniform(5, 60), None])) for _ in range(rng.randint(1, 40))]
        verdict = evaluate(records, tier)
        assert (verdict.margin >= 0) == verdict.passed


def test_step_verdict_covers_every_tier():
    spec = SloSpec("x", (TIER, SloTier(name="fast", ttft_max_s=2.0, output_tps_min=60.0, max_error_rate=1.0)))
    step = evaluate_step([record(ttft_s=1.5, output_tps=50.0) for _ in range(10)], spec)
    assert step.tier("t20").passed and not step.tier("fast").passed and not step.passed
    assert step.to_dict()["tiers"][1]["reasons"] == ["output speed p5 50 tok/s < 60 tok/s"]


def test_surely_fails_is_conservative_and_implies_a_fail():
    few_misses = [record() for _ in range(18)] + [record(ttft_s=30.0) for _ in range(2)]
    assert not evaluate(few_misses, TIER).passed
    assert not surely_fails(few_misses, TIER, agents=4, extra_fraction=1.0)  # 20 more good ones would dilute
    assert surely_fails(few_misses, TIER, agents=4, extra_fraction=0.0)
    hopeless = [record(ttft_s=30.0) for _ in range(20)]
    assert surely_fails(hopeless, TIER, agents=4, extra_fraction=3.0)
    rng = random.Random(3)
    agent_tier = SloTier(name="a", ttft_max_s=10.0, output_tps_min=20.0, scope="agent", max_error_rate=0.05)
    for _ in range(300):
        sample = [
            record(agent=rng.randrange(8), ttft_s=rng.choice([1.0, 30.0]), output_tps=rng.choice([50.0, 5.0, None]),
                   status=rng.choice([Status.OK] * 9 + [Status.HTTP_5XX]))
            for _ in range(rng.randint(1, 40))
        ]
        for tier in (TIER, agent_tier):
            if surely_fails(sample, tier, agents=8, extra_fraction=rng.uniform(0, 2)):
                assert not evaluate(sample, tier).passed


def test_default_file_has_the_aa_headline_tier():
    spec = load_slo(None)
    headline = spec.tiers[0]
    assert (headline.output_tps_min, headline.ttft_max_s) == (20.0, 10.0)
    assert headline.label == "20 tok/s, TTFT ≤ 10 s"
    assert [t.label for t in spec.tiers[1:]] == ["60 tok/s, TTFT ≤ 5 s", "100 tok/s, TTFT ≤ 2 s"]
    assert all(t.quantile == 0.95 for t in spec.tiers)


def test_file_defaults_and_tier_overrides(tmp_path):
    path = tmp_path / "slo.yaml"
    path.write_text(
        "defaults: {quantile: 0.9, scope: agent}\n"
        "tiers:\n  - {ttft_max_s: 3, output_tps_min: 40}\n  - {name: x, ttft_max_s: 1, output_tps_min: 0, quantile: 0.5}\n"
    )
    first, second = load_slo(path).tiers
    assert (first.name, first.quantile, first.scope) == ("40 tok/s, TTFT ≤ 3 s", 0.9, "agent")
    assert (second.name, second.quantile, second.max_error_rate) == ("x", 0.5, 0.01)


@pytest.mark.parametrize(
    "text, message",
    [
        ("tiers:\n  - {ttft_max_s: 1, output_tps_min: 2}\n  - {ttft_max_s: x, output_tps_min: 2}\n",
         "tiers[1].ttft_max_s: expected a positive number of seconds, at most 86400, got 'x'"),
        ("tiers:\n  - {ttft_max_s: 1, output_tps_min: 2, ttft_p95: 3}\n", "tiers[0]: unknown key 'ttft_p95'"),
        ("tiers:\n  - {ttft_max_s: true, output_tps_min: 2}\n", "tiers[0].ttft_max_s: expected a positive number of seconds, at most 86400, got True"),
        ("tiers:\n  - {ttft_max_s: 0, output_tps_min: 2}\n", "tiers[0].ttft_max_s: expected a positive number of seconds, at most 86400, got 0"),
        ("tiers:\n  - {output_tps_min: 2}\n", "tiers[0].ttft_max_s: missing (required)"),
        ("tiers:\n  - {ttft_max_s: 1, output_tps_min: 2, scope: worker}\n", "tiers[0].scope: expected one of request, agent"),
        ("tiers:\n  - {ttft_max_s: 1, output_tps_min: 2, quantile: 1.5}\n", "tiers[0].quantile: expected a number in (0, 1]"),
        ("defaults: {quantile: 0}\ntiers:\n  - {ttft_max_s: 1, output_tps_min: 2}\n", "defaults.quantile: expected a number in (0, 1]"),
        ("defaults: {name: a}\ntiers: []\n", "defaults: unknown key 'name'"),
        ("tiers: []\n", "tiers: expected a non-empty list"),
        ("tier:\n  - {}\n", "top level: unknown key 'tier'"),
        ("tiers:\n  - {name: a, ttft_max_s: 1, output_tps_min: 2}\n  - {name: a, ttft_max_s: 2, output_tps_min: 2}\n",
         "tiers[1].name: duplicate tier name 'a'"),
        ("tiers:\n  - [1, 2\n", "line 3: not valid YAML"),
    ],
)
def test_bad_files_give_one_line_errors(tmp_path, text, message):
    path = tmp_path / "slo.yaml"
    path.write_text(text)
    with pytest.raises(AgentperfError) as error:
        load_slo(path)
    assert str(error.value).startswith(f"{path}: ")
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_file(tmp_path):
    with pytest.raises(AgentperfError, match=r"nope\.yaml: cannot read the SLO file"):
        load_slo(tmp_path / "nope.yaml")


def test_the_aa_agentperf_preset_is_the_headline_tier_judged_per_request_at_p25_speed(tmp_path, monkeypatch):
    from agentperf_users.measure.slo import load_slo

    [tier] = load_slo("aa-agentperf").tiers
    assert (tier.name, tier.output_tps_min, tier.ttft_max_s) == ("aa-20tps", 20, 10)
    assert (tier.scope, tier.quantile, 1 - tier.quantile) == ("request", 0.75, 0.25)
    assert load_slo("default") == load_slo(None)
    monkeypatch.chdir(tmp_path)  # a file of the preset's name in the working folder is the user's, and wins
    (tmp_path / "aa-agentperf").write_text("tiers:\n  - {name: mine, output_tps_min: 5, ttft_max_s: 1}\n")
    assert [t.name for t in load_slo("aa-agentperf").tiers] == ["mine"]
