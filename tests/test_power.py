"""Measured power: the DCGM gauge read from a real simulator server, and the report's per-step means and
agents per megawatt at the capacity step."""

from __future__ import annotations

import pytest

from agentperf_users.errors import AgentperfError
from agentperf_users.measure.power import (
    DEFAULT_METRIC,
    PowerSample,
    PowerSampler,
    endpoint_name,
    mean_watts,
    read_samples,
    total_watts,
)
from agentperf_users.simulator.profile import load_profile
from tests.simulator import simulator
from tests.support import wait_for

EXPOSITION = f"""# HELP {DEFAULT_METRIC} Power draw.
# TYPE {DEFAULT_METRIC} gauge
{DEFAULT_METRIC}{{gpu="0",UUID="GPU-a"}} 301.5
{DEFAULT_METRIC}{{gpu="1",UUID="GPU-b"}} 298.5
DCGM_FI_DEV_GPU_TEMP{{gpu="0"}} 61
"""


def test_the_series_of_every_accelerator_are_summed_and_nothing_else():
    assert total_watts(EXPOSITION, DEFAULT_METRIC) == 600.0
    assert total_watts(EXPOSITION, "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION") is None


def test_a_window_averages_the_readings_inside_it():
    samples = [PowerSample(t, w) for t, w in ((9.5, 100.0), (10.0, 200.0), (11.0, 400.0), (12.0, 800.0))]
    assert mean_watts(samples, 10.0, 12.0) == 300.0  # half-open: 12.0 is the next window's
    assert mean_watts(samples, 20.0, 30.0) is None


def test_credentials_never_reach_the_report():
    assert endpoint_name("http://user:secret@dcgm:9400/metrics?token=x") == "http://dcgm:9400/metrics"


def test_a_torn_last_line_is_skipped_and_any_other_bad_line_named(tmp_path):
    path = tmp_path / "power.jsonl"
    path.write_text('{"epoch_s": 1.0, "watts": 70.0}\n{"epoch_s": 2.0, "wa')
    assert read_samples(path) == [PowerSample(1.0, 70.0)]
    path.write_text('{"epoch_s": 1.0}\n{"epoch_s": 2.0, "watts": 70.0}\n')
    with pytest.raises(AgentperfError, match=r"power\.jsonl:1: not a power sample"):
        read_samples(path)
    assert read_samples(tmp_path / "none.jsonl") == []


def test_the_sampler_reads_an_idle_simulators_gauge_once_a_second(tmp_path):
    profile = load_profile("l4-llama3.2-3b")
    with simulator("--profile", profile.name) as server:
        with PowerSampler(f"{server.url}/metrics", tmp_path / "power.jsonl", interval_s=0.2) as sampler:
            wait_for(lambda: len(read_samples(tmp_path / "power.jsonl")) >= 3, 30, "three power samples")
    samples = read_samples(tmp_path / "power.jsonl")
    assert len(samples) >= 3 and sampler.misses == 0
    idle = profile.gpu.count * profile.gpu.idle_w  # nothing ran: every accelerator at idle
    assert [sample.watts for sample in samples] == [pytest.approx(idle)] * len(samples)
    assert all(a.epoch_s < b.epoch_s for a, b in zip(samples, samples[1:]))
