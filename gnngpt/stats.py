"""The statistics of a comparison over seeds: mean and deviation, and paired differences with Student-t intervals."""
import math
import statistics
from dataclasses import dataclass

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Spread:
    """The mean of n values and their sample standard deviation (None for one value)."""

    mean: float
    sd: float | None
    n: int


def spread(values):
    values = list(values)
    return Spread(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))


@dataclass(frozen=True)
class Difference:
    """The mean of n paired differences and its CONFIDENCE interval (low, high; None for one pair)."""

    mean: float
    low: float | None
    high: float | None
    n: int


def paired_difference(values, baseline):
    """values[s] - baseline[s] over the seeds s both have ({seed: value} each): the mean and its Student-t
    interval, mean +- t(0.975, n-1) sd / sqrt(n); None when they share no seed."""
    seeds = sorted(set(values) & set(baseline))
    if not seeds:
        return None
    d = [values[s] - baseline[s] for s in seeds]
    mean = statistics.fmean(d)
    if len(d) < 2:
        return Difference(mean, None, None, 1)
    from scipy import stats  # here, not at the top: importing it takes a second that sample.py need not spend

    half = stats.t.ppf(0.5 + CONFIDENCE / 2, len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    return Difference(mean, mean - half, mean + half, len(d))
