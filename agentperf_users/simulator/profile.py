"""Performance profiles: one GPU setup serving one model, read from a strict YAML file.

A profile is everything the simulated engine needs to behave like a given deployment: how much KV cache
fits, how long one engine step takes for the work scheduled in it, the scheduler limits, and how long
replies are when a request does not pin its length. Bundled profiles live in ``profiles/*.yaml`` next to
this module; ``profiles/README.md`` derives every constant and states its source.

Why strict parsing: a typo in a profile silently changes the "known capacity" a load test is scored
against, so unknown keys, missing keys, wrong types and non-positive numbers are errors naming the file
and the field. Why a closed-form step time (see :class:`StepCost`): the capacity of a simulated server
must be computable, and a roofline with efficiency factors is what vidur, BLIS and llm-d use.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from agentperf_users.bounded import (
    InputError,
    is_single_line_text,
    load_yaml,
    one_line,
    read_text,
    short,
)
from agentperf_users.tokens import BLOCK_SIZE

PROFILES_DIR = Path(__file__).with_name("profiles")
DEFAULT_PROFILE = "h100-llama3.1-8b"
GIB = 1024**3
DESCRIBE_CONTEXT_TOKENS = 2048
"""Context length per sequence at which ``describe()`` reports decode step times (the notes' anchors)."""
P95_Z = 1.6448536269514722
"""Standard normal quantile of 0.95: turns the p95/median ratio into the lognormal's sigma."""


class SimulatorError(Exception):
    """Base of the simulator's errors; the message is one line fit to show a user or return to a client."""


class ProfileError(SimulatorError):
    """A profile file is malformed: ``"<file>: <field.path>: expected ..., got ..."``."""


MAX_PROFILE_BYTES = 1024 * 1024
"""A profile is a few dozen lines; anything larger is not one (and is not read whole into memory)."""
MAX_PROFILE_NODES = 10_000
"""YAML values a profile may hold with its aliases expanded (a bundled one has about a hundred)."""
MAX_VALUE = 10_000_000
"""Largest number any field may hold unless its metadata says otherwise: no GPU count, memory, layer
count, token count or rate of a real deployment is near it, while 1e300 or a 5000-digit integer would
overflow the step-time arithmetic or size the KV cache's per-block state beyond memory."""
MAX_KV_CAPACITY_TOKENS = 64 * 1024 * 1024
"""Most KV tokens a profile may give: the engine keeps per-block state (a few lists of ``blocks``
entries), so a cache sized from an absurd ``memory_gib`` would exhaust memory before serving."""
FRACTION = {"le": 1.0}
"""Field metadata: a number in (0, 1]. Every other number must be positive and at most ``MAX_VALUE``."""
MAX_DECODE_STEP_S = 10.0
"""Longest one-sequence decode step a profile may give: a tiny but positive bandwidth, TFLOPS or
efficiency (1e-300) passes every per-field check yet makes each step last longer than the universe."""
ANCHOR = {"le": 1e12}
"""Field metadata of a reference number: positive and at most 1e12 (KV tokens of a whole cluster)."""


@dataclass(frozen=True)
class GPU:
    name: str
    count: int
    """GPUs serving one engine with tensor parallelism (the TP degree)."""
    memory_gib: float
    """Per GPU, as CUDA reports it (e.g. 79.2 GiB for an 80 GB H100)."""
    bandwidth_gb_s: float
    bf16_tflops: float
    """Dense (not sparse) BF16 tensor-core peak per GPU."""
    tdp_w: float
    idle_w: float


@dataclass(frozen=True)
class SlidingWindow:
    layers: int
    tokens: int


@dataclass(frozen=True)
class MoE:
    experts: int
    experts_per_token: int
    expert_weights_gib: float
    """Resident bytes of all routed experts; the rest of ``weights_gib`` is read every step."""


@dataclass(frozen=True)
class Model:
    name: str
    params_b: float
    active_params_b: float
    """Parameters used per token (all of them for a dense model); FLOPs are 2 per active parameter."""
    weights_gib: float
    """Resident weight memory as vLLM logs it ("Model loading took ... GiB"), summed over GPUs."""
    layers: int
    attention_heads: int
    kv_heads: int
    head_dim: int
    kv_bytes_per_value: int
    max_context_tokens: int
    sliding_window: SlidingWindow | None = None
    moe: MoE | None = None


@dataclass(frozen=True)
class EngineLimits:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_waiting_requests: int
    block_size: int
    gpu_memory_utilization: float = dataclasses.field(metadata=FRACTION)
    activation_reserve_gib: float
    """Per GPU: peak activations, CUDA graphs and non-torch memory, which vLLM subtracts before sizing KV."""
    enable_prefix_caching: bool = True
    """vLLM's flag: off, no prompt block is ever a cache hit, so an agent's every turn prefills its whole
    conversation (a server run so, which calibrate's shared-prefix pair tells, holds far fewer agents)."""


@dataclass(frozen=True)
class Efficiency:
    bandwidth: float = dataclasses.field(metadata=FRACTION)
    mfu: float = dataclasses.field(metadata=FRACTION)
    step_overhead_ms: float
    sequence_overhead_ms: float | None = dataclasses.field(default=None, metadata=ANCHOR)
    """Per sequence decoded in a step, outside the roofline: CPU work per streamed token that the step
    waits for (detokenizing, framing the stream) where the server's front end shares the engine's cores,
    as on a CPU vLLM; absent (0) for a GPU server, whose front end runs beside the GPU. Set by
    ``agentperf calibrate`` when it measures one."""
    frontend_ms: float | None = None
    """Per request, before the engine queues it: the API server's own work (chat template with the tool
    schemas, tokenizing the whole conversation, the hop to the engine) where that server shares the engine's
    cores, as on a CPU vLLM. The engine charges it as busy time: it delays the request's admission *and*
    every running sequence's next token. Absent (0) for a GPU server, whose front end runs beside the GPU.
    Set by ``agentperf calibrate`` from its agent-shaped probe requests."""
    frontend_ms_per_1k_tokens: float | None = None
    """Front-end work per 1,000 prompt tokens of the whole conversation, cached or not (the template and
    tokenizer see every message on every turn); added to ``frontend_ms``. Absent: 0."""


@dataclass(frozen=True)
class OutputLength:
    """Lognormal reply length for requests that do not set ``ignore_eos``."""

    median_tokens: int
    p95_tokens: int

    @property
    def sigma(self) -> float:
        return math.log(self.p95_tokens / self.median_tokens) / P95_Z


@dataclass(frozen=True)
class Anchors:
    """Published or derived reference numbers, keyed like ``Profile.describe()``, to compare against."""

    source: str
    kv_capacity_tokens: float | None = dataclasses.field(default=None, metadata=ANCHOR)
    decode_step_b1_ms: float | None = dataclasses.field(default=None, metadata=ANCHOR)
    decode_step_b64_ms: float | None = dataclasses.field(default=None, metadata=ANCHOR)
    prefill_tok_s: float | None = dataclasses.field(default=None, metadata=ANCHOR)

    def values(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "source" and getattr(self, f.name) is not None}


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    gpu: GPU
    model: Model
    engine: EngineLimits
    efficiency: Efficiency
    output_tokens: OutputLength
    anchors: Anchors | None = None

    @property
    def kv_bytes_per_token(self) -> int:
        """KV bytes one token costs in full-attention layers, summed over the TP GPUs.

        Each GPU holds ``ceil(kv_heads / tp)`` heads (replicated when there are fewer heads than GPUs).
        """
        full_layers = self.model.layers - self.sliding_layers
        heads_per_gpu = -(-self.model.kv_heads // self.gpu.count)
        return 2 * full_layers * heads_per_gpu * self.gpu.count * self.model.head_dim * self.model.kv_bytes_per_value

    @property
    def sliding_layers(self) -> int:
        return self.model.sliding_window.layers if self.model.sliding_window else 0

    @property
    def kv_cache_bytes(self) -> float:
        per_gpu_gib = (self.gpu.memory_gib * self.engine.gpu_memory_utilization
                       - self.model.weights_gib / self.gpu.count - self.engine.activation_reserve_gib)
        return per_gpu_gib * GIB * self.gpu.count

    @property
    def kv_capacity_blocks(self) -> int:
        return max(0, int(self.kv_cache_bytes // (self.kv_bytes_per_token * self.engine.block_size)))

    @property
    def kv_capacity_tokens(self) -> int:
        return self.kv_capacity_blocks * self.engine.block_size

    @property
    def window_blocks_per_request(self) -> int:
        """Blocks a request holds for its sliding-window layers, in full-attention block units.

        vLLM's hybrid allocator gives sliding-window layers only the last ``window`` tokens (plus the
        block being written) from the same block pool, so their cost is a constant per request.
        """
        window = self.model.sliding_window
        if window is None:
            return 0
        blocks = -(-window.tokens // self.engine.block_size) + 1
        return math.ceil(window.layers / (self.model.layers - window.layers) * blocks)

    def frontend_s(self, prompt_tokens: int) -> float:
        """Seconds of front-end work for a request of ``prompt_tokens`` (0 without the efficiency fields)."""
        efficiency = self.efficiency
        return ((efficiency.frontend_ms or 0.0) + (efficiency.frontend_ms_per_1k_tokens or 0.0) * prompt_tokens / 1e3) / 1e3

    def slower(self, factor: float) -> Profile:
        """The same deployment with every step and every front-end charge ``factor`` times as long (under 1:
        faster). Why: a measured server's speed moves between measurements (other tenants, clocks, a shared
        host), and a twin asked where a search may land must search the server as it may be, not only as it
        was probed. The peaks are divided and the fixed costs multiplied, so each term of :class:`StepCost`
        scales alike and the memory limits stay as they are."""
        if not 0 < factor < math.inf:
            raise ValueError(f"a speed factor must be positive and finite, got {factor}")
        gpu, efficiency = self.gpu, self.efficiency

        def times(ms: float | None) -> float | None:
            return None if ms is None else ms * factor

        return dataclasses.replace(
            self, gpu=dataclasses.replace(gpu, bandwidth_gb_s=gpu.bandwidth_gb_s / factor, bf16_tflops=gpu.bf16_tflops / factor),
            efficiency=dataclasses.replace(
                efficiency, step_overhead_ms=efficiency.step_overhead_ms * factor,
                sequence_overhead_ms=times(efficiency.sequence_overhead_ms), frontend_ms=times(efficiency.frontend_ms),
                frontend_ms_per_1k_tokens=times(efficiency.frontend_ms_per_1k_tokens)))

    @cached_property
    def cost(self) -> StepCost:
        return StepCost(self)

    def step_time_s(self, prefill_tokens: int = 0, prefill_context_tokens: int = 0, prefill_attention_pairs: int = 0,
                    decode_batch: int = 0, decode_context_tokens: int = 0) -> float:
        """Duration of one engine step doing exactly this work (see :meth:`StepCost.step_time_s`)."""
        return self.cost.step_time_s(prefill_tokens, prefill_context_tokens, prefill_attention_pairs,
                                     decode_batch, decode_context_tokens)

    def decode_step_s(self, batch: int, context_tokens: int = DESCRIBE_CONTEXT_TOKENS) -> float:
        """One decode step for ``batch`` sequences that each attend over ``context_tokens``."""
        return self.step_time_s(decode_batch=batch, decode_context_tokens=batch * context_tokens)

    def prefill_tok_s(self) -> float:
        """Prefill rate of full ``max_num_batched_tokens`` chunks of fresh prompts (no prior context)."""
        chunk = self.engine.max_num_batched_tokens
        return chunk / self.step_time_s(prefill_tokens=chunk, prefill_attention_pairs=attention_pairs(chunk, 0))

    def describe(self) -> dict[str, Any]:
        """The derived numbers (KV capacity, step times, power) next to the profile's anchors."""
        b1, b64 = self.decode_step_s(1), self.decode_step_s(64)
        return {
            "profile": self.name,
            "gpu": f"{self.gpu.count}x {self.gpu.name}",
            "model": self.model.name,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "kv_cache_gib": round(self.kv_cache_bytes / GIB, 2),
            "kv_capacity_blocks": self.kv_capacity_blocks,
            "kv_capacity_tokens": self.kv_capacity_tokens,
            "max_concurrency_at_max_context": round(self.kv_capacity_tokens / self.model.max_context_tokens, 2),
            "decode_context_tokens": DESCRIBE_CONTEXT_TOKENS,
            "decode_step_b1_ms": round(b1 * 1e3, 3),
            "decode_step_b64_ms": round(b64 * 1e3, 3),
            "decode_tok_s_b1": round(1 / b1, 1),
            "decode_tok_s_b64": round(64 / b64, 1),
            "prefill_tok_s": round(self.prefill_tok_s()),
            "power_idle_w": self.gpu.idle_w * self.gpu.count,
            "power_tdp_w": self.gpu.tdp_w * self.gpu.count,
            "anchors": self.anchors.values() if self.anchors else {},
            "anchor_source": self.anchors.source if self.anchors else "",
        }


def attention_pairs(new_tokens: int, context_tokens: int) -> int:
    """(query, key) pairs a prefill chunk of ``new_tokens`` after ``context_tokens`` computes (causal)."""
    return new_tokens * context_tokens + new_tokens * (new_tokens + 1) // 2


class StepCost:
    """The roofline step time, with every per-profile constant folded once (``step()`` calls it a lot).

    ``step = overhead + sequence_overhead * decodes + max(memory_s, compute_s)`` where, summed over the TP GPUs,

    * ``memory_s = (weight bytes read + KV bytes read) / (bandwidth * count * efficiency)``: dense weights
      are read once per step; an MoE reads its shared weights plus the fraction of experts the step's
      tokens route to, ``1 - (1 - k/E)^tokens`` in expectation. KV read is each decode's context, each
      prefill chunk's prior context and new tokens; sliding-window layers read at most the window.
    * ``compute_s = FLOPs / (peak * count * MFU)`` with FLOPs = 2 * active params * tokens + 4 * heads *
      head_dim per layer per attended (query, key) pair.
    """

    __slots__ = ("_overhead_s", "_sequence_s", "_dense_bytes", "_expert_bytes", "_expert_miss", "_kv_token_bytes",
                 "_window_kv_bytes", "_window_kv_bytes_per_seq", "_bandwidth", "_flops_per_token", "_pair_flops",
                 "_window_token_flops", "_flops_per_s")

    def __init__(self, profile: Profile) -> None:
        model, gpu = profile.model, profile.gpu
        moe = model.moe
        expert_gib = moe.expert_weights_gib if moe else 0.0
        self._overhead_s = profile.efficiency.step_overhead_ms / 1e3
        self._sequence_s = (profile.efficiency.sequence_overhead_ms or 0.0) / 1e3
        self._dense_bytes = (model.weights_gib - expert_gib) * GIB
        self._expert_bytes = expert_gib * GIB
        self._expert_miss = 1 - moe.experts_per_token / moe.experts if moe else 0.0
        self._kv_token_bytes = profile.kv_bytes_per_token
        window_tokens = model.sliding_window.tokens if model.sliding_window else 0
        per_layer_token_bytes = profile.kv_bytes_per_token / (model.layers - profile.sliding_layers)
        self._window_kv_bytes = per_layer_token_bytes * profile.sliding_layers
        self._window_kv_bytes_per_seq = self._window_kv_bytes * window_tokens
        self._bandwidth = gpu.bandwidth_gb_s * 1e9 * gpu.count * profile.efficiency.bandwidth
        self._flops_per_token = 2 * model.active_params_b * 1e9
        pair_flops_per_layer = 4 * model.attention_heads * model.head_dim
        self._pair_flops = pair_flops_per_layer * (model.layers - profile.sliding_layers)
        self._window_token_flops = pair_flops_per_layer * profile.sliding_layers * window_tokens
        self._flops_per_s = gpu.bf16_tflops * 1e12 * gpu.count * profile.efficiency.mfu

    def step_time_s(self, prefill_tokens: int, prefill_context_tokens: int, prefill_attention_pairs: int,
                    decode_batch: int, decode_context_tokens: int) -> float:
        """Seconds for one step: ``prefill_*`` sum over the step's prefill chunks (context = tokens already
        computed before the chunk, pairs from :func:`attention_pairs`), ``decode_context_tokens`` sums each
        decoding sequence's attended length (its computed tokens plus the one being decoded)."""
        tokens = prefill_tokens + decode_batch
        if tokens == 0:
            return 0.0
        weight_bytes = self._dense_bytes + self._expert_bytes * (1 - self._expert_miss**tokens)
        kv_bytes = (self._kv_token_bytes * (decode_context_tokens + prefill_context_tokens + prefill_tokens)
                    + self._window_kv_bytes * prefill_tokens + self._window_kv_bytes_per_seq * decode_batch)
        memory_s = (weight_bytes + kv_bytes) / self._bandwidth
        flops = (self._flops_per_token * tokens + self._pair_flops * (prefill_attention_pairs + decode_context_tokens)
                 + self._window_token_flops * tokens)
        return self._overhead_s + self._sequence_s * decode_batch + max(memory_s, flops / self._flops_per_s)


def list_profiles() -> list[str]:
    """Names of the bundled profiles (file stems in ``profiles/``)."""
    return sorted(path.stem for path in PROFILES_DIR.glob("*.yaml"))


def load_profile(name_or_path: str | Path = DEFAULT_PROFILE) -> Profile:
    """A bundled profile by name, or a profile YAML file by path; :class:`ProfileError` when malformed."""
    bundled = PROFILES_DIR / f"{name_or_path}.yaml"
    path = bundled if str(name_or_path) in list_profiles() else Path(name_or_path)
    source = one_line(str(path))
    if not path.is_file():
        raise ProfileError(f"{one_line(str(name_or_path))}: no such profile file; bundled profiles: "
                           f"{', '.join(list_profiles())}")
    try:
        data = load_yaml(read_text(path, MAX_PROFILE_BYTES), max_nodes=MAX_PROFILE_NODES, name=source)
    except OSError as exc:
        raise ProfileError(f"{source}: cannot read the profile: {exc.strerror or exc}") from None
    except InputError as exc:
        where = f"line {exc.line}" if exc.line else "top level"
        raise ProfileError(f"{source}: {where}: expected valid YAML of a profile: {exc.reason}") from None
    profile = _build(Profile, data, "", source, {"name": path.stem})
    _check_consistency(profile, source)
    return profile


def _fail(source: str, path: str, expected: str, got: Any) -> typing.NoReturn:
    raise ProfileError(f"{source}: {path or 'top level'}: expected {expected}, got {short(got)}")


def _build(cls: type, data: Any, path: str, source: str, given: dict[str, Any] | None = None) -> Any:
    """Instantiate dataclass ``cls`` from a YAML mapping, checking keys, types and ranges."""
    given = given or {}
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in given}
    if not isinstance(data, dict):
        _fail(source, path, f"a mapping with keys {', '.join(fields)}", type(data).__name__)
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            _fail(source, f"{path}.{key}" if path else str(key), f"one of the keys {', '.join(fields)}",
                  "an unknown key")
    values = dict(given)
    for name, field in fields.items():
        field_path = f"{path}.{name}" if path else name
        if name in data:
            values[name] = _value(hints[name], data[name], field_path, source, field.metadata)
        elif field.default is dataclasses.MISSING:
            _fail(source, field_path, f"a value ({_type_name(hints[name])})", "nothing: the key is missing")
    return cls(**values)


def _value(hint: Any, value: Any, path: str, source: str, limits: Any) -> Any:
    if isinstance(hint, types.UnionType):  # ``X | None``: an optional section or number
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
        if value is None:
            return None
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path, source)
    if hint is bool:
        if not isinstance(value, bool):
            _fail(source, path, "true or false", value)
        return value
    if hint is str:
        if not is_single_line_text(value, max_chars=500):
            _fail(source, path, "a non-empty string of one line, at most 500 characters", value)
        return value
    numeric = (int,) if hint is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, numeric):
        _fail(source, path, "a positive integer" if hint is int else "a positive number", value)
    high = limits.get("le", MAX_VALUE)
    if not 0 < value <= high:  # NaN and infinities fail here too
        _fail(source, path, f"a number in (0, {high}]" if high <= 1 else f"a positive number, at most {high:,g}", value)
    return hint(value)


def _type_name(hint: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string"}.get(hint, "a mapping")


def _check_consistency(profile: Profile, source: str) -> None:
    """Cross-field rules that a per-field type check cannot see."""
    model, engine, gpu = profile.model, profile.engine, profile.gpu
    if engine.block_size != BLOCK_SIZE:
        _fail(source, "engine.block_size", f"{BLOCK_SIZE} (the tokenizer hashes {BLOCK_SIZE}-token blocks)",
              engine.block_size)
    if model.active_params_b > model.params_b:
        _fail(source, "model.active_params_b", f"at most params_b ({model.params_b})", model.active_params_b)
    if model.kv_heads > model.attention_heads:
        _fail(source, "model.kv_heads", f"at most attention_heads ({model.attention_heads})", model.kv_heads)
    if model.sliding_window and model.sliding_window.layers >= model.layers:
        _fail(source, "model.sliding_window.layers", f"fewer than model.layers ({model.layers})",
              model.sliding_window.layers)
    if model.moe and model.moe.experts_per_token > model.moe.experts:
        _fail(source, "model.moe.experts_per_token", f"at most experts ({model.moe.experts})",
              model.moe.experts_per_token)
    if model.moe and model.moe.expert_weights_gib >= model.weights_gib:
        _fail(source, "model.moe.expert_weights_gib", f"less than weights_gib ({model.weights_gib})",
              model.moe.expert_weights_gib)
    if gpu.idle_w >= gpu.tdp_w:
        _fail(source, "gpu.idle_w", f"less than tdp_w ({gpu.tdp_w})", gpu.idle_w)
    if profile.output_tokens.p95_tokens <= profile.output_tokens.median_tokens:
        _fail(source, "output_tokens.p95_tokens", f"more than median_tokens ({profile.output_tokens.median_tokens})",
              profile.output_tokens.p95_tokens)
    decode_step_s = profile.decode_step_s(1)
    if not decode_step_s <= MAX_DECODE_STEP_S:
        _fail(source, "efficiency", f"a one-token decode step of at most {MAX_DECODE_STEP_S:g} s from gpu.bandwidth_gb_s, "
              "gpu.bf16_tflops and efficiency", f"{decode_step_s:.3g} s")
    if profile.kv_capacity_tokens > MAX_KV_CAPACITY_TOKENS:
        _fail(source, "gpu.memory_gib", f"a KV cache of at most {MAX_KV_CAPACITY_TOKENS:,} tokens (the simulator keeps "
              f"state per block), but {gpu.count}x {gpu.memory_gib} GiB gives {profile.kv_capacity_tokens:,}",
              gpu.memory_gib)
    needed_blocks = -(-model.max_context_tokens // engine.block_size) + profile.window_blocks_per_request
    if needed_blocks > profile.kv_capacity_blocks:  # vLLM refuses to start in this case too
        _fail(source, "model.max_context_tokens",
              f"a context that fits the KV cache ({profile.kv_capacity_tokens} tokens after "
              f"{gpu.count}x {gpu.memory_gib} GiB x {engine.gpu_memory_utilization} minus weights and reserve)",
              model.max_context_tokens)
