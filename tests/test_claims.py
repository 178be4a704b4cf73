"""The paper's claims, paired differences against the reference optimizer and the claims table,
on hand-built rows."""

from __future__ import annotations

from pathlib import Path

import pytest

from robustunlearn.study.claims import (
    CLAIMS,
    Claim,
    Comparison,
    Optimizers,
    claim_verdict,
    evaluate_claims,
    paired_differences,
)
from robustunlearn.study.report import write_report
from robustunlearn.study.rows import Landscape, References, ResultRow, RowCell, UnlearningCost, write_results_jsonl
from robustunlearn.study.stats import (
    CONTRADICTED,
    INCONCLUSIVE,
    NOT_MEASURED,
    ONE_SEED,
    SUPPORTED,
    bootstrap_interval,
)

TARGET = {"forget_qa_rouge": 0.9, "retain_qa_rouge": 0.9}
RETRAIN = {"forget_qa_rouge": 0.1, "retain_qa_rouge": 0.9}  # F_target - F_floor = 0.8
UNLEARNED = 0.1
FAMILIES = {"rtn-int4": "quantization", "relearn": "relearning"}
GRADES = {
    "adam": "first-order",
    "zo-sgd": "zeroth-order",
    "signsgd": "compressed-first-order",
    "sophia-g": "second-order",
    "hybrid": "hybrid",
}
COST = UnlearningCost(
    steps=10, forward_passes=20, backward_passes=10, seconds=1.0, reached_level=True, target_level=0.1
)
NOISE = (0.0, 0.02, -0.01, 0.01, -0.02)  # per seed, shared by every optimizer (what pairing removes)


def cell_rows(
    optimizer: str, seed: int, ratios: dict[str, float], *, utility: float = 0.85, landscape=None
) -> list[ResultRow]:
    """A cell's rows: the unlearned model (forget 0.1) and one row per attack with the given
    recovery ratio, F_attacked = 0.1 + 0.8 R."""
    cell = RowCell(
        benchmark="synthetic", objective="npo", optimizer=optimizer, grade=GRADES[optimizer], seed=seed, lr=1e-3
    )
    forgets = {"none": UNLEARNED, **{attack: UNLEARNED + 0.8 * ratio for attack, ratio in ratios.items()}}
    return [
        ResultRow(
            cell=cell,
            attack=attack,
            attack_family=FAMILIES.get(attack, "none"),
            forget={"forget_qa_rouge": forget},
            utility={"retain_qa_rouge": utility},
            reference=References(
                target=TARGET, unlearned={"forget_qa_rouge": UNLEARNED, "retain_qa_rouge": utility}, retrain=RETRAIN
            ),
            primary_metric="forget_qa_rouge",
            cost=COST,
            landscape=landscape,
        )
        for attack, forget in forgets.items()
    ]


def lmc(optimizer: str, bump: float) -> Landscape:
    """An LMC curve from adam's model with a rise of ``bump`` in the forget metric at α = 1/2."""
    points = [{"alpha": a, "forget_qa_rouge": UNLEARNED + (bump if a == 0.5 else 0.0)} for a in (0.0, 0.5, 1.0)]
    return Landscape(pair=f"adam-vs-{optimizer}", lmc=points)


def study_rows(seeds=range(5)) -> list[ResultRow]:
    """Five optimizers x seeds, built so that each claim gets a known verdict:

    * zo-sgd recovers 0.4 less than adam under both attacks (supported), with utility 0.25 lower;
    * signsgd recovers 0.2 more under quantization (contradicted), ±0.05 around adam under relearning;
    * sophia-g recovers 0.9, more than any other (supported);
    * hybrid forgets exactly as much as adam (a tie: inconclusive), with utility 0.01 higher, recovers 0.3;
    * zo-sgd's LMC barrier from adam is 0.1 + noise, signsgd's 0.
    """
    rows = []
    for seed in seeds:
        noise, swing = NOISE[seed], 0.05 * (-1) ** seed
        rows += cell_rows("adam", seed, {"rtn-int4": 0.5 + noise, "relearn": 0.6 + noise})
        rows += cell_rows(
            "zo-sgd",
            seed,
            {"rtn-int4": 0.1 + noise, "relearn": 0.2 + noise},
            utility=0.6 + noise,
            landscape=lmc("zo-sgd", 0.1 + noise),
        )
        rows += cell_rows(
            "signsgd", seed, {"rtn-int4": 0.7 + noise, "relearn": 0.6 + noise + swing}, landscape=lmc("signsgd", 0.0)
        )
        rows += cell_rows("sophia-g", seed, {"rtn-int4": 0.9, "relearn": 0.9})
        rows += cell_rows("hybrid", seed, {"rtn-int4": 0.3 + noise, "relearn": 0.3 + noise}, utility=0.86)
    return rows


@pytest.fixture(scope="module")
def results():
    return evaluate_claims(study_rows())


def test_the_claims_get_their_verdicts(results):
    assert [result.verdict for result in results] == [
        CONTRADICTED,  # 1: zo-sgd recovers less under quantization, but signsgd recovers more
        INCONCLUSIVE,  # 2: zo-sgd recovers less under relearning, signsgd's difference spans 0
        SUPPORTED,  # 3: sophia-g recovers more than the highest of the others
        INCONCLUSIVE,  # 4: the hybrid's forgetting ties adam's (its utility is higher: supported)
        SUPPORTED,  # 5: the hybrid recovers less than adam
        SUPPORTED,  # 6: zo-sgd's barrier is above 0 and above signsgd's
    ]
    first, second = results[0].measured, results[1].measured
    assert [(m.subject, m.versus, m.verdict) for m in first] == [
        ("zo-sgd", "adam", SUPPORTED),
        ("signsgd", "adam", CONTRADICTED),
    ]
    assert second[1].verdict == INCONCLUSIVE and second[1].difference.low < 0 < second[1].difference.high
    assert [m.verdict for m in results[3].measured] == [INCONCLUSIVE, SUPPORTED]
    assert results[2].measured[0].versus == "highest of adam, hybrid, signsgd, zo-sgd"


def test_a_comparison_is_the_paired_difference_over_seeds(results):
    zo_quantized = results[0].measured[0]
    assert zo_quantized.difference.mean == pytest.approx(-0.4)  # the shared per-seed noise cancels
    assert zo_quantized.difference.seeds == 5
    assert zo_quantized.difference.low == pytest.approx(-0.4) and zo_quantized.difference.high == pytest.approx(-0.4)
    # sophia-g against the others: per seed, its difference from the highest other, signsgd
    # (mean over both attacks: (0.9 - 0.7 - noise + 0.9 - 0.6 - noise - swing) / 2)
    sophia = results[2].measured[0].difference
    by_seed = [(0.2 - NOISE[s] + 0.3 - NOISE[s] - 0.05 * (-1) ** s) / 2 for s in range(5)]
    assert sophia.mean == pytest.approx(sum(by_seed) / 5)
    assert (sophia.low, sophia.high) == pytest.approx(
        (bootstrap_interval(by_seed).low, bootstrap_interval(by_seed).high)
    )


def test_paired_differences_against_the_reference():
    # adam's ratios differ by seed; zo-sgd's are paired with them seed by seed, and its seed 3 has no adam partner
    rows = [row for s, r in enumerate([0.5, 0.4, 0.6]) for row in cell_rows("adam", s, {"rtn-int4": r})]
    for seed, ratio in enumerate([0.3, 0.35, 0.2, 0.9]):
        rows += cell_rows("zo-sgd", seed, {"rtn-int4": ratio})
    rows.reverse()  # pairing is by seed, not by position
    (entry,) = paired_differences(rows)
    assert (entry.subject, entry.versus, entry.comparison.attack) == ("zo-sgd", "adam", "rtn-int4")
    differences = [-0.2, -0.05, -0.4]
    expected = bootstrap_interval(differences)
    assert entry.difference.seeds == 3
    assert entry.difference.mean == pytest.approx(sum(differences) / 3)
    assert (entry.difference.low, entry.difference.high) == pytest.approx((expected.low, expected.high))
    assert entry.verdict == SUPPORTED  # zo-sgd recovers less than adam


def test_every_optimizer_and_attack_is_compared_with_the_reference():
    entries = paired_differences(study_rows(), reference_optimizer="adam")
    assert {(e.subject, e.comparison.attack) for e in entries} == {
        (optimizer, attack) for optimizer in GRADES if optimizer != "adam" for attack in FAMILIES
    }
    by_key = {(e.subject, e.comparison.attack): e for e in entries}
    assert by_key["signsgd", "rtn-int4"].verdict == CONTRADICTED
    assert by_key["sophia-g", "relearn"].difference.mean == pytest.approx(0.3)
    # against another reference: adam is one of the compared
    assert {e.subject for e in paired_differences(study_rows(), reference_optimizer="hybrid")} == set(GRADES) - {
        "hybrid"
    }


def test_utility_caveat_when_the_more_robust_model_is_damaged(results):
    caveat = results[0].measured[0].utility_caveat  # zo-sgd recovers less, with utility 0.25 below adam's
    assert (caveat.more_robust, caveat.other) == ("zo-sgd", "adam")
    assert caveat.difference.mean == pytest.approx(-0.25)
    assert results[0].measured[1].utility_caveat is None  # adam, the more robust there, has signsgd's utility
    assert results[4].measured[0].utility_caveat is None  # the hybrid's utility is higher than adam's


def test_one_seed_is_inconclusive():
    results = evaluate_claims(study_rows(seeds=[0]))
    assert [result.verdict for result in results] == [ONE_SEED] * 6
    zo_quantized = results[0].measured[0]
    assert zo_quantized.difference.mean == pytest.approx(-0.4) and zo_quantized.difference.low is None
    assert zo_quantized.utility_caveat is None  # no interval to be beyond


def test_missing_optimizers_attacks_and_landscapes_are_not_measured():
    rows = [
        row for row in study_rows() if row.cell.optimizer not in ("sophia-g", "signsgd") and row.attack != "relearn"
    ]
    for row in rows:
        row.landscape = None
    results = evaluate_claims(rows)
    assert [result.verdict for result in results] == [
        NOT_MEASURED,  # 1: no sign-based optimizer (zo-sgd's part alone is supported)
        NOT_MEASURED,  # 2: no relearning attack
        NOT_MEASURED,  # 3: no second-order optimizer
        INCONCLUSIVE,
        SUPPORTED,
        NOT_MEASURED,  # 6: no LMC curves
    ]
    assert results[0].measured[0].verdict == SUPPORTED
    assert results[0].measured[1].note == "no compressed-first-order optimizer in the study"
    assert results[1].measured[0].note == "no excess AUC over the control or recovery ratio for zo-sgd"
    no_adam = evaluate_claims([row for row in rows if row.cell.optimizer != "adam"])
    assert no_adam[4].measured[0].note == "the reference optimizer adam is not in the study"


def test_claims_are_data_and_combine_their_comparisons():
    louder = Claim(
        "sign-based recovers more than Adam under quantization",
        (Comparison(Optimizers(names=("signsgd",)), "recovery_ratio", "higher", "quantization"),),
    )
    (result,) = evaluate_claims(study_rows(), claims=[louder])
    assert result.verdict == SUPPORTED
    assert len(CLAIMS) == 6
    assert claim_verdict([SUPPORTED, SUPPORTED]) == SUPPORTED
    assert claim_verdict([SUPPORTED, ONE_SEED]) == ONE_SEED
    assert claim_verdict([ONE_SEED, INCONCLUSIVE]) == INCONCLUSIVE
    assert claim_verdict([SUPPORTED, NOT_MEASURED]) == NOT_MEASURED
    assert claim_verdict([NOT_MEASURED, CONTRADICTED]) == CONTRADICTED
    with pytest.raises(ValueError, match="no better direction"):
        evaluate_claims(study_rows(), claims=[Claim("x", (Comparison(Optimizers(), "lmc_barrier", "better"),))])


def claims_table(markdown: str) -> list[list[str]]:
    section = markdown.split("## Claims", 1)[1].split("\n#", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_the_report_opens_with_the_claims_table(tmp_path: Path):
    write_results_jsonl(tmp_path / "results.jsonl", study_rows())
    markdown = write_report(tmp_path / "results.jsonl", tmp_path / "out")["markdown"].read_text()
    assert markdown.index("## Claims") < markdown.index("## Setup") < markdown.index("## Attack:")
    header, _, *rows = claims_table(markdown)
    assert header == [
        "#",
        "claim",
        "comparison",
        "difference [95% CI]",
        "seeds",
        "F_unlearned",
        "verdict",
        "utility caveat",
    ]
    verdicts = [row[header.index("verdict")] for row in rows]
    assert verdicts == [CONTRADICTED, INCONCLUSIVE, SUPPORTED, INCONCLUSIVE, SUPPORTED, SUPPORTED]
    first = dict(zip(header, rows[0]))
    assert first["claim"] == CLAIMS[0].text
    # no controls in these rows: the ladder comparison falls back to the recovery ratio and says so
    assert first["comparison"].startswith(
        "recovery ratio under quantization [rtn-int4]: zo-sgd − adam < 0 "
        "(fallback: rows without controls give no excess AUC over the control);"
    )
    assert first["F_unlearned"] == "zo-sgd 0.100, adam 0.100; signsgd 0.100, adam 0.100"
    assert first["difference [95% CI]"].startswith("-0.400 [-0.400, -0.400]: supported;")
    assert first["seeds"] == "5; 5"
    utility = bootstrap_interval([-0.25 + noise for noise in NOISE])
    assert first["utility caveat"] == f"utility of zo-sgd − adam: -0.250 [{utility.low:.3f}, {utility.high:.3f}]"
    assert "LMC barrier from the reference's model: zo-sgd > 0" in rows[5][header.index("comparison")]
    paired = markdown.split("## Paired differences against adam", 1)[1].split("\n#", 1)[0]
    assert "| zo-sgd | zeroth-order | rtn-int4 | 5 | -0.400 [-0.400, -0.400] | recovers less than adam |" in paired
    # one seed, and a study without the reference optimizer
    write_results_jsonl(tmp_path / "one.jsonl", [row for row in study_rows([0]) if row.cell.optimizer != "sophia-g"])
    markdown = write_report(tmp_path / "one.jsonl", tmp_path / "one", reference_optimizer="adamw")[
        "markdown"
    ].read_text()
    assert [row[6] for row in claims_table(markdown)[2:]] == [NOT_MEASURED] * 6
    assert "The reference optimizer adamw is not in this study." in markdown
