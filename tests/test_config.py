"""Recipes and flags: strict types, finite numbers, mappings for sections, no duplicate keys, and the
embedded benchmark's tuned recipe as the base layer of the runs that use it."""

from __future__ import annotations

import pytest

from robustunlearn.config import (
    check_training_options,
    embedded_recipe,
    load_settings,
    tofu_tiny_recipe,
    unlearn_settings,
)
from robustunlearn.core.errors import UserError


def recipe(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("unlearn: {steps: true}", "unlearn.steps: Input should be a valid integer"),
        ("unlearn: {steps: '3'}", "unlearn.steps: Input should be a valid integer"),
        ("unlearn: [1, 2]", "unlearn: must be a mapping of settings, not list"),
        ("study: 5", "study: must be a mapping of settings, not int"),
        ("unlearn: {lr: .inf}", "unlearn.lr: must be a finite number"),
        ("unlearn: {objective_options: {gamma: .nan}}", "unlearn.objective_options.gamma: must be a finite number"),
        ("seed: 1\nseed: 2\n", "at line 2: duplicate key 'seed'"),
        ("unlearn: {seed: 3}", "unlearn.seed is set by the top-level seed"),
        ("trust_remote_code: 'yes'", "trust_remote_code: Input should be a valid boolean"),
    ],
)
def test_bad_recipes_are_one_user_error(tmp_path, text, fragment):
    with pytest.raises(UserError) as caught:
        load_settings(recipe(tmp_path, text))
    assert fragment in str(caught.value)
    assert str(caught.value).startswith(f"config file {tmp_path / 'recipe.yaml'}")


def test_a_list_section_is_refused_even_when_a_flag_sets_that_section(tmp_path):
    with pytest.raises(UserError, match="unlearn: must be a mapping of settings, not list"):
        load_settings(recipe(tmp_path, "unlearn: [1, 2]"), {"unlearn": {"steps": 3}})


def test_non_finite_flags_are_refused():
    with pytest.raises(UserError, match=r"unlearn.lr: must be a finite number"):
        load_settings(None, {"unlearn": {"lr": float("inf")}})


def test_exponents_without_a_dot_are_floats_and_lists_become_tuples(tmp_path):
    settings = load_settings(recipe(tmp_path, "unlearn: {lr: 1e-4}\nstudy: {seeds: [1, 2], max_steps: 7}\n"))
    assert settings.unlearn.lr == 1e-4 and settings.study.seeds == (1, 2) and settings.study.max_steps == 7


def test_the_tuned_recipe_is_the_base_layer_of_embedded_runs_only(tmp_path):
    tuned = embedded_recipe()["tuned"]
    embedded = load_settings()
    assert embedded.tuned.learning_rates == tuned["learning_rates"]
    assert unlearn_settings(embedded).objective_options == tuned["objective_options"]["npo"]
    for other in ({"model_path": "some/model"}, {"base_model": "some/model"}, {"benchmark": "muse"}):
        assert load_settings(None, other).tuned.learning_rates == {}, other
    # a recipe's own tuned value wins over the shipped one, the others stay
    mine = load_settings(recipe(tmp_path, "tuned: {learning_rates: {npo: {adam: 0.002}}}"))
    assert mine.tuned.learning_rates == {"npo": {**tuned["learning_rates"]["npo"], "adam": 0.002}}


TOFU = {"benchmark": "tofu", "benchmark_options": {"data_dir": "tofu", "forget_split": "forget01"}}


def test_a_tofu_run_of_the_tiny_model_starts_from_the_tofu_recipe_whose_every_value_is_taken():
    shipped = tofu_tiny_recipe()
    settings = load_settings(None, TOFU).model_dump()
    for section, values in shipped.items():
        for name, value in values.items():
            taken = settings[section][name]
            assert (list(taken) if isinstance(taken, tuple) else taken) == value, f"{section}.{name}"
    assert {"model", "train", "study", "tuned"} <= set(shipped)


def test_the_tofu_recipe_is_not_used_for_a_given_model_and_loses_to_the_run_s_recipe_and_flags(tmp_path):
    defaults = load_settings(None, {"benchmark": "muse"})
    for given in ({"model_path": "some/model"}, {"base_model": "some/model"}):
        settings = load_settings(None, {**TOFU, **given})
        for section in ("model", "train", "study", "tuned"):
            assert getattr(settings, section) == getattr(defaults, section), (given, section)
    mine = load_settings(recipe(tmp_path, "train: {max_epochs: 3}\nstudy: {seeds: [5]}\n"), {**TOFU, "seed": 2})
    shipped = tofu_tiny_recipe()
    assert (mine.train.max_epochs, mine.study.seeds, mine.seed) == (3, (5,), 2)
    assert mine.train.lr == shipped["train"]["lr"] and mine.model.vocab_size == shipped["model"]["vocab_size"]


@pytest.mark.parametrize(
    "tuned, fragment",
    [
        ("{learning_rates: {adam: 0.002}}", "learning_rates: keyed by objective, then optimizer ({npo: {adam: ...}})"),
        ("{learning_rates: {nop: {adam: 0.002}}}", "tuned.learning_rates: unknown objective 'nop'; accepted: ga,"),
        ("{learning_rates: {npo: {adan: 0.002}}}", "tuned.learning_rates: unknown optimizer 'adan'; accepted: adam,"),
        ("{learning_rates: {npo: {adam: 0}}}", "tuned.learning_rates.npo.adam: Input should be greater than 0"),
        ("{optimizer_options: {hybrid: {zo_lr: 0.001}}}", "tuned.optimizer_options: keyed by objective"),
        ("{optimizer_options: {npo: {hybird: {zo_lr: 0.001}}}}", "unknown optimizer 'hybird'"),
        ("{optimizer_options: {npo: {hybrid: 0.001}}}", "optimizer_options.npo.hybrid: Input should be an object"),
        ("{sweep_bases: {adan: 0.001}}", "tuned.sweep_bases: unknown optimizer 'adan'"),
    ],
)
def test_tuned_values_with_unknown_names_or_the_per_optimizer_form_are_one_user_error(tmp_path, tuned, fragment):
    with pytest.raises(UserError) as caught:
        load_settings(recipe(tmp_path, f"tuned: {tuned}"))
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


def test_tuned_learning_rates_and_options_resolve_per_objective(tmp_path):
    text = "tuned: {learning_rates: {graddiff: {adam: 0.002}}, optimizer_options: {graddiff: {hybrid: {zo_lr: 0.003}}}}"
    settings = load_settings(recipe(tmp_path, text))
    npo = embedded_recipe()["tuned"]["learning_rates"]["npo"]["adam"]
    assert unlearn_settings(settings, objective="graddiff", optimizer="adam").lr == 0.002
    assert unlearn_settings(settings, objective="npo", optimizer="adam").lr == npo
    assert unlearn_settings(settings, objective="graddiff", optimizer="hybrid").optimizer_options == {"zo_lr": 0.003}
    tuned_hybrid = embedded_recipe()["tuned"]["optimizer_options"]["npo"]["hybrid"]
    assert unlearn_settings(settings, objective="npo", optimizer="hybrid").optimizer_options == tuned_hybrid


def test_the_tuned_options_of_each_objective_in_the_grid_are_checked(tmp_path):
    settings = load_settings(recipe(tmp_path, "tuned: {optimizer_options: {graddiff: {adam: {momentum: 0.9}}}}"))
    check_training_options(settings, ["npo"], ["adam"])  # graddiff's options are not this run's
    with pytest.raises(UserError, match="unknown option.s. momentum for optimizer 'adam'"):
        check_training_options(settings, ["npo", "graddiff"], ["adam"])


def test_the_engine_settings_carry_the_run_seed_and_the_tuned_choices():
    settings = load_settings(None, {"seed": 4, "unlearn": {"optimizer": "adam"}})
    engine = unlearn_settings(settings, steps=9)
    assert (engine.seed, engine.steps, engine.lr) == (4, 9, embedded_recipe()["tuned"]["learning_rates"]["npo"]["adam"])


def test_the_reference_optimizer_is_adam_when_the_grid_has_it_else_the_first():
    assert load_settings().study.reference == "adam"
    assert load_settings(None, {"study": {"optimizers": ("signum", "zo-sgd")}}).study.reference == "signum"
    chosen = load_settings(None, {"study": {"optimizers": ("adam", "zo-sgd"), "reference_optimizer": "zo-sgd"}})
    assert chosen.study.reference == "zo-sgd"
    with pytest.raises(UserError, match="reference_optimizer 'lion' is not in the grid"):
        load_settings(None, {"study": {"reference_optimizer": "lion"}})


def test_relearn_beside_relearn_lr_at_the_same_rate_is_refused_in_one_line():
    with pytest.raises(UserError, match="relearn and relearn-lr1e-4 both relearn at lr 0.0001"):
        load_settings(None, {"study": {"attacks": ["relearn", "relearn-lr1e-4"], "relearn_lr": 1e-4}})
    load_settings(None, {"study": {"attacks": ["relearn", "relearn-lr2e-3"], "relearn_lr": 1e-4}})


def test_the_engine_settings_of_a_cell_are_validated_like_a_recipe():
    settings = load_settings(None, {})
    assert unlearn_settings(settings, lr=1e-3, steps=5).steps == 5
    with pytest.raises(ValueError, match="lr"):
        unlearn_settings(settings, lr=-1.0)  # a swept or tuned lr goes through the same checks
    with pytest.raises(ValueError, match="steps"):
        unlearn_settings(settings, steps=0)
