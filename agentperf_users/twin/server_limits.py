"""The limits a server tells on its ``/metrics``: its KV cache's size, how many sequences it runs at once and
its context, each with the metric it came from.

Why: a twin that queues at the wrong count, or runs out of KV at the wrong context, predicts the wrong
capacity, and a limit the server states is exact where a measured one is an estimate (the burst of
:mod:`~agentperf_users.twin.probe_seqs`) and an option is a guess. Which names, from the engines' sources:

* vLLM: ``vllm:cache_config_info``, an info gauge whose labels hold the cache config, ``num_gpu_blocks`` x
  ``block_size`` tokens (team note ``real-engine-vllm-cpu.md``, as a real vLLM 0.32 exported it). vLLM
  states no scheduler limit: max_num_seqs is measured, its context comes from ``/v1/models``.
* SGLang (``python/sglang/srt/metrics/collector.py``; constants its scheduler sets once at start):
  ``sglang:max_total_num_tokens``, the KV pool in tokens; ``sglang:max_running_requests``, the requests it
  runs at once (vLLM's max_num_seqs; in recent releases, with a ``cap_source`` label); ``sglang:context_len``
  (older releases), read where ``/v1/models`` does not say ``max_model_len``. No SGLang ran here: the tests'
  expositions follow that source.

Every series of a name is one engine's view (SGLang: one per ``dp_rank`` and ``tp_rank``), and the twin
models one engine, so the smallest positive value is taken: data-parallel engines are ``predict
--replicas``' copies, and the tensor-parallel ranks of one engine state the same pool.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import requests
from prometheus_client.parser import text_string_to_metric_families

from agentperf_users.loadgen.probe import ProbeTarget

METRICS_TIMEOUT_S = 10.0
VLLM_CACHE_INFO = "vllm:cache_config_info"
SGLANG_LIMITS = {  # the limit (profile_yaml.Limits' field) -> the SGLang gauge that states it
    "kv_capacity_tokens": "sglang:max_total_num_tokens",
    "max_num_seqs": "sglang:max_running_requests",
    "max_context_tokens": "sglang:context_len",
}


@dataclass(frozen=True)
class ToldLimits:
    """What the server's ``/metrics`` said, per limit (``profile_yaml.Limits``' field names): the value and
    the words saying where it came from; a limit it did not state is absent."""

    values: dict[str, int] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> int | None:
        return self.values.get(name)


def told_limits(exposition: str) -> ToldLimits:
    """The limits a Prometheus text exposition states (module docstring); none from text that is not one."""
    found: dict[str, list[int]] = {}
    kv_blocks: list[int] = []
    try:
        for family in text_string_to_metric_families(exposition):
            for sample in family.samples:
                if sample.name == VLLM_CACHE_INFO:
                    blocks, size = sample.labels.get("num_gpu_blocks", ""), sample.labels.get("block_size", "")
                    if blocks.isdigit() and size.isdigit() and int(blocks) * int(size) > 0:
                        kv_blocks.append(int(blocks) * int(size))
                for limit, name in SGLANG_LIMITS.items():
                    if sample.name == name and math.isfinite(sample.value) and sample.value >= 1:
                        found.setdefault(limit, []).append(int(sample.value))
    except Exception:  # noqa: BLE001  the parser's errors on arbitrary text are not all ValueError
        return ToldLimits()
    values = {limit: min(numbers) for limit, numbers in found.items()}
    sources = {limit: SGLANG_LIMITS[limit] for limit in values}
    if kv_blocks:  # a vLLM's own statement of its cache wins over any other name
        values["kv_capacity_tokens"] = min(kv_blocks)
        sources["kv_capacity_tokens"] = f"{VLLM_CACHE_INFO} (num_gpu_blocks x block_size)"
    return ToldLimits(values, sources)


def read_told_limits(host: str, target: ProbeTarget) -> ToldLimits:
    """:func:`told_limits` of the server's ``/metrics`` (beside ``/v1``); none where it cannot be read."""
    base = host.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    try:
        with requests.Session() as session:
            session.trust_env = False
            response = session.get(f"{base}/metrics", headers=headers, timeout=METRICS_TIMEOUT_S)
    except requests.RequestException:
        return ToldLimits()
    return told_limits(response.text) if response.status_code == 200 else ToldLimits()
