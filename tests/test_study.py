"""Where a cell's learning rate and options come from: tuned per objective, the sweep's choice,
the recipe; and the TOFU metrics' default."""

from __future__ import annotations

import robustunlearn.config as config_module
from helpers import synthetic_setup
from robustunlearn.config import learning_rate, load_settings, objective_options, optimizer_options, sweep_base
from robustunlearn.optim import OPTIMIZERS


def test_tuned_defaults_apply_to_the_embedded_benchmark_only_and_settings_win(monkeypatch):
    tuned = {
        "learning_rates": {"npo": {"adam": 7e-4}, "graddiff": {"adam": 2e-4}},
        "objective_options": {"npo": {"gamma": 5.0, "beta": 0.2}},
        "optimizer_options": {"npo": {"hybrid": {"zo_lr": 1e-5, "every": 5}}},
    }
    monkeypatch.setattr(config_module, "embedded_recipe", lambda: {"tuned": tuned})
    embedded = load_settings()
    assert learning_rate(embedded, "adam", "npo") == 7e-4
    assert learning_rate(embedded, "adam", "graddiff") == 2e-4  # each objective its own lr
    assert learning_rate(embedded, "adam", "simnpo") == OPTIMIZERS["adam"].default_lr
    swept = {"npo": {"adam": {"lr": 3e-4, "options": {}}, "hybrid": {"lr": 1e-3, "options": {"zo_lr": 3e-4}}}}
    assert learning_rate(embedded, "adam", "npo", swept) == 3e-4  # a sweep's choice beats the shipped one
    assert learning_rate(embedded, "adam", "graddiff", swept) == 2e-4  # ... for its own objective only
    assert learning_rate(embedded, "signum", "npo", swept) == OPTIMIZERS["signum"].default_lr
    assert objective_options(embedded, "npo") == {"gamma": 5.0, "beta": 0.2}
    assert objective_options(embedded, "graddiff") == {}
    assert optimizer_options(embedded, "hybrid", "npo") == {"zo_lr": 1e-5, "every": 5}
    assert optimizer_options(embedded, "hybrid", "npo", swept) == {"zo_lr": 3e-4, "every": 5}
    assert optimizer_options(embedded, "hybrid", "graddiff", swept) == {}

    user = load_settings(None, {"unlearn": {"lr": 1e-5, "objective_options": {"beta": 0.5}}})
    assert learning_rate(user, "adam", "npo", swept) == 1e-5
    assert objective_options(user, "npo") == {"gamma": 5.0, "beta": 0.5}
    pinned = load_settings(None, {"unlearn": {"optimizer_options": {"zo_lr": 2e-5}}})
    assert optimizer_options(pinned, "hybrid", "npo", swept) == {"zo_lr": 2e-5, "every": 5}  # the recipe wins

    for other in ({"model_path": "some/model"}, {"base_model": "some/model"}, {"benchmark": "muse"}):
        settings = load_settings(None, other)
        assert learning_rate(settings, "adam", "npo") == OPTIMIZERS["adam"].default_lr, other
        assert objective_options(settings, "npo") == {} and optimizer_options(settings, "hybrid", "npo") == {}, other


def test_the_sweep_centres_on_the_recorded_base_else_the_tuned_lr_not_on_its_own_choices(monkeypatch):
    tuned = {"sweep_bases": {"adam": 2e-4}, "learning_rates": {"npo": {"adam": 9e-4, "signum": 4e-4}}}
    monkeypatch.setattr(config_module, "embedded_recipe", lambda: {"tuned": tuned})
    settings = load_settings()
    assert sweep_base(settings, "adam", "npo") == 2e-4
    assert sweep_base(settings, "signum", "npo") == 4e-4  # no recorded base: the tuned lr
    assert sweep_base(settings, "signum", "graddiff") == OPTIMIZERS["signum"].default_lr
    assert sweep_base(load_settings(None, {"unlearn": {"lr": 1e-5}}), "adam", "npo") == 1e-5


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
