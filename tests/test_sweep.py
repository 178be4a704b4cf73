"""The learning-rate sweep: its rule, per objective, over lr x optimizer options, on the sweep seeds
and the validation split only, resumable; and the study's cells."""

from __future__ import annotations

import json

import pytest

from robustunlearn.config import load_settings
from robustunlearn.study.cells import Cell, cell_optimizer_options, grid_cells
from robustunlearn.study.sweep import PARTIAL_FILE, SWEEP_FILE, Trial, sweep_learning_rates

COST = {"steps": 10, "forward_passes": 20, "backward_passes": 10, "seconds": 0.1}


def settings_and_study(**study_changes):
    """Every optimizer's sweep centres on lr 1e-3; reported seeds 0 and 1, one sweep seed, no option
    grid, unless changed."""
    study = {"seeds": [0, 1], "sweep_seeds": [1000], "sweep_options": {}, **study_changes}
    settings = load_settings(None, {"unlearn": {"lr": 1e-3}, "study": study})
    return settings, settings.study


def fake_trial(outcome):
    """A trial without a model: ``outcome(cell) -> (reached, forget, utility)``; records each cell."""
    calls = []

    def trial(cell: Cell) -> Trial:
        calls.append(cell)
        reached, forget, utility = outcome(cell)
        return Trial(reached, forget, utility, COST)

    return trial, calls


def table(outcomes):
    """``outcomes[(optimizer, lr, seed)] = (reached, forget, utility)``, lr rounded."""
    return lambda cell: outcomes[(cell.optimizer, round(cell.lr, 12), cell.seed)]


def test_a_rate_must_reach_the_level_on_every_seed_else_the_best_utility_minus_forget_wins(tmp_path):
    settings, study = settings_and_study(
        optimizers=("adam", "zo-sgd"), sweep_factors=(0.1, 1.0, 10.0), sweep_seeds=(1000, 1001)
    )
    outcomes = {
        # adam: 1e-2 has the best utility but misses the level on seed 1001; 1e-3 reaches it on both
        ("adam", 1e-4, 1000): (False, 0.5, 0.99),
        ("adam", 1e-4, 1001): (False, 0.5, 0.99),
        ("adam", 1e-3, 1000): (True, 0.05, 0.7),
        ("adam", 1e-3, 1001): (True, 0.05, 0.8),
        ("adam", 1e-2, 1000): (True, 0.05, 0.9),
        ("adam", 1e-2, 1001): (False, 0.2, 0.9),
        # zo-sgd: none reaches on both seeds; means of utility - forget: 0.0, 0.35 (reached on one
        # seed only: no priority), 0.5; the best utility (1e-4) forgets nothing
        ("zo-sgd", 1e-4, 1000): (False, 0.97, 0.97),
        ("zo-sgd", 1e-4, 1001): (False, 0.97, 0.97),
        ("zo-sgd", 1e-3, 1000): (True, 0.1, 0.5),
        ("zo-sgd", 1e-3, 1001): (False, 0.6, 0.9),
        ("zo-sgd", 1e-2, 1000): (False, 0.3, 0.8),
        ("zo-sgd", 1e-2, 1001): (False, 0.4, 0.9),
    }
    trial, calls = fake_trial(table(outcomes))
    chosen = sweep_learning_rates(settings, study, trial, tmp_path)
    assert chosen["npo"]["adam"] == {"lr": pytest.approx(1e-3), "options": {}}
    assert chosen["npo"]["zo-sgd"] == {"lr": pytest.approx(1e-2), "options": {}}
    assert len(calls) == 12


def test_each_objective_is_tuned_on_its_own_outcomes(tmp_path):
    settings, study = settings_and_study(objectives=("npo", "graddiff"), optimizers=("adam",), sweep_factors=(0.1, 10))
    best = {"npo": 1e-4, "graddiff": 1e-2}  # the lr whose utility is highest, per objective
    trial, calls = fake_trial(lambda cell: (True, 0.0, 0.9 if round(cell.lr, 12) == best[cell.objective] else 0.5))
    chosen = sweep_learning_rates(settings, study, trial, tmp_path)
    assert {objective: chosen[objective]["adam"]["lr"] for objective in chosen} == pytest.approx(best)
    assert sorted((cell.objective, round(cell.lr, 12)) for cell in calls) == sorted(
        (objective, lr) for objective in best for lr in (1e-4, 1e-2)
    )


def test_the_hybrid_crosses_lr_factors_with_every_combination_of_its_option_values(tmp_path):
    grid = {"zo_lr": (1e-5, 1e-4), "every": (5, 10)}
    settings, study = settings_and_study(
        optimizers=("adam", "hybrid"), sweep_factors=(0.5, 2.0), sweep_options={"hybrid": grid}
    )
    # the hybrid's best: lr 2e-3 with zo_lr 1e-4 and blocks of 5
    trial, calls = fake_trial(
        lambda cell: (
            True,
            0.0,
            0.9 if (round(cell.lr, 12), cell.options) == (2e-3, (("every", 5), ("zo_lr", 1e-4))) else 0.5,
        )
    )
    chosen = sweep_learning_rates(settings, study, trial, tmp_path)
    hybrid = {(round(cell.lr, 12), cell.options) for cell in calls if cell.optimizer == "hybrid"}
    assert hybrid == {
        (lr, (("every", every), ("zo_lr", zo_lr))) for lr in (5e-4, 2e-3) for every in (5, 10) for zo_lr in (1e-5, 1e-4)
    }
    assert {cell.options for cell in calls if cell.optimizer == "adam"} == {()}  # no grid: lr only
    assert len(calls) == 8 + 2
    assert chosen["npo"]["hybrid"] == {"lr": pytest.approx(2e-3), "options": {"every": 5, "zo_lr": 1e-4}}


def test_trials_run_on_the_sweep_seeds_never_the_reported_ones_and_the_file_says_so(tmp_path):
    settings, study = settings_and_study(
        optimizers=("adam",), seeds=(0, 1), sweep_seeds=(1000, 1001), sweep_factors=(1.0, 3.0)
    )
    trial, calls = fake_trial(lambda cell: (cell.lr < 2e-3, 0.1, 0.8))
    printed = []
    console = type("Console", (), {"print": lambda self, line, **_: printed.append(line)})()
    chosen = sweep_learning_rates(settings, study, trial, tmp_path, console)
    assert {cell.seed for cell in calls} == {1000, 1001}
    saved = json.loads((tmp_path / SWEEP_FILE).read_text())
    assert saved["chosen"] == chosen and saved["seeds"] == [1000, 1001] and saved["split"] == "validation"
    assert "every sweep seed" in saved["rule"]
    assert [(t["lr"], t["seed"], t["reached_level"]) for t in saved["trials"]] == [
        (1e-3, 1000, True),
        (1e-3, 1001, True),
        (pytest.approx(3e-3), 1000, False),
        (pytest.approx(3e-3), 1001, False),
    ]
    first = saved["trials"][0]
    assert (first["objective"], first["optimizer"], first["options"], first["cost"]) == ("npo", "adam", {}, COST)
    assert (first["forget"], first["utility"]) == (0.1, 0.8)
    assert (
        len(printed) == 4
        and printed[0] == "lr sweep 1/4: npo/adam lr 0.001 seed 1000: reached the level, forget 0.100, utility 0.800"
    )
    assert not (tmp_path / PARTIAL_FILE).exists()


def test_a_rerun_reads_the_finished_sweep_back_without_running_a_trial(tmp_path):
    settings, study = settings_and_study(optimizers=("adam", "signum"))
    trial, calls = fake_trial(lambda cell: (True, 0.1, 1 / cell.lr))
    chosen = sweep_learning_rates(settings, study, trial, tmp_path)
    written = (tmp_path / SWEEP_FILE).read_text()
    again, calls_again = fake_trial(lambda cell: pytest.fail(f"{cell.name} ran again"))
    assert sweep_learning_rates(settings, study, again, tmp_path) == chosen
    assert (tmp_path / SWEEP_FILE).read_text() == written and not calls_again
    # another seed is another sweep: its trials run, the recorded ones do not
    _, other_seed = settings_and_study(optimizers=("adam", "signum"), sweep_seeds=(1000, 1001))
    more, new_calls = fake_trial(lambda cell: (True, 0.1, 0.5))
    sweep_learning_rates(settings, other_seed, more, tmp_path)
    assert {cell.seed for cell in new_calls} == {1001} and len(new_calls) == len(calls)


def test_a_killed_sweep_resumes_from_its_partial_file(tmp_path):
    settings, study = settings_and_study(optimizers=("adam", "signum"))
    outcome = lambda cell: (True, 0.1, round(cell.lr, 12))  # noqa: E731
    done = []

    def killed_after_two(cell: Cell) -> Trial:
        if len(done) == 2:
            raise KeyboardInterrupt
        done.append(cell)
        return Trial(*outcome(cell), COST)

    with pytest.raises(KeyboardInterrupt):
        sweep_learning_rates(settings, study, killed_after_two, tmp_path)
    assert not (tmp_path / SWEEP_FILE).exists()
    assert len(json.loads((tmp_path / PARTIAL_FILE).read_text())["trials"]) == 2
    trial, calls = fake_trial(outcome)
    chosen = sweep_learning_rates(settings, study, trial, tmp_path)
    assert len(calls) == 6 - 2 and not set(calls) & set(done)
    assert len(json.loads((tmp_path / SWEEP_FILE).read_text())["trials"]) == 6
    uninterrupted, _ = fake_trial(outcome)
    assert chosen == sweep_learning_rates(settings, study, uninterrupted, tmp_path / "fresh")


def test_trials_of_a_sweep_scored_on_the_evaluation_sets_are_never_reused(tmp_path):
    settings, study = settings_and_study(optimizers=("adam",), sweep_factors=(1.0,))
    old = {"chosen": {"adam": 1e-3}, "trials": [{"optimizer": "adam", "lr": 1e-3, "reached_level": True}]}
    (tmp_path / SWEEP_FILE).write_text(json.dumps(old))
    trial, calls = fake_trial(lambda cell: (True, 0.1, 0.8))
    assert sweep_learning_rates(settings, study, trial, tmp_path) == {"npo": {"adam": {"lr": 1e-3, "options": {}}}}
    assert len(calls) == 1


def test_a_cell_names_its_option_overrides_in_one_order_and_rows_carry_them_only_when_set():
    plain = Cell("synthetic", "npo", "adam", 0, 5e-4)
    assert plain.name == "npo-adam-seed0-lr0.0005" and "options" not in plain.as_dict()
    hybrid = Cell("synthetic", "npo", "hybrid", 1, 1.5e-3, (("zo_lr", 1e-4), ("every", 5), ("zo", "zo/adazo")))
    assert hybrid == Cell("synthetic", "npo", "hybrid", 1, 1.5e-3, (("every", 5), ("zo", "zo/adazo"), ("zo_lr", 1e-4)))
    assert hybrid.name == "npo-hybrid-seed1-lr0.0015-every5-zozo_adazo-zo_lr0.0001"
    assert hybrid.as_dict()["options"] == {"every": 5, "zo": "zo/adazo", "zo_lr": 1e-4}


def test_the_grid_cells_take_the_sweeps_choices_unless_the_recipe_pins_them():
    chosen = {"npo": {"hybrid": {"lr": 2e-3, "options": {"zo_lr": 3e-4, "every": 5}}}}
    settings = load_settings(None, {"study": {"optimizers": ["adam", "hybrid"], "seeds": [0, 1]}})
    cells = grid_cells(settings, settings.study, chosen)
    assert [(c.optimizer, c.seed) for c in cells] == [("adam", 0), ("adam", 1), ("hybrid", 0), ("hybrid", 1)]
    hybrid = cells[2]
    assert (hybrid.lr, hybrid.options) == (2e-3, (("every", 5), ("zo_lr", 3e-4)))
    assert cell_optimizer_options(settings, hybrid) == {"zo_lr": 3e-4, "every": 5}
    assert cells[0].lr == settings.tuned.learning_rates["npo"]["adam"] and cells[0].options == ()

    pinned = load_settings(
        None, {"unlearn": {"optimizer_options": {"zo_lr": 1e-5}}, "study": {"optimizers": ["hybrid"], "seeds": [0]}}
    )
    (cell,) = grid_cells(pinned, pinned.study, chosen)
    assert cell.options == (("every", 5),)
    assert cell_optimizer_options(pinned, cell) == {"zo_lr": 1e-5, "every": 5}
