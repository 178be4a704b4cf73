"""The interleaved timing core on fake clocks: the stopping rule, the statistics, the call order."""

from __future__ import annotations

import gc
import itertools
import subprocess
import sys

import pytest

from robustunlearn.bench.timing import (
    BASELINE,
    RatioStats,
    Timings,
    TimingSettings,
    median_interval,
    quantile,
    ratio_stats,
    time_interleaved,
)


class FakeClock:
    """A clock that moves only when a fake call says how long it took."""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls: list[str] = []

    def __call__(self) -> float:
        return self.now

    def call(self, name: str, durations):
        """A call named ``name`` that takes the next of ``durations`` (an iterable) each time."""
        remaining = iter(durations)

        def run() -> None:
            self.calls.append(name)
            self.now += next(remaining)

        return run


def test_constant_ratio_stops_at_min_pairs_and_warmup_is_not_timed():
    clock = FakeClock()
    baseline = clock.call("base", itertools.chain([100.0], itertools.repeat(1.0)))
    step = clock.call("step", itertools.chain([50.0], itertools.repeat(3.0)))
    timings = time_interleaved(baseline, {"step": step}, TimingSettings(min_pairs=10, warmup=1), clock)
    assert timings.stop == "precise"
    assert timings.pairs == 10
    assert timings.seconds == {BASELINE: (1.0,) * 10, "step": (3.0,) * 10}
    assert timings.ratio("step") == RatioStats(3.0, 3.0, 3.0, 10, 3.0, 3.0)
    assert clock.calls == ["base", "step"] * 11  # forward, step, forward, step, ...


def test_the_median_interval_is_the_order_statistics_the_binomial_law_picks():
    values = [float(i) for i in range(30)]
    # n = 6: P(B <= 0) = 1/64 <= 2.5%, so the extremes; n = 10: P(B <= 1) = 11/1024, P(B <= 2) =
    # 56/1024 > 2.5%: ranks 2 and 9 (from 1); n = 20: P(B <= 5) = 0.0207, P(B <= 6) = 0.0577
    assert median_interval(values[:5]) is None  # P(B <= 0) = 1/32 > 2.5%
    assert median_interval(values[:6]) == (0.0, 5.0)
    assert median_interval(values[:10]) == (1.0, 8.0)
    assert median_interval(values[:20]) == (5.0, 14.0)
    assert median_interval(values[:10], confidence=0.5) == (3.0, 6.0)  # P(B <= 3) = 176/1024 <= 25%
    assert median_interval(values[:2], confidence=0.4) == (0.0, 1.0)


def test_stops_at_the_first_round_whose_median_interval_is_within_interval_rel():
    # ratios 10, 10, then 1 forever: the interval's upper end stays at 10 until it picks a 1, which
    # first happens at n = 12 (j = 2: index 9 of 10 ones then two tens; at n = 11, j = 1: index 9 = 10)
    clock = FakeClock()
    step = clock.call("step", itertools.chain([10.0, 10.0], itertools.repeat(1.0)))
    settings = TimingSettings(min_pairs=4, interval_rel=0.1, budget_s=1e9, warmup=0)
    timings = time_interleaved(clock.call("base", itertools.repeat(1.0)), {"step": step}, settings, clock)
    assert (timings.stop, timings.pairs) == ("precise", 12)
    assert timings.ratio("step") == RatioStats(1.0, 1.0, 1.0, 12, 1.0, 1.0)
    assert timings.ratio("step").fields("r") == {"r": 1.0, "r_q1": 1.0, "r_q3": 1.0, "r_ci_low": 1.0, "r_ci_high": 1.0}


def test_a_median_that_never_settles_stops_when_the_budget_is_spent():
    # candidate i seconds in round i, baseline 1 s: after round n, n + n(n+1)/2 seconds are spent:
    # 9 after round 3, 14 after 4, 20 after 5
    clock = FakeClock()
    settings = TimingSettings(min_pairs=3, interval_rel=0.01, budget_s=20.0, warmup=0)
    step = clock.call("step", itertools.count(1.0))
    timings = time_interleaved(clock.call("base", itertools.repeat(1.0)), {"step": step}, settings, clock)
    assert (timings.stop, timings.pairs) == ("budget", 5)


def test_max_pairs_caps_the_rounds_and_min_pairs_holds_against_the_budget():
    clock = FakeClock()
    settings = TimingSettings(min_pairs=3, budget_s=1e9, max_pairs=7, warmup=0)
    step = clock.call("step", itertools.count(1.0))
    timings = time_interleaved(clock.call("base", itertools.repeat(1.0)), {"step": step}, settings, clock)
    assert (timings.stop, timings.pairs) == ("max_pairs", 7)

    clock = FakeClock()
    settings = TimingSettings(min_pairs=4, budget_s=1.0, warmup=0)  # spent in the first round
    step = clock.call("step", itertools.count(1.0))
    timings = time_interleaved(clock.call("base", itertools.repeat(1.0)), {"step": step}, settings, clock)
    assert (timings.stop, timings.pairs) == ("budget", 4)


def test_every_candidate_must_be_precise_and_rounds_call_them_in_order():
    clock = FakeClock()
    steady = clock.call("a", itertools.repeat(2.0))
    noisy = clock.call("b", itertools.chain([10.0, 10.0], itertools.repeat(1.0)))
    settings = TimingSettings(min_pairs=4, interval_rel=0.1, budget_s=1e9, warmup=0)
    baseline = clock.call("base", itertools.repeat(1.0))
    timings = time_interleaved(baseline, {"a": steady, "b": noisy}, settings, clock)
    assert (timings.stop, timings.pairs) == ("precise", 12)  # as "b" alone (test above); "a" was at 6
    assert clock.calls == ["base", "a", "b"] * 12
    assert timings.ratio("b", over="a") == ratio_stats([10.0, 10.0] + [1.0] * 10, [2.0] * 12)


def test_ratios_are_taken_within_rounds_and_summarised_by_median_and_quartiles():
    assert ratio_stats([1.0, 2.0, 3.0, 4.0, 10.0], [1.0] * 5) == RatioStats(3.0, 2.0, 4.0, 5)  # no interval
    # ratios 1, 2, 3, 4: quartiles at positions 0.75 and 2.25 of the sorted ratios
    assert ratio_stats([2.0, 8.0, 4.0, 6.0], [2.0] * 4) == RatioStats(2.5, 1.75, 3.25, 4)
    assert ratio_stats([6.0, 1.0, 5.0, 2.0, 4.0, 3.0], [1.0] * 6) == RatioStats(3.5, 2.25, 4.75, 6, 1.0, 6.0)
    # per round: 2/1 and 9/3, median 2.5 (the ratio of the medians would be 5.5 / 2 = 2.75)
    assert ratio_stats([2.0, 9.0], [1.0, 3.0]).median == 2.5
    assert quantile([5.0], 0.25) == 5.0
    timings = Timings({BASELINE: (1.0, 2.0, 4.0), "a": (2.0, 4.0, 8.0)}, "precise")
    assert timings.ratio("a") == RatioStats(2.0, 2.0, 2.0, 3)
    assert timings.median_s("a") == 4.0
    assert RatioStats(2.0, 1.5, 2.5, 3).fields("x") == {
        "x": 2.0,
        "x_q1": 1.5,
        "x_q3": 2.5,
        "x_ci_low": None,
        "x_ci_high": None,
    }


def test_calls_too_short_for_the_clock_are_an_error_not_an_infinite_ratio():
    with pytest.raises(ValueError, match="no measurable time"):
        ratio_stats([1.0], [0.0])
    with pytest.raises(ValueError, match="equally many"):
        ratio_stats([1.0, 2.0], [1.0])
    clock = FakeClock()
    with pytest.raises(ValueError, match="no measurable time"):
        baseline = clock.call("base", itertools.repeat(0.0))
        time_interleaved(baseline, {"a": clock.call("a", itertools.repeat(1.0))}, clock=clock)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"min_pairs": 0}, "1 <= min_pairs"),
        ({"min_pairs": 20, "max_pairs": 10}, "min_pairs <= max_pairs"),
        ({"interval_rel": 0.0}, "interval_rel"),
        ({"confidence": 1.0}, "confidence"),
        ({"budget_s": -1.0}, "budget_s"),
        ({"warmup": -1}, "warmup"),
    ],
)
def test_invalid_settings_are_rejected(options, match):
    with pytest.raises(ValueError, match=match):
        TimingSettings(**options)


def test_the_garbage_collector_is_off_during_timed_calls_only():
    clock = FakeClock()
    seen = []
    baseline = clock.call("base", itertools.repeat(1.0))

    def step() -> None:
        seen.append(gc.isenabled())
        clock.now += 2.0

    settings = TimingSettings(min_pairs=6, warmup=1)
    time_interleaved(baseline, {"step": step}, settings, clock)
    assert seen == [True] + [False] * 6 and gc.isenabled()  # the warm-up round ran with it on

    def failing() -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        time_interleaved(baseline, {"step": failing}, TimingSettings(warmup=0), clock)
    assert gc.isenabled()


def test_the_baseline_name_is_reserved():
    clock = FakeClock()
    with pytest.raises(ValueError, match="baseline"):
        time_interleaved(clock.call("a", [1.0]), {BASELINE: clock.call("b", [1.0])}, clock=clock)


# Allocates, touches and frees a block 30 times under the memory measurement's thresholds, then
# under settle_malloc's, and prints the minor page faults of each 30: for 8 MiB, and for 64 MiB, over
# the 32 MiB that glibc's mmap threshold can reach (the logits of a 5M model at 8 x 512 tokens).
_FAULTS = """
import resource, sys, torch
from robustunlearn.bench.common import set_mmap_threshold, settle_malloc

def faults(elements):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(30):
        block = torch.empty(elements).fill_(1.0)
        del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

set_mmap_threshold(64 << 10)
measuring = [faults(2 << 20), faults(16 << 20)]
settle_malloc()
faults(16 << 20)  # the first allocation under the new thresholds grows the heap once
print(*measuring, faults(2 << 20), faults(16 << 20))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc thresholds")
def test_settled_malloc_reuses_freed_memory_instead_of_faulting_it_back():
    result = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True, check=True)
    measuring_8, measuring_64, settled_8, settled_64 = map(int, result.stdout.split())
    # 8 MiB is 2,048 pages and 64 MiB 16,384: mapped and faulted in on every allocation
    assert measuring_8 >= 30 * 2000 and measuring_64 >= 30 * 16000
    assert settled_8 < 2000 and settled_64 < 2000  # reused: not one 8 MiB allocation's worth of faults
