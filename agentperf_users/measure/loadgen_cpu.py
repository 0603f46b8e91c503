"""The load generator's own CPU use, per worker, over a step's window: what the diagnosis's "load generator"
cause reads (``diagnose.LoadGenerator``).

A worker does not know where the master puts a step's window (the master decides when the warm-up ends),
so it does not measure "over the window" itself: it meters its process CPU time between consecutive
reports (``CpuMeter``: one ``CpuInterval`` of wall and CPU seconds each, sent with the records in the same
``report_to_master`` payload, ``aggregate``) and the master, which keeps every worker's intervals, cuts
them to the window (``window_load``). An interval that straddles an edge of the window counts by the share
of its wall time inside it, its CPU assumed spread evenly over it (reports come every 3 s; a window is
tens of seconds). Since a report is sent after the time it covers, the intervals of a window have reached
the master when its records have: the search judges a step only then.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterable

from agentperf_users.measure.diagnose import CpuReading, LoadGenerator, read_cpu

MIN_INTERVAL_S = 0.5
"""A report sooner than this after the last carries no interval (a LocalRunner's aggregator builds a report
at every query, many a second); the next one covers the time."""


@dataclass(frozen=True)
class CpuInterval:
    """One worker's process CPU time over wall time ``(end - wall_s, end]``, epoch seconds."""

    worker: str  # the worker's process id (``aggregate.process_id``), as its records' ``worker_id``
    end_epoch_s: float
    wall_s: float
    cpu_s: float  # every thread of the process (the records' native reader threads too)

    @property
    def start_epoch_s(self) -> float:
        return self.end_epoch_s - self.wall_s

    def to_wire(self) -> dict:
        return {"worker": self.worker, "end_epoch_s": self.end_epoch_s, "wall_s": self.wall_s, "cpu_s": self.cpu_s}

    @classmethod
    def from_wire(cls, data: dict) -> CpuInterval:
        return cls(str(data["worker"]), float(data["end_epoch_s"]), float(data["wall_s"]), float(data["cpu_s"]))


class CpuMeter:
    """This process's CPU use since the previous interval it gave."""

    def __init__(self, read: Callable[[], CpuReading] = read_cpu, clock: Callable[[], float] = time.time) -> None:
        self._read = read
        self._clock = clock
        self._last = read()

    def interval(self, worker: str) -> CpuInterval | None:
        """The interval since the last one (or since the meter was made); None before ``MIN_INTERVAL_S``."""
        now = self._read()
        wall = now.wall_s - self._last.wall_s
        if wall < MIN_INTERVAL_S:
            return None
        interval = CpuInterval(worker, self._clock(), wall, now.cpu_s - self._last.cpu_s)
        self._last = now
        return interval


def window_load(intervals: Iterable[CpuInterval], start_epoch_s: float, end_epoch_s: float) -> LoadGenerator | None:
    """Each worker's CPU use over ``[start, end)``, a fraction of one core (module docstring); None when no
    interval of any worker overlaps the window (no worker reported CPU: an older worker, or none ran)."""
    cpu: dict[str, float] = defaultdict(float)
    wall: dict[str, float] = defaultdict(float)
    for interval in intervals:
        overlap = min(interval.end_epoch_s, end_epoch_s) - max(interval.start_epoch_s, start_epoch_s)
        if overlap <= 0 or interval.wall_s <= 0:
            continue
        wall[interval.worker] += overlap
        cpu[interval.worker] += interval.cpu_s * overlap / interval.wall_s
    if not wall:
        return None
    return LoadGenerator(tuple(sorted((worker, cpu[worker] / wall[worker]) for worker in wall)))
