"""Intervals over seeds: the percentile bootstrap the study's numbers and claims are reported with.

Method (Efron & Tibshirani 1993, ch. 13): given one sample per seed, draw B resamples of the
seeds with replacement (as many as there are), take each resample's mean, and report the
α/2 and 1 - α/2 quantiles of those B means (α = 1 - confidence; 95%: the 2.5% and 97.5%
quantiles, numpy's linear interpolation between order statistics)::

    mean = 1/n · Σ_s x̄_s
    CI   = [ q_{α/2}(m*_1 .. m*_B), q_{1-α/2}(m*_1 .. m*_B) ],   m*_b = 1/n · Σ_j x̄*_{b,j}

Where a seed carries per-item values (one score per forget question, say), the bootstrap has two
levels: each drawn seed's mean x̄*_{b,j} is itself the mean of a resample of that seed's items,
so the interval covers both the seed-to-seed and the item-to-item variation. A seed given as one
number (the rows carry per-seed means) is a one-item seed and resamples to itself: the
bootstrap is then over seeds only.

Resampling is seeded (:data:`BOOTSTRAP_SEED`, a fresh generator per call), so the same samples
always give the same interval. With one seed there is no interval (``low``/``high`` are
``None``). With few seeds the percentile interval is narrow (with two it is the range of the two
means): read it as a floor on the uncertainty, not a guarantee of 95% coverage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0

# A verdict on a difference expected to be "lower" or "higher" than 0.
SUPPORTED = "supported"
CONTRADICTED = "contradicted"
INCONCLUSIVE = "inconclusive"
ONE_SEED = "inconclusive (1 seed)"
NOT_MEASURED = "not measured"

Direction = Literal["lower", "higher"]
Sample = float | Sequence[float]  # one seed: its value, or its items' values


@dataclass(frozen=True)
class Interval:
    """A mean over seeds and its bootstrap interval (``None`` bounds with one seed)."""

    mean: float
    low: float | None
    high: float | None
    seeds: int

    def negated(self) -> Interval:
        """The interval of minus the quantity."""
        return Interval(
            -self.mean, None if self.high is None else -self.high, None if self.low is None else -self.low, self.seeds
        )

    def as_list(self) -> list[float] | None:
        """``[low, high]``, or ``None`` without an interval."""
        return None if self.low is None or self.high is None else [self.low, self.high]


def bootstrap_interval(
    samples: Sequence[Sample],
    *,
    confidence: float = CONFIDENCE,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> Interval:
    """The mean of ``samples`` (one per seed: a number, or that seed's item values) and its
    percentile bootstrap interval (the module docstring gives the method)."""
    if not samples:
        raise ValueError("no samples to bootstrap")
    seeds = [np.atleast_1d(np.asarray(sample, dtype=float)) for sample in samples]
    if any(items.size == 0 for items in seeds):
        raise ValueError("a seed has no item values")
    seed_means = np.array([items.mean() for items in seeds])
    mean = float(seed_means.mean())
    if len(seeds) < 2:
        return Interval(mean, None, None, len(seeds))
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, len(seeds), size=(resamples, len(seeds)))
    drawn_means = seed_means[drawn]
    for index, items in enumerate(seeds):
        if items.size > 1:  # a one-item seed resamples to itself
            where = drawn == index
            picks = rng.integers(0, items.size, size=(int(where.sum()), items.size))
            drawn_means[where] = items[picks].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(drawn_means.mean(axis=1), [tail, 1 - tail])
    return Interval(mean, float(low), float(high), len(seeds))


def verdict(difference: Interval | None, expected: Direction) -> str:
    """Whether a difference ``expected`` to be below (``"lower"``) or above (``"higher"``) 0 is:
    :data:`SUPPORTED` (the interval excludes 0 on the expected side), :data:`CONTRADICTED` (it
    excludes 0 on the other), :data:`INCONCLUSIVE` (it spans 0), :data:`ONE_SEED` (no interval)
    or :data:`NOT_MEASURED` (no difference)."""
    if difference is None:
        return NOT_MEASURED
    if difference.low is None or difference.high is None:
        return ONE_SEED
    below, above = difference.high < 0, difference.low > 0
    if not (below or above):
        return INCONCLUSIVE
    return SUPPORTED if below == (expected == "lower") else CONTRADICTED
