"""Percentiles of a sample, as the benchmarks and the services' logs report them."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def nearest_rank(values: Sequence[float], q: float) -> float:
    """The value at rank floor(q x n) of the sorted values (q from 0 to 1, no interpolation); NaN for
    no values. The small CPU benchmarks' percentiles (bench.edge_hit, bench.accept_delay)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
