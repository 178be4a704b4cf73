"""First-order smoothing baselines: randomized smoothing (fo-rs) and SAM."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import closure_for, saved_and_loaded
from robustunlearn.optim.smoothing import SAM, SPECS, RandomizedSmoothing


def test_specs_and_base_choice(quadratic):
    assert set(SPECS) == {"fo-rs", "sam"}
    model = quadratic()
    for name, spec in SPECS.items():
        assert spec.name == name and spec.grade == "smoothing" and spec.default_lr > 0
        assert isinstance(spec.build(model, [model.theta], 1e-3, {}).base_optimizer, torch.optim.Adam)
        sgd = spec.build(model, [model.theta], 1e-3, {"base": "sgd", "momentum": 0.9})
        assert isinstance(sgd.base_optimizer, torch.optim.SGD)
        assert sgd.param_groups[0]["momentum"] == 0.9
        with pytest.raises(ValueError, match="'lbfgs'; accepted: adam, sgd"):
            spec.build(model, [model.theta], 1e-3, {"base": "lbfgs"})


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("base, lr", [("adam", 0.05), ("sgd", 0.05)])
def test_decreases_a_convex_quadratic(name, base, lr, quadratic):
    model = quadratic()
    optimizer = SPECS[name].build(model, [model.theta], lr, {"base": base})
    initial = model.loss().item()
    torch.manual_seed(0)  # fo-rs's noise
    for _ in range(60):
        optimizer.step(closure_for(model, model.loss))
    assert model.loss().item() < 0.1 * initial


@pytest.mark.parametrize("name", sorted(SPECS))
def test_decreases_a_tiny_llama_loss(name, tiny_llama, lm_closure):
    model = tiny_llama()
    input_ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    closure = lm_closure(model, input_ids)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = SPECS[name].build(model, params, 1e-3, {})
    first = closure(backward=False).item()
    for _ in range(6):
        optimizer.step(closure)
    with torch.no_grad():
        assert closure(backward=False).item() < first - 0.05


def test_sam_takes_the_gradient_at_the_ascended_point(quadratic):
    model = quadratic()
    model.theta.data = torch.linspace(-1.0, 1.0, 8, dtype=torch.float64)
    theta = model.theta.detach().clone()
    g = model.gradient_at(theta)
    ascended = theta + 0.3 * g / g.norm()
    expected_gradient = model.gradient_at(ascended)

    optimizer = SAM([model.theta], lr=0.1, rho=0.3, base=torch.optim.SGD)
    loss = optimizer.step(closure_for(model, model.loss))
    torch.testing.assert_close(model.theta.grad, expected_gradient, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.theta.detach(), theta - 0.1 * expected_gradient, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, 0.5 * (theta - model.target) @ model.a @ (theta - model.target))


def test_sam_with_adam_is_adam_fed_the_ascended_gradient(quadratic):
    model, twin = quadratic(), quadratic()
    sam = SAM([model.theta], lr=0.05, rho=0.2)
    adam = torch.optim.Adam([twin.theta], lr=0.05)
    for _ in range(4):
        theta = twin.theta.detach()
        g = twin.gradient_at(theta)
        twin.theta.grad = twin.gradient_at(theta + 0.2 * g / g.norm())
        adam.step()
        sam.step(closure_for(model, model.loss))
        torch.testing.assert_close(model.theta, twin.theta, rtol=1e-12, atol=1e-14)


def test_randomized_smoothing_takes_the_mean_gradient_at_gaussian_perturbations(quadratic):
    model = quadratic()
    model.theta.data = torch.linspace(-1.0, 1.0, 8, dtype=torch.float64)
    theta = model.theta.detach().clone()
    optimizer = RandomizedSmoothing([model.theta], lr=0.1, sigma=0.5, samples=3, base=torch.optim.SGD)
    torch.manual_seed(7)
    noise = [torch.randn_like(theta) for _ in range(3)]  # one draw per sample, from the global RNG
    expected_gradient = torch.stack([model.gradient_at(theta + 0.5 * u) for u in noise]).mean(0)
    expected_loss = torch.stack(
        [0.5 * (theta + 0.5 * u - model.target) @ model.a @ (theta + 0.5 * u - model.target) for u in noise]
    ).mean()

    torch.manual_seed(7)
    loss = optimizer.step(closure_for(model, model.loss))
    torch.testing.assert_close(model.theta.grad, expected_gradient, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.theta.detach(), theta - 0.1 * expected_gradient, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, expected_loss)


def test_randomized_smoothing_of_a_linear_loss_is_plain_sgd():
    slope = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    theta = nn.Parameter(torch.tensor([0.3, 0.1, -0.7], dtype=torch.float64))

    def closure(backward: bool = True, *, sample_labels: bool = False, term: str | None = None):
        loss = (slope * theta).sum()
        theta.grad = None
        loss.backward()
        return loss.detach()

    optimizer = RandomizedSmoothing([theta], lr=0.1, sigma=10.0, samples=4, base=torch.optim.SGD)
    expected = theta.detach().clone()
    for _ in range(3):
        optimizer.step(closure)
        expected -= 0.1 * slope
        torch.testing.assert_close(theta.detach(), expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_state_dict_carries_the_base_moments_and_resumes_the_trajectory(name, quadratic):
    def run(model, optimizer, steps):
        for step in steps:
            torch.manual_seed(step)  # fo-rs draws its noise from the global RNG
            optimizer.step(closure_for(model, model.loss))

    straight = quadratic()
    run(straight, SPECS[name].build(straight, [straight.theta], 0.05, {}), range(6))

    first = quadratic()
    optimizer = SPECS[name].build(first, [first.theta], 0.05, {})
    run(first, optimizer, range(3))
    saved = saved_and_loaded({"model": first.state_dict(), "optimizer": optimizer.state_dict()})
    assert set(saved["optimizer"]["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}  # Adam's

    resumed = quadratic(seed=5)
    resumed.load_state_dict(saved["model"])
    optimizer = SPECS[name].build(resumed, [resumed.theta], 0.05, {})
    optimizer.load_state_dict(saved["optimizer"])
    assert optimizer.base_optimizer.state is optimizer.state
    run(resumed, optimizer, range(3, 6))
    assert torch.equal(resumed.theta, straight.theta)


def test_invalid_arguments_name_the_value():
    param = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="samples 0"):
        RandomizedSmoothing([param], samples=0)
    with pytest.raises(ValueError, match="rho -1"):
        SAM([param], rho=-1)
    with pytest.raises(ValueError, match="needs a closure"):
        SAM([param]).step()
