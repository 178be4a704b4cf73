"""Loss landscape: linear mode connectivity and sharpness."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import snapshot
from robustunlearn.attacks import quantizable_linears
from robustunlearn.study.landscape import linear_interpolation, lmc_barrier, sharpness

INPUT_IDS = torch.arange(2 * 12).reshape(2, 12) % 64


def lm_loss(model: nn.Module) -> dict[str, float]:
    with torch.no_grad():
        return {"loss": float(model(input_ids=INPUT_IDS, labels=INPUT_IDS).loss)}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


class Point(nn.Module):
    """A model that is just a point θ in R^n; its "loss" is a quadratic of θ."""

    def __init__(self, theta: list[float]):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(theta, dtype=torch.float64))


def test_lmc_of_a_model_with_itself_is_flat(tiny_llama):
    model = tiny_llama(0, dtype=torch.float64).eval()
    curve = linear_interpolation(model, model, lm_loss, points=5)
    assert [point["alpha"] for point in curve] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert {point["loss"] for point in curve} == {lm_loss(model)["loss"]}
    assert lmc_barrier(curve, "loss") == 0.0


def test_lmc_endpoints_are_the_two_models_and_inputs_are_untouched(tiny_llama):
    model_a, model_b = tiny_llama(0, dtype=torch.float64).eval(), tiny_llama(1, dtype=torch.float64).eval()
    before_a, before_b = snapshot(model_a), snapshot(model_b)
    curve = linear_interpolation(model_a, model_b, lm_loss, points=3)
    assert curve[0]["loss"] == lm_loss(model_a)["loss"]
    assert curve[-1]["loss"] == lm_loss(model_b)["loss"]
    assert curve[0]["loss"] != curve[-1]["loss"]
    # the midpoint is neither endpoint: the weights really were interpolated
    assert curve[1]["loss"] not in (curve[0]["loss"], curve[-1]["loss"])
    assert_unchanged(model_a, before_a)
    assert_unchanged(model_b, before_b)


def test_lmc_evaluates_the_interpolated_weights():
    a, b = Point([0.0, 2.0]), Point([4.0, -2.0])
    curve = linear_interpolation(
        a, b, lambda m: {"x": float(m.theta[0].detach()), "y": float(m.theta[1].detach())}, points=5
    )
    assert [(p["x"], p["y"]) for p in curve] == [(0.0, 2.0), (1.0, 1.0), (2.0, 0.0), (3.0, -1.0), (4.0, -2.0)]


def test_lmc_barrier_of_a_quadratic():
    # f(θ) = ||θ - c||² is convex: along the path, chord - f = α(1-α)·||a - b||², largest at α = 1/2.
    a, b, c = Point([0.0, 1.0, 2.0]), Point([2.0, -1.0, 2.0]), torch.tensor([1.0, 3.0, -1.0], dtype=torch.float64)
    distance2 = 8.0  # ||a - b||²
    bowl = linear_interpolation(a, b, lambda m: {"loss": float((m.theta.detach() - c).pow(2).sum())}, points=11)
    hill = linear_interpolation(a, b, lambda m: {"loss": -float((m.theta.detach() - c).pow(2).sum())}, points=11)
    assert lmc_barrier(hill, "loss") == pytest.approx(distance2 / 4)
    assert lmc_barrier(bowl, "loss") == pytest.approx(0.0, abs=1e-12)  # below the chord: no barrier
    assert lmc_barrier(bowl, "loss", higher_is_worse=False) == pytest.approx(distance2 / 4)
    # only the points the curve has count: without α = 1/2 the largest bump is at α = 0.4 and 0.6
    without_middle = [point for point in hill if point["alpha"] != 0.5]
    assert lmc_barrier(without_middle, "loss") == pytest.approx(0.4 * 0.6 * distance2)


def test_lmc_rejects_different_architectures_and_degenerate_curves():
    with pytest.raises(ValueError, match="architecture"):
        linear_interpolation(Point([0.0, 1.0]), Point([0.0, 1.0, 2.0]), lambda m: {})
    with pytest.raises(ValueError, match="points"):
        linear_interpolation(Point([0.0]), Point([1.0]), lambda m: {}, points=1)
    with pytest.raises(ValueError, match="two different alphas"):
        lmc_barrier([{"alpha": 0.0, "loss": 1.0}], "loss")


def weights_bowl(model: nn.Module):
    """L(θ) = Σ ||W - W*||² over the noised weights, with W* the model's own: the model is at the minimum."""
    optimum = {name: linear.weight.detach().clone() for name, linear in quantizable_linears(model)}

    def loss(candidate: nn.Module) -> float:
        return sum(
            float((linear.weight.detach() - optimum[name]).pow(2).sum())
            for name, linear in quantizable_linears(candidate)
        )

    return loss, optimum


def test_sharpness_at_the_minimum_of_a_quadratic(tiny_llama):
    model = tiny_llama(0, dtype=torch.float64).eval()
    before = snapshot(model)
    loss, optimum = weights_bowl(model)
    scales = (1e-3, 1e-2, 3e-2)
    result = sharpness(model, loss, scales=scales, samples=3, seed=0)
    assert [row["scale"] for row in result] == list(scales)
    increases = [row["mean_loss_increase"] for row in result]
    assert all(increase > 0 for increase in increases)
    assert increases == sorted(increases)
    # relative noise: E[ΔL] = Σ n·(scale·RMS(W))² = scale² · Σ ||W||² (20k weights: within a few %)
    squared_norm = sum(float(weight.pow(2).sum()) for weight in optimum.values())
    for row in result:
        assert row["mean_loss_increase"] == pytest.approx(row["scale"] ** 2 * squared_norm, rel=0.05)
        assert 0 < row["std"] < 0.05 * row["mean_loss_increase"]
    assert_unchanged(model, before)


def test_sharpness_is_seeded_and_absolute_noise_has_absolute_scale(tiny_llama):
    model = tiny_llama(0, dtype=torch.float64).eval()
    loss, optimum = weights_bowl(model)
    first = sharpness(model, loss, scales=(1e-2,), samples=2, seed=3)
    assert sharpness(model, loss, scales=(1e-2,), samples=2, seed=3) == first
    assert sharpness(model, loss, scales=(1e-2,), samples=2, seed=4) != first
    count = sum(weight.numel() for weight in optimum.values())
    (absolute,) = sharpness(model, loss, scales=(1e-3,), samples=1, relative=False)
    assert absolute["mean_loss_increase"] == pytest.approx(1e-6 * count, rel=0.05)
    assert absolute["std"] == 0.0
