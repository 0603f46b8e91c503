"""The digital twin: the fit recovers known step constants, calibrate recovers a simulator's profile through
HTTP, predict answers what truth answers, and every way calibrate cannot work is one line, exit 2, no file.

Tolerances: the per-step overhead alone (0.5 ms of a 7 ms decode step in the default profile) is not
separable from the weight read by timings with 1 % noise (it is their sum that a decode step costs), so
the tests check the sum and the four other constants, not the overhead by itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml

from agentperf_users.cli.main import main
from agentperf_users.loadgen import replay
from agentperf_users.measure.records import RecordWriter, RequestRecord, Status
from agentperf_users.measure.server_metrics import HistogramValue, ServerSample
from agentperf_users.measure.slo import load_slo
from agentperf_users.search import truth
from agentperf_users.search.headline import band_words
from agentperf_users.search.policy import SearchParameters
from agentperf_users.simulator.profile import attention_pairs, load_profile
from agentperf_users.twin.fit import (
    MIN_OBSERVATIONS,
    FitError,
    Observation,
    StepConstants,
    StepWork,
    fit,
)
from agentperf_users.twin.calibrate import LIMIT_NAMES, _measured_seqs
from agentperf_users.twin.from_run import RunPoints, read_run_points, recheck_drift
from agentperf_users.twin.probe_design import DESIGNS
from agentperf_users.twin.probe_run import prefill_steps
from agentperf_users.twin.probe_seqs import (
    BURST_OUTPUT_TOKENS,
    BURST_PROMPT_TOKENS,
    BURST_REQUESTS,
    Gauges,
    burst_size,
    read_limit,
)
from agentperf_users.twin.profile_yaml import Limits, constants_of
from agentperf_users.workload.readers import load_trajectories
from tests.simulator import simulator, write_profile
from tests.support import free_port, wait_for

BUDGET_TOKENS = 8192


def synthetic(true: StepConstants, noise: float, seed: int) -> list[Observation]:
    """What the standard probe design measures on a server priced by ``true``, each timing off by ``noise`` (relative sd)."""
    rng = random.Random(seed)
    planned = [Observation("prefill", f"prefill {n}", prefill_steps(n, 0, BUDGET_TOKENS), 0.0)
               for n in (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)]
    planned += [Observation("itl", f"decode {b}x{c}", (StepWork(decode_batch=b, decode_context_tokens=b * c),), 0.0)
                for b in (1, 2, 4, 8, 16) for c in (128, 1024, 4096)]
    return [Observation(o.kind, o.label, o.steps, true.predict_s(o) * (1 + rng.gauss(0, noise))) for o in planned]


def assert_close(found: StepConstants, true: StepConstants, tolerance: float, attention_tolerance: float,
                 kv_tolerance: float | None = None) -> None:
    ratios = found.ratios_to(true)
    for name in ("weights_s", "compute_s_per_token"):
        assert abs(ratios[name] - 1) < tolerance, (name, ratios)
    assert abs(ratios["kv_s_per_token"] - 1) < (kv_tolerance or tolerance), ratios
    assert abs(ratios["attention_s_per_pair"] - 1) < attention_tolerance, ratios
    floor, true_floor = found.overhead_s + found.weights_s, true.overhead_s + true.weights_s
    assert abs(floor / true_floor - 1) < tolerance / 2, (floor, true_floor)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_recovers_known_constants_from_noisy_timings(seed):
    true = constants_of(load_profile("h100-llama3.1-8b"))
    result = fit(synthetic(true, noise=0.01, seed=seed))
    assert_close(result.constants, true, tolerance=0.08, attention_tolerance=0.15)
    assert result.rms_relative < 0.02
    assert result.compute_bound_steps > 0 and result.memory_bound_steps > 0  # both sides of the roofline seen


def test_fit_without_noise_is_exact_and_separates_request_latency_and_per_sequence_cost():
    """Client TTFTs (request latency + steps) beside decodes on a server whose front end costs 0.7 ms per
    streamed sequence and step (a CPU vLLM's): both are numbers of their own."""
    true = constants_of(load_profile("l4-llama3.2-3b"))
    true = StepConstants(**{**true.to_dict(), "request_latency_s": 0.004, "sequence_s": 0.0007})
    observations = [Observation("ttft", o.label, o.steps, true.predict_s(Observation("ttft", "", o.steps, 0.0)))
                    if o.kind == "prefill" else o for o in synthetic(true, noise=0.0, seed=0)]
    found = fit(observations).constants
    for name, ratio in found.ratios_to(true).items():
        assert ratio == pytest.approx(1, rel=1e-6), name


def test_fit_refuses_too_few_points_and_noise_in_one_line():
    true = constants_of(load_profile())
    with pytest.raises(FitError, match="at least") as few:
        fit(synthetic(true, 0.0, 0)[: MIN_OBSERVATIONS - 1])
    rng = random.Random(3)
    noisy = [Observation(o.kind, o.label, o.steps, rng.uniform(0.001, 1.0)) for o in synthetic(true, 0.0, 0)]
    with pytest.raises(FitError, match="too noisy") as noise:
        fit(noisy)
    for error in (few.value, noise.value):
        assert "\n" not in str(error) and error.exit_code == 2


def test_calibrate_recovers_the_profile_of_a_simulator(tmp_path, capsys):
    """Without --max-num-seqs the burst measures the hidden 16 (the quick design's largest decode group)."""
    hidden = write_profile(tmp_path, {"efficiency.bandwidth": 0.6, "efficiency.mfu": 0.5, "engine.max_num_seqs": 16})
    out = tmp_path / "twin.yaml"
    with simulator("--profile", str(hidden)) as sim:
        # --max-residual 0.5: on a loaded CI machine client-timed decodes stall; the refusal has its own test.
        code = main(["calibrate", "--host", sim.url, "--out", str(out), "--design", "quick", "--max-residual", "0.5"])
    assert code == 0, capsys.readouterr().err
    twin, truth = load_profile(out), load_profile(hidden)
    # KV read per token is the faintest term here (a third of the largest decode step): client-timed decodes on
    # a shared machine move it most.
    assert_close(constants_of(twin), constants_of(truth), tolerance=0.10, attention_tolerance=0.35, kv_tolerance=0.3)
    floor_s = truth.decode_step_s(1)
    assert constants_of(twin).sequence_s < 0.03 * floor_s  # the simulator's front end costs its steps nothing
    assert twin.kv_capacity_tokens == truth.kv_capacity_tokens  # read from vllm:cache_config_info, not fitted
    assert twin.model.max_context_tokens == truth.model.max_context_tokens
    assert twin.engine.max_num_seqs == 16
    assert "max_num_seqs 16 from a burst of 64 requests: at most 16 running while others waited" in out.read_text()
    sidecar = json.loads((tmp_path / "twin.probe.json").read_text())
    assert sidecar["prefix_caching"] == "on"
    assert len(sidecar["observations"]) >= MIN_OBSERVATIONS
    assert {o["kind"] for o in sidecar["observations"]} == {"prefill", "itl"}  # the simulator tells prefill times
    # so the time outside its steps is measured beside them: client TTFT minus the prefill, one per cold length
    assert len(sidecar["front_end_s"]) == 5 and all(seconds > 0 for _, seconds in sidecar["front_end_s"])
    assert "residual" in out.read_text().splitlines()[4]  # the comment block says how well it fits
    assert "calibrate: cold prefill" in capsys.readouterr().err  # progress lines



def test_a_server_without_prefix_caching_gets_a_twin_without_it(tmp_path, capsys):
    """The shared-prefix pair finds the server caches nothing: the twin's engine does not either, so on an
    agent workload (every turn resends the conversation) it holds fewer agents than the same twin caching."""
    hidden = write_profile(tmp_path, {"engine.enable_prefix_caching": False, "engine.max_num_seqs": 64})
    out = tmp_path / "twin.yaml"
    with simulator("--profile", str(hidden)) as sim:
        code = main(["calibrate", "--host", sim.url, "--out", str(out), "--design", "quick", "--max-residual", "0.5",
                     "--max-num-seqs", "64"])
    assert code == 0, capsys.readouterr().err
    assert "prefix caching off" in capsys.readouterr().err
    twin = load_profile(out)
    assert twin.engine.enable_prefix_caching is False
    assert "Prefix caching on the server: off (so engine.enable_prefix_caching false)" in (
        out.read_text())
    caching = tmp_path / "caching.yaml"
    caching.write_text(out.read_text().replace("enable_prefix_caching: false", "enable_prefix_caching: true"))
    # to 96 agents: without caching the twin holds ~54, with it it never fails there (~220 past it)
    options = ["--trajectories", "demo", "--warmup-s", "5", "--window-s", "15", "--max-agents", "96", "--json",
               "--no-band"]
    answers = {}
    for name, profile in (("off", out), ("on", caching)):
        assert main(["predict", "--profile", str(profile), *options]) == 0
        answers[name] = json.loads(capsys.readouterr().out)["capacity"]["aa-20tps"]["agents"] or 0
    assert answers["off"] < answers["on"], answers


@pytest.mark.parametrize("case", ["queued", "arrivals only", "no gauges"])
def test_the_burst_reads_max_num_seqs_only_where_requests_queued_for_a_slot(case):
    """Running while others wait is the limit; requests that wait only as they arrive (every one started
    before the first ended) show a limit of at least the burst; a server without the gauges, nothing."""
    plateau = [Gauges(3, 61), Gauges(8, 56), Gauges(8, 40), Gauges(8, 0)]
    found = {"queued": read_limit(plateau, 64, started=8),
             "arrivals only": read_limit([Gauges(20, 44), Gauges(64, 0)], 64, started=64),
             "no gauges": read_limit((), 64, started=64)}[case]
    assert found.value == {"queued": 8, "arrivals only": None, "no gauges": None}[case]
    assert {"queued": "at most 8 running while others waited", "arrivals only": "at least 64",
            "no gauges": "not measured"}[case] in found.note


class _NoGauges:
    """A probe client of a server whose /metrics has no queue gauges (here: none at all)."""

    def metrics_text(self):
        return None


def test_without_the_gauges_calibrate_keeps_max_num_seqs_and_says_so_in_one_line(capsys):
    limits = Limits(400_000, 131072, 256, 8192)
    kept, sources = _measured_seqs(_NoGauges(), limits, {"max_num_seqs": "vLLM's default (--max-num-seqs not given)"})
    assert kept == limits and "not measured" in sources["max_num_seqs"]
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "max_num_seqs 256 kept" in lines[1] and "no gauges" in lines[1]


def test_the_burst_fits_in_half_the_kv_cache():
    assert burst_size(10**6) == BURST_REQUESTS
    small = burst_size(4000)
    assert 1 <= small < BURST_REQUESTS and small * (BURST_PROMPT_TOKENS + BURST_OUTPUT_TOKENS) <= 2000


def test_the_probe_sends_no_decode_group_larger_than_max_num_seqs():
    """A group larger than the sequences the server runs at once never decodes all together: not sent."""
    assert DESIGNS["quick"].fitted_to(131072, 10**6, 256).decode_batches == (1, 4, 16)
    assert DESIGNS["quick"].fitted_to(131072, 10**6, 8).decode_batches == (1, 4)


def test_predict_repeats_gives_the_median_search_and_the_range_over_seeds(capsys):
    """``--repeats 4`` is four searches at seeds 2-5, each what ``--seed k`` alone answers; the answer per tier
    is the lower-median search's own (status and first failing count), beside the range they span."""
    options = ["--profile", "l4-llama3.2-3b", "--trajectories", "demo", "--warmup-s", "5", "--window-s", "15"]
    assert main(["predict", *options, "--seed", "2", "--repeats", "4", "--json"]) == 0
    repeated = json.loads(capsys.readouterr().out)
    assert repeated["repeats"]["seeds"] == [2, 3, 4, 5]
    alone = {}
    for seed in (2, 3, 4, 5):
        assert main(["predict", *options, "--seed", str(seed), "--json"]) == 0
        alone[seed] = json.loads(capsys.readouterr().out)["capacity"]
    for tier, found in repeated["repeats"]["agents"].items():
        each = [alone[seed][tier]["agents"] or 0 for seed in (2, 3, 4, 5)]
        assert found == each
        median_seed = sorted((2, 3, 4, 5), key=lambda seed: (alone[seed][tier]["agents"] or 0, seed))[1]
        assert repeated["capacity"][tier] == {**alone[median_seed][tier], "range": [min(each), max(each)]}
    first = repeated["repeats"]["agents"]["aa-20tps"]
    assert len(set(first)) > 1  # the seeds do draw different coincidences: the test sees a real median
    assert main(["predict", *options, "--seed", "2", "--repeats", "4"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("20 tok/s"))
    assert line.endswith(f"; the searches found {min(first)}-{max(first)}")
    assert line.split()[6] == str(repeated["capacity"]["aa-20tps"]["agents"])


def test_a_speed_spread_runs_each_search_on_a_server_slowed_or_sped_by_its_quantile(capsys):
    """``--repeats 3 --speed-spread 0.5``: the seeds' searches on servers exp(0.5 z) as slow at z = 0, -0.97,
    0.97 (1, 0.62, 1.62: nearest 1 first). The first is the unspread search at its seed, exactly; the faster
    server holds more agents at the headline tier than the same seed's unspread search, the slower one
    fewer, so the range is wider than the seeds' alone."""
    options = ["--profile", "l4-llama3.2-3b", "--trajectories", "demo", "--warmup-s", "5", "--window-s", "15",
               "--seed", "2", "--repeats", "3", "--json"]
    assert main(["predict", *options]) == 0
    seeds_only = json.loads(capsys.readouterr().out)
    assert main(["predict", *options, "--speed-spread", "0.5"]) == 0
    spread = json.loads(capsys.readouterr().out)
    assert seeds_only["repeats"]["speed_factors"] == []
    assert spread["repeats"]["speed_factors"] == pytest.approx([1.0, math.exp(-0.5 * 0.9674), math.exp(0.5 * 0.9674)],
                                                               rel=1e-3)
    middle, fast, slow = spread["repeats"]["agents"]["aa-20tps"]
    alone = seeds_only["repeats"]["agents"]["aa-20tps"]
    assert (middle == alone[0], fast > alone[1], slow < alone[2]) == (True, True, True), (spread["repeats"], alone)
    assert spread["steps"] == seeds_only["steps"]  # the JSON's steps are the search at --seed, unmoved
    assert spread["capacity"]["aa-20tps"]["range"][1] - spread["capacity"]["aa-20tps"]["range"][0] > (
        max(alone) - min(alone))
    assert main(["predict", *options[:-1], "--speed-spread", "0.5"]) == 0
    assert "3 searches at seeds 2-4 on servers 0.62-1.62x as slow, their median" in capsys.readouterr().out


@pytest.mark.parametrize("value, repeats, expected", [
    ("-0.1", "8", "expected a number from 0 to 1"), ("1.5", "8", "expected a number from 0 to 1"),
    ("wide", "8", "expected a number from 0 to 1"), ("nan", "8", "expected a number from 0 to 1"),
    ("0.2", "1", "needs --repeats 2 or more")])
def test_a_bad_speed_spread_is_one_line(value, repeats, expected, capsys):
    assert main(["predict", "--profile", "l4-llama3.2-3b", "--repeats", repeats, "--speed-spread", value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("agentperf: error: --speed-spread: ") and expected in err[0], err


@pytest.mark.parametrize("value", ["0", "101", "two", "-1"])
def test_a_bad_repeats_is_one_line(value, capsys):
    assert main(["predict", "--profile", "l4-llama3.2-3b", "--repeats", value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--repeats: expected a whole number from 1 to 100" in err[0]


def test_predict_gives_the_truth_of_the_profile(tmp_path, capsys):
    profile = write_profile(tmp_path, {"engine.max_num_seqs": 4})
    trajectories = tmp_path / "flat.yaml"
    trajectories.write_text(yaml.safe_dump({"agentperf": 1, "name": "flat", "trajectories": [
        {"id": f"t{i}", "turns": [{"messages": [{"role": "user", "content_tokens": 100}], "output_tokens": 100}]}
        for i in range(6)]}))
    slo = tmp_path / "slo.yaml"
    slo.write_text(yaml.safe_dump({"tiers": [
        {"name": "tight", "ttft_max_s": 0.1, "output_tps_min": 1.0, "scope": "request", "quantile": 0.95}]}))
    options = ["--profile", str(profile), "--trajectories", str(trajectories), "--slo", str(slo), "--tool-wait", "none",
               "--start-agents", "2", "--max-agents", "16", "--warmup-s", "5", "--window-s", "20",
               "--agent-spawn-rate", "100"]
    assert main(["truth", *options]) == 0
    truth = json.loads(capsys.readouterr().out)
    assert main(["predict", *options, "--json"]) == 0
    predicted = json.loads(capsys.readouterr().out)
    assert predicted["capacity"] == truth["capacity"]
    assert truth["capacity"]["tight"]["agents"] == 4  # max_num_seqs: one agent more queues past the TTFT limit
    assert predicted["bands"]["tight"] == {"passes_up_to": 4, "fails_above": 4, "measured_up_to": 6}  # 1.2 x 5
    assert main(["predict", *options]) == 0
    assert "4 agents (fails at 5); verdicts monotone to 6 agents" in capsys.readouterr().out
    assert main(["predict", *options, "--no-band", "--json"]) == 0
    assert "bands" not in json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("repeats", ["1", "3"])
def test_predict_gives_each_tiers_verdict_band_around_its_answer(repeats, capsys):
    """The band is the truth's verdict at every count up to a fifth past the highest first failing count, at
    --seed on the profile as given, where a count's verdict is the search's at that seed (a restarted step
    depends on its count and seed alone): the search's first failure lies past every count that passed from
    1 up, its answer at or below the last pass, and where the band is monotone the two meet. The line says it."""
    options = ["--profile", "l4-llama3.2-3b", "--trajectories", "demo", "--warmup-s", "5", "--window-s", "15",
               "--seed", "3", "--repeats", repeats]
    assert main(["predict", *options, "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert main(["predict", *options, "--repeats", "1", "--json"]) == 0
    at_seed = json.loads(capsys.readouterr().out)["capacity"]
    failing = max(cap["first_failing_agents"] for cap in found["capacity"].values() if cap["first_failing_agents"])
    for tier, band in found["bands"].items():
        assert band["measured_up_to"] == math.ceil(1.2 * failing)
        agents = at_seed[tier]["agents"] or 0
        assert band["passes_up_to"] < at_seed[tier]["first_failing_agents"] and agents <= band["fails_above"]
        if band["passes_up_to"] == band["fails_above"]:
            assert agents == band["passes_up_to"], (tier, band, at_seed[tier])
    assert main(["predict", *options]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("20 tok/s"))
    assert ("; at seed 3, " if repeats == "3" else "; ") + band_words(found["bands"]["aa-20tps"]) in line


def test_a_tier_that_never_failed_has_no_band(capsys):
    """--max-agents under the headline tier's knee: it never fails, so it has no knee to band; the tiers that
    fail at 1 agent are judged to a fifth past that (2 agents)."""
    options = ["--profile", "l4-llama3.2-3b", "--trajectories", "demo", "--warmup-s", "5", "--window-s", "15",
               "--max-agents", "6"]
    assert main(["predict", *options, "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["capacity"]["aa-20tps"]["status"] == "never_failed"
    assert sorted(found["bands"]) == ["example-100tps", "example-60tps"]
    assert all(band["measured_up_to"] == 2 for band in found["bands"].values())
    assert main(["predict", *options]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("20 tok/s"))
    assert "verdicts" not in line


@pytest.mark.parametrize("band, words", [
    ({"passes_up_to": 8, "fails_above": 8, "measured_up_to": 11}, "verdicts monotone to 11 agents"),
    ({"passes_up_to": 6, "fails_above": 9, "measured_up_to": 49}, "true verdicts flip between 7 and 9 agents"),
    ({"passes_up_to": 0, "fails_above": 0, "measured_up_to": 5}, "verdicts monotone to 5 agents")])
def test_a_verdict_band_in_words(band, words):
    assert band_words(band) == words


def calibrate_error(tmp_path, capsys, host: str) -> str:
    out = tmp_path / "twin.yaml"
    out.write_text("an older profile\n")
    assert main(["calibrate", "--host", host, "--out", str(out), "--design", "quick", "--request-timeout", "10"]) == 2
    assert out.read_text() == "an older profile\n"  # nothing written over it
    assert not (tmp_path / "twin.probe.json").exists()
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err
    return lines[0]


def test_calibrate_against_a_closed_port_is_one_line(tmp_path, capsys):
    line = calibrate_error(tmp_path, capsys, f"http://127.0.0.1:{free_port()}")
    assert "connection refused" in line and "start the server" in line


def test_calibrate_against_a_server_that_is_not_openai_is_one_line(tmp_path, capsys):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                               "--directory", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _answers(f"http://127.0.0.1:{port}/"), 20, "http.server", server)
        line = calibrate_error(tmp_path, capsys, f"http://127.0.0.1:{port}")
    finally:
        server.terminate()
        server.wait(10)
    assert "HTTP 404" in line and "OpenAI-compatible" in line


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


def test_a_profile_prices_each_decoding_sequence_outside_the_roofline(tmp_path):
    """``efficiency.sequence_overhead_ms`` (what calibrate writes for a CPU server) adds to every decode step
    per sequence, and a profile without it prices steps as before."""
    plain = load_profile(write_profile(tmp_path, {}))
    costed = load_profile(write_profile(tmp_path, {"efficiency.sequence_overhead_ms": 0.5}))
    assert costed.decode_step_s(4) - plain.decode_step_s(4) == pytest.approx(4 * 0.5e-3)
    assert costed.step_time_s(prefill_tokens=512) == plain.step_time_s(prefill_tokens=512)
    assert constants_of(costed).sequence_s == pytest.approx(0.5e-3)


def off_by(found: StepConstants, true: StepConstants) -> dict[str, float]:
    """Relative error of the decode floor (overhead + weights: a run, like a probe, pins their sum) and of
    the KV, compute and attention terms."""
    floor = (found.overhead_s + found.weights_s) / (true.overhead_s + true.weights_s)
    ratios = found.ratios_to(true)
    return {"floor": abs(floor - 1), **{name: abs(ratios[name] - 1) for name in
                                        ("kv_s_per_token", "compute_s_per_token", "attention_s_per_pair")}}


def truth_run(tmp_path, profile, max_agents: int = 24) -> tuple:
    """A run folder as ``agentperf capacity`` leaves one (records/ with every request, cancelled ones too),
    written from the truth's search on the virtual clock of ``profile`` (the default set and tiers)."""
    parser = argparse.ArgumentParser()
    truth.add_arguments(parser)
    args = parser.parse_args(["--profile", str(profile), "--max-agents", str(max_agents), "--window-s", "30",
                              "--warmup-s", "10"])
    result = truth.find_capacity(load_profile(profile), load_trajectories(args.trajectories), load_slo(None),
                                 SearchParameters.from_options(args), replay.ReplaySettings.from_options(args),
                                 keep_records=True)
    folder = tmp_path / "run"
    writer = RecordWriter(folder / "records", "truth")
    for record in result.records:
        writer.write(record)
    writer.close()
    return folder, result


@pytest.mark.parametrize("server_tokens", [1.0, 1.25, None])
def test_calibrate_from_a_run_recovers_the_decode_and_prefill_constants(tmp_path, capsys, server_tokens):
    """A run's records alone (no server metrics: TTFTs for the prefill) give the profile's constants back.

    Measured (this profile: the default's bandwidth x 0.6 and MFU x 0.5; a search to 24 agents): decode
    floor (overhead + weights) 1.7 % off, KV read per token 6.6 %, compute per token 12 %, attention per
    pair 19 % (the prefill terms come from TTFTs, which wait part of another request's step). Asserted
    loosely: 3 %, 10 %, 20 %, 35 %.

    ``server_tokens``: the same run on a server whose tokenizer counts 1.25 tokens per agentperf token (its
    usage says 1.25x, its timings are the same): the records' two counts give that scale, and the profile is
    priced per agentperf token again, the same constants; the KV cache's size, given in server tokens, is
    1.25x fewer of agentperf's. None: records from before agentperf kept its own count, which give no scale.
    """
    hidden = write_profile(tmp_path, {"efficiency.bandwidth": 0.6, "efficiency.mfu": 0.5})
    folder, result = truth_run(tmp_path, hidden)
    assert any(r.status.value == "cancelled" and r.ttft_s is not None for r in result.records)
    assert all(r.counted_prompt_tokens == r.prompt_tokens for r in result.records)  # the simulator counts as we do
    if server_tokens != 1.0:
        rewrite_records(folder, result.records, server_tokens)
    out = tmp_path / "twin.yaml"
    limits = ["--kv-cache-tokens", "400000", "--max-model-len", "131072", "--max-num-seqs", "1024"]
    assert main(["calibrate", "--from-run", str(folder), "--out", str(out), *limits]) == 0
    err = capsys.readouterr().err
    assert "client TTFTs" in err and "Not measured by a run (kept): kv_capacity_tokens from --kv-cache-tokens" in err
    assert (f"token scale {server_tokens:.3f} server tokens per agentperf token" if server_tokens
            else "token scale 1: the records carry no agentperf count") in err
    errors = off_by(constants_of(load_profile(out)), constants_of(load_profile(hidden)))
    assert errors["floor"] < 0.03 and errors["kv_s_per_token"] < 0.10, errors
    assert errors["compute_s_per_token"] < 0.20 and errors["attention_s_per_pair"] < 0.35, errors
    # kept from the option (the run did not measure it), in agentperf tokens
    assert load_profile(out).kv_capacity_tokens == pytest.approx(400_000 / (server_tokens or 1.0), abs=1)
    sidecar = json.loads((tmp_path / "twin.probe.json").read_text())
    assert {o["kind"] for o in sidecar["observations"]} == {"decode", "ttft"} and sidecar["design"] == "run"


def test_a_run_on_a_server_without_prefix_caching_gives_a_twin_without_it(tmp_path, capsys):
    """No request of the run hit the cache though the server reported each one's cached tokens: an agent
    resends its conversation every turn, so the server caches nothing, and neither does its twin."""
    hidden = write_profile(tmp_path, {"engine.enable_prefix_caching": False})
    folder, result = truth_run(tmp_path, hidden, max_agents=8)
    out = tmp_path / "twin.yaml"
    limits = ["--kv-cache-tokens", "400000", "--max-model-len", "131072", "--max-num-seqs", "1024"]
    assert main(["calibrate", "--from-run", str(folder), "--out", str(out), *limits]) == 0, capsys.readouterr().err
    assert load_profile(out).engine.enable_prefix_caching is False
    assert "Prefix caching on the server: off (the server reported no cached token on any of " in out.read_text()


@pytest.mark.parametrize("reported, hits, said", [(200, 3, "on"), (200, 0, "off"), (19, 0, "unknown"),
                                                   (0, 0, "unknown")])
def test_what_a_run_says_of_prefix_caching(reported, hits, said):
    points = RunPoints((), 200, "", 1, (1.0, 1.0), (1, 1), cache_reported=reported, cache_hits=hits)
    assert points.prefix_caching().split()[0] == said


def rewrite_records(folder, records, server_tokens: float | None) -> None:
    """The run's records as a server counting ``server_tokens`` per agentperf token reports them (None: as
    records from before ``counted_prompt_tokens`` was kept, which lack it)."""
    writer_path = folder / "records" / "records-truth.jsonl"
    lines = []
    for record in records:
        if server_tokens is None:
            data = json.loads(record.to_json())
            del data["counted_prompt_tokens"]
            lines.append(json.dumps(data))
            continue
        scaled = {key: round(getattr(record, key) * server_tokens) if getattr(record, key) is not None else None
                  for key in ("prompt_tokens", "cached_tokens")}
        lines.append(dataclasses.replace(record, **scaled).to_json())
    writer_path.write_text("\n".join(lines) + "\n")


def stored_probe(tmp_path, true: StepConstants) -> Path:
    """A probe sidecar as calibrate stores it: exact synthetic timings of ``true``, limits 300,000 KV tokens,
    131,072 context, 1,024 sequences, :data:`BUDGET_TOKENS` a step."""
    probe = tmp_path / "probe.probe.json"
    probe.write_text(json.dumps({
        "server": "http://127.0.0.1:1", "model": "m", "design": "standard", "prefix_caching": "on", "token_scale": 1.0,
        "limits": dict(zip(LIMIT_NAMES, (300_000, 131072, 1024, BUDGET_TOKENS))),
        "limit_sources": {n: "probe" for n in LIMIT_NAMES},
        "observations": [o.to_dict() for o in synthetic(true, 0.0, 0)]}))
    return probe


def test_a_stored_probe_is_priced_for_the_limits_given_as_options(tmp_path):
    """The same timings for a server set up with fewer sequence slots: the option's limit, named in the header
    with what the probe had; the limits not given stay the probe's, and the fitted constants are the same."""
    probe = stored_probe(tmp_path, constants_of(load_profile(write_profile(tmp_path, {}))))
    kept, slots = tmp_path / "kept.yaml", tmp_path / "slots.yaml"
    assert main(["calibrate", "--from-probe", str(probe), "--out", str(kept)]) == 0
    assert main(["calibrate", "--from-probe", str(probe), "--max-num-seqs", "3", "--out", str(slots)]) == 0
    before, after = load_profile(kept), load_profile(slots)
    assert (before.engine.max_num_seqs, after.engine.max_num_seqs) == (1024, 3)
    assert after.engine.max_num_batched_tokens == before.engine.max_num_batched_tokens == BUDGET_TOKENS
    assert after.kv_capacity_tokens == before.kv_capacity_tokens == 300_000
    assert constants_of(after) == constants_of(before)
    assert "max_num_seqs 3 from --max-num-seqs (the probe's 1024 from probe)" in slots.read_text()
    assert "max_num_seqs 1024 from probe" in kept.read_text()


def test_a_runs_rechecks_say_how_far_its_server_drifted(tmp_path):
    """The headline tier's recheck changes (log ratios) give sigma = rms / sqrt 2, each change printed as a
    speed change; a run without rechecks, without a report or with only non-finite changes gives none."""
    report = {"capacity": {"aa-20tps": {"drift": [{"agents": 8, "change": math.log(1.16)},
                                                   {"agents": 9, "change": math.log(0.75)},
                                                   {"agents": 9, "change": None}]},
                           "example-60tps": {"drift": [{"agents": 8, "change": 3.0}]}}}
    (tmp_path / "report.json").write_text(json.dumps(report))
    drift = recheck_drift(tmp_path)
    assert drift.changes == pytest.approx((math.log(1.16), math.log(0.75)))
    assert drift.speed_spread == pytest.approx(math.sqrt((math.log(1.16) ** 2 + math.log(0.75) ** 2) / 4))
    assert "speed move +16 %, -25 %" in drift.words() and "--speed-spread 0.16 " in drift.words()
    for capacity in ({"aa-20tps": {"drift": []}}, {"aa-20tps": {"drift": [{"change": None}]}}, {}):
        (tmp_path / "report.json").write_text(json.dumps({"capacity": capacity}))
        assert recheck_drift(tmp_path) is None
    assert recheck_drift(tmp_path / "absent") is None


def test_calibrate_from_a_probe_and_a_run_uses_both(tmp_path, capsys):
    """A stored probe's timings (exact, synthetic) and a run's together: the probe's limits are kept, and the
    terms the probe pins come back. Measured: floor 0.06 %, compute 0.07 %, attention 2.7 %, KV read per
    token 6.7 % (the run's decode phases, at contexts up to 400k tokens, pull it: as with the run alone).
    Asserted: 3 %, and 10 % for KV."""
    hidden = write_profile(tmp_path, {"efficiency.bandwidth": 0.6, "efficiency.mfu": 0.5})
    true = constants_of(load_profile(hidden))
    probe = stored_probe(tmp_path, true)
    folder, _ = truth_run(tmp_path, hidden, max_agents=8)
    (folder / "report.json").write_text(json.dumps({"capacity": {"aa-20tps": {"drift": [{"change": math.log(0.8)}]}}}))
    out = tmp_path / "twin.yaml"
    assert main(["calibrate", "--from-probe", str(probe), "--from-run", str(folder), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "fitted the probe and the run" in err
    assert "the run's rechecks measured the server's speed move -20 %" in err and "--speed-spread 0.16 " in err
    errors = off_by(constants_of(load_profile(out)), true)
    assert errors["kv_s_per_token"] < 0.10, errors
    assert max(errors["floor"], errors["compute_s_per_token"], errors["attention_s_per_pair"]) < 0.03, errors
    assert load_profile(out).kv_capacity_tokens == 300_000  # the probe's
    assert "--design standard --from-run" in out.read_text().splitlines()[0]


@pytest.mark.parametrize("case", ["no folder", "no records", "too few", "no limits"])
def test_calibrate_from_a_run_that_cannot_fit_is_one_line(tmp_path, capsys, case):
    folder = tmp_path / "run"
    limits = ["--kv-cache-tokens", "400000", "--max-model-len", "131072"]
    if case != "no folder":
        (folder / "records").mkdir(parents=True)
    if case in ("too few", "no limits"):
        folder, _ = truth_run(tmp_path, write_profile(tmp_path, {}), max_agents=1)
        records = (folder / "records" / "records-truth.jsonl").read_text().splitlines()
        (folder / "records" / "records-truth.jsonl").write_text("\n".join(records[:3]) + "\n")
    if case == "no limits":
        limits = []
    out = tmp_path / "twin.yaml"
    assert main(["calibrate", "--from-run", str(folder), "--out", str(out), *limits]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert {"no folder": "no records/ folder", "no records": "no request that ended with tokens",
            "too few": "the fit needs at least", "no limits": "--kv-cache-tokens"}[case] in err[0]
    assert not out.exists() and not (tmp_path / "twin.probe.json").exists()


def _record(start: float, ttft: float, end: float, output: int, prompt: int, cached: int) -> RequestRecord:
    return RequestRecord(run_id="r", worker_id="w", agent=0, trajectory="t", turn=0, load_step=0,
                         scheduled_start_epoch_s=start, start_epoch_s=start, end_epoch_s=end, ttfb_s=ttft, ttft_s=ttft,
                         e2e_s=end - start, itl_p50_s=None, itl_p95_s=None, itl_max_s=None, output_tokens=output,
                         output_tokens_estimated=False, prompt_tokens=prompt, cached_tokens=cached, output_tps=None,
                         status=Status.OK)


def test_a_runs_points_read_the_prefill_clock_and_the_decode_phases(tmp_path):
    """Three requests and five readings of the server's prefill histogram, worked by hand: a window's points
    are the prefill steps of the requests that ended in it (vLLM observes a request's prefill time when it
    finishes; two whose first tokens came together share one step), a window whose count the records do
    not match is left out, and a decode phase is its pure steps at the phase's mean load plus the step of
    the prefill that came inside it."""
    writer = RecordWriter(tmp_path / "records", "w")
    for record in (_record(100.0, 0.05, 101.0, 20, 1000, 0), _record(100.5, 0.1, 102.0, 30, 2000, 1000),
                   _record(100.55, 0.05, 101.6, 5, 500, 0)):
        writer.write(record)
    writer.close()
    # ends: the first request at 101.0, the third at 101.6, the second at 102.0; the last reading: no record
    readings = [(99.9, 0.0, 0), (101.2, 0.04, 1), (101.7, 0.14, 2), (102.5, 0.24, 3), (103.0, 0.30, 4)]
    (tmp_path / "server_metrics.jsonl").write_text("".join(
        ServerSample(at, "vllm", {}, {"prefill_time": HistogramValue(total, count, ((math.inf, count),))}).to_json()
        + "\n" for at, total, count in readings))
    points = read_run_points(tmp_path, 8192, 256)
    prefill = [o for o in points.observations if o.kind == "prefill"]
    assert [o.measured_s for o in prefill] == pytest.approx([0.04, 0.10, 0.10])
    assert prefill[0].steps == (StepWork(1000, 0, attention_pairs(1000, 0), 0, 0),)
    assert prefill[1].steps == prefill[2].steps  # the second and third requests' first tokens came from one step
    (shared,) = prefill[1].steps
    assert shared.repeat == 1 and shared.decode_batch == 1  # the first request was decoding then
    assert shared.decode_context_tokens == pytest.approx(1001 + 19 / 0.95 * 0.55)
    assert (shared.prefill_tokens, shared.prefill_context_tokens) == (1500, 1000)
    assert shared.prefill_attention_pairs == attention_pairs(1000, 1000) + attention_pairs(500, 0)
    decode = {o.label.split(" ")[2]: o for o in points.observations if o.kind == "decode"}
    assert set(decode) == {"20", "30"}  # the 5-token request is too short to say much
    pure, mixed = decode["20"].steps
    assert pure.repeat == 18 and mixed.prefill_tokens == 1500 and decode["20"].measured_s == pytest.approx(0.95)
    assert pure.decode_batch == pytest.approx((0.95 + 0.4 + 0.4) / 0.95)  # itself, then two more from 100.6
    assert "prefill clock" in points.prefill_source
