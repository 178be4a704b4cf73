"""The study's learning-rate sweep rule and where a cell's learning rate and options come from."""

from __future__ import annotations

import json

import pytest

import robustunlearn.config as config_module
import robustunlearn.study.grid as study_module
from helpers import synthetic_setup
from robustunlearn.config import learning_rate, load_settings, objective_options, optimizer_options
from robustunlearn.optim import OPTIMIZERS
from robustunlearn.study.grid import sweep_learning_rates
from robustunlearn.study.rows import References, ResultRow, RowCell, UnlearningCost


def fake_cell_results(outcomes):
    """A run_cell stand-in: ``outcomes[(optimizer, lr)] = (reached, forget, utility)``."""
    calls = []

    def run_cell(cell, *args, **kwargs):
        calls.append((cell.optimizer, cell.lr, kwargs))
        reached, forget, utility = outcomes[(cell.optimizer, round(cell.lr, 12))]
        metrics = {"forget_qa_rouge": forget, "retain_qa_rouge": utility}
        return [
            ResultRow(
                cell=RowCell(**cell.as_dict()),
                attack="none",
                attack_family="none",
                forget={"forget_qa_rouge": forget},
                utility={"retain_qa_rouge": utility},
                reference=References(target=metrics, unlearned=metrics, retrain=None),
                primary_metric="forget_qa_rouge",
                cost=UnlearningCost(
                    steps=1, forward_passes=1, backward_passes=1, seconds=0.1, reached_level=reached, target_level=0.1
                ),
            )
        ]

    return run_cell, calls


def test_sweep_keeps_the_best_utility_among_rates_that_reach_the_level(tmp_path, monkeypatch):
    settings = load_settings(None, {"unlearn": {"lr": 1e-3}})
    study = settings.study.model_copy(update={"optimizers": ("adam", "zo-sgd"), "sweep_factors": (0.1, 1.0, 10.0)})
    outcomes = {
        # adam: two rates reach the level; the slower one keeps more utility
        ("adam", 1e-4): (False, 0.5, 0.95),
        ("adam", 1e-3): (True, 0.05, 0.8),
        ("adam", 1e-2): (True, 0.01, 0.3),
        # zo-sgd: none reaches; the largest lr forgets most by wrecking the model, the middle one has
        # the best utility minus forget
        ("zo-sgd", 1e-4): (False, 0.97, 0.97),
        ("zo-sgd", 1e-3): (False, 0.6, 0.9),
        ("zo-sgd", 1e-2): (False, 0.02, 0.03),
    }
    run_cell, calls = fake_cell_results(outcomes)
    monkeypatch.setattr(study_module, "run_cell", run_cell)
    chosen = sweep_learning_rates(settings, study, None, None, None, {}, tmp_path)
    assert chosen == pytest.approx({"adam": 1e-3, "zo-sgd": 1e-3})
    assert all(kwargs == {"attacks": False, "landscape": False} for *_, kwargs in calls)
    saved = json.loads((tmp_path / "lr_sweep.json").read_text())
    assert saved["chosen"] == chosen and len(saved["trials"]) == 6
    # a second call reads the file instead of sweeping again
    monkeypatch.setattr(study_module, "run_cell", None)
    assert sweep_learning_rates(settings, study, None, None, None, {}, tmp_path) == chosen


def test_tuned_defaults_apply_to_the_embedded_benchmark_only_and_settings_win(monkeypatch):
    tuned = {
        "learning_rates": {"adam": 7e-4},
        "objective_options": {"npo": {"gamma": 5.0, "beta": 0.2}},
        "optimizer_options": {"hybrid": {"zo_lr": 1e-5}},
    }
    monkeypatch.setattr(config_module, "embedded_recipe", lambda: {"tuned": tuned})
    embedded = load_settings()
    assert learning_rate(embedded, "adam", {}) == 7e-4
    assert learning_rate(embedded, "adam", {"adam": 3e-4}) == 3e-4  # a sweep's choice beats the shipped one
    assert learning_rate(embedded, "signum", {}) == OPTIMIZERS["signum"].default_lr
    assert objective_options(embedded, "npo") == {"gamma": 5.0, "beta": 0.2}
    assert objective_options(embedded, "graddiff") == {}
    assert optimizer_options(embedded, "hybrid") == {"zo_lr": 1e-5}

    user = load_settings(None, {"unlearn": {"lr": 1e-5, "objective_options": {"beta": 0.5}}})
    assert learning_rate(user, "adam", {"adam": 3e-4}) == 1e-5
    assert objective_options(user, "npo") == {"gamma": 5.0, "beta": 0.5}

    for other in ({"model_path": "some/model"}, {"base_model": "some/model"}, {"benchmark": "tofu"}):
        settings = load_settings(None, other)
        assert learning_rate(settings, "adam", {}) == OPTIMIZERS["adam"].default_lr, other
        assert objective_options(settings, "npo") == {} and optimizer_options(settings, "hybrid") == {}, other


def test_the_embedded_sweep_starts_from_its_recorded_bases_not_the_shipped_choices(tmp_path, monkeypatch):
    tuned = {"sweep_bases": {"adam": 2e-4}, "learning_rates": {"adam": 9e-4}}
    monkeypatch.setattr(config_module, "embedded_recipe", lambda: {"tuned": tuned})
    settings = load_settings()
    study = settings.study.model_copy(update={"optimizers": ("adam",), "sweep_factors": (0.5, 1.0)})
    run_cell, calls = fake_cell_results({("adam", 1e-4): (True, 0.05, 0.9), ("adam", 2e-4): (True, 0.05, 0.8)})
    monkeypatch.setattr(study_module, "run_cell", run_cell)
    assert sweep_learning_rates(settings, study, None, None, None, {}, tmp_path) == {"adam": 1e-4}
    assert [lr for _, lr, _ in calls] == [1e-4, 2e-4]


def test_tofu_metrics_run_on_tofu_by_default_and_elsewhere_only_when_asked():
    from robustunlearn.core.models import TinyModelConfig, build_tiny_model
    from robustunlearn.metrics.suite import tofu_scores

    benchmark, tokenizer = synthetic_setup(4, 2, 2, vocab_size=300, repeats=1)
    model = build_tiny_model(
        TinyModelConfig(
            vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        ),
        tokenizer,
        seed=0,
    )
    assert tofu_scores(model, tokenizer, benchmark, load_settings().eval) is None  # synthetic: off by default
    asked = load_settings(None, {"eval": {"tofu_metrics": True, "max_examples": 3}})
    scores = tofu_scores(model, tokenizer, benchmark, asked.eval)
    assert len(scores["forget_truth_ratios"]) == 3 and 0 < scores["forget_prob"] < 1
