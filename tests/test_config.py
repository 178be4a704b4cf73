"""Recipes and flags: strict types, finite numbers, mappings for sections, no duplicate keys, and the
embedded benchmark's tuned recipe as the base layer of the runs that use it."""

from __future__ import annotations

import pytest

from robustunlearn.config import embedded_recipe, load_settings, unlearn_settings
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
    for other in ({"model_path": "some/model"}, {"base_model": "some/model"}, {"benchmark": "tofu"}):
        assert load_settings(None, other).tuned.learning_rates == {}, other
    # a recipe's own tuned value wins over the shipped one, the others stay
    mine = load_settings(recipe(tmp_path, "tuned: {learning_rates: {adam: 0.002}}"))
    assert mine.tuned.learning_rates == {**tuned["learning_rates"], "adam": 0.002}


def test_the_engine_settings_carry_the_run_seed_and_the_tuned_choices():
    settings = load_settings(None, {"seed": 4, "unlearn": {"optimizer": "adam"}})
    engine = unlearn_settings(settings, steps=9)
    assert (engine.seed, engine.steps, engine.lr) == (4, 9, embedded_recipe()["tuned"]["learning_rates"]["adam"])


def test_the_reference_optimizer_is_adam_when_the_grid_has_it_else_the_first():
    assert load_settings().study.reference == "adam"
    assert load_settings(None, {"study": {"optimizers": ("signum", "zo-sgd")}}).study.reference == "signum"
    chosen = load_settings(None, {"study": {"optimizers": ("adam", "zo-sgd"), "reference_optimizer": "zo-sgd"}})
    assert chosen.study.reference == "zo-sgd"
    with pytest.raises(UserError, match="reference_optimizer 'lion' is not in the grid"):
        load_settings(None, {"study": {"reference_optimizer": "lion"}})
