"""Two runs of a benchmark side by side (``robustunlearn bench compare A.json B.json``): does every
timed ratio of the first run hold in the second?

A run is what ``--output`` wrote (:func:`~robustunlearn.bench.common.write_run`). Rows are matched
on what they measured (objective, optimizer, model size, batch shape); a timed ratio is a column
that comes with its quartiles (``name``, ``name_q1``, ``name_q3``: the median over interleaved
rounds). Their relative difference is ``|second − first| / first``; the runs agree when every
matched ratio differs by at most the tolerance and neither run has a row the other lacks.

Where both runs recorded the medians' 95% intervals (``name_ci_low``, ``name_ci_high``), each pair
also says whether the two intervals overlap: disjoint intervals mean the machine itself changed
between the runs (more than each run's own rounds varied), not that a run took too few rounds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table

KEY_FIELDS = ("objective", "optimizer", "size", "batch", "seq_len")
DEFAULT_TOLERANCE = 0.05


@dataclass(frozen=True)
class RatioPair:
    """One timed ratio of one row, as each run measured it."""

    row: str  # e.g. "npo adamw 1M 8x128"
    ratio: str  # the column, e.g. "step_over_forward"
    first: float
    second: float
    overlap: bool | None = None  # whether the runs' 95% intervals overlap; None: a run has none

    @property
    def relative(self) -> float:
        return abs(self.second - self.first) / abs(self.first)


@dataclass(frozen=True)
class Comparison:
    pairs: list[RatioPair]  # largest relative difference first
    only_first: list[str]  # rows of the first run that the second lacks
    only_second: list[str]
    environments: tuple[dict[str, Any], dict[str, Any]]
    tolerance: float

    @property
    def agree(self) -> bool:
        return not self.only_first and not self.only_second and all(p.relative <= self.tolerance for p in self.pairs)


def load_run(path: Path) -> dict[str, Any]:
    """A benchmark run written by ``--output``; ValueError when the file is not one."""
    try:
        run = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read benchmark run {path}: {error}") from None
    if not isinstance(run, dict) or not isinstance(run.get("rows"), list) or "environment" not in run:
        raise ValueError(f"{path} is not a benchmark run (no rows and environment; write one with --output)")
    return run


def row_label(row: dict[str, Any]) -> str:
    names = [str(row[key]) for key in ("objective", "optimizer", "size") if key in row]
    return " ".join([*names, f"{row['batch']}x{row['seq_len']}"])


def timed_ratios(row: dict[str, Any]) -> list[str]:
    """The columns of ``row`` that are medians over timed rounds (they come with quartiles)."""
    return [key for key in row if f"{key}_q1" in row and f"{key}_q3" in row]


def compare_runs(first: dict[str, Any], second: dict[str, Any], tolerance: float = DEFAULT_TOLERANCE) -> Comparison:
    """Match the rows of two runs and pair their timed ratios (module docstring)."""
    if not tolerance > 0:
        raise ValueError(f"the tolerance must be > 0, got {tolerance!r}")
    rows = [{_key(row): row for row in run["rows"]} for run in (first, second)]
    pairs = [
        RatioPair(row_label(row), ratio, row[ratio], rows[1][key][ratio], _overlap(row, rows[1][key], ratio))
        for key, row in rows[0].items()
        if key in rows[1]
        for ratio in timed_ratios(row)
        if ratio in rows[1][key]
    ]
    pairs.sort(key=lambda pair: pair.relative, reverse=True)
    only = [[row_label(row) for key, row in mine.items() if key not in other] for mine, other in (rows, rows[::-1])]
    return Comparison(pairs, only[0], only[1], (first["environment"], second["environment"]), tolerance)


def _overlap(first: dict[str, Any], second: dict[str, Any], ratio: str) -> bool | None:
    """Whether the 95% intervals of ``ratio`` in the two rows overlap (None: a row has none)."""
    bounds = [(row.get(f"{ratio}_ci_low"), row.get(f"{ratio}_ci_high")) for row in (first, second)]
    if any(low is None or high is None for low, high in bounds):
        return None
    return bounds[0][0] <= bounds[1][1] and bounds[1][0] <= bounds[0][1]


def _key(row: dict[str, Any]) -> tuple:
    return tuple(row.get(field) for field in KEY_FIELDS)


def comparison_table(comparison: Comparison) -> Table:
    table = Table(title="timed ratios of two runs, largest difference first", box=box.SIMPLE)
    for column in ("row", "ratio", "first", "second", "difference", "95% CIs overlap"):
        table.add_column(column, no_wrap=True, justify="left" if column in ("row", "ratio") else "right")
    for pair in comparison.pairs:
        over = pair.relative > comparison.tolerance
        table.add_row(
            pair.row,
            pair.ratio,
            f"{pair.first:.3f}",
            f"{pair.second:.3f}",
            f"[red]{pair.relative:.1%}[/red]" if over else f"{pair.relative:.1%}",
            {None: "-", True: "yes", False: "no"}[pair.overlap],
        )
    return table


def verdict_lines(comparison: Comparison) -> list[str]:
    """What differs in the environments, the rows one run lacks, and PASS or FAIL with the worst pair."""
    first, second = comparison.environments
    lines = [
        f"note: environment {key} differs: {first.get(key)!r} vs {second.get(key)!r}"
        for key in sorted(set(first) | set(second))
        if first.get(key) != second.get(key)
    ]
    lines += [f"only in the first run: {label}" for label in comparison.only_first]
    lines += [f"only in the second run: {label}" for label in comparison.only_second]
    if not comparison.pairs:
        return [*lines, "FAIL: the runs share no timed ratio"]
    worst = comparison.pairs[0]
    within = sum(pair.relative <= comparison.tolerance for pair in comparison.pairs)
    head = "PASS" if comparison.agree else "FAIL"
    disjoint = sum(pair.overlap is False for pair in comparison.pairs)
    if any(pair.overlap is not None for pair in comparison.pairs):
        lines.append(f"{disjoint} of {len(comparison.pairs)} timed ratios have disjoint 95% intervals in the two runs")
    return [
        *lines,
        f"{head}: {within} of {len(comparison.pairs)} timed ratios agree within {comparison.tolerance:.0%} "
        f"(worst: {worst.row} {worst.ratio}, {worst.first:.3f} vs {worst.second:.3f}, {worst.relative:.1%})",
    ]
