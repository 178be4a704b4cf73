"""Ladder scores: each attack at growing strength against the control model under the same attack,
and the row fields they read (cost, unlearning curve, scorings, control)."""

from __future__ import annotations

import json

import pytest

from robustunlearn.study.rows import (
    COST_OPTIONAL_FIELDS,
    Control,
    References,
    ResultRow,
    RowCell,
    UnlearningCost,
    read_results_jsonl,
    write_results_jsonl,
)
from robustunlearn.study.scores import attack_scores, cell_ladders, summarise

# F_target - F_unlearned = 0.5: a rung breaks down at an excess of 0.25 (all values exact in binary).
TARGET = {"forget_qa_rouge": 0.75, "retain_qa_rouge": 0.875}
UNLEARNED = {"forget_qa_rouge": 0.25, "retain_qa_rouge": 0.875}
CELL = RowCell(benchmark="tofu", objective="npo", optimizer="adam", grade="first-order", seed=0, lr=1e-3)
COST = UnlearningCost(
    steps=10,
    forward_passes=20,
    backward_passes=10,
    seconds=1.0,
    reached_level=True,
    target_level=0.3,
    forward_equivalents=40.0,
    compute_budget=100.0,
    budget_spent=False,
    level_gap=0.05,
    level_tolerance=0.05,
)
RELEARN_CONFIG = {"lr": 1e-4, "strength": 1e-4, "records": 4, "split": "forget_qa"}


def make_row(
    attack: str, family: str, forget: float, *, control: float | Control | None = None, config=None, **parts
) -> ResultRow:
    if isinstance(control, float):
        control = Control(source="retrain", forget={"forget_qa_rouge": control}, utility={"retain_qa_rouge": 0.75})
    return ResultRow(
        cell=CELL,
        attack=attack,
        attack_family=family,
        forget={"forget_qa_rouge": forget},
        utility={"retain_qa_rouge": 0.75},
        reference=References(target=TARGET, unlearned=UNLEARNED, retrain=None),
        primary_metric="forget_qa_rouge",
        cost=COST,
        attack_config=config,
        control=control,
        **parts,
    )


def curve(whole: list[float], in_set: list[float], held_out: list[float]) -> list[dict[str, float]]:
    """A relearning curve probed at steps 0, 10, 20 (train_loss from step 10 on)."""
    return [
        {
            "step": step,
            **({"train_loss": 2.0} if step else {}),
            "forget_qa_rouge": values[0],
            "forget_qa_rouge@in_set": values[1],
            "forget_qa_rouge@held_out_subjects": values[2],
        }
        for step, values in zip((0, 10, 20), zip(whole, in_set, held_out, strict=True), strict=True)
    ]


def test_relearning_recovers_the_trained_records_but_not_the_held_out_subjects():
    control = Control(
        source="retrain",
        forget={"forget_qa_rouge": 0.25},
        utility={"retain_qa_rouge": 0.75},
        scorings={"in_set": {"forget_qa_rouge": 0.5}, "held_out_subjects": {"forget_qa_rouge": 0.125}},
        curve=curve([0.25, 0.25, 0.25], [0.25, 0.375, 0.5], [0.125, 0.125, 0.125]),
    )
    relearned = make_row(
        "relearn-lr1e-4",
        "relearning",
        0.625,
        control=control,
        config=RELEARN_CONFIG,
        curve=curve([0.25, 0.5, 0.625], [0.25, 0.75, 1.0], [0.25, 0.25, 0.25]),
        scorings={"in_set": {"forget_qa_rouge": 1.0}, "held_out_subjects": {"forget_qa_rouge": 0.25}},
    )
    ladders = {ladder.name: ladder for ladder in cell_ladders([relearned])}
    # no attributes were held out: no ladder for them; the lr is named once, apart from the attack
    assert list(ladders) == ["relearn lr=0.0001 all", "relearn lr=0.0001 in_set", "relearn lr=0.0001 held_out_subjects"]
    in_set = ladders["relearn lr=0.0001 in_set"]
    assert [(p.rung, p.strength, p.excess) for p in in_set.points] == [
        ("step 0", 0.0, 0.0),
        ("step 10", 10.0, 0.375),
        ("step 20", 20.0, 0.5),
    ]
    assert in_set.removed == 0.5 and in_set.breakdown == "step 10"  # 0.375 >= 0.25, step 0's 0 is not
    assert in_set.auc == pytest.approx(((0 + 0.375) / 2 + (0.375 + 0.5) / 2) / 2)  # 0.3125
    held_out = ladders["relearn lr=0.0001 held_out_subjects"]
    assert held_out.breakdown is None and held_out.auc == pytest.approx(0.125)  # excess 0.125 at every step
    whole = ladders["relearn lr=0.0001 all"]
    assert whole.breakdown == "step 10" and whole.auc == pytest.approx((0.25 / 2 + (0.25 + 0.375) / 2) / 2)

    scores = attack_scores(relearned)
    assert scores["control_forget"] == 0.25 and scores["control_source"] == "retrain"
    assert scores["excess_over_control"] == pytest.approx(0.375)
    assert scores["excess_scorings"] == {"in_set": pytest.approx(0.5), "held_out_subjects": pytest.approx(0.125)}
    assert (scores["forget_in_set"], scores["forget_held_out_subjects"]) == (1.0, 0.25)
    assert scores["forget_held_out_attributes"] is None

    summary = summarise([make_row("none", "none", 0.25, control=0.25), relearned])[0]
    assert summary["ladders"]["relearn lr=0.0001 in_set"] == {
        "family": "relearning",
        "auc": pytest.approx(0.3125),
        "breakdown": "step 10",
    }
    assert summary["ladders"]["relearn lr=0.0001 held_out_subjects"]["breakdown"] is None
    assert summary["level_gap"] == 0.05 and summary["forward_equivalents"] == 40.0
    assert summary["attacks"]["relearn-lr1e-4"]["excess_over_control"] == pytest.approx(0.375)
    same_lr = make_row("relearn", "relearning", 0.625, config=RELEARN_CONFIG, curve=relearned.curve)
    with pytest.raises(ValueError, match="named relearn lr=0.0001 all"):
        cell_ladders([relearned, same_lr])


def test_a_control_that_learns_as_fast_leaves_no_excess():
    points = curve([0.25, 0.5, 0.75], [0.25, 0.75, 1.0], [0.25, 0.5, 0.5])
    control = Control(source="target", forget={"forget_qa_rouge": 0.75}, utility={}, curve=points)
    rows = [
        make_row("none", "none", 0.25, control=0.25),
        make_row("relearn", "relearning", 0.75, control=control, config=RELEARN_CONFIG, curve=points),
        make_row("rtn-int4", "quantization", 0.5, control=0.5, config={"method": "rtn", "bits": 4, "strength": 12}),
        make_row("rtn-int2", "quantization", 0.625, control=0.625, config={"method": "rtn", "bits": 2, "strength": 14}),
    ]
    ladders = cell_ladders(rows)
    assert [ladder.name for ladder in ladders] == [
        "quantization rtn",
        "relearn lr=0.0001 all",
        "relearn lr=0.0001 in_set",
        "relearn lr=0.0001 held_out_subjects",
    ]
    for ladder in ladders:
        assert [point.excess for point in ladder.points] == [0.0] * len(ladder.points)
        assert ladder.auc == 0.0 and ladder.breakdown is None
    assert attack_scores(rows[0])["excess_over_control"] == 0.0  # F_unlearned - F_control_unlearned


def test_an_rtn_ladder_given_out_of_order_breaks_at_half_of_what_was_removed():
    def rtn(bits: int, forget: float) -> ResultRow:
        config = {"method": "rtn", "bits": bits, "strength": 16 - bits, "same_bucket": 0.9}
        return make_row(f"rtn-int{bits}", "quantization", forget, control=0.25, config=config)

    nf4 = make_row("nf4", "quantization", 0.5, control=0.375, config={"method": "nf4", "bits": 4, "strength": 12})
    rows = [rtn(3, 0.5), nf4, rtn(8, 0.25), rtn(2, 0.75), rtn(4, 0.375)]
    rtn_ladder, nf4_ladder = cell_ladders(rows)
    assert rtn_ladder.name == "quantization rtn" and rtn_ladder.family == "quantization"
    assert [(p.rung, p.strength, p.excess) for p in rtn_ladder.points] == [
        ("int8", 8.0, 0.0),
        ("int4", 12.0, 0.125),
        ("int3", 13.0, 0.25),  # exactly removed / 2: counts as the breakdown
        ("int2", 14.0, 0.5),
    ]
    assert rtn_ladder.breakdown == "int3"
    assert rtn_ladder.auc == pytest.approx(((0 + 0.125) + (0.125 + 0.25) + (0.25 + 0.5)) / 2 / 3)
    # one rung: the AUC is its excess; 0.125 < 0.25 does not break down
    assert (nf4_ladder.name, nf4_ladder.auc, nf4_ladder.breakdown) == ("quantization nf4", 0.125, None)


def test_rows_without_a_control_have_ladders_without_scores():
    # rows written before controls and attack configs: the strengths come from the attack names
    rows = [
        make_row("none", "none", 0.25),
        make_row("rtn-int2", "quantization", 0.75),
        make_row("rtn-int4", "quantization", 0.5),
        make_row("noise-0.03", "perturbation", 0.5),
        make_row("noise-0.01", "perturbation", 0.375),
        make_row("prune-0.3", "perturbation", 0.5),
        make_row("relearn", "relearning", 0.5, curve=curve([0.25, 0.5, 0.5], [0.25, 0.5, 0.5], [0.25, 0.25, 0.25])),
    ]
    ladders = {ladder.name: ladder for ladder in cell_ladders(rows)}
    assert list(ladders) == ["quantization rtn", "noise", "relearn all", "relearn in_set", "relearn held_out_subjects"]
    assert [(p.rung, p.strength) for p in ladders["quantization rtn"].points] == [("int4", 12.0), ("int2", 14.0)]
    assert [(p.rung, p.strength) for p in ladders["noise"].points] == [("0.01", 0.01), ("0.03", 0.03)]
    for ladder in ladders.values():
        assert ladder.auc is None and ladder.breakdown is None
        assert all(point.control is None and point.excess is None for point in ladder.points)
    scores = attack_scores(rows[1])
    assert [scores[key] for key in ("control_forget", "control_source", "excess_over_control")] == [None] * 3
    assert scores["excess_scorings"] is None and scores["forget_in_set"] is None
    summary = summarise(rows)[0]
    assert summary["ladders"]["noise"] == {"family": "perturbation", "auc": None, "breakdown": None}


NEW_FIELDS_ROW = {
    "cell": CELL.to_json(),
    "attack": "relearn",
    "attack_family": "relearning",
    "attack_config": RELEARN_CONFIG,
    "forget": {"forget_qa_rouge": 0.5},
    "utility": {"retain_qa_rouge": 0.75},
    "reference": {"target": TARGET, "unlearned": UNLEARNED, "retrain": None},
    "primary_metric": "forget_qa_rouge",
    "cost": COST.to_json(),
    "unlearning_curve": [
        {"step": 5, "forward_equivalents": 20.0, "forget_qa_rouge": 0.5, "retain_qa_rouge": 0.875},
        {"step": 10, "forward_equivalents": 40.0, "forget_qa_rouge": 0.25},
    ],
    "curve": curve([0.25, 0.5, 0.5], [0.25, 0.5, 0.75], [0.25, 0.25, 0.25]),
    "landscape": None,
    "scorings": {"in_set": {"forget_qa_rouge": 0.75}, "held_out_attributes": {"forget_qa_rouge": 0.25}},
    "control": {
        "source": "target",
        "forget": {"forget_qa_rouge": 0.75},
        "utility": {"retain_qa_rouge": 0.875},
        "scorings": {"in_set": {"forget_qa_rouge": 1.0}},
        "curve": [{"step": 0, "forget_qa_rouge": 0.75}],
    },
    "scores": {},
}


def test_a_row_with_every_new_field_round_trips(tmp_path):
    row = ResultRow.from_json(NEW_FIELDS_ROW)
    assert row.cost == COST and row.control.source == "target" and row.scorings["in_set"] == {"forget_qa_rouge": 0.75}
    assert row.control.curve == [{"step": 0, "forget_qa_rouge": 0.75}] and row.unlearning_curve[1]["step"] == 10
    assert row.to_json() == NEW_FIELDS_ROW
    path = tmp_path / "results.jsonl"
    write_results_jsonl(path, [row])
    assert read_results_jsonl(path) == [row]
    # a row written before the new fields reads, and writes them nowhere
    new_keys = ("unlearning_curve", "scorings", "control")
    old = {key: value for key, value in NEW_FIELDS_ROW.items() if key not in new_keys}
    old["cost"] = {key: value for key, value in old["cost"].items() if key not in COST_OPTIONAL_FIELDS}
    read = ResultRow.from_json(old)
    assert read.control is None and read.scorings is None and read.cost.level_gap is None
    assert read.to_json() == old


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"control": {**NEW_FIELDS_ROW["control"], "source": "oracle"}}, r"'control.source' must be one of"),
        ({"scorings": {"in_set": {"forget_qa_rouge": "high"}}}, r"'scorings.in_set' must be an object of numbers"),
        ({"scorings": {"in_sets": {}}}, r"'scorings' has unknown scoring\(s\) in_sets"),
        ({"cost": {**NEW_FIELDS_ROW["cost"], "budget_spent": "no"}}, r"'cost.budget_spent' must be true or false"),
        ({"unlearning_curve": [{"step": "10"}]}, r"'unlearning_curve' must be a list of objects of numbers"),
        ({"control": {"source": "retrain", "forget": {}}}, r"lacks control.utility"),
    ],
)
def test_a_bad_new_field_names_the_file_line_and_field(tmp_path, change, message):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(NEW_FIELDS_ROW) + "\n" + json.dumps({**NEW_FIELDS_ROW, **change}) + "\n")
    with pytest.raises(ValueError, match=rf"results.jsonl:2: .*{message}"):
        read_results_jsonl(path)
