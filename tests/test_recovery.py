"""The recovery ratio's floor and guards, and the chance correction of the retained fraction."""

from __future__ import annotations

from dataclasses import replace

import pytest

from robustunlearn.metrics.suite import METRICS
from robustunlearn.study.report import write_report
from robustunlearn.study.rows import References, ResultRow, RowCell, UnlearningCost, write_results_jsonl
from robustunlearn.study.scores import (
    MIN_REMOVED_SHARE,
    Recovery,
    attack_scores,
    recovery_ratio,
    retained_fraction,
    summarise,
    worst_case,
)

COST = UnlearningCost(
    steps=10, forward_passes=20, backward_passes=10, seconds=1.0, reached_level=True, target_level=0.1
)


def scored_row(
    metric: str, attacked: float, unlearned: float, target: float, retrain: dict | None, *, attack="rtn-int4", seed=0
) -> ResultRow:
    return ResultRow(
        cell=RowCell(benchmark="synthetic", objective="npo", optimizer="adam", grade="first-order", seed=seed, lr=1e-3),
        attack=attack,
        attack_family="quantization",
        forget={metric: attacked},
        utility={"retain_qa_rouge": 0.8},
        reference=References(
            target={metric: target}, unlearned={metric: unlearned, "retain_qa_rouge": 0.85}, retrain=retrain
        ),
        primary_metric=metric,
        cost=COST,
    )


def test_the_ratio_is_normalised_by_what_the_matched_level_removes():
    # A cell that stopped short of the level (F_unlearned 0.5, floor 0.0): the old denominator
    # F_target - F_unlearned = 0.3 made this 0.97; the benchmark's F_target - F_floor = 0.8 does not move.
    assert recovery_ratio(0.79, 0.5, 0.8, 0.0) == Recovery(pytest.approx(0.29 / 0.8))
    assert recovery_ratio(0.3, 0.1, 0.8, 0.0).ratio == pytest.approx(0.25)
    assert recovery_ratio(0.05, 0.1, 0.8, 0.0).ratio == pytest.approx(-0.0625)  # the attack removed more


def test_no_ratio_when_unlearning_removed_too_little():
    # target 1, floor 0: unlearned 0.875 removed 12.5% < 20% of the distance; 0.75 removed 25%
    assert MIN_REMOVED_SHARE == 0.2
    short = recovery_ratio(0.99, 0.875, 1.0, 0.0)
    assert short.ratio is None and "removed 12% " in short.note and "less than 20%" in short.note
    assert recovery_ratio(0.99, 0.75, 1.0, 0.0).ratio == pytest.approx(0.24)
    # the share is a parameter; reaching it exactly is enough
    assert recovery_ratio(0.9, 0.5, 1.0, 0.0, min_removed_share=0.5).ratio == pytest.approx(0.4)
    assert recovery_ratio(0.9, 0.5, 1.0, 0.0, min_removed_share=0.6).ratio is None
    # the almost-no-forgetting cell whose old ratio was 0.01 / 0.01 = 1
    assert recovery_ratio(0.8, 0.79, 0.8, 0.0).ratio is None


def test_no_ratio_without_a_floor_or_with_the_target_at_it():
    assert recovery_ratio(0.5, 0.1, 0.8, None) == Recovery(
        None, "no floor: no retrain reference and no chance level for the metric"
    )
    at_floor = recovery_ratio(0.3, 0.25, 0.25, 0.25)
    assert at_floor.ratio is None and "at the floor" in at_floor.note


def test_attack_scores_take_the_floor_from_retrain_else_chance():
    with_retrain = attack_scores(scored_row("forget_qa_rouge", 0.5, 0.2, 0.8, {"forget_qa_rouge": 0.15}))
    assert (with_retrain["forget_floor"], with_retrain["floor_source"]) == (0.15, "retrain")
    assert with_retrain["recovery_ratio"] == pytest.approx(0.3 / 0.65)
    assert with_retrain["recovery_ratio_note"] is None
    assert with_retrain["forget_change"] == pytest.approx(0.3)  # the absolute change beside the ratio
    # a retrain reference without the metric, or none at all (a user's model): the registry's chance level
    for retrain in ({"retain_qa_rouge": 0.9}, None):
        scores = attack_scores(scored_row("forget_qa_rouge", 0.5, 0.2, 0.8, retrain))
        assert (scores["forget_floor"], scores["floor_source"]) == (0.0, "chance")
        assert scores["recovery_ratio"] == pytest.approx(0.3 / 0.8)
    short = attack_scores(scored_row("forget_qa_rouge", 0.8, 0.75, 0.8, {"forget_qa_rouge": 0.1}))
    assert short["recovery_ratio"] is None and "less than 20%" in short["recovery_ratio_note"]


def test_multiple_choice_is_chance_corrected_from_the_registry(monkeypatch):
    # 4-option MCQ: chance 0.25. Target 0.85, unlearned 0.3, attacked 0.55, no retrain model.
    assert METRICS["forget_mcq_accuracy"].chance == 0.25
    scores = attack_scores(scored_row("forget_mcq_accuracy", 0.55, 0.3, 0.85, None))
    assert (scores["forget_floor"], scores["floor_source"]) == (0.25, "chance")
    assert scores["recovery_ratio"] == pytest.approx(0.25 / 0.6)
    assert scores["retained_fraction"] == pytest.approx(0.5)  # (0.55 - 0.25) / (0.85 - 0.25), not 0.55 / 0.85
    # at chance the model knows nothing: nothing retained
    assert attack_scores(scored_row("forget_mcq_accuracy", 0.25, 0.3, 0.85, None))["retained_fraction"] == 0.0
    # the level is read from the registry, not the metric's name
    monkeypatch.setitem(METRICS, "forget_mcq_accuracy", replace(METRICS["forget_mcq_accuracy"], chance=0.2))
    scores = attack_scores(scored_row("forget_mcq_accuracy", 0.55, 0.3, 0.85, None))
    assert scores["forget_floor"] == 0.2 and scores["retained_fraction"] == pytest.approx(0.35 / 0.65)


def test_retained_fraction_above_chance():
    assert retained_fraction(0.55, 0.85, 0.25) == pytest.approx(0.5)
    assert retained_fraction(0.3, 0.6) == pytest.approx(0.5)  # chance 0: F_attacked / F_target
    assert retained_fraction(0.3, 0.25, 0.25) is None  # the original model was at chance


def test_guarded_cells_carry_their_note_and_leave_the_worst_case():
    rows = [
        scored_row("forget_qa_rouge", 0.8, 0.75, 0.8, None, attack="rtn-int4"),  # removed 6%: no ratio
        scored_row("forget_qa_rouge", 0.78, 0.75, 0.8, None, attack="nf4"),
    ]
    assert worst_case(rows)["recovery_ratio"] is None and worst_case(rows)["forget"] == 0.8
    cell = summarise(rows)[0]
    assert cell["attacks"]["rtn-int4"]["recovery_ratio"] is None
    assert "less than 20%" in cell["attacks"]["rtn-int4"]["recovery_ratio_note"]
    assert cell["attacks"]["nf4"]["forget_change"] == pytest.approx(0.03)


def test_means_over_seeds_carry_bootstrap_intervals():
    rows = [
        scored_row("forget_qa_rouge", 0.1 + 0.8 * ratio, 0.1, 0.8, None, seed=s) for s, ratio in enumerate([0.2, 0.4])
    ]
    mean = summarise(rows)[-1]
    assert mean["kind"] == "mean" and mean["attacks"]["rtn-int4"]["recovery_ratio"] == pytest.approx(0.3)
    # two seeds: the percentile interval is their range
    assert mean["ci"]["attacks"]["rtn-int4"]["recovery_ratio"] == pytest.approx([0.2, 0.4])
    assert mean["ci"]["cost"]["steps"] == [10.0, 10.0]
    assert summarise(rows[:1])[-1]["ci"]["attacks"]["rtn-int4"]["recovery_ratio"] is None  # one seed


def test_the_report_says_why_a_cell_has_no_ratio(tmp_path):
    rows = [
        scored_row("forget_qa_rouge", 0.75, 0.75, 0.8, None, attack="none"),
        scored_row("forget_qa_rouge", 0.8, 0.75, 0.8, None),  # removed 0.05 of 0.8: 6%
    ]
    write_results_jsonl(tmp_path / "results.jsonl", rows)
    markdown = write_report(tmp_path / "results.jsonl", tmp_path / "out")["markdown"].read_text()
    section = markdown.split("## Attack: rtn-int4", 1)[1].split("\n#", 1)[0]
    header = next(line for line in section.splitlines() if line.startswith("| optimizer"))
    cells = next(line for line in section.splitlines() if line.startswith("| adam"))
    titles = [cell.strip() for cell in header.strip("|").split("|")]
    values = [cell.strip() for cell in cells.strip("|").split("|")]
    assert values[titles.index("recovery ratio")] == "—" and values[titles.index("change from unlearned")] == "0.050"
    assert "No recovery ratio for:\n\n- adam, seed 0: unlearning removed 6% of the original model's distance" in section
