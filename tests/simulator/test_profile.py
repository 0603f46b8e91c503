"""Profiles: the bundled ones load and land near their published anchors; malformed ones fail in one line."""

from __future__ import annotations

import math
import statistics

import pytest

from agentperf_users.simulator.engine import Engine
from agentperf_users.simulator.profile import (
    DEFAULT_PROFILE,
    GIB,
    ProfileError,
    attention_pairs,
    list_profiles,
    load_profile,
)
from tests.simulator import custom_profile, write_profile

ANCHOR_TOLERANCE = 0.25
REQUIRED_PROFILES = {"h100-llama3.1-8b", "h200-llama3.1-8b", "4xh100-llama3.1-70b", "h100-gpt-oss-120b",
                     "l4-llama3.2-3b"}


def test_bundled_profiles_all_load_and_default_is_first_class():
    assert REQUIRED_PROFILES <= set(list_profiles())
    assert DEFAULT_PROFILE in list_profiles()
    for name in list_profiles():
        profile = load_profile(name)
        assert profile.name == name
        assert profile.kv_capacity_tokens >= profile.model.max_context_tokens
        assert profile.describe()["kv_capacity_tokens"] == profile.kv_capacity_tokens


@pytest.mark.parametrize("name", sorted(REQUIRED_PROFILES))
def test_derived_numbers_land_within_25_percent_of_the_profiles_anchors(name):
    described = load_profile(name).describe()
    for key, anchor in described["anchors"].items():
        assert described[key] == pytest.approx(anchor, rel=ANCHOR_TOLERANCE), key


def test_default_profile_matches_the_notes_anchors_on_every_headline_number():
    described = load_profile(DEFAULT_PROFILE).describe()
    assert set(described["anchors"]) == {"kv_capacity_tokens", "decode_step_b1_ms", "decode_step_b64_ms",
                                         "prefill_tok_s"}
    # The KV capacity follows from first principles too: 128 KiB per token for Llama-3.1-8B in BF16.
    assert described["kv_bytes_per_token"] == 2 * 32 * 8 * 128 * 2
    free_gib = 0.9 * 79.2 - 14.99 - 5.65
    assert described["kv_capacity_tokens"] == pytest.approx(free_gib * GIB / 131072, abs=16)


def test_tensor_parallel_and_sliding_window_kv_accounting():
    llama70 = load_profile("4xh100-llama3.1-70b")
    assert llama70.kv_bytes_per_token == 327680  # 320 KiB: 2 KV heads on each of 4 GPUs, 80 layers
    # The KV pool is four GPUs' worth of leftover memory after a quarter of the weights each.
    per_gpu_gib = 0.9 * 79.2 - 131.4 / 4 - 6.1
    assert llama70.kv_capacity_tokens == pytest.approx(4 * per_gpu_gib * GIB / 327680, abs=16)
    oss = load_profile("h100-gpt-oss-120b")
    assert oss.kv_bytes_per_token == 2 * 18 * 8 * 64 * 2  # only the 18 full-attention layers grow with context
    assert oss.window_blocks_per_request == 128 // 16 + 1  # equal sliding layers: one window (+1 block) each


def test_step_time_is_a_roofline_of_the_scheduled_work():
    profile = load_profile(DEFAULT_PROFILE)
    eff = profile.efficiency
    weights_s = profile.model.weights_gib * GIB / (profile.gpu.bandwidth_gb_s * 1e9 * eff.bandwidth)
    # Batch-1 decode with a tiny context is the weight stream plus overhead (memory-bound).
    assert profile.step_time_s(decode_batch=1, decode_context_tokens=1) == pytest.approx(
        eff.step_overhead_ms / 1e3 + weights_s, rel=1e-3)
    # A big prefill chunk is compute-bound: 2 FLOPs per parameter per token plus the attention pairs.
    chunk = 8192
    flops = 2 * profile.model.active_params_b * 1e9 * chunk + 4 * 32 * 128 * 32 * attention_pairs(chunk, 0)
    expected = eff.step_overhead_ms / 1e3 + flops / (profile.gpu.bf16_tflops * 1e12 * eff.mfu)
    pairs = attention_pairs(chunk, 0)
    assert profile.step_time_s(prefill_tokens=chunk, prefill_attention_pairs=pairs) == pytest.approx(expected)
    # Longer contexts cost more: KV read for decodes, attention FLOPs for prefill.
    assert profile.decode_step_s(64, 8192) > profile.decode_step_s(64, 2048) > profile.decode_step_s(64, 128)
    later_chunk = profile.step_time_s(prefill_tokens=chunk, prefill_context_tokens=32768,
                                      prefill_attention_pairs=attention_pairs(chunk, 32768))
    assert later_chunk > expected * 1.3


@pytest.mark.parametrize("name", ["h100-gpt-oss-120b", "l4-llama3.2-3b"])
@pytest.mark.parametrize("factor", [0.6, 1.3])
def test_a_slower_server_takes_each_step_and_front_end_charge_that_many_times_as_long(tmp_path, name, factor):
    """Every term of the step (overhead, per-sequence cost, the memory or compute roofline) scales alike, for
    an MoE too, and the front end's charges with them; the memory limits do not move."""
    base = load_profile(name)
    efficiency = {"efficiency.sequence_overhead_ms": 0.4, "efficiency.frontend_ms": 13.0,
                  "efficiency.frontend_ms_per_1k_tokens": 5.5}
    for profile in (base, load_profile(write_profile(tmp_path, efficiency, name))):
        slower = profile.slower(factor)
        for work in ({"decode_batch": 1, "decode_context_tokens": 1}, {"decode_batch": 48, "decode_context_tokens": 48 * 9000},
                     {"prefill_tokens": 8192, "prefill_attention_pairs": attention_pairs(8192, 4096),
                      "prefill_context_tokens": 4096, "decode_batch": 7, "decode_context_tokens": 7 * 3000}):
            assert slower.step_time_s(**work) == pytest.approx(factor * profile.step_time_s(**work), rel=1e-9)
        assert slower.frontend_s(6000) == pytest.approx(factor * profile.frontend_s(6000), rel=1e-9)
        assert (slower.kv_capacity_tokens, slower.engine) == (profile.kv_capacity_tokens, profile.engine)
    assert base.slower(factor).frontend_s(6000) == 0.0  # a GPU profile has no front-end charge to scale
    with pytest.raises(ValueError):
        base.slower(0.0)


def test_moe_reads_more_experts_as_the_batch_grows():
    dense, moe = load_profile(DEFAULT_PROFILE), load_profile("h100-gpt-oss-120b")
    dense_growth = dense.decode_step_s(8, 1) / dense.decode_step_s(1, 1)
    moe_growth = moe.decode_step_s(8, 1) / moe.decode_step_s(1, 1)
    assert dense_growth < 1.01  # the whole dense model is read every step anyway
    assert moe_growth > 1.5  # 8 tokens route to ~7x more experts than 1


def test_output_length_distribution_has_the_documented_median_and_p95():
    profile = load_profile(DEFAULT_PROFILE)
    assert profile.output_tokens.sigma == pytest.approx(math.log(2000 / 150) / 1.6449, rel=1e-4)
    engine = Engine(profile, seed=7)
    draws = sorted(engine.sample_output_tokens(100_000) for _ in range(20_000))
    assert statistics.median(draws) == pytest.approx(150, rel=0.1)
    assert draws[int(0.95 * len(draws))] == pytest.approx(2000, rel=0.15)

    def draws_of(engine: Engine) -> list[int]:
        return [engine.sample_output_tokens(5000) for _ in range(100)]

    first, second, other = (Engine(profile, seed=seed) for seed in (7, 7, 8))
    assert draws_of(first) == draws_of(second)
    assert draws_of(first) != draws_of(other)
    assert all(1 <= other.sample_output_tokens(64) <= 64 for _ in range(1000))


def test_load_by_path_uses_the_file_stem_as_name(tmp_path):
    path = write_profile(tmp_path, {"engine.max_num_seqs": 8})
    profile = load_profile(str(path))
    assert profile.name == "custom-profile"
    assert profile.engine.max_num_seqs == 8


@pytest.mark.parametrize(
    ("changes", "field", "expected"),
    [
        ({"gpu.colour": "green"}, "gpu.colour", "one of the keys"),
        ({"model.layers": "32"}, "model.layers", "a positive integer"),
        ({"model.layers": 32.5}, "model.layers", "integer"),
        ({"efficiency.mfu": ...}, "efficiency.mfu", "missing"),
        ({"gpu": ...}, "gpu", "missing"),
        ({"gpu.count": 0}, "gpu.count", "a positive number"),
        ({"efficiency.mfu": 1.5}, "efficiency.mfu", "a number in (0, 1.0]"),
        ({"engine.gpu_memory_utilization": True}, "engine.gpu_memory_utilization", "got True"),
        ({"model.name": ""}, "model.name", "a non-empty string"),
        ({"model.moe": {"experts": 8}}, "model.moe.experts_per_token", "missing"),
        ({"anchors.source": ...}, "anchors.source", "missing"),
        ({"engine.block_size": 32}, "engine.block_size", "16"),
        ({"model.max_context_tokens": 1_000_000}, "model.max_context_tokens", "fits the KV cache"),
        ({"model.weights_gib": 80.0}, "model.max_context_tokens", "fits the KV cache"),
        ({"output_tokens.p95_tokens": 100}, "output_tokens.p95_tokens", "more than median_tokens"),
    ],
)
def test_malformed_profile_fails_in_one_line_naming_file_and_field(tmp_path, changes, field, expected):
    path = write_profile(tmp_path, changes)
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {field}: expected ")
    assert expected in message
    assert "\n" not in message


def test_broken_yaml_and_unknown_names_are_one_line_errors(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("gpu:\n  name: [unclosed\n")
    with pytest.raises(ProfileError, match=rf"^{path}: line \d+: expected valid YAML"):
        load_profile(path)
    with pytest.raises(ProfileError, match="no such profile file; bundled profiles: .*h100-llama3.1-8b"):
        load_profile("a100-nonexistent")
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n")
    with pytest.raises(ProfileError, match=rf"^{top}: top level: expected a mapping"):
        load_profile(top)


def test_profile_objects_are_frozen(tmp_path):
    profile = custom_profile(tmp_path, {})
    with pytest.raises(AttributeError):
        profile.gpu.count = 2  # type: ignore[misc]
