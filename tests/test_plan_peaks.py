"""plan's estimate against the measured peak memory of real unlearning steps on tiny models on the
CPU (robustunlearn.bench.memory: a fresh process per row, peak resident memory above the baseline
of a process that has already taken one small step)."""

from __future__ import annotations

import pytest
from rich.console import Console

from robustunlearn.bench.memory import DEFAULT_CASES, TOLERANCE, bench_memory


@pytest.mark.slow
def test_estimates_within_tolerance_of_measured_peaks():
    rows = bench_memory(sizes=["1M"], shapes=[(8, 128)], cases=DEFAULT_CASES, console=Console(quiet=True))
    assert [(r["optimizer"], r["objective"]) for r in rows] == list(DEFAULT_CASES)
    for row in rows:
        assert abs(row["error"]) <= TOLERANCE, row
        assert row["measured_bytes"] > 10e6  # tens of MB: well above what page-level noise could move
