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
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable
from urllib.parse import urlsplit, urlunsplit

import requests
from prometheus_client.parser import text_string_to_metric_families

from agentperf_users.errors import AgentperfError

DEFAULT_METRIC = "DCGM_FI_DEV_POWER_USAGE"  # DCGM's board power draw, watts, one series per GPU
SAMPLE_INTERVAL_S = 1.0
SCRAPE_TIMEOUT_S = 2.0
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


def endpoint_name(url: str) -> str:
    """The URL without credentials or query, for logs and the report."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class PowerSampler:
    """Samples ``metric`` at ``url`` into ``path`` from entering the context until leaving it."""

    def __init__(self, url: str, path: str | os.PathLike, metric: str = DEFAULT_METRIC,
                 interval_s: float = SAMPLE_INTERVAL_S) -> None:
        self._url, self._path, self._metric, self._interval_s = url, Path(path), metric, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="agentperf-power", daemon=True)
        self.misses = 0  # readings that failed or lacked the metric

    def __enter__(self) -> PowerSampler:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join(SCRAPE_TIMEOUT_S + 1.0)
        if self.misses:
            logger.warning("agentperf: %d power readings of %s failed or had no %s", self.misses,
                           endpoint_name(self._url), self._metric)

    def _run(self) -> None:
        with open(self._path, "a", encoding="utf-8") as file:
            while True:
                watts = self._read()
                if watts is None:
                    self.misses += 1
                else:
                    file.write(json.dumps({"epoch_s": time.time(), "watts": watts}) + "\n")
                    file.flush()
                if self._stop.wait(self._interval_s):
                    return

    def _read(self) -> float | None:
        try:
            response = requests.get(self._url, timeout=SCRAPE_TIMEOUT_S)
            response.raise_for_status()
            return total_watts(response.text, self._metric)
        except (requests.RequestException, ValueError):
            return None


def read_samples(path: str | os.PathLike) -> list[PowerSample]:
    """The samples in a ``power.jsonl`` (none when it does not exist). A torn last line, as a killed run
    may leave, is skipped; any other malformed line is a one-line error."""
    path = Path(path)
    if not path.exists():
        return []
    samples = []
    lines = path.read_text(encoding="utf-8").split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            samples.append(PowerSample(float(data["epoch_s"]), float(data["watts"])))
        except (ValueError, KeyError, TypeError) as exc:
            if number == len(lines):
                continue  # torn final write of a killed run
            raise AgentperfError(f"{path}:{number}: not a power sample ({exc})") from None
    return samples


def mean_watts(samples: Iterable[PowerSample], start_epoch_s: float, end_epoch_s: float) -> float | None:
    """The mean of the samples taken in ``[start, end)``; None when there is none."""
    inside = [sample.watts for sample in samples if start_epoch_s <= sample.epoch_s < end_epoch_s]
    return sum(inside) / len(inside) if inside else None
