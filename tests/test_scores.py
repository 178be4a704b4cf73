"""Robustness scores over result rows."""

from __future__ import annotations

from dataclasses import replace

import pytest

from robustunlearn.study.rows import References, ResultRow, RowCell, UnlearningCost
from robustunlearn.study.scores import (
    attack_scores,
    recovery_ratio,
    relearn_auc,
    retained_fraction,
    summarise,
    worst_case,
)

TARGET = {"forget_qa_rouge": 0.9, "retain_qa_rouge": 0.95, "utility_perplexity": 10.0}
UNLEARNED = {"forget_qa_rouge": 0.1, "retain_qa_rouge": 0.8, "utility_perplexity": 12.0}


COST = UnlearningCost(
    steps=100, forward_passes=200, backward_passes=100, seconds=10.0, reached_level=True, target_level=0.2
)


def row(
    attack: str, forget: float, *, optimizer: str = "adam", seed: int = 0, utility: float = 0.7, curve=None, cost=COST
) -> ResultRow:
    return ResultRow(
        cell=RowCell(
            benchmark="synthetic", objective="npo", optimizer=optimizer, grade="first-order", seed=seed, lr=1e-3
        ),
        attack=attack,
        attack_family="none" if attack == "none" else "quantization",
        forget={"forget_qa_rouge": forget, "forget_qa_accuracy": 0.0},
        utility={"retain_qa_rouge": utility, "utility_perplexity": 15.0},
        reference=References(target=TARGET, unlearned=UNLEARNED, retrain=None),
        primary_metric="forget_qa_rouge",
        cost=cost,
        curve=curve,
    )


def test_retained_fraction_and_recovery_ratio():
    assert retained_fraction(0.3, 0.6) == pytest.approx(0.5)
    assert retained_fraction(0.3, 0.0) is None
    # floor 0.1: the unlearned model reached it, so F_target - F_floor = F_target - F_unlearned = 0.8
    assert recovery_ratio(0.5, 0.1, 0.9, 0.1).ratio == pytest.approx(0.5)
    assert recovery_ratio(0.1, 0.1, 0.9, 0.1).ratio == 0.0
    assert recovery_ratio(0.9, 0.1, 0.9, 0.1).ratio == pytest.approx(1.0)
    assert recovery_ratio(0.05, 0.1, 0.9, 0.1).ratio == pytest.approx(-0.0625)  # the attack removed more
    assert recovery_ratio(0.5, 0.4, 0.4, 0.0).ratio is None  # unlearning removed nothing


def test_relearn_auc_is_the_trapezoid_mean_level():
    # 0 -> 1 over steps 0..10, then flat at 1 until step 20: area 5 + 10 = 15 over a span of 20
    curve = [{"step": 20, "m": 1.0}, {"step": 0, "m": 0.0}, {"step": 10, "m": 1.0}]
    assert relearn_auc(curve, "m") == pytest.approx(0.75)
    assert relearn_auc([{"step": 5, "m": 0.3}], "m") == pytest.approx(0.3)
    with pytest.raises(ValueError, match="empty"):
        relearn_auc([], "m")
    with pytest.raises(ValueError, match="'m'"):
        relearn_auc([{"step": 0, "other": 1.0}], "m")


def test_attack_scores_of_one_row():
    curve = [{"step": 0, "forget_qa_rouge": 0.1}, {"step": 10, "forget_qa_rouge": 0.5}]
    scores = attack_scores(row("relearn", 0.5, curve=curve))
    assert scores["utility_metric"] == "retain_qa_rouge"
    assert scores["forget"] == 0.5
    assert scores["forget_unlearned"] == 0.1 and scores["forget_target"] == 0.9
    assert scores["retained_fraction"] == pytest.approx(0.5 / 0.9)
    assert scores["recovery_ratio"] == pytest.approx(0.4 / 0.9)  # no retrain: the floor is chance, 0
    assert scores["relearn_auc"] == pytest.approx(0.3)
    assert scores["utility_before"] == 0.8 and scores["utility_after"] == 0.7
    assert scores["utility_drop"] == pytest.approx(0.1)
    assert attack_scores(row("rtn-int4", 0.5))["relearn_auc"] is None


def test_utility_drop_is_positive_when_perplexity_rises():
    only_perplexity = replace(row("nf4", 0.2), utility={"utility_perplexity": 15.0})
    scores = attack_scores(only_perplexity)
    assert scores["utility_metric"] == "utility_perplexity"
    assert scores["utility_drop"] == pytest.approx(3.0)  # 15 after vs 12 unlearned


def test_attack_scores_names_what_is_missing():
    broken = replace(row("nf4", 0.2), primary_metric="forget_mcq_accuracy")
    with pytest.raises(ValueError, match="forget_mcq_accuracy"):
        attack_scores(broken)
    without_reference = {key: value for key, value in broken.to_json().items() if key != "reference"}
    with pytest.raises(ValueError, match="reference"):
        ResultRow.from_json(without_reference)  # a row without references cannot even be read


def test_worst_case_skips_the_unattacked_row():
    rows = [row("none", 0.95), row("rtn-int4", 0.3), row("relearn", 0.5), row("noise-0.01", 0.2)]
    worst = worst_case(rows)
    assert worst == {
        "forget": 0.5,
        "forget_attack": "relearn",
        "recovery_ratio": pytest.approx(0.4 / 0.9),
        "recovery_attack": "relearn",
    }
    assert worst_case([row("none", 0.1)])["recovery_attack"] is None
    with pytest.raises(ValueError, match="one cell"):
        worst_case([row("nf4", 0.2), row("nf4", 0.2, seed=1)])


def test_summarise_cells_then_means_over_seeds():
    longer = replace(COST, steps=200, reached_level=False)
    rows = [
        row("none", 0.1, seed=0),
        row("rtn-int4", 0.3, seed=0),
        row("none", 0.1, seed=1, cost=longer),
        row("rtn-int4", 0.5, seed=1, cost=longer),
        row("none", 0.1, optimizer="zo-sgd"),
        row("rtn-int4", 0.2, optimizer="zo-sgd"),
    ]
    summaries = summarise(rows)
    assert [(s["kind"], s["optimizer"], s["seed"]) for s in summaries] == [
        ("cell", "adam", 0),
        ("cell", "adam", 1),
        ("cell", "zo-sgd", 0),
        ("mean", "adam", None),
        ("mean", "zo-sgd", None),
    ]
    adam_0, adam_1, _, adam, zo = summaries
    # R = (F_attacked - 0.1) / (0.9 - 0): no retrain reference, the floor is forget QA ROUGE's chance, 0
    assert adam_0["attacks"]["rtn-int4"]["recovery_ratio"] == pytest.approx(0.2 / 0.9)
    assert adam_1["attacks"]["rtn-int4"]["recovery_ratio"] == pytest.approx(0.4 / 0.9)
    assert adam_0["forget_unlearned"] == 0.1 and adam_0["utility_unlearned"] == 0.8
    assert adam_0["worst"]["recovery_attack"] == "rtn-int4"
    assert adam_1["cost"]["steps"] == 200
    assert adam["seeds"] == [0, 1] and "seed" not in adam["cell"]
    assert adam["attacks"]["rtn-int4"]["recovery_ratio"] == pytest.approx(0.3 / 0.9)
    assert adam["std"]["attacks"]["rtn-int4"]["recovery_ratio"] == pytest.approx(0.2 / 0.9 / 2**0.5)
    assert adam["worst"]["forget"] == pytest.approx(0.4)
    assert {key: adam["cost"][key] for key in ("steps", "seconds", "reached_level")} == {
        "steps": 150.0,
        "seconds": 10.0,
        "reached_level": 0.5,
    }
    assert zo["attacks"]["rtn-int4"]["recovery_ratio"] == pytest.approx(0.1 / 0.9)
    assert zo["std"]["attacks"]["rtn-int4"]["recovery_ratio"] is None  # one seed
    with pytest.raises(ValueError, match="no result rows"):
        summarise([])
