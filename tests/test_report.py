"""The study report: markdown, HTML and plots from a hand-built results.jsonl."""

from __future__ import annotations

import base64
import io
import json
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from robustunlearn.study.report import read_results, write_report
from robustunlearn.study.rows import Landscape, References, ResultRow, RowCell, UnlearningCost, write_results_jsonl

TARGET = {"forget_qa_rouge": 0.8, "retain_qa_rouge": 0.9}
RETRAIN = {"forget_qa_rouge": 0.15, "retain_qa_rouge": 0.88}
FAMILIES = {"none": "none", "rtn-int4": "quantization", "relearn": "relearning"}


def row(
    optimizer: str, grade: str, attack: str, forget: float, unlearned: float, *, seed: int = 0, landscape=None
) -> ResultRow:
    curve = None
    if attack == "relearn":
        curve = [{"step": 0, "forget_qa_rouge": unlearned}, {"step": 10, "forget_qa_rouge": forget}]
    return ResultRow(
        cell=RowCell(benchmark="synthetic", objective="npo", optimizer=optimizer, grade=grade, seed=seed, lr=1e-4),
        attack=attack,
        attack_family=FAMILIES[attack],
        forget={"forget_qa_rouge": forget, "forget_qa_accuracy": forget / 2},
        utility={"retain_qa_rouge": 0.85 if attack == "none" else 0.8, "utility_perplexity": 12.0},
        reference=References(
            target=TARGET, unlearned={"forget_qa_rouge": unlearned, "retain_qa_rouge": 0.85}, retrain=RETRAIN
        ),
        primary_metric="forget_qa_rouge",
        cost=UnlearningCost(
            steps=40, forward_passes=80, backward_passes=40, seconds=3.5, reached_level=True, target_level=0.2
        ),
        curve=curve,
        landscape=landscape,
    )


LMC = Landscape(
    pair="adam-vs-zo-sgd",
    lmc=[{"alpha": a, "forget_qa_rouge": 0.2 + 0.4 * a * (1 - a), "retain_qa_rouge": 0.85} for a in (0.0, 0.5, 1.0)],
    sharpness_loss="forget_qa_loss",
    sharpness=[{"scale": 0.01, "mean_loss_increase": 0.00123, "std": 0.0004}],
)

# Recovery ratios (F_attacked - F_unlearned) / (F_target - F_retrain), target 0.8, retrain 0.15:
#   adam (unlearned 0.2):   rtn-int4 0.5 -> 0.3/0.65 = 0.462, relearn 0.65 -> 0.45/0.65 = 0.692
#   zo-sgd (unlearned 0.3): rtn-int4 0.35 -> 0.05/0.65 = 0.077, relearn 0.6 -> 0.3/0.65 = 0.462
ROWS = [
    row("adam", "first-order", "none", 0.2, 0.2, landscape=LMC),
    row("adam", "first-order", "rtn-int4", 0.5, 0.2, landscape=LMC),
    row("adam", "first-order", "relearn", 0.65, 0.2, landscape=LMC),
    row("zo-sgd", "zeroth-order", "none", 0.3, 0.3),
    row("zo-sgd", "zeroth-order", "rtn-int4", 0.35, 0.3),
    row("zo-sgd", "zeroth-order", "relearn", 0.6, 0.3),
]


def write_jsonl(path: Path, rows: list[ResultRow]) -> Path:
    write_results_jsonl(path, rows)
    return path


def table_row(markdown: str, heading: str, optimizer: str, nth: int = 0) -> list[str]:
    """The cells of ``optimizer``'s ``nth`` row in the first table after ``heading``."""
    section = markdown.split(heading, 1)[1].split("\n#", 1)[0]
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if cells[0] == optimizer:
            if nth == 0:
                return cells
            nth -= 1
    raise AssertionError(f"no row for {optimizer} under {heading!r}")


def column(markdown: str, heading: str, title: str) -> int:
    section = markdown.split(heading, 1)[1]
    header = next(line for line in section.splitlines() if line.startswith("|"))
    return [cell.strip() for cell in header.strip("|").split("|")].index(title)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("report")
    return write_report(write_jsonl(directory / "results.jsonl", ROWS), directory / "out", title="Test study")


def test_writes_the_report_and_valid_pngs(report):
    assert set(report) == {"markdown", "html", "forget_vs_utility", "relearning_curves", "recovery_by_grade", "lmc"}
    for name, path in report.items():
        assert path.is_file() and path.stat().st_size > 0, name
        if path.suffix == ".png":
            with Image.open(path) as image:
                assert image.format == "PNG" and image.width > 100 and image.height > 100
    # no temporary files left behind by the atomic writes
    assert sorted(p.name for p in report["markdown"].parent.iterdir()) == sorted(p.name for p in report.values())


def test_markdown_has_every_optimizer_attack_and_the_recovery_ratios(report):
    markdown = report["markdown"].read_text()
    assert markdown.startswith("# Test study")
    for name in ("adam", "zo-sgd", "rtn-int4", "relearn", "synthetic", "npo", "lr: 0.0001", "How to read this"):
        assert name in markdown
    quantized = column(markdown, "## Attack: rtn-int4", "recovery ratio")
    relearned = column(markdown, "## Attack: relearn", "recovery ratio")
    assert table_row(markdown, "## Attack: rtn-int4", "adam")[quantized] == "0.462"
    assert table_row(markdown, "## Attack: rtn-int4", "zo-sgd")[quantized] == "0.077"
    assert table_row(markdown, "## Attack: relearn", "adam")[relearned] == "0.692"
    assert table_row(markdown, "## Attack: relearn", "zo-sgd")[relearned] == "0.462"
    # relearn AUC of a two-point curve: the mean of its ends, (0.2 + 0.65) / 2
    auc = column(markdown, "## Attack: relearn", "relearn AUC")
    assert table_row(markdown, "## Attack: relearn", "adam")[auc] == "0.425"
    assert "relearn AUC" not in markdown.split("## Attack: rtn-int4")[1].split("\n#")[0]
    # worst case: relearning is the worst attack for both
    worst = table_row(markdown, "## Worst case", "adam")
    assert worst[-4:] == ["0.650", "relearn", "0.692", "relearn"]
    cost = table_row(markdown, "## Cost", "zo-sgd")
    assert "40" in cost and "80" in cost and "3.500" in cost
    # the LMC barrier of the forget metric: 0.4 · 0.5 · 0.5 above the chord at α = 1/2
    assert table_row(markdown, "## Loss landscape", "adam-vs-zo-sgd")[1:] == ["forget_qa_rouge", "0.100"]
    # and the retain ROUGE dip: the path is flat at 0.85, no barrier
    assert table_row(markdown, "## Loss landscape", "adam-vs-zo-sgd", nth=1)[1:] == ["retain_qa_rouge", "0.000"]
    assert "| adam | forget_qa_loss | 0.01 | 0.00123 ± 0.0004 |" in markdown  # sharpness, labelled by its cell
    for name in ("forget_vs_utility", "relearning_curves", "recovery_by_grade", "lmc"):
        assert f"]({name}.png)" in markdown


def test_tables_order_grades_zeroth_order_first(report):
    section = report["markdown"].read_text().split("## Attack: rtn-int4", 1)[1]
    assert section.index("| zo-sgd") < section.index("| adam")


def test_html_is_self_contained(report):
    page = report["html"].read_text()
    assert page.startswith("<!DOCTYPE html>") and "<table>" in page
    for name in ("adam", "zo-sgd", "rtn-int4", "relearn", "0.692"):
        assert name in page
    embedded = page.split('src="data:image/png;base64,')[1:]
    assert len(embedded) == 4 and ".png" not in page.replace("base64", "")
    with Image.open(io.BytesIO(base64.b64decode(embedded[0].split('"', 1)[0]))) as image:
        assert image.format == "PNG"


def test_means_over_seeds_and_skipped_plots(tmp_path):
    rows = [
        row("adam", "first-order", "none", 0.2, 0.2, seed=0),
        row("adam", "first-order", "rtn-int4", 0.5, 0.2, seed=0),  # R = 0.3 / 0.65
        row("adam", "first-order", "none", 0.2, 0.2, seed=1),
        row("adam", "first-order", "rtn-int4", 0.38, 0.2, seed=1),  # R = 0.18 / 0.65
    ]
    written = write_report(write_jsonl(tmp_path / "results.jsonl", rows), tmp_path / "out")
    assert set(written) == {"markdown", "html", "forget_vs_utility", "recovery_by_grade"}
    markdown = written["markdown"].read_text()
    cells = table_row(markdown, "## Attack: rtn-int4", "adam")
    assert cells[column(markdown, "## Attack: rtn-int4", "seeds")] == "2"
    # mean 0.24 / 0.65, and the bootstrap interval over two seeds: the range of their values
    assert cells[column(markdown, "## Attack: rtn-int4", "recovery ratio")] == "0.369 [0.277, 0.462]"
    assert "Loss landscape" not in markdown


ACCURACY_ROW = replace(
    ROWS[1],
    primary_metric="forget_qa_accuracy",
    reference=References(
        target={**TARGET, "forget_qa_accuracy": 0.7},
        unlearned={"forget_qa_accuracy": 0.1, "retain_qa_rouge": 0.85},
        retrain=None,
    ),
)
FIRST, SECOND = ROWS[0].to_json(), ROWS[1].to_json()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "holds no result rows"),
        ("\n  \n", "holds no result rows"),
        (json.dumps(FIRST) + "\n{not json\n", r"results.jsonl:2: not valid JSON"),
        ("[1, 2]\n", r"results.jsonl:1: expected a JSON object"),
        (
            json.dumps(FIRST) + "\n\n" + json.dumps({k: v for k, v in SECOND.items() if k != "forget"}),
            r"results.jsonl:3: .*lacks forget",
        ),
        (json.dumps({**FIRST, "cell": {"optimizer": "adam"}}), r"results.jsonl:1: .*cell.benchmark"),
        (json.dumps({**FIRST, "primary_metric": "forget_mcq_accuracy"}), r"results.jsonl:1: .*'forget_mcq_accuracy'"),
        (
            json.dumps(FIRST) + "\n" + json.dumps(ACCURACY_ROW.to_json()),
            r"results.jsonl:2: scored on 'forget_qa_accuracy'",
        ),
    ],
)
def test_bad_input_names_the_line(tmp_path, content, message):
    path = tmp_path / "results.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        read_results(path)
    with pytest.raises(ValueError, match=message):
        write_report(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_swept_lr_reads_as_the_value_it_stands_for(tmp_path):
    # a sweep's candidate is base x factor: 1e-05 * 3 is 3.0000000000000004e-05 in binary floating point
    swept = 1e-05 * 3
    rows = [replace(r, cell=replace(r.cell, lr=swept if r.cell.optimizer == "adam" else 1e-4)) for r in ROWS]
    markdown = write_report(write_jsonl(tmp_path / "results.jsonl", rows), tmp_path / "out")["markdown"].read_text()
    assert repr(swept) not in markdown
    assert "lr: 3e-05, 0.0001" in markdown
    assert table_row(markdown, "## Matched level", "adam")[2] == "3e-05"
