"""Fitted step constants to a simulator profile and back.

A profile is written in physical terms (GPU bandwidth and TFLOPS, model layers and heads, memory), and
:class:`~agentperf_users.simulator.profile.StepCost` folds them into the five numbers a step costs. The
fit measures those five numbers, not the hardware, so the calibrated profile describes a *stand-in*
device: one GPU, efficiencies of 1, a fixed model shape (:data:`STAND_IN`, whose integer dimensions set
the KV bytes and attention FLOPs per token), and the continuous fields solved so that its ``StepCost``
gives exactly the fitted numbers: bandwidth from the KV cost per token, weight bytes from the weight
read time, TFLOPS from the cost per attention pair, active parameters from the cost per token, memory so
that the KV cache holds the server's blocks. Its hardware names say ``calibrated``; only its prices and
limits are the server's.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from agentperf_users.files import atomic_write
from agentperf_users.simulator.profile import (
    GIB,
    MAX_VALUE,
    Profile,
    SimulatorError,
    load_profile,
)
from agentperf_users.tokens import BLOCK_SIZE
from agentperf_users.twin.fit import FrontEndFit, StepConstants

STAND_IN = {"layers": 32, "attention_heads": 32, "kv_heads": 8, "head_dim": 128, "kv_bytes_per_value": 2}
"""The stand-in model's shape (Llama-3.1-8B's): 131,072 KV bytes per token, 524,288 FLOPs per attended pair."""
KV_BYTES_PER_TOKEN = 2 * STAND_IN["layers"] * STAND_IN["kv_heads"] * STAND_IN["head_dim"] * STAND_IN["kv_bytes_per_value"]
PAIR_FLOPS = 4 * STAND_IN["attention_heads"] * STAND_IN["head_dim"] * STAND_IN["layers"]
RESERVE_GIB = 0.001  # activation reserve: must be positive; the memory is sized around it
MEMORY_SLACK = 1e-6  # relative: keeps the floor() of the block count from losing a block to rounding
MAX_RATE = MAX_VALUE * 0.99  # GB/s and TFLOPS a profile may hold: a cost measured as ~0 becomes this fast
PLACEHOLDER_POWER_W = (700.0, 70.0)  # TDP and idle: the probe measures no power (the profile needs numbers)


@dataclass(frozen=True)
class Limits:
    """What the server told (or the options said) about its limits."""

    kv_capacity_tokens: int
    max_context_tokens: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_waiting_requests: int = 1000
    output_median_tokens: int = 150
    output_p95_tokens: int = 2000


def constants_of(profile: Profile) -> StepConstants:
    """The step constants a profile's ``StepCost`` uses (dense model, no sliding window, no MoE)."""
    if profile.model.moe or profile.model.sliding_window:
        raise SimulatorError(f"profile {profile.name}: MoE and sliding-window profiles have no five-number step cost")
    gpu, model, efficiency = profile.gpu, profile.model, profile.efficiency
    bandwidth = gpu.bandwidth_gb_s * 1e9 * gpu.count * efficiency.bandwidth
    flops = gpu.bf16_tflops * 1e12 * gpu.count * efficiency.mfu
    pair_flops = 4 * model.attention_heads * model.head_dim * model.layers
    return StepConstants(efficiency.step_overhead_ms / 1e3, model.weights_gib * GIB / bandwidth,
                         profile.kv_bytes_per_token / bandwidth, 2 * model.active_params_b * 1e9 / flops,
                         pair_flops / flops, sequence_s=(efficiency.sequence_overhead_ms or 0.0) / 1e3)


def profile_data(name: str, constants: StepConstants, limits: Limits, front_end: FrontEndFit | None = None,
                 prefix_caching: bool = True) -> dict:
    """The profile YAML's mapping whose ``StepCost`` prices steps as ``constants`` do (module docstring),
    whose engine charges ``front_end``'s work per request (absent: none) and caches prompt prefixes where
    the server does (``prefix_caching``)."""
    bandwidth_gb_s = min(MAX_RATE, KV_BYTES_PER_TOKEN / max(constants.kv_s_per_token, 1e-30) / 1e9)
    tflops = min(MAX_RATE, PAIR_FLOPS / max(constants.attention_s_per_pair, 1e-30) / 1e12)
    weights_gib = max(constants.weights_s, 1e-9) * bandwidth_gb_s * 1e9 / GIB
    active_params_b = max(constants.compute_s_per_token, 1e-15) * tflops * 1e12 / 2 / 1e9
    kv_gib = -(-limits.kv_capacity_tokens // BLOCK_SIZE) * BLOCK_SIZE * KV_BYTES_PER_TOKEN / GIB
    tdp_w, idle_w = PLACEHOLDER_POWER_W
    return {
        "description": f"calibrated by agentperf calibrate: {name}"[:500],
        "gpu": {"name": "calibrated", "count": 1, "memory_gib": (weights_gib + RESERVE_GIB + kv_gib) * (1 + MEMORY_SLACK),
                "bandwidth_gb_s": bandwidth_gb_s, "bf16_tflops": tflops, "tdp_w": tdp_w, "idle_w": idle_w},
        "model": {"name": name, "params_b": active_params_b, "active_params_b": active_params_b,
                  "weights_gib": weights_gib, **STAND_IN, "max_context_tokens": limits.max_context_tokens},
        "engine": {"max_num_seqs": limits.max_num_seqs, "max_num_batched_tokens": limits.max_num_batched_tokens,
                   "max_waiting_requests": limits.max_waiting_requests, "block_size": BLOCK_SIZE,
                   "gpu_memory_utilization": 1.0, "activation_reserve_gib": RESERVE_GIB,
                   "enable_prefix_caching": prefix_caching},
        "efficiency": {"bandwidth": 1.0, "mfu": 1.0, "step_overhead_ms": max(constants.overhead_s * 1e3, 1e-6),
                       **({"sequence_overhead_ms": constants.sequence_s * 1e3} if constants.sequence_s > 1e-9 else {}),
                       **_front_end_fields(front_end)},
        "output_tokens": {"median_tokens": limits.output_median_tokens, "p95_tokens": limits.output_p95_tokens},
    }


def _front_end_fields(front_end: FrontEndFit | None) -> dict:
    """The efficiency fields of a fitted front end; a term fitted as ~0 is left out (the loader wants > 0)."""
    if front_end is None:
        return {}
    fields = {"frontend_ms": front_end.fixed_s * 1e3, "frontend_ms_per_1k_tokens": front_end.per_token_s * 1e6}
    return {name: value for name, value in fields.items() if value > 1e-6}


def write_profile(path: Path, data: dict, header: str) -> Profile:
    """Write the profile YAML (``header`` as a comment block on top) in one rename, after checking that the
    simulator loads it: the file at ``path`` is the old one or a valid new one, never half of one."""
    comment = "".join(f"# {line}\n".replace("# \n", "#\n") for line in header.splitlines())
    text = comment + yaml.safe_dump(data, sort_keys=False)
    with tempfile.TemporaryDirectory(prefix="agentperf-calibrate-") as folder:
        trial = Path(folder) / path.name
        trial.write_text(text, encoding="utf-8")
        profile = load_profile(trial)  # ProfileError if the numbers make no valid profile
    atomic_write(path, text)
    return profile
