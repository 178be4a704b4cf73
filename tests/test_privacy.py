"""Membership inference and PrivLeak in every run: which texts are members and non-members on each
benchmark, which reference PrivLeak is measured against, the study's rows and report, and ``eval``."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

import robustunlearn.study.grid as grid_module
from robustunlearn.config import StudySettings, load_settings
from robustunlearn.core.models import save_model
from robustunlearn.data.base import QA, Benchmark
from robustunlearn.data.muse import load_muse
from robustunlearn.data.splits import retain_views
from robustunlearn.metrics.muse import privleak
from robustunlearn.metrics.privacy import (
    MUSE_PUBLISHED_RETRAIN_AUC,
    PRIVLEAK_AUC,
    TOFU_REASON,
    membership_sets,
    mia_privacy,
    muse_corpus,
    privleak_against,
    with_privleak,
)
from robustunlearn.study.cells import Cell
from robustunlearn.study.grid import StudyRun, run_cell, study_references
from robustunlearn.study.report import write_report
from robustunlearn.study.rows import ResultRow, write_results_jsonl
from robustunlearn.train.engine import UnlearnResult
from test_eval_command import run_ok
from test_report import ROWS

MUSE_FIXTURE = Path(__file__).parent / "fixtures" / "muse" / "news"
AUC_KEYS = {"auc_loss", "auc_zlib", "auc_min_k", "auc_min_k_plus_plus"}


def test_synthetic_members_are_the_forget_people_and_non_members_the_holdout_people(tiny_random):
    benchmark = tiny_random[0]
    sets, reason = membership_sets(benchmark)
    assert reason is None and sets.source == "forget_text vs holdout_text"
    assert sets.members == benchmark.get("forget_text") and sets.nonmembers == benchmark.get("holdout_text")
    assert sets.members and sets.nonmembers
    assert not {p.subject for p in sets.members} & {p.subject for p in sets.nonmembers}


def test_muse_members_are_its_privleak_forget_and_holdout_texts():
    benchmark = load_muse(MUSE_FIXTURE)
    sets, reason = membership_sets(benchmark)
    assert reason is None and sets.source == "privleak/forget vs privleak/holdout"
    expected = benchmark.metadata["privleak"]
    assert [p.text for p in sets.members] == expected["forget"]
    assert [p.text for p in sets.nonmembers] == expected["holdout"]
    assert muse_corpus(benchmark) == "news"


def test_tofu_and_benchmarks_without_a_holdout_give_a_reason_not_an_auc(tiny_random):
    benchmark, model, tokenizer = tiny_random
    tofu = Benchmark("tofu", "1", {"forget_qa": [QA("Who?", "Ann")], "retain_qa": [QA("What?", "A cat")]})
    assert membership_sets(tofu) == (None, TOFU_REASON)
    assert "holdout" in TOFU_REASON and muse_corpus(tofu) is None
    no_holdout = Benchmark("wmdp", "1", {"forget_text": benchmark.get("forget_text")})
    sets, reason = membership_sets(no_holdout)
    assert sets is None and "'wmdp' has no holdout" in reason
    result = with_privleak(mia_privacy(model, tokenizer, tofu, load_settings().eval))
    assert result == {"aucs": None, "reason": TOFU_REASON, "privleak": None, "privleak_reference": "no reference"}


def test_privleak_uses_the_retrain_auc_then_muse_published_when_asked_else_no_reference():
    assert privleak_against(0.9, 0.5) == {"privleak": pytest.approx(-80.0), "privleak_reference": "retrain"}
    assert privleak_against(0.9, 0.5, muse="news")["privleak_reference"] == "retrain"  # retrain wins
    published = privleak_against(0.9, muse="news")
    assert published["privleak_reference"] == "muse-published-news"
    # MUSE's published AUC is of its own orientation (holdout positive): 1 - our membership AUC
    assert published["privleak"] == pytest.approx((0.1 - 0.4772) / 0.4772 * 100)
    for corpus, auc in MUSE_PUBLISHED_RETRAIN_AUC.items():
        as_private = privleak_against(1.0 - auc, muse=corpus)
        assert as_private == {"privleak": pytest.approx(0.0), "privleak_reference": f"muse-published-{corpus}"}
    assert privleak_against(0.9) == {"privleak": None, "privleak_reference": "no reference"}
    undefined = privleak_against(0.9, 1.0)  # a perfectly separating retrain model: no division by 0
    assert undefined["privleak"] is None and undefined["privleak_reference"] == "retrain"
    assert "undefined" in undefined["privleak_note"]


def test_mia_privacy_scores_the_capped_sets_and_privleak_names_its_reference(tiny_random):
    benchmark, model, tokenizer = tiny_random
    settings = load_settings(None, {"eval": {"max_examples": 2, "batch_size": 3}}).eval
    mia = mia_privacy(model, tokenizer, benchmark, settings)
    assert set(mia["aucs"]) == AUC_KEYS and all(0.0 <= v <= 1.0 for v in mia["aucs"].values())
    assert mia["members"] == min(2, len(benchmark.get("forget_text")))
    assert mia["nonmembers"] == min(2, len(benchmark.get("holdout_text")))
    assert with_privleak(mia) == {**mia, "privleak": None, "privleak_reference": "no reference"}
    retrain = {**mia, "aucs": {**mia["aucs"], PRIVLEAK_AUC: 0.5}}
    leak = with_privleak(mia, retrain)
    assert leak["privleak_reference"] == "retrain"
    assert leak["privleak"] == pytest.approx(privleak(mia["aucs"][PRIVLEAK_AUC], 0.5))


def _quick_settings():
    return load_settings(None, {"eval": {"max_examples": 2, "batch_size": 4, "verbmem_max_new_tokens": 4}})


def test_study_references_hold_privacy_and_files_of_other_evaluation_records_are_recomputed(tiny_random, tmp_path):
    benchmark, model, tokenizer = tiny_random
    settings = _quick_settings()
    path = tmp_path / "references.json"
    evaluation = retain_views(benchmark, 0).evaluation
    references = study_references(model, None, tokenizer, evaluation, settings, path)
    assert json.loads(path.read_text()) == references
    assert set(references["privacy"]["target"]["aucs"]) == AUC_KEYS and references["privacy"]["retrain"] is None
    assert references["privacy"]["target"]["privleak_reference"] == "no reference"
    assert references["evaluation_subjects"] == sorted({r.subject for r in evaluation.get("retain_qa")})
    assert study_references(model, None, tokenizer, evaluation, settings, path) == references  # read back
    older = {"target": {"forget_qa_rouge": 0.5}, "retrain": None}  # scored before the retain split existed
    path.write_text(json.dumps(older))
    assert study_references(model, None, tokenizer, evaluation, settings, path) == references


def _study_run(tiny_random, tmp_path, settings, study, references) -> StudyRun:
    benchmark, model, tokenizer = tiny_random
    return StudyRun(settings, study, model, tokenizer, retain_views(benchmark, 0), references, tmp_path)


def test_run_cell_gives_every_row_privacy_against_the_retrain_reference(tiny_random, tmp_path, monkeypatch):
    benchmark, model, tokenizer = tiny_random

    def no_unlearning(model, *args, **kwargs):
        return UnlearnResult(model=model, steps_done=0, history=[], seconds=0.0)

    monkeypatch.setattr(grid_module, "unlearn", no_unlearning)
    settings = _quick_settings()
    study = StudySettings(optimizers=("adam",), attacks=("noise-0.01",), landscape=False, relearn_subjects=1)
    retrain_mia = mia_privacy(model, tokenizer, benchmark, settings.eval)
    retrain_mia["aucs"][PRIVLEAK_AUC] = 0.5
    references = {"target": {"forget_qa_rouge": 0.5}, "retrain": None, "privacy": {"retrain": retrain_mia}}
    cell = Cell("synthetic", "npo", "adam", 0, 1e-4)
    rows = run_cell(_study_run(tiny_random, tmp_path, settings, study, references), cell, tmp_path, landscape=False)
    assert [row.attack for row in rows] == ["none", "noise-0.01"]
    for row in rows:
        assert set(row.privacy["aucs"]) == AUC_KEYS and row.privacy["privleak_reference"] == "retrain"
        assert row.privacy["privleak"] == pytest.approx(privleak(row.privacy["aucs"][PRIVLEAK_AUC], 0.5))
        assert row.privacy["source"] == "forget_text vs holdout_text"
        assert ResultRow.from_json(json.loads(json.dumps(row.to_json()))) == row


def _with_privacy(row: ResultRow, leak: float | None, reference: str = "retrain") -> ResultRow:
    aucs = {key: 0.6 for key in AUC_KEYS}
    privacy = {"source": "forget_text vs holdout_text", "members": 4, "nonmembers": 4, "aucs": aucs}
    return replace(row, privacy={**privacy, "privleak": leak, "privleak_reference": reference})


def _report(tmp_path: Path, rows: list[ResultRow]) -> str:
    write_results_jsonl(tmp_path / "results.jsonl", rows)
    return write_report(tmp_path / "results.jsonl", tmp_path)["markdown"].read_text()


def test_the_report_shows_privleak_before_and_after_each_attack(tmp_path):
    leaks = {"none": -20.0, "rtn-int4": -55.0, "relearn": -90.0}
    rows = [_with_privacy(row, leaks[row.attack] - (10.0 if row.cell.optimizer != "adam" else 0.0)) for row in ROWS]
    report = _report(tmp_path, rows)
    assert "## Privacy: PrivLeak before and after each attack" in report
    assert "PrivLeak % unlearned | PrivLeak % after rtn-int4 | PrivLeak % after relearn" in report
    adam = next(line for line in report.splitlines() if line.startswith("| adam |") and "-55.0" in line)
    assert "| -20.0 | -55.0 | -90.0 |" in adam
    assert "PrivLeak reference: retrain" in report


def test_the_report_without_privacy_is_unchanged_and_without_non_members_says_why(tmp_path):
    assert "Privacy" not in _report(tmp_path, ROWS)  # rows written before privacy existed
    reason = {"aucs": None, "reason": TOFU_REASON, "privleak": None, "privleak_reference": "no reference"}
    report = _report(tmp_path, [replace(row, privacy=reason) for row in ROWS])
    assert f"No membership inference: {TOFU_REASON}" in report


def test_eval_on_muse_prints_privleak_with_its_reference(monkeypatch, capsys, mcq_model, tmp_path):
    model_dir = save_model(*mcq_model, tmp_path / "tiny")
    recipe = tmp_path / "muse.yaml"
    recipe.write_text(json.dumps({"benchmark": "muse", "benchmark_options": {"data_dir": str(MUSE_FIXTURE)}}))
    output = tmp_path / "eval.json"
    printed = run_ok(
        monkeypatch, capsys, "eval", "--config", str(recipe), "--model", str(model_dir), "--output", str(output)
    )
    report = json.loads(output.read_text(encoding="utf-8"))
    privacy = report["privacy"]
    assert privacy["privleak_reference"] == "muse-published-news" and set(privacy["aucs"]) == AUC_KEYS
    assert privacy["privleak"] == pytest.approx(privacy_against_published(privacy["aucs"][PRIVLEAK_AUC]))
    assert "PrivLeak % (vs muse-published-news)" in printed and f"{privacy['privleak']:.2f}" in printed
    assert "MIA AUC Min-K%" in printed and "forget VerbMem" in printed and "forget KnowMem" in printed


def privacy_against_published(auc: float) -> float:
    return privleak(auc, 1.0 - MUSE_PUBLISHED_RETRAIN_AUC["news"])


def test_the_matched_level_is_the_retrain_level_plus_the_presets_tolerance(tiny_random, tmp_path, monkeypatch):
    benchmark, model, tokenizer = tiny_random
    monkeypatch.setattr(
        grid_module, "unlearn", lambda model, *a, **k: UnlearnResult(model=model, steps_done=0, history=[], seconds=0.0)
    )
    base = _quick_settings()
    settings = base.model_copy(update={"eval": base.eval.model_copy(update={"level_tolerance": 0.125})})
    study = StudySettings(optimizers=("adam",), attacks=(), landscape=False, relearn_subjects=1)
    references = {"target": {"forget_qa_rouge": 0.9}, "retrain": {"forget_qa_rouge": 0.25}}
    run = _study_run(tiny_random, tmp_path, settings, study, references)
    (row,) = run_cell(run, Cell("synthetic", "npo", "adam", 0, 1e-4), tmp_path, landscape=False)
    assert row.cost.target_level == pytest.approx(0.375)
