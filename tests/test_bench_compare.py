"""`bench compare`: two benchmark runs' timed ratios side by side, and whether they agree."""

from __future__ import annotations

import json

import pytest

from helpers import cli_result
from robustunlearn.bench.compare import compare_runs, load_run, timed_ratios, verdict_lines

ENVIRONMENT = {"torch": "2.13.0", "device": "cpu", "threads": 1, "clock": "process CPU time"}


def row(optimizer: str, seq_len: int, ratio: float, **extra) -> dict:
    return {
        "optimizer": optimizer,
        "size": "1M",
        "batch": 8,
        "seq_len": seq_len,
        "step_over_forward": ratio,
        "step_over_forward_q1": ratio - 0.1,
        "step_over_forward_q3": ratio + 0.1,
        "peak_mem_over_inference": 2.0,  # no quartiles: not a timed ratio
        **extra,
    }


def run(*rows: dict, **environment) -> dict:
    return {"environment": {**ENVIRONMENT, **environment}, "timing": {}, "rows": list(rows)}


def test_only_columns_with_quartiles_are_timed_ratios():
    objective_row = {"objective": "npo", "reference_share": 0.3, "reference_share_q1": 0.2, "reference_share_q3": 0.4}
    assert timed_ratios(row("adam", 128, 3.0)) == ["step_over_forward"]
    assert timed_ratios({**objective_row, "batch": 8, "seq_len": 128}) == ["reference_share"]


def test_ratios_are_paired_by_row_and_the_worst_relative_difference_decides():
    first = run(row("adam", 128, 3.0), row("adam", 512, 2.0))
    second = run(row("adam", 512, 2.08), row("adam", 128, 2.94))  # another order: matched by row
    comparison = compare_runs(first, second, tolerance=0.05)
    assert [(p.row, p.first, p.second) for p in comparison.pairs] == [
        ("adam 1M 8x512", 2.0, 2.08),
        ("adam 1M 8x128", 3.0, 2.94),
    ]
    assert [p.relative for p in comparison.pairs] == pytest.approx([0.04, 0.02])
    assert comparison.agree
    assert verdict_lines(comparison)[-1].startswith("PASS: 2 of 2 timed ratios agree within 5% (worst: adam 1M 8x512")
    assert not compare_runs(first, second, tolerance=0.03).agree


def test_pairs_say_whether_the_runs_95_percent_intervals_overlap():
    def with_interval(optimizer: str, ratio: float, low: float, high: float) -> dict:
        return row(optimizer, 128, ratio, step_over_forward_ci_low=low, step_over_forward_ci_high=high)

    first = run(with_interval("adam", 3.0, 2.9, 3.1), with_interval("sgd", 3.0, 2.9, 3.1), row("lion", 128, 3.0))
    second = run(with_interval("adam", 3.15, 3.1, 3.2), with_interval("sgd", 3.3, 3.2, 3.4), row("lion", 128, 3.0))
    overlap = {pair.row: pair.overlap for pair in compare_runs(first, second).pairs}
    assert overlap == {"adam 1M 8x128": True, "sgd 1M 8x128": False, "lion 1M 8x128": None}  # touching ends overlap
    assert "1 of 3 timed ratios have disjoint 95% intervals in the two runs" in verdict_lines(
        compare_runs(first, second)
    )
    assert not any(
        "disjoint" in line for line in verdict_lines(compare_runs(run(row("a", 128, 3.0)), run(row("a", 128, 3.0))))
    )


def test_a_row_one_run_lacks_fails_the_comparison_and_environment_changes_are_named():
    first = run(row("adam", 128, 3.0), row("sgd", 128, 3.0))
    second = run(row("adam", 128, 3.0), threads=2)
    comparison = compare_runs(first, second)
    assert comparison.only_first == ["sgd 1M 8x128"] and not comparison.agree
    lines = verdict_lines(comparison)
    assert "note: environment threads differs: 1 vs 2" in lines
    assert "only in the first run: sgd 1M 8x128" in lines
    assert lines[-1].startswith("FAIL: 1 of 1 timed ratios agree")


def test_compare_command_exits_0_when_the_runs_agree_and_1_when_they_do_not(tmp_path, monkeypatch, capsys):
    paths = {}
    for name, ratio in (("a", 3.0), ("b", 3.1), ("c", 3.6)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(run(row("adamw", 128, ratio))))
    code, out, _ = cli_result(monkeypatch, capsys, "bench", "compare", str(paths["a"]), str(paths["b"]))
    assert code == 0 and "PASS: 1 of 1" in out and "3.3%" in out
    code, out, _ = cli_result(monkeypatch, capsys, "bench", "compare", str(paths["a"]), str(paths["c"]))
    assert code == 1 and "FAIL: 0 of 1" in out and "20.0%" in out


def test_a_file_that_is_not_a_run_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    other = tmp_path / "results.json"
    other.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="is not a benchmark run"):
        load_run(other)
    code, _, err = cli_result(monkeypatch, capsys, "bench", "compare", str(other), str(other))
    assert code == 2 and err.count("\n") == 1 and "is not a benchmark run" in err
