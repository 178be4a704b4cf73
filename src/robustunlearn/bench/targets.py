"""The cost targets the benchmarks hold, each checked on the worst row it covers.

A target is met when its column's value (a median over rounds, or a memory ratio) is at most its
bound on every row it selects; the check reports that worst value and where it was measured.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Row = dict[str, Any]


@dataclass(frozen=True)
class Target:
    """``column`` <= ``bound`` on every row of benchmark ``bench`` that ``selects`` accepts."""

    bench: str  # "optimizers" or "objectives"
    text: str
    column: str
    bound: float
    selects: Callable[[Row], bool]


TARGETS: tuple[Target, ...] = (
    Target(
        "optimizers",
        "zo-sgd step / forward at 8x512",
        "step_over_forward",
        2.1,
        lambda row: row["optimizer"] == "zo-sgd" and (row["batch"], row["seq_len"]) == (8, 512),
    ),
    Target(
        "optimizers",
        "stateless ZO peak memory / inference",
        "peak_mem_over_inference",
        1.05,
        lambda row: row["grade"] == "zeroth-order" and row["state_over_params"] == 0,
    ),
    Target("optimizers", "adamw step / forward", "step_over_forward", 3.3, lambda row: row["optimizer"] == "adamw"),
    Target(
        "objectives",
        "npo step with a cached reference / plain step of the same optimizer",
        "cached_step_over_plain_step",
        1.05,
        lambda row: row["objective"] == "npo" and "cached_step_over_plain_step" in row,
    ),
)


def _where(row: Row) -> str:
    names = [row[key] for key in ("objective", "optimizer") if key in row]
    return " ".join([*names, row["size"], f"{row['batch']}x{row['seq_len']}"])


def check_targets(bench: str, rows: list[Row]) -> list[dict[str, Any]]:
    """For each target of ``bench``: ``target``, ``bound``, the worst ``measured`` value of the rows
    it selects, ``where`` (that row) and ``passed`` (None, with measured and where None, when no
    row was measured for it)."""
    results = []
    for target in TARGETS:
        if target.bench != bench:
            continue
        selected = [row for row in rows if target.selects(row)]
        worst = max(selected, key=lambda row: row[target.column], default=None)
        measured = None if worst is None else worst[target.column]
        results.append(
            {
                "target": target.text,
                "bound": target.bound,
                "measured": measured,
                "where": None if worst is None else _where(worst),
                "passed": None if measured is None else measured <= target.bound,
            }
        )
    return results


def target_lines(results: list[dict[str, Any]]) -> list[str]:
    """One line per target: ``PASS``, ``FAIL`` or ``SKIP`` (not measured), with the measured value."""
    lines = []
    for result in results:
        head = f"{result['target']} <= {result['bound']:.2f}"
        if result["passed"] is None:
            lines.append(f"SKIP {head}: not measured in this run")
        else:
            verdict = "PASS" if result["passed"] else "FAIL"
            lines.append(f"{verdict} {head}: {result['measured']:.2f} (worst: {result['where']})")
    return lines
