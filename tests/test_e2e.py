"""The README's main job and the study on a tiny configuration, through the CLI."""

from __future__ import annotations

import json
import sys

import pytest

import robustunlearn.study.grid as study_module
from robustunlearn.cli import main
from robustunlearn.metrics.suite import METRICS

TINY_RECIPE = """
seed: 0
data: {num_people: 12, forget_fraction: 0.2, num_utility_passages: 4, num_utility_qa: 2}
model: {vocab_size: 400, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4}
train: {lr: 1.0e-2, max_epochs: 60, batch_tokens: 256, check_every_epochs: 10}
unlearn: {lr: 1.0e-3, batch_size: 4}
eval: {max_examples: 12, verbmem_max_new_tokens: 16}
study:
  optimizers: [adamw, zo-sgd]
  seeds: [0]
  attacks: [rtn-int4, relearn]
  max_steps: 6
  check_every: 3
  relearn_steps: 4
  relearn_eval_every: 2
  relearn_subjects: 1
"""


def run_cli(monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", ["robustunlearn", *args])
    main()


@pytest.mark.slow
def test_run_writes_results_report_and_skips_finished_cells(tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE)
    output = tmp_path / "out"
    args = ("run", "--config", str(recipe), "--output-dir", str(output), "--cache-dir", str(tmp_path / "cache"))
    run_cli(monkeypatch, *args)
    printed = capsys.readouterr().out
    assert "npo/adamw+rtn-int4" in printed and "npo/zo-sgd+relearn" in printed

    results = json.loads((output / "results.json").read_text())
    assert set(results) == {"settings", "benchmark", "cells", "scores", "files", "seconds", "time"}
    expected_models = {"target", "retrain"} | {
        f"npo/{opt}{suffix}" for opt in ("adamw", "zo-sgd") for suffix in ("", "+rtn-int4", "+relearn")
    }
    assert set(results["scores"]) == expected_models
    for name, metrics in results["scores"].items():
        assert set(metrics) == set(METRICS), name
    for cell in results["cells"]:
        assert {"steps", "forward_passes", "backward_passes", "seconds", "reached_level"} <= set(cell)
    zo_cell = next(c for c in results["cells"] if c["optimizer"] == "zo-sgd")
    assert zo_cell["backward_passes"] == 0 and zo_cell["forward_passes"] >= 2 * zo_cell["steps"]

    rows = [json.loads(line) for line in (output / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    relearn_rows = [row for row in rows if row["attack"] == "relearn"]
    assert all([point["step"] for point in row["curve"]] == [0, 2, 4] for row in relearn_rows)
    assert all("recovery_ratio" in row["scores"] for row in rows if row["attack"] != "none")
    # The landscape: each cell's sharpness; an LMC curve from adamw's model (alpha 0) to zo-sgd's
    # (alpha 1) whose endpoints are those models' own scores.
    unlearned = {row["cell"]["optimizer"]: row for row in rows if row["attack"] == "none"}
    assert all(len(row["landscape"]["sharpness"]) == 3 for row in rows)
    lmc = unlearned["zo-sgd"]["landscape"]
    assert lmc["pair"] == "adamw-vs-zo-sgd" and "lmc" not in unlearned["adamw"]["landscape"]
    assert [point["alpha"] for point in lmc["lmc"]] == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    for point, optimizer in ((lmc["lmc"][0], "adamw"), (lmc["lmc"][-1], "zo-sgd")):
        assert point["forget_qa_rouge"] == pytest.approx(unlearned[optimizer]["forget"]["forget_qa_rouge"])
        assert {"forget_qa_loss", "retain_qa_loss"} <= set(point)
    report = (output / "report.md").read_text()
    assert "adamw" in report and "zo-sgd" in report and "Loss landscape" in report
    assert_protocol(output, rows, report)
    assert list(output.glob("*.png")) and (output / "report.html").exists()

    # A rerun skips both finished cells: no unlearning happens at all.
    def no_cells(*args, **kwargs):
        raise AssertionError("a finished cell ran again")

    monkeypatch.setattr(study_module, "run_cell", no_cells)
    monkeypatch.setattr(study_module, "linear_interpolation", no_cells)
    run_cli(monkeypatch, *args)
    assert capsys.readouterr().err.count("skipping finished cell") == 2
    assert len((output / "results.jsonl").read_text().splitlines()) == 6


def assert_protocol(output, rows: list[dict], report: str) -> None:
    """What the protocol adds to a study's files, read back from a real run."""
    splits = json.loads((output / "splits.json").read_text())
    evaluation = set(splits["retain"]["subjects"]["evaluation"])
    assert evaluation and not evaluation & set(splits["retain"]["subjects"]["regulariser"])
    relearned = splits["relearn"]["0"]
    assert relearned["counts"]["train"] > 0 and relearned["counts"]["held_out_subjects"] > 0
    for row in rows:
        # held-out relearning and the excess over the retrain control
        assert row["control"]["source"] == "retrain"
        control_forget = row["control"]["forget"]["forget_qa_rouge"]
        assert row["scores"]["excess_over_control"] == pytest.approx(row["forget"]["forget_qa_rouge"] - control_forget)
        if row["attack"] == "relearn":
            assert set(row["scorings"]) == {"in_set", "held_out_subjects", "held_out_attributes"}
            assert (
                row["curve"][-1]["forget_qa_rouge@held_out_subjects"]
                == row["scorings"]["held_out_subjects"]["forget_qa_rouge"]
            )
            assert "forget_qa_rouge@in_set" in row["control"]["curve"][-1]
        # the matched-level check: the retrain level plus the tolerance, and how far below it the cell ended
        cost = row["cost"]
        retrain_level = row["reference"]["retrain"]["forget_qa_rouge"] + cost["level_tolerance"]
        assert cost["target_level"] == pytest.approx(retrain_level)
        assert cost["level_gap"] == pytest.approx(
            cost["target_level"] - row["reference"]["unlearned"]["forget_qa_rouge"]
        )
        # the compute curve: forward-pass equivalents at each check, from 0
        curve = row["unlearning_curve"]
        spent = [point["forward_equivalents"] for point in curve]
        assert spent[0] == 0 and spent == sorted(spent) and spent[-1] <= cost["forward_equivalents"]
        assert [point["step"] for point in curve] == [0, 3, 6][: len(curve)]
    zo = next(row for row in rows if row["cell"]["optimizer"] == "zo-sgd")
    assert zo["cost"]["forward_equivalents"] == zo["cost"]["forward_passes"]  # no backward
    assert (output / "compute_curve.png").exists() and "compute_curve.png" in report
    assert "## Claims" in report and "95%" in report
    assert "## Protocol" in report and "## Matched level" in report and "## Attack ladders" in report
