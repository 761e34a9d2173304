"""Percentiles, medians with their spread, and ratios to the floor of the same run.

The spread is the interquartile range (p25-p75, linear interpolation between order
statistics) everywhere. A ratio to the floor is computed per round (a configuration's figure
over the floor's figure from the same round of the alternation) and reported as the median of
those ratios with their IQR, so the machine's drift between rounds cancels out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypedDict


class Spread(TypedDict):
    median: float
    p25: float
    p75: float
    min: float
    max: float
    n: int


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linearly interpolated; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def spread(values: Sequence[float]) -> Spread:
    """Median, IQR, extremes and count (NaN, a failed run, is left out)."""
    values = [v for v in values if not math.isnan(v)]
    return {
        "median": percentile(values, 50),
        "p25": percentile(values, 25),
        "p75": percentile(values, 75),
        "min": min(values) if values else math.nan,
        "max": max(values) if values else math.nan,
        "n": len(values),
    }


def paired_ratios(values: Sequence[float], floor: Sequence[float]) -> list[float]:
    """values[i] / floor[i] for the rounds both have."""
    return [v / f for v, f in zip(values, floor, strict=False) if f > 0 and not math.isnan(v)]


def scaled(summary: Spread, factor: float) -> Spread:
    """The same summary in other units (e.g. seconds to milliseconds)."""
    return {
        "median": summary["median"] * factor,
        "p25": summary["p25"] * factor,
        "p75": summary["p75"] * factor,
        "min": summary["min"] * factor,
        "max": summary["max"] * factor,
        "n": summary["n"],
    }
