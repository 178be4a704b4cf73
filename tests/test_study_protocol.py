"""The study's protocol pieces in grid.py: the relearning probe's scorings, the hybrid's block
layout on the checks, the retain views the cell's steps use, and the control's cache."""

from __future__ import annotations

import json

import pytest

from helpers import TINY_MODEL, synthetic_setup
from robustunlearn.config import load_settings
from robustunlearn.core.errors import UserError
from robustunlearn.core.models import build_tiny_model
from robustunlearn.data.splits import retain_views
from robustunlearn.metrics.suite import evaluate_model
from robustunlearn.study.cells import Cell
from robustunlearn.study.controls import Controls
from robustunlearn.study.grid import (
    StudyRun,
    attack_context,
    cell_options,
    cell_settings,
    check_stop_alignment,
    relearning_probe,
)

QUICK_EVAL = {"batch_size": 8, "verbmem_max_new_tokens": 4}


@pytest.fixture(scope="module")
def setup():
    """Twenty people (two forget people, so the attacker has one and one is held out) and a random model."""
    data = synthetic_setup(num_people=20)
    return data.benchmark, build_tiny_model(TINY_MODEL, data.tokenizer, seed=0).eval(), data.tokenizer


def study_run(setup, tmp_path, study=None, **eval_options) -> StudyRun:
    benchmark, model, tokenizer = setup
    settings = load_settings(None, {"eval": {**QUICK_EVAL, **eval_options}, "study": study or {}})
    references = {"target": {"forget_qa_rouge": 1.0}, "retrain": {"forget_qa_rouge": 0.1}}
    views = retain_views(benchmark, 0)
    return StudyRun(settings, settings.study, model, tokenizer, views, references, tmp_path)


def test_the_relearning_probe_scores_each_part_and_the_whole_set_as_their_weighted_mean(setup, tmp_path):
    run = study_run(setup, tmp_path)
    split = run.relearn_split(0)
    values = relearning_probe(run, split)(run.target, 0)
    assert set(values) == {
        "forget_qa_rouge",
        "forget_qa_rouge@in_set",
        "forget_qa_rouge@held_out_subjects",
        "forget_qa_rouge@held_out_attributes",
    }
    direct = run.evaluate(run.target, metrics=("forget_qa_rouge",))["forget_qa_rouge"]
    assert values["forget_qa_rouge"] == pytest.approx(direct, abs=1e-12)  # the weighted mean is the whole
    view = run.views.evaluation.with_splits(forget_qa=list(split.held_out_subjects))
    alone = evaluate_model(run.target, run.tokenizer, view, run.settings.eval, metrics=("forget_qa_rouge",))
    assert values["forget_qa_rouge@held_out_subjects"] == alone["forget_qa_rouge"]
    capped = study_run(setup, tmp_path, max_examples=3)  # capped parts no longer make up the whole
    probe_values = relearning_probe(capped, capped.relearn_split(0))(run.target, 0)
    assert probe_values["forget_qa_rouge"] == capped.evaluate(run.target, ("forget_qa_rouge",))["forget_qa_rouge"]


def test_the_attacker_trains_on_its_subjects_only_and_with_no_subject_count_on_half_of_them(setup, tmp_path):
    run = study_run(setup, tmp_path)
    context = attack_context(run, seed=0)
    forget_people = {record.subject for record in run.views.evaluation.get("forget_qa")}
    trained = {record.subject for record in context.relearn_records}
    assert len(forget_people) == 2 and len(trained) == 1  # half of two
    held_out = {record.subject for record in run.relearn_split(0).held_out_subjects}
    assert held_out == forget_people - trained
    assert context.benchmark is run.views.training  # benign relearning and GPTQ see regulariser data


def test_a_hybrid_in_a_study_ends_a_zo_block_on_every_check(setup, tmp_path):
    run = study_run(setup, tmp_path, study={"check_every": 10, "max_steps": 40, "optimizers": ["adam", "hybrid"]})
    hybrid = Cell("synthetic", "npo", "hybrid", 0, 1e-3)
    assert cell_options(run.settings, run.study, hybrid)["every"] == 5
    assert cell_options(run.settings, run.study, hybrid)["align"] == "start"
    assert "every" not in cell_options(run.settings, run.study, Cell("synthetic", "npo", "adam", 0, 1e-3))
    config = cell_settings(run, hybrid)
    assert config.eval_every == 10 and config.compute_budget == run.study.compute_budget
    check_stop_alignment(run.settings, run.study)
    pinned = load_settings(None, {"unlearn": {"optimizer_options": {"every": 4}}, "study": {"optimizers": ["hybrid"]}})
    with pytest.raises(UserError, match="2·every dividing study.check_every"):
        check_stop_alignment(pinned, pinned.study)  # blocks of 4 end at 8, 16, ...: not on checks every 10


def test_the_control_is_attacked_once_per_seed_and_attack_and_read_back(setup, tmp_path):
    run = study_run(setup, tmp_path, study={"attacks": ["noise-0.1"]})
    calls = []

    def evaluate(model):
        calls.append(model)
        return run.evaluate(model, metrics=("forget_qa_rouge", "retain_qa_rouge"))

    controls = Controls(run.target, "retrain", tmp_path / "controls", evaluate, "forget_qa_rouge")
    context = attack_context(run, seed=0)
    first = controls.get("noise-0.1", context)
    again = controls.get("noise-0.1", context)
    assert len(calls) == 1 and again == first and first.source == "retrain"
    saved = json.loads((tmp_path / "controls" / "seed0" / "noise-0.1.json").read_text())
    assert saved["forget"] == first.forget and saved["utility"] == first.utility
    unattacked = controls.get("none", context)
    assert unattacked.forget["forget_qa_rouge"] == run.evaluate(run.target, ("forget_qa_rouge",))["forget_qa_rouge"]
