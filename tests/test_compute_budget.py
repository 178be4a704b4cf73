"""Compute budgets in forward-pass equivalents: a step costs its model passes, forward +
backward_cost · backward (the reference model's forward included, or with a reference cache its
forwards before the first step); the run stops after the step at which the cost reaches the budget,
deferred like an evaluation's stop, and a resumed run stops at the same step with the same cost."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import Killed, dies_at
from robustunlearn.core.errors import SettingsError
from robustunlearn.train.settings import UnlearnSettings

# the reference cache of the synthetic benchmark's 9 forget records, in batches of 2
CACHE_FORWARDS = 5
# hybrid in blocks of 2 from the first step: fo fo zo zo fo fo zo zo ...; ZO-SGD takes one
# two-sided direction per step (2 forwards)
HYBRID_FROM_START = {"every": 2, "align": "start", "zo": "zo-sgd"}


def settings(**values) -> UnlearnSettings:
    return UnlearnSettings(**{"lr": 1e-3, "steps": 20, "batch_size": 2, **values})


def costs(result) -> list[float]:
    return [h["forward_equivalents"] for h in result.history]


def spent(budget: float) -> str:
    return f"compute budget of {budget:g} forward-pass equivalents spent"


@pytest.mark.parametrize(
    "objective,reference,before,forwards,backward_cost,budget,stops_at",
    [
        ("ga", "cached", 0, 1, 2.0, 10, 4),  # 1 + 2·1 = 3 a step: 3, 6, 9, 12 ≥ 10
        ("ga", "cached", 0, 1, 0.5, 4.5, 3),  # 1 + 0.5·1 = 1.5 a step: 1.5, 3, 4.5, reached exactly
        ("npo", "live", 0, 2, 2.0, 10, 3),  # the reference model's forward too: 2 + 2·1 = 4 a step: 4, 8, 12 ≥ 10
        # the cache's forwards first, then 1 + 2·1 = 3 a step: 8, 11 ≥ 10
        ("npo", "cached", CACHE_FORWARDS, 1, 2.0, 10, 2),
    ],
)
def test_a_first_order_run_stops_at_the_step_that_spends_the_budget(
    run_unlearn, objective, reference, before, forwards, backward_cost, budget, stops_at
):
    config = settings(
        objective=objective,
        optimizer="adamw",
        compute_budget=budget,
        backward_cost=backward_cost,
        reference=reference,
    )
    result = run_unlearn(config)
    per_step = forwards + backward_cost
    assert costs(result) == [before + per_step * step for step in range(1, stops_at + 1)]
    assert result.passes == {"forward": before + forwards * stops_at, "backward": stops_at}
    assert result.steps_done == stops_at and result.forward_equivalents == before + per_step * stops_at
    assert result.stopped_early == spent(budget) and result.budget_spent


@pytest.mark.parametrize("two_sided,forwards", [(True, 2 * 3), (False, 1 + 3)])
def test_a_zeroth_order_step_costs_its_function_values(run_unlearn, two_sided, forwards):
    # q = 3 directions: two-sided L(θ ± eps·z_k) for each, one-sided L(θ) and L(θ + eps·z_k)
    options = {"q": 3, "two_sided": two_sided}
    config = settings(objective="ga", optimizer="zo-sgd", compute_budget=3 * forwards - 1, optimizer_options=options)
    result = run_unlearn(config)
    assert costs(result) == [forwards, 2 * forwards, 3 * forwards]
    assert result.passes == {"forward": 3 * forwards, "backward": 0} and result.budget_spent


@pytest.mark.parametrize(
    "budget,reached_at,stops_at",
    [
        (7, 3, 4),  # spent inside a ZO block: the run finishes the block
        (11, 5, 8),  # spent in an FO block: the run goes on through the next ZO block
    ],
)
def test_a_hybrid_spends_its_budget_to_the_end_of_a_zo_block(run_unlearn, budget, reached_at, stops_at):
    # an Adam step costs 1 + 2 = 3, a ZO-SGD step 2
    config = settings(objective="ga", optimizer="hybrid", steps=12, compute_budget=budget)
    result = run_unlearn(config.model_copy(update={"optimizer_options": HYBRID_FROM_START}))
    assert costs(result) == [3, 6, 8, 10, 13, 16, 18, 20][:stops_at]
    assert [h["current_phase"] for h in result.history] == ["fo", "fo", "zo", "zo", "fo", "fo", "zo", "zo"][:stops_at]
    assert next(step for step, cost in enumerate(costs(result), 1) if cost >= budget) == reached_at
    assert result.steps_done == stops_at and result.stopped_early == spent(budget) and result.budget_spent


@pytest.mark.parametrize("options", [{"every": 2}, {"every": 2, "align": "end"}])
def test_a_hybrid_aligned_at_the_end_is_refused_a_compute_budget(run_unlearn, options):
    config = settings(objective="ga", optimizer="hybrid", steps=12, compute_budget=10, optimizer_options=options)
    with pytest.raises(SettingsError, match="align='end'.*compute_budget.*align='start'") as error:
        run_unlearn(config)
    assert "\n" not in str(error.value)


def test_a_stop_asked_by_should_stop_is_not_a_spent_budget(run_unlearn):
    config = settings(objective="ga", optimizer="adamw", compute_budget=6, eval_every=1)  # spent at step 2
    evaluate = lambda model, step: {"step": step}  # noqa: E731
    level = run_unlearn(config, evaluate=evaluate, should_stop=lambda m: "level" if m["step"] >= 2 else None)
    assert (level.steps_done, level.stopped_early, level.budget_spent) == (2, "level", False)
    budget = run_unlearn(config, evaluate=evaluate, should_stop=lambda m: None)
    assert (budget.steps_done, budget.stopped_early, budget.budget_spent) == (2, spent(6), True)


@pytest.mark.parametrize("budget", [None, 100])
def test_without_a_budget_spent_the_run_takes_all_its_steps(run_unlearn, budget):
    result = run_unlearn(settings(objective="ga", optimizer="adamw", steps=3, compute_budget=budget))
    assert result.steps_done == 3 and result.stopped_early is None and not result.budget_spent
    assert costs(result) == [3, 6, 9] and result.forward_equivalents == 9


@pytest.mark.parametrize(
    "optimizer,options,kill_at,stops_at",
    [
        ("adamw", {}, 5, 5),  # 4 a step: 4, 8, 12, 16 (checkpoint), 20 ≥ 18
        # Adam 4, ZO 3 a step: 4, 8, 11, 14, 18 (spent), 22 (checkpoint), 25, 28 (end of the ZO block)
        ("hybrid", HYBRID_FROM_START, 7, 8),
    ],
)
def test_a_resumed_run_stops_where_an_uninterrupted_one_does(
    run_unlearn, fresh_model, tmp_path, optimizer, options, kill_at, stops_at
):
    config = settings(
        objective="npo",
        optimizer=optimizer,
        steps=12,
        compute_budget=18,
        checkpoint_every=2,
        eval_every=1,
        optimizer_options=options,
        reference="live",  # its forward counted at every step; test_reference_cache resumes a cached run
    )
    reference = fresh_model()
    whole = run_unlearn(config, tmp_path / "whole", model=reference, evaluate=lambda m, s: {})

    with pytest.raises(Killed):
        run_unlearn(config, tmp_path / "killed", evaluate=dies_at(kill_at))
    resumed = fresh_model()  # a new process starts from the original weights
    result = run_unlearn(config, tmp_path / "killed", model=resumed, resume=True, evaluate=lambda m, s: {})

    assert result.resumed_from == kill_at - 1
    assert (result.steps_done, result.stopped_early, result.budget_spent) == (stops_at, spent(18), True)
    assert whole.steps_done == stops_at and result.passes == whole.passes
    assert result.forward_equivalents == whole.forward_equivalents
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    logged = [json.loads(line) for line in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    assert [entry["forward_equivalents"] for entry in logged] == costs(whole)
