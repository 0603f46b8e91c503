"""Measured accelerator power, sampled while a run goes, so agents per megawatt use the power the target
drew at its capacity, not its nameplate.

A thread of ``agentperf capacity`` reads a Prometheus endpoint once a second (``--power-metrics-url``:
NVIDIA's DCGM exporter beside the serving engine; for the embedded simulator its own ``/metrics``, which
models a gauge of the same name), sums the metric's series (one per accelerator) and appends
``{"epoch_s", "watts"}`` to ``power.jsonl`` in the run folder, flushed per sample, so an interrupted run
keeps what it measured. The report averages the samples inside each step's window.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Iterable

from prometheus_client.parser import text_string_to_metric_families

from agentperf_users.measure.scrape import (  # noqa: F401  (re-exported)
    SAMPLE_INTERVAL_S,
    SCRAPE_TIMEOUT_S,
    ScrapeSampler,
    endpoint_name,
    read_jsonl,
)

DEFAULT_METRIC = "DCGM_FI_DEV_POWER_USAGE"  # DCGM's board power draw, watts, one series per GPU
POWER_FILE = "power.jsonl"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PowerSample:
    epoch_s: float  # when the reading arrived
    watts: float  # summed over the metric's series: every accelerator the endpoint reports


def total_watts(exposition: str, metric: str) -> float | None:
    """The sum of ``metric``'s series in a Prometheus text exposition; None when it has none."""
    values = [sample.value for family in text_string_to_metric_families(exposition)
              for sample in family.samples if sample.name == metric]
    return sum(values) if values else None


class PowerSampler(ScrapeSampler):
    """Samples ``metric`` at ``url`` into ``path`` (``{"epoch_s", "watts"}`` lines) from entering the
    context until leaving it."""

    def __init__(self, url: str, path: str | os.PathLike, metric: str = DEFAULT_METRIC,
                 interval_s: float = SAMPLE_INTERVAL_S) -> None:
        def reading(text: str, epoch_s: float) -> str | None:
            try:
                watts = total_watts(text, metric)
            except ValueError:  # not an exposition
                return None
            return None if watts is None else json.dumps({"epoch_s": epoch_s, "watts": watts})

        super().__init__(url, path, reading, "power", metric, interval_s)


def read_samples(path: str | os.PathLike) -> list[PowerSample]:
    """The samples in a ``power.jsonl`` (none when it does not exist; a torn last line skipped)."""
    return read_jsonl(path, lambda data: PowerSample(float(data["epoch_s"]), float(data["watts"])), "a power sample")


def mean_watts(samples: Iterable[PowerSample], start_epoch_s: float, end_epoch_s: float) -> float | None:
    """The mean of the samples taken in ``[start, end)``; None when there is none."""
    inside = [sample.watts for sample in samples if start_epoch_s <= sample.epoch_s < end_epoch_s]
    return sum(inside) / len(inside) if inside else None
