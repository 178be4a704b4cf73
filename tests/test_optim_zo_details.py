"""Details of the zeroth-order grade a reviewer checks: its loss values are taken with dropout off
(the closure protocol), its updates are stochastically rounded onto the exact grid (unbiased at
any lr), and every optimizer says where its last closure call evaluated the loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM

from helpers import tiny_llama
from robustunlearn.optim import build_optimizer, hooks, make_closure
from robustunlearn.optim.zo import ZOSGD

IDS = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))


def dropout_llama(attention_dropout: float = 0.5) -> LlamaForCausalLM:
    """A tiny Llama whose attention drops half its weights in training mode."""
    return tiny_llama(attention_dropout=attention_dropout).train()


def lm_loss(model: nn.Module, seen_modes: list[bool] | None = None):
    def loss(term: str | None) -> torch.Tensor:
        if seen_modes is not None:
            seen_modes.append(model.training)
        logits = model(input_ids=IDS).logits[:, :-1]
        return F.cross_entropy(logits.flatten(0, 1), IDS[:, 1:].flatten())

    return loss


# -- 1. function values with dropout off -----------------------------------------------------------


def test_function_values_are_taken_with_dropout_off_and_the_modes_restored():
    model = dropout_llama()
    model.model.layers[1].eval()  # a submodule in its own mode: it must stay so
    modes = {name: m.training for name, m in model.named_modules()}
    seen: list[bool] = []
    closure = make_closure(model, lm_loss(model, seen))
    with torch.no_grad():
        first, second = closure(backward=False), closure(backward=False)
    assert torch.equal(first, second)  # the same function of θ at each call
    assert seen == [False, False]
    assert {name: m.training for name, m in model.named_modules()} == modes


def test_calls_with_backward_or_a_graph_keep_training_mode_and_its_dropout():
    model = dropout_llama()
    seen: list[bool] = []
    closure = make_closure(model, lm_loss(model, seen))
    with_backward = [closure(), closure()]
    with torch.enable_grad():  # sophia-h's call: the loss with its graph, as in training
        graph = closure(backward=False)
    assert graph.grad_fn is not None and seen == [True, True, True]
    assert not torch.equal(*with_backward)  # control: dropout is on in training mode


def test_a_zo_step_on_a_model_with_dropout_is_the_step_without_dropout():
    runs = []
    for dropout in (0.5, 0.0):
        model = dropout_llama(dropout)
        opt = ZOSGD(model.parameters(), lr=1e-3, seed=0)
        losses = [opt.step(make_closure(model, lm_loss(model))) for _ in range(2)]
        runs.append((torch.stack(losses), torch.cat([p.detach().flatten() for p in model.parameters()])))
        assert model.training  # back in training mode after the step
    (losses, weights), (plain_losses, plain_weights) = runs
    assert torch.equal(losses, plain_losses) and torch.equal(weights, plain_weights)


# -- 2. unbiased updates ---------------------------------------------------------------------------


def grid_step(theta: torch.Tensor, reach: float) -> float:
    """h of zo.py's docstring: 2**(e − 24), 2**(e − 1) the first power of two above max|θ| + reach."""
    return math.ldexp(1.0, math.frexp(float(theta.detach().abs().max()) + reach)[1] + 1 - 24)


def one_coordinate_loss(theta: nn.Parameter):
    """L(θ) = θ_0, in float64: every projected gradient is z_0 exactly (±1 for Rademacher z)."""

    def closure(backward: bool = True, **_) -> torch.Tensor:
        return theta[0].double()

    return closure


def on_grid_weights(count: int = 1 << 20) -> nn.Parameter:
    """Weights that are multiples of 2**-20 in (−1/8, 1/8), hence already on their grid."""
    integers = torch.randint(-(1 << 17) + 1, 1 << 17, (count,), generator=torch.Generator().manual_seed(3))
    return nn.Parameter(integers.float() * 2.0**-20)


@pytest.mark.parametrize(
    "directions,reach,ratio",
    [("rademacher", 1e-3, 0.3), ("rademacher", 1e-3, 1.3), ("gaussian", 9e-3, 0.3)],
)
def test_the_expected_update_is_the_update_at_an_lr_near_the_grid_step(directions, reach, ratio):
    theta = on_grid_weights()
    h = grid_step(theta, reach)
    assert torch.equal(torch.remainder(theta.detach(), h), torch.zeros_like(theta))
    lr = ratio * h  # the update of a coordinate is −lr·z_0·z_i: ±ratio·h for Rademacher z
    opt = ZOSGD([theta], lr=lr, eps=1e-3, directions=directions, seed=11)
    before = theta.detach().clone()
    opt.step(one_coordinate_loss(theta))
    change = (theta.detach() - before).double()
    update = (-lr * opt.projected_grads[0] * opt.direction(0)).double()  # −lr·ĝ
    assert torch.equal(torch.remainder(change, h), torch.zeros_like(change))  # still on the grid
    assert float((change - update).abs().max()) < h  # each coordinate off by less than one step
    # E[change] = −lr·ĝ: the least-squares slope of the change on the update is 1 within a few
    # standard deviations of the rounding noise (variance below h²/4 per coordinate)
    slope = float((change * update).sum() / update.square().sum())
    deviation = (h / 2) / float(update.square().sum().sqrt())
    assert deviation < 0.005 and slope == pytest.approx(1.0, abs=5 * deviation)
    # control: rounding to nearest drops the updates below h/2 and turns ±1.3·h into ±h
    nearest = torch.round(update / h) * h
    nearest_slope = float((nearest * update).sum() / update.square().sum())
    assert abs(nearest_slope - 1.0) > 0.15


def test_an_update_already_on_the_grid_is_added_exactly():
    theta = on_grid_weights(1 << 12)
    h = grid_step(theta, 1e-3)
    opt = ZOSGD([theta], lr=2 * h, eps=1e-3, seed=1)
    before = theta.detach().clone()
    opt.step(one_coordinate_loss(theta))
    assert torch.equal(theta.detach() - before, -2 * h * opt.projected_grads[0] * opt.direction(0))


def test_the_rounding_draws_do_not_touch_the_direction_stream():
    # the same seed with and without rounding noise (lr on or off the grid) draws the same directions
    directions = []
    for lr_steps in (0.5, 2.0):
        theta = on_grid_weights(1 << 10)
        opt = ZOSGD([theta], lr=lr_steps * grid_step(theta, 1e-3), eps=1e-3, seed=4)
        opt.step(one_coordinate_loss(theta))
        directions.append(opt.direction(0))
    assert torch.equal(*directions)


# -- 4. where the last closure call was ------------------------------------------------------------


@pytest.mark.parametrize(
    "name,options,where",
    [
        ("zo-sgd", {}, "θ − eps·z"),
        ("zo-sgd", {"q": 3}, "θ − eps·z_q"),
        ("zo-adazo", {}, "θ + eps·z"),  # one-sided by default
        ("adamw", {}, "θ"),
        ("signum", {}, "θ"),
        ("sophia-g", {}, "θ"),
        ("fo-rs", {}, "θ + σ·u"),
        ("sam", {}, "θ + ρ·g/‖g‖"),
        ("hybrid-objective", {}, "θ + Δzo"),
        ("hybrid-depth", {"fo_blocks": 1, "fo": "sam"}, "θ + Δzo + ρ·g/‖g‖"),
    ],
)
def test_each_optimizer_says_where_its_last_closure_call_was(name, options, where):
    assert hooks(build_optimizer(name, dropout_llama(0.0), **options)).last_closure_at == where


def test_the_hybrid_says_where_the_part_of_its_last_step_called_the_closure():
    model = dropout_llama(0.0)
    hybrid = build_optimizer("hybrid", model, total_steps=4, every=2, align="start", zo_options={"seed": 0})
    closure = make_closure(model, lm_loss(model))
    where = []
    for _ in range(4):
        hybrid.step(closure)
        where.append(hybrid.last_closure_at)
    assert where == ["θ", "θ", "θ + eps·z", "θ + eps·z"]
