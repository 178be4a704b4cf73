"""The report's protocol sections on a hand-built study with controls (two optimizers x two seeds):
the claims on ladder AUCs (held-out relearning counted, in-set shown), the utility flag, the
protocol and splits, the matched level, the ladder tables, the plots, and older rows' fallbacks."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from robustunlearn.study.claims import IN_SET, LADDER_MEASURE, ZEROTH_ORDER, Claim, Comparison, evaluate_claims
from robustunlearn.study.report import write_report
from robustunlearn.study.rows import Control, References, ResultRow, RowCell, UnlearningCost, write_results_jsonl
from robustunlearn.study.stats import CONTRADICTED, NOT_MEASURED, SUPPORTED

METRIC, UTILITY = "forget_qa_rouge", "retain_qa_rouge"
TARGET = {METRIC: 0.8, UTILITY: 0.9}
RETRAIN = {METRIC: 0.15, UTILITY: 0.88}
GRADES = {"adam": "first-order", "hybrid": "hybrid"}
LR = 1e-4
TOLERANCE = 0.05  # target level = 0.15 + 0.05 = 0.2
# F_unlearned per (optimizer, seed): hybrid's seed 1 ends 0.1 below the target level 0.2 (over-shot).
UNLEARNED = {("adam", 0): 0.2, ("adam", 1): 0.2, ("hybrid", 0): 0.2, ("hybrid", 1): 0.1}
# Quantization (rtn-int8, rtn-int4) and noise (0.01, 0.03) F_attacked; the control's under the same rung.
QUANTIZED = {"adam": (0.25, 0.45), "hybrid": (0.22, 0.30)}  # hybrid's int4 gets + 0.02 x seed
QUANTIZED_CONTROL = (0.15, 0.17)
NOISED = {"adam": (0.21, 0.30), "hybrid": (0.20, 0.25)}
NOISED_CONTROL = (0.15, 0.16)
# Relearning curves at steps 0, 10, 20 on each part of the forget set ("" = the whole set; its step 0
# is F_unlearned). The hybrid recovers nothing of the held-out subjects.
RELEARNED = {
    "adam": {"": (0.5, 0.7), "in_set": (0.2, 0.75, 0.8), "held_out_subjects": (0.2, 0.3, 0.4)},
    "hybrid": {"": (0.4, 0.6), "in_set": (0.2, 0.7, 0.75), "held_out_subjects": (0.15, 0.15, 0.15)},
}
RELEARNED_CONTROL = {"": (0.15, 0.3, 0.4), "in_set": (0.15, 0.3, 0.4), "held_out_subjects": (0.15, 0.15, 0.15)}
SAME_BUCKET = (0.9, 0.7)  # per rung, every cell

PROTOCOL = {
    "compute_budget": 400.0,
    "backward_cost": 2.0,
    "check_every": 10,
    "level_metric": METRIC,
    "level_tolerance": TOLERANCE,
    "reference_optimizer": "adam",
    "seeds": [0, 1],
    "sweep_seeds": [100, 101],
    "attacks": ["rtn-int8", "rtn-int4", "noise-0.01", "noise-0.03", "relearn"],
}
SPLITS = {
    "retain": {
        "seed": 0,
        "shares": {"regulariser": 0.5, "validation": 0.25, "evaluation": 0.25},
        "subjects": {"regulariser": ["a", "b", "c", "d"], "validation": ["e", "f"], "evaluation": ["g", "h"]},
        "records": {"regulariser": {"retain_qa": 8}, "validation": {"retain_qa": 4}, "evaluation": {"retain_qa": 4}},
    },
    "relearn": {
        str(seed): {
            "seed": seed,
            "split": "forget_qa",
            "subjects": [f"p{seed}", f"q{seed}"],
            "attributes": ["birthplace"],
            "counts": {"train": 2, "held_out_subjects": 6, "held_out_attributes": 2},
        }
        for seed in (0, 1)
    },
}


def cost(optimizer: str, seed: int) -> UnlearningCost:
    gap = 0.2 - UNLEARNED[optimizer, seed]
    steps = 40 if optimizer == "adam" else 50
    return UnlearningCost(
        steps=steps,
        forward_passes=2 * steps,
        backward_passes=steps,
        seconds=1.0,
        reached_level=True,
        target_level=0.2,
        forward_equivalents=4.0 * steps,
        compute_budget=400.0,
        budget_spent=False,
        level_gap=gap,
        level_tolerance=TOLERANCE,
    )


def relearn_curve(values: dict[str, tuple[float, ...]], unlearned: float | None) -> list[dict[str, float]]:
    whole = values[""] if unlearned is None else (unlearned, *values[""])
    return [
        {"step": step, METRIC: whole[i], **{f"{METRIC}@{part}": values[part][i] for part in values if part}}
        for i, step in enumerate((0, 10, 20))
    ]


def cell_rows(optimizer: str, seed: int, utility: float, *, relearning: bool = True) -> list[ResultRow]:
    """A cell's rows: the unlearned model, the rtn and noise ladders and (with ``relearning``) one
    relearning attack scored on in-set and held-out subjects, each with its control."""
    unlearned = UNLEARNED[optimizer, seed]
    common = {
        "cell": RowCell("synthetic", "npo", optimizer, GRADES[optimizer], seed, 1e-3),
        "reference": References(TARGET, {METRIC: unlearned, UTILITY: utility}, RETRAIN),
        "primary_metric": METRIC,
        "cost": cost(optimizer, seed),
        "unlearning_curve": [
            {"step": 10, "forward_equivalents": 40.0, METRIC: 0.6, UTILITY: 0.88},
            {"step": 20, "forward_equivalents": 80.0, METRIC: 0.4, UTILITY: 0.87},
            {"step": 40, "forward_equivalents": 160.0, METRIC: unlearned, UTILITY: utility},
        ],
    }

    def row(attack: str, family: str, forget: float, control: float, config=None, relearned=None) -> ResultRow:
        """``relearned``: the row's and the control's scorings and curves."""
        mine, theirs = relearned or ({}, {})
        return ResultRow(
            attack=attack,
            attack_family=family,
            forget={METRIC: forget},
            utility={UTILITY: utility},
            control=Control("retrain", {METRIC: control}, {UTILITY: 0.88}, theirs.get("scorings"), theirs.get("curve")),
            attack_config=config,
            scorings=mine.get("scorings"),
            curve=mine.get("curve"),
            **common,
        )

    int8, int4 = QUANTIZED[optimizer]
    int4 += 0.02 * seed if optimizer == "hybrid" else 0.0
    rows = [row("none", "none", unlearned, RETRAIN[METRIC])]
    for bits, forget, control, same in zip((8, 4), (int8, int4), QUANTIZED_CONTROL, SAME_BUCKET):
        config = {"method": "rtn", "bits": bits, "strength": 16 - bits, "same_bucket": same}
        config["update_to_step"] = {"median": bits / 10, "max": 1.0, "per_layer": {}}
        rows.append(row(f"rtn-int{bits}", "quantization", forget, control, config))
    for scale, forget, control in zip((0.01, 0.03), NOISED[optimizer], NOISED_CONTROL):
        rows.append(row(f"noise-{scale}", "perturbation", forget, control, {"scale": scale, "strength": scale}))
    if relearning:
        values = RELEARNED[optimizer]
        parts = [part for part in values if part]
        mine = {"scorings": {p: {METRIC: values[p][-1]} for p in parts}, "curve": relearn_curve(values, unlearned)}
        theirs = {
            "scorings": {p: {METRIC: RELEARNED_CONTROL[p][-1]} for p in parts},
            "curve": relearn_curve(RELEARNED_CONTROL, None),
        }
        config = {"lr": LR, "strength": LR, "records": 2, "split": "forget_qa"}
        rows.append(row("relearn", "relearning", values[""][-1], RELEARNED_CONTROL[""][-1], config, (mine, theirs)))
    return rows


def study_rows(utility_gap: dict[int, float], *, relearning: bool = True) -> list[ResultRow]:
    """adam and the hybrid x seeds 0, 1; the hybrid's unlearned utility is adam's 0.85 minus
    ``utility_gap[seed]``."""
    return [
        row
        for seed in (0, 1)
        for optimizer, utility in (("adam", 0.85), ("hybrid", 0.85 - utility_gap[seed]))
        for row in cell_rows(optimizer, seed, utility, relearning=relearning)
    ]


def write_study(directory: Path, rows: list[ResultRow], *, protocol: bool = True) -> dict[str, Path]:
    directory.mkdir(parents=True)
    write_results_jsonl(directory / "results.jsonl", rows)
    if protocol:
        (directory / "protocol.json").write_text(json.dumps(PROTOCOL), encoding="utf-8")
        (directory / "splits.json").write_text(json.dumps(SPLITS), encoding="utf-8")
    return write_report(directory / "results.jsonl", directory / "report")


def section(markdown: str, heading: str) -> str:
    return markdown.split(heading + "\n", 1)[1].split("\n#", 1)[0]


def table(markdown: str, heading: str) -> list[dict[str, str]]:
    """The first table after ``heading``, one dict per row by column title."""
    lines = [line for line in section(markdown, heading).splitlines() if line.startswith("|")]
    header, _, *rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    return [dict(zip(header, row)) for row in rows]


def claim(markdown: str, number: int) -> dict[str, str]:
    return next(row for row in table(markdown, "## Claims") if row["#"] == str(number))


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict[str, Path]:
    # the hybrid's utility 0.2 below adam's (0.21 at seed 1): beyond the interval [-0.21, -0.2]
    return write_study(tmp_path_factory.mktemp("study") / "results", study_rows({0: 0.2, 1: 0.21}))


def test_the_hybrid_claim_compares_ladder_aucs_paired_by_seed(report):
    markdown = report["markdown"].read_text()
    hybrid = claim(markdown, 5)
    # Per seed, hybrid - adam averaged over the three ladders read:
    #   quantization rtn, excess per rung: adam (0.10, 0.28) -> AUC 0.19; hybrid (0.07, 0.13 + 0.02 s) -> 0.10 + 0.01 s
    #   relearning on held-out subjects: adam (0.05, 0.15, 0.25) -> 0.15; hybrid (0, 0, 0) -> 0
    #   noise: adam (0.06, 0.14) -> 0.10; hybrid (0.05, 0.09) -> 0.07
    # seed 0: (-0.09 - 0.15 - 0.03) / 3 = -0.09; seed 1: (-0.08 - 0.15 - 0.03) / 3 = -0.0867
    assert hybrid["difference [95% CI]"] == "-0.088 [-0.090, -0.087]"
    assert hybrid["verdict"] == "supported"  # the interval excludes 0 below
    assert hybrid["comparison"] == (
        "excess AUC over the control over every attack [quantization rtn, relearn lr=0.0001 held_out_subjects, "
        "noise]: hybrid − adam < 0"
    )
    assert hybrid["F_unlearned"] == "hybrid 0.150, adam 0.200"
    # claim 4 compares forgetting and utility: no F_unlearned beside it
    assert claim(markdown, 4)["F_unlearned"] == "—; —"


def test_the_utility_flag_marks_a_gap_beyond_its_interval(report, tmp_path):
    flagged = claim(report["markdown"].read_text(), 5)["utility caveat"]
    assert flagged == "utility of hybrid − adam: -0.205 [-0.210, -0.200]"
    # a gap of -0.01 / +0.01: its interval spans 0, no flag (a lighter study: no relearning, no protocol)
    written = write_study(tmp_path / "study", study_rows({0: 0.01, 1: -0.01}, relearning=False), protocol=False)
    unflagged = claim(written["markdown"].read_text(), 5)
    assert unflagged["verdict"] == "supported" and unflagged["utility caveat"] == "—"


def test_the_protocol_section_follows_the_claims(report):
    markdown = report["markdown"].read_text()
    assert markdown.index("## Claims") < markdown.index("## Protocol") < markdown.index("## Setup")
    protocol = section(markdown, "## Protocol")
    for text in (
        "compute budget: 400 forward-pass equivalents per cell",
        "forward-pass equivalents = forward passes + 2 x backward passes",
        "the level is checked every 10 steps",
        "level metric: forget_qa_rouge, tolerance 0.05",
        "seeds reported: 0, 1",
        "sweep seeds (learning rates are tuned on these, never reported): 100, 101",
        "regulariser: 4 subjects, share 50%, records retain_qa 8; validation: 2 subjects, share 25%",
        "quantization rtn: int8 → int4",
        "relearn lr=0.0001 held_out_subjects: step 0 → step 10 → step 20",
    ):
        assert text in protocol, text
    seeds = table(markdown, "## Protocol")
    assert seeds[1]["seed"] == "1" and seeds[1]["subjects trained on"] == "p1, q1"
    assert seeds[1]["held-out subjects' records"] == "6" and seeds[1]["attributes trained on"] == "birthplace"


def test_an_over_shot_cell_is_flagged(report):
    markdown = report["markdown"].read_text()
    cells = {(row["optimizer"], row["seed"]): row for row in table(markdown, "## Matched level")}
    assert cells["hybrid", "1"]["over-shot"] == "over-shot"  # level gap 0.1 > tolerance 0.05
    assert (
        cells["hybrid", "1"]["level gap"] == "0.100"
        and cells["hybrid", "1"]["F_unlearned (forget_qa_rouge)"] == "0.100"
    )
    for key in (("hybrid", "0"), ("adam", "0"), ("adam", "1")):
        assert cells[key]["over-shot"] == "within tolerance"
    assert cells["adam", "0"]["forward-pass equivalents"] == "160" and cells["adam", "0"]["budget"] == "400"
    assert "Over-shot (their robustness compares deeper forgetting): hybrid, seed 1." in markdown


def test_ladder_tables_give_breakdowns_beside_f_unlearned(report):
    markdown = report["markdown"].read_text()
    held_out = {
        row["optimizer"]: row for row in table(markdown, "### Ladder: relearn lr=0.0001 held_out_subjects (relearning)")
    }
    in_set = {row["optimizer"]: row for row in table(markdown, "### Ladder: relearn lr=0.0001 in_set (relearning)")}
    # the hybrid brings back nothing of the held-out subjects; in-set, step 10 brings back 0.4 >= removed / 2
    assert held_out["hybrid"]["breakdown"] == "none within the ladder"
    assert held_out["hybrid"]["excess AUC"] == "0.000 [0.000, 0.000]"
    assert in_set["hybrid"]["breakdown"] == "step 10"
    assert held_out["hybrid"]["F_unlearned"] == "0.150 [0.100, 0.200]"
    assert held_out["hybrid"]["removed"] == "0.650 [0.600, 0.700]"
    quantized = {row["optimizer"]: row for row in table(markdown, "### Ladder: quantization rtn (quantization)")}
    assert quantized["adam"]["excess AUC"] == "0.190 [0.190, 0.190]"
    assert quantized["adam"]["same bucket"] == "0.800 [0.800, 0.800]"  # mean of 0.9 and 0.7
    assert quantized["adam"]["update/step"] == "0.600 [0.600, 0.600]"  # median of 0.8 and 0.4
    assert quantized["hybrid"]["utility"] == "0.645 [0.640, 0.650]"


def test_the_protocol_plots_are_written_and_linked(report):
    markdown = report["markdown"].read_text()
    for name in ("compute_curve", "relearning_heldout", "ladders"):
        with Image.open(report[name]) as image:
            assert image.format == "PNG" and image.width > 100
        assert f"]({name}.png)" in markdown
    assert report["html"].read_text().count("data:image/png;base64,") == len(report) - 2


def test_older_rows_without_controls_fall_back_and_say_so(tmp_path):
    old = [
        replace(row, control=None, scorings=None, unlearning_curve=None, cost=replace(row.cost, level_gap=None))
        for row in study_rows({0: 0.2, 1: 0.21}, relearning=False)
    ]
    written = write_study(tmp_path / "study", old, protocol=False)
    assert not {"compute_curve", "relearning_heldout", "ladders"} & set(written)
    markdown = written["markdown"].read_text()
    hybrid = claim(markdown, 5)
    assert hybrid["comparison"] == (
        "recovery ratio over every attack [rtn-int8, rtn-int4, noise-0.01, noise-0.03]: hybrid − adam < 0 "
        "(fallback: rows without controls give no excess AUC over the control)"
    )
    protocol = section(markdown, "## Protocol")
    assert "No protocol.json or splits.json beside the results" in protocol
    assert "quantization rtn: int8 → int4" in protocol  # the rungs come from the rows
    assert section(markdown, "## Attack ladders").strip().startswith("The rows have no controls")
    assert {row["over-shot"] for row in table(markdown, "## Matched level")} == {"—"}


def test_relearning_claims_read_held_out_subjects_and_show_in_set():
    rows = [
        replace(row, cell=replace(row.cell, optimizer="zo-sgd", grade="zeroth-order"))
        if row.cell.optimizer == "hybrid"
        else row
        for row in study_rows({0: 0.0, 1: 0.0})
    ]
    relearning = evaluate_claims(rows)[1]
    held_out, sign, in_set = relearning.measured  # the sign-based optimizer's in-set part is left out, unmeasured
    # held-out subjects: AUC 0 - 0.15 at both seeds
    assert held_out.pooled == ("relearn lr=0.0001 held_out_subjects",) and held_out.verdict == SUPPORTED
    assert held_out.difference.mean == pytest.approx(-0.15)
    assert sign.verdict == NOT_MEASURED and relearning.verdict == NOT_MEASURED
    # in-set: excess adam (0.05, 0.45, 0.4) -> AUC 0.3375, zo-sgd (0.05, 0.4, 0.35) -> 0.3
    assert in_set.comparison.shown and in_set.pooled == ("relearn lr=0.0001 in_set",)
    assert in_set.difference.mean == pytest.approx(-0.0375)
    # a shown comparison does not count: contradicted beside a supported one, the claim is supported
    expecting_more = Claim(
        "zo-sgd recovers less of the held-out subjects",
        (
            Comparison(ZEROTH_ORDER, LADDER_MEASURE, "lower", "relearning"),
            Comparison(ZEROTH_ORDER, LADDER_MEASURE, "higher", "relearning", ladders=IN_SET, shown=True),
        ),
    )
    (result,) = evaluate_claims(rows, claims=[expecting_more])
    assert [entry.verdict for entry in result.measured] == [SUPPORTED, CONTRADICTED]
    assert result.verdict == SUPPORTED
