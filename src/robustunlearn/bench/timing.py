"""Interleaved timing: a baseline and its candidates, called in turn until their ratios hold still.

A round calls the baseline, then each candidate, once each, and times every call. A ratio is taken
within a round (candidate / baseline of the same round), so a slow spell of the machine that
spans a round slows both sides and cancels. After ``warmup`` untimed rounds, rounds repeat until
one of these holds, checked after each round n ≥ ``min_pairs``:

* ``"stable"``: for every candidate, the median of its first n ratios and the median of its first
  n − ``window`` ratios differ by at most ``stable_rel`` × the former (the median moved less than
  that over the last ``window`` rounds);
* ``"budget"``: the timed calls have taken ``budget_s`` seconds of the clock in all;
* ``"max_pairs"``: n = ``max_pairs``.

The summary of a ratio is its median and quartiles over the rounds (:func:`ratio_stats`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

BASELINE = "baseline"  # the baseline's name in Timings.seconds
_TOO_COARSE = "a call took no measurable time: the clock is too coarse for it"


@dataclass(frozen=True)
class TimingSettings:
    """When :func:`time_interleaved` stops (module docstring)."""

    min_pairs: int = 10
    window: int = 5
    stable_rel: float = 0.01
    budget_s: float = 20.0
    max_pairs: int = 200
    warmup: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.window < self.min_pairs <= self.max_pairs:
            raise ValueError(
                f"need 1 <= window < min_pairs <= max_pairs, got window={self.window}, "
                f"min_pairs={self.min_pairs}, max_pairs={self.max_pairs}"
            )
        if not self.stable_rel > 0:
            raise ValueError(f"stable_rel must be > 0, got {self.stable_rel!r}")
        if not self.budget_s >= 0:
            raise ValueError(f"budget_s must be >= 0, got {self.budget_s!r}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup!r}")


@dataclass(frozen=True)
class RatioStats:
    """Median, first and third quartile of per-round ratios, and how many rounds they cover."""

    median: float
    q1: float
    q3: float
    pairs: int

    def fields(self, name: str) -> dict[str, float]:
        """``{name: median, name_q1: q1, name_q3: q3}``: the columns of a row."""
        return {name: self.median, f"{name}_q1": self.q1, f"{name}_q3": self.q3}


def quantile(sorted_values: Sequence[float], p: float) -> float:
    """The ``p``-quantile by linear interpolation between order statistics: at position
    p·(n − 1) of the sorted values, counted from 0 (numpy's default)."""
    position = p * (len(sorted_values) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (position - low) * (sorted_values[high] - sorted_values[low])


def ratio_stats(numerators: Sequence[float], denominators: Sequence[float]) -> RatioStats:
    """:class:`RatioStats` of ``numerators[i] / denominators[i]`` over the rounds i."""
    if not denominators or len(numerators) != len(denominators):
        raise ValueError(f"need equally many numerators and denominators, got {len(numerators)}, {len(denominators)}")
    if min(denominators) <= 0:
        raise ValueError(_TOO_COARSE)
    ratios = sorted(n / d for n, d in zip(numerators, denominators))
    return RatioStats(quantile(ratios, 0.5), quantile(ratios, 0.25), quantile(ratios, 0.75), len(ratios))


@dataclass(frozen=True)
class Timings:
    """Seconds of every timed call, per name (the baseline under :data:`BASELINE`), one per round,
    and why the rounds stopped."""

    seconds: dict[str, tuple[float, ...]]
    stop: str

    @property
    def pairs(self) -> int:
        return len(self.seconds[BASELINE])

    def ratio(self, name: str, over: str = BASELINE) -> RatioStats:
        return ratio_stats(self.seconds[name], self.seconds[over])

    def median_s(self, name: str) -> float:
        return statistics.median(self.seconds[name])


def median_settled(ratios: Sequence[float], window: int, stable_rel: float) -> bool:
    """Whether the median of ``ratios`` moved by at most ``stable_rel`` (relative) over the last
    ``window`` of them."""
    now = statistics.median(ratios)
    before = statistics.median(ratios[:-window])
    return abs(now - before) <= stable_rel * abs(now)


def time_interleaved(
    baseline: Callable[[], object],
    candidates: Mapping[str, Callable[[], object]],
    settings: TimingSettings = TimingSettings(),
    clock: Callable[[], float] = time.perf_counter,
) -> Timings:
    """Call ``baseline`` and the ``candidates`` in rounds and time each call with ``clock``
    (module docstring: warm-up, stopping rule). The callables must finish their work before
    returning (on a GPU: synchronise)."""
    if BASELINE in candidates:
        raise ValueError(f"{BASELINE!r} names the baseline; give the candidates other names")
    calls = {BASELINE: baseline, **candidates}
    for _ in range(settings.warmup):
        for call in calls.values():
            call()
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
            return Timings({name: tuple(times) for name, times in seconds.items()}, stop)


def _stop_reason(seconds: dict[str, list[float]], spent: float, settings: TimingSettings) -> str | None:
    pairs = len(seconds[BASELINE])
    if pairs < settings.min_pairs:
        return None
    base = seconds[BASELINE]
    ratios = {name: [t / b for t, b in zip(times, base)] for name, times in seconds.items() if name != BASELINE}
    if all(median_settled(r, settings.window, settings.stable_rel) for r in ratios.values()):
        return "stable"
    if spent >= settings.budget_s:
        return "budget"
    if pairs >= settings.max_pairs:
        return "max_pairs"
    return None
