"""Interleaved timing: a baseline and its candidates, called in turn until their ratios hold still.

A round calls the baseline, then each candidate, once each, and times every call. A ratio is taken
within a round (candidate / baseline of the same round), so a slow spell of the machine that
spans a round slows both sides and cancels. After ``warmup`` untimed rounds, rounds repeat until
one of these holds, checked after each round n ≥ ``min_pairs``:

* ``"precise"``: for every candidate, the ``confidence`` interval of the median of its n ratios
  reaches at most ``interval_rel`` × that median on either side of it;
* ``"budget"``: the timed calls have taken ``budget_s`` seconds of the clock in all;
* ``"max_pairs"``: n = ``max_pairs``.

The interval is distribution-free: two order statistics of the ratios, chosen from the
Binomial(n, 1/2) law of how many ratios fall below the true median (:func:`median_interval`).
A rule on the interval's width, unlike one on how far the median moved over the last few rounds,
is not met by chance while the median is still uncertain: at the spread a 2-core machine shows
(an interquartile range of 5-20% of the median) it takes about 20 to 300 rounds.

The summary of a ratio is its median, quartiles and that interval (:func:`ratio_stats`).
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from scipy.stats import binom

BASELINE = "baseline"  # the baseline's name in Timings.seconds
_TOO_COARSE = "a call took no measurable time: the clock is too coarse for it"


@dataclass(frozen=True)
class TimingSettings:
    """When :func:`time_interleaved` stops (module docstring)."""

    min_pairs: int = 10
    interval_rel: float = 0.02
    confidence: float = 0.95
    budget_s: float = 30.0
    max_pairs: int = 400
    warmup: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.min_pairs <= self.max_pairs:
            raise ValueError(
                f"need 1 <= min_pairs <= max_pairs, got min_pairs={self.min_pairs}, max_pairs={self.max_pairs}"
            )
        if not self.interval_rel > 0:
            raise ValueError(f"interval_rel must be > 0, got {self.interval_rel!r}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be between 0 and 1, got {self.confidence!r}")
        if not self.budget_s >= 0:
            raise ValueError(f"budget_s must be >= 0, got {self.budget_s!r}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup!r}")


@dataclass(frozen=True)
class RatioStats:
    """Median, first and third quartile of per-round ratios, how many rounds they cover, and the
    median's interval (None when there are too few rounds for one: fewer than 6 at 95%)."""

    median: float
    q1: float
    q3: float
    pairs: int
    ci_low: float | None = None
    ci_high: float | None = None

    def fields(self, name: str) -> dict[str, float | None]:
        """``{name: median, name_q1, name_q3, name_ci_low, name_ci_high}``: the columns of a row."""
        return {
            name: self.median,
            f"{name}_q1": self.q1,
            f"{name}_q3": self.q3,
            f"{name}_ci_low": self.ci_low,
            f"{name}_ci_high": self.ci_high,
        }


def quantile(sorted_values: Sequence[float], p: float) -> float:
    """The ``p``-quantile by linear interpolation between order statistics: at position
    p·(n − 1) of the sorted values, counted from 0 (numpy's default)."""
    position = p * (len(sorted_values) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (position - low) * (sorted_values[high] - sorted_values[low])


def median_interval(sorted_values: Sequence[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """The distribution-free ``confidence`` interval of the median of ``sorted_values``:
    ``(x[j], x[n − 1 − j])`` (counted from 0) with the largest j for which at most
    (1 − confidence) / 2 of the Binomial(n, 1/2) law lies below j, so that the interval covers the
    true median with probability at least ``confidence``; None when no j qualifies (n < 6 at 95%)."""
    n = len(sorted_values)
    tail = (1 - confidence) / 2
    j = int(binom.ppf(tail, n, 0.5))  # the smallest j with P(B <= j) >= tail
    if binom.cdf(j, n, 0.5) > tail:
        j -= 1
    if j < 0:
        return None
    return sorted_values[j], sorted_values[n - 1 - j]


def ratio_stats(numerators: Sequence[float], denominators: Sequence[float], confidence: float = 0.95) -> RatioStats:
    """:class:`RatioStats` of ``numerators[i] / denominators[i]`` over the rounds i."""
    if not denominators or len(numerators) != len(denominators):
        raise ValueError(f"need equally many numerators and denominators, got {len(numerators)}, {len(denominators)}")
    if min(denominators) <= 0:
        raise ValueError(_TOO_COARSE)
    ratios = sorted(n / d for n, d in zip(numerators, denominators))
    interval = median_interval(ratios, confidence) or (None, None)
    return RatioStats(quantile(ratios, 0.5), quantile(ratios, 0.25), quantile(ratios, 0.75), len(ratios), *interval)


@dataclass(frozen=True)
class Timings:
    """Seconds of every timed call, per name (the baseline under :data:`BASELINE`), one per round,
    and why the rounds stopped."""

    seconds: dict[str, tuple[float, ...]]
    stop: str
    confidence: float = 0.95  # of the medians' intervals

    @property
    def pairs(self) -> int:
        return len(self.seconds[BASELINE])

    def ratio(self, name: str, over: str = BASELINE) -> RatioStats:
        return ratio_stats(self.seconds[name], self.seconds[over], self.confidence)

    def median_s(self, name: str) -> float:
        return statistics.median(self.seconds[name])


def interval_within(ratios: Sequence[float], interval_rel: float, confidence: float) -> bool:
    """Whether the ``confidence`` interval of the median of ``ratios`` reaches at most
    ``interval_rel`` (relative to the median) on either side of it."""
    ordered = sorted(ratios)
    interval = median_interval(ordered, confidence)
    if interval is None:
        return False
    median = statistics.median(ordered)
    return max(median - interval[0], interval[1] - median) <= interval_rel * abs(median)


def time_interleaved(
    baseline: Callable[[], object],
    candidates: Mapping[str, Callable[[], object]],
    settings: TimingSettings = TimingSettings(),
    clock: Callable[[], float] = time.perf_counter,
) -> Timings:
    """Call ``baseline`` and the ``candidates`` in rounds and time each call with ``clock``
    (module docstring: warm-up, stopping rule). The callables must finish their work before
    returning (on a GPU: synchronise). Python's garbage collector is off during the timed rounds."""
    if BASELINE in candidates:
        raise ValueError(f"{BASELINE!r} names the baseline; give the candidates other names")
    calls = {BASELINE: baseline, **candidates}
    for _ in range(settings.warmup):
        for call in calls.values():
            call()
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()  # as timeit does: a collection would land in whichever call happened to trigger it
    try:
        return _timed_rounds(calls, settings, clock)
    finally:
        if enabled:
            gc.enable()


def _timed_rounds(calls: dict[str, Callable[[], object]], settings: TimingSettings, clock) -> Timings:
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    spent = 0.0
    while True:
        for name, call in calls.items():
            start = clock()
            call()
            elapsed = clock() - start
            seconds[name].append(elapsed)
            spent += elapsed
        if seconds[BASELINE][-1] <= 0:
            raise ValueError(_TOO_COARSE)
        stop = _stop_reason(seconds, spent, settings)
        if stop is not None:
            return Timings({name: tuple(times) for name, times in seconds.items()}, stop, settings.confidence)


def _stop_reason(seconds: dict[str, list[float]], spent: float, settings: TimingSettings) -> str | None:
    pairs = len(seconds[BASELINE])
    if pairs < settings.min_pairs:
        return None
    base = seconds[BASELINE]
    ratios = {name: [t / b for t, b in zip(times, base)] for name, times in seconds.items() if name != BASELINE}
    if all(interval_within(r, settings.interval_rel, settings.confidence) for r in ratios.values()):
        return "precise"
    if spent >= settings.budget_s:
        return "budget"
    if pairs >= settings.max_pairs:
        return "max_pairs"
    return None
