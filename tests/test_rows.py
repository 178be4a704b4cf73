"""The study's result rows: one schema for results.jsonl and each cell's rows.json."""

from __future__ import annotations

import json

import pytest

from robustunlearn.study.rows import (
    Landscape,
    ResultRow,
    read_cell_rows,
    read_results_jsonl,
    write_cell_rows,
    write_results_jsonl,
)

# A row as the grid has always written it (a relearning attack, with landscape and TOFU scores).
WRITTEN = {
    "cell": {
        "benchmark": "tofu",
        "objective": "npo",
        "optimizer": "adam",
        "grade": "first-order",
        "seed": 1,
        "lr": 1e-5,
    },
    "attack": "relearn",
    "attack_family": "relearning",
    "forget": {"forget_qa_rouge": 0.4, "forget_qa_accuracy": 0.25},
    "utility": {"retain_qa_rouge": 0.8, "retain_qa_accuracy": 0.7},
    "reference": {
        "target": {"forget_qa_rouge": 0.9, "retain_qa_rouge": 0.9},
        "unlearned": {"forget_qa_rouge": 0.1, "retain_qa_rouge": 0.85},
        "retrain": None,
    },
    "primary_metric": "forget_qa_rouge",
    "curve": [{"step": 0, "forget_qa_rouge": 0.1}, {"step": 4, "train_loss": 2.5, "forget_qa_rouge": 0.4}],
    "cost": {
        "steps": 12,
        "forward_passes": 24,
        "backward_passes": 12,
        "seconds": 1.25,
        "reached_level": False,
        "target_level": None,
    },
    "landscape": {
        "pair": "adam-vs-zo-sgd",
        "lmc": [{"alpha": 0.0, "forget_qa_rouge": 0.1, "forget_qa_loss": 3.0}],
        "sharpness_loss": "forget_qa_loss",
        "sharpness": [{"scale": 0.01, "mean_loss_increase": 0.002, "std": 0.0}],
    },
    "scores": {"forget": 0.4, "recovery_ratio": 0.375, "utility_metric": "retain_qa_rouge"},
    "tofu": {"forget_truth_ratio": 0.6, "model_utility": None, "utility_sets": {"world_facts": {"rouge": 0.5}}},
}


def test_a_row_round_trips_through_its_json_key_for_key():
    row = ResultRow.from_json(WRITTEN)
    assert row.cell.seed == 1 and row.reference.retrain is None and row.cost.reached_level is False
    assert row.landscape.pair == "adam-vs-zo-sgd" and row.tofu["forget_truth_ratio"] == 0.6
    assert row.to_json() == WRITTEN
    assert ResultRow.from_json(row.to_json()) == row
    # the parts list their keys sorted, as the files store them
    assert list(row.cell.to_json()) == sorted(WRITTEN["cell"]) and list(row.cost.to_json()) == sorted(WRITTEN["cost"])


def test_absent_optional_parts_stay_absent():
    bare = {key: value for key, value in WRITTEN.items() if key != "tofu"}
    bare["landscape"] = {"sharpness_loss": "forget_qa_loss", "sharpness": []}
    row = ResultRow.from_json(bare)
    assert row.tofu is None and row.landscape == Landscape(sharpness_loss="forget_qa_loss", sharpness=[])
    assert row.to_json() == bare  # no "tofu": null, no "pair"/"lmc": null
    assert ResultRow.from_json({**bare, "landscape": None, "curve": None}).to_json()["landscape"] is None


def test_results_jsonl_round_trips_byte_for_byte(tmp_path):
    rows = [ResultRow.from_json(WRITTEN), ResultRow.from_json({**WRITTEN, "attack": "nf4", "curve": None})]
    path = tmp_path / "results.jsonl"
    write_results_jsonl(path, rows)
    text = path.read_text()
    assert text == "".join(json.dumps(row.to_json(), sort_keys=True) + "\n" for row in rows)
    assert read_results_jsonl(path) == rows
    write_results_jsonl(path, read_results_jsonl(path))
    assert path.read_text() == text


def test_cell_rows_round_trip(tmp_path):
    rows = [ResultRow.from_json(WRITTEN)]
    path = tmp_path / "rows.json"
    write_cell_rows(path, rows)
    assert json.loads(path.read_text()) == [WRITTEN]
    assert read_cell_rows(path) == rows
    path.write_text(json.dumps([WRITTEN, {**WRITTEN, "cost": {**WRITTEN["cost"], "steps": "12"}}]))
    with pytest.raises(ValueError, match=r"rows.json: row 1: 'cost.steps' must be an integer"):
        read_cell_rows(path)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"not valid JSON"),
        ("[1, 2]", r"expected a JSON object, got list"),
        (json.dumps({k: v for k, v in WRITTEN.items() if k not in ("forget", "cost")}), r"lacks forget, cost$"),
        (json.dumps({**WRITTEN, "extra": 1}), r"unknown field\(s\) extra"),
        (json.dumps({**WRITTEN, "cell": [1]}), r"'cell' must be an object"),
        (json.dumps({**WRITTEN, "cell": {**WRITTEN["cell"], "seed": "1"}}), r"'cell.seed' must be an integer"),
        (json.dumps({**WRITTEN, "forget": {"forget_qa_rouge": "high"}}), r"'forget' must be an object of numbers"),
        (json.dumps({**WRITTEN, "reference": {"target": {}}}), r"lacks reference.unlearned, reference.retrain"),
        (json.dumps({**WRITTEN, "landscape": {"lmc": [{"alpha": None}]}}), r"'landscape.lmc' must be a list"),
    ],
)
def test_a_malformed_line_names_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(WRITTEN) + "\n\n" + line + "\n")
    with pytest.raises(ValueError, match=rf"results.jsonl:3: .*{message}"):
        read_results_jsonl(path)


def test_a_check_sees_the_first_row_and_its_rejection_names_the_line(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(WRITTEN) + "\n" + json.dumps({**WRITTEN, "attack": "nf4"}) + "\n")
    seen = []

    def check(row: ResultRow, first: ResultRow) -> None:
        seen.append((row.attack, first.attack))
        if row.attack == "nf4":
            raise ValueError("no nf4 here")

    with pytest.raises(ValueError, match=r"results.jsonl:2: no nf4 here"):
        read_results_jsonl(path, check)
    assert seen == [("relearn", "relearn"), ("nf4", "relearn")]
    path.write_text("\n")
    with pytest.raises(ValueError, match="holds no result rows"):
        read_results_jsonl(path)
