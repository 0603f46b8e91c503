"""The one linear-interpolated quantile (numpy's default) for descriptive numbers: inter-token gaps and
trajectory statistics. SLO verdicts use ``slo.quantile`` (nearest rank) instead, on purpose: it always
returns an observed value and reads as attainment."""

from __future__ import annotations

import math
from typing import Sequence


def interpolated_quantile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0-1) of a non-empty sorted sequence, interpolating between closest ranks."""
    position = (len(sorted_values) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)
