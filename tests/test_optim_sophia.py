"""Sophia-G (Gauss-Newton-Bartlett) and Sophia-H (Hutchinson)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import Quadratic, closure_for, saved_and_loaded
from robustunlearn.optim.sophia import SPECS, SophiaG, SophiaH


class SampledQuadratic(Quadratic):
    """The quadratic ½‖r‖² with a sampled-label loss: it treats r as the mean of a unit Gaussian,
    y ~ N(r, I), and returns ½‖r − y‖², so the squared gradient is a Gauss-Newton-Bartlett
    estimate, E[ĝ²] = diag(A)."""

    def closure(self, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)

        def sampled_loss() -> torch.Tensor:
            r = self.residual()
            sampled = r.detach() + torch.randn(r.shape, generator=generator, dtype=r.dtype)
            return 0.5 * (r - sampled).square().sum()

        return closure_for(self, self.loss, sampled_loss_fn=sampled_loss)


def rademacher_like(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The probes SophiaH draws: one ±1 tensor per parameter, in order, from the global RNG."""
    return [torch.randint_like(p, 0, 2) * 2 - 1 for p in params]


def double_backward_hvp(loss: torch.Tensor, params: list[torch.Tensor], vectors: list[torch.Tensor]):
    grads = torch.autograd.grad(loss, params, create_graph=True)
    dot = sum((g * v).sum() for g, v in zip(grads, vectors))
    return torch.autograd.grad(dot, params)


def test_specs():
    assert set(SPECS) == {"sophia-g", "sophia-h"}
    for name, spec in SPECS.items():
        assert spec.name == name and spec.grade == "second-order" and spec.default_lr > 0
    model = SampledQuadratic()
    optimizer = SPECS["sophia-h"].build(model, [model.theta], 1e-3, {"hvp": "finite-difference"})
    assert isinstance(optimizer, SophiaH) and optimizer.hvp == "finite-difference"


@pytest.mark.parametrize(
    "name, options",
    [
        ("sophia-g", {"batch_size": 1}),
        ("sophia-h", {}),
        ("sophia-h", {"hvp": "finite-difference", "hvp_radius": 1e-5}),
    ],
)
def test_decreases_a_convex_quadratic(name, options):
    model = SampledQuadratic()
    optimizer = SPECS[name].build(model, [model.theta], 0.05, {"hessian_period": 2, **options})
    closure = model.closure()
    initial = model.loss().item()
    torch.manual_seed(0)  # Sophia-H's probes
    for _ in range(120):
        optimizer.step(closure)
    assert model.loss().item() < 0.1 * initial
    assert 0.0 <= optimizer.last_unclipped_fraction <= 1.0


@pytest.mark.parametrize(
    "name, options",
    [("sophia-g", {}), ("sophia-h", {}), ("sophia-h", {"hvp": "finite-difference"})],
)
def test_decreases_a_tiny_llama_loss_with_sdpa_attention(name, options, tiny_llama, lm_closure):
    model = tiny_llama(attention="sdpa")
    assert model.config._attn_implementation == "sdpa"
    input_ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    closure = lm_closure(model, input_ids)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = SPECS[name].build(model, params, 1e-3, {"hessian_period": 2, **options})
    losses = [optimizer.step(closure).item() for _ in range(6)]
    with torch.no_grad():
        final = closure(backward=False).item()
    assert final < losses[0] - 0.05
    assert all(torch.isfinite(optimizer.state[p]["hessian"]).all() for p in params)


def test_zero_hessian_clips_to_lr_times_sign_of_momentum():
    generator = torch.Generator().manual_seed(0)
    slope = torch.randn(6, generator=generator, dtype=torch.float64)
    theta = nn.Parameter(torch.randn(6, generator=generator, dtype=torch.float64))

    def linear(backward: bool = True, *, sample_labels: bool = False, term: str | None = None):
        loss = (slope * theta).sum()  # linear: ∇²L = 0
        if not backward:
            return loss
        theta.grad = None
        loss.backward()
        return loss.detach()

    for optimizer in (SophiaH([theta], lr=0.1), SophiaH([theta], lr=0.1, hvp="finite-difference")):
        for _ in range(3):
            before = theta.detach().clone()
            optimizer.step(linear)
            assert torch.equal(optimizer.state[theta]["hessian"], torch.zeros(6, dtype=torch.float64))
            torch.testing.assert_close(theta.detach(), before - 0.1 * slope.sign(), rtol=0, atol=1e-15)
            assert optimizer.last_unclipped_fraction == 0.0


def test_sophia_g_with_zero_sampled_gradient_clips_to_sign():
    theta = nn.Parameter(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))

    def closure(backward: bool = True, *, sample_labels: bool = False, term: str | None = None):
        loss = 0.0 * theta.sum() if sample_labels else (theta.square() * 10).sum()
        theta.grad = None
        loss.backward()
        return loss.detach()

    optimizer = SophiaG([theta], lr=0.01)
    optimizer.step(closure)
    torch.testing.assert_close(theta.detach(), torch.tensor([0.99, -1.99, 2.99], dtype=torch.float64))


@pytest.mark.parametrize("hvp", ["autograd", "finite-difference"])
def test_diagonal_quadratic_gives_the_exact_hessian_and_clips_where_it_should(hvp):
    # L = ½ Σ aᵢθᵢ²: Hutchinson is exact on a diagonal Hessian (uᵢ² = 1), so h = (1 − β₂)·a.
    a = torch.tensor([100.0, 10.0, 1.0, 0.1], dtype=torch.float64)
    theta = nn.Parameter(torch.ones(4, dtype=torch.float64))

    def closure(backward: bool = True, *, sample_labels: bool = False, term: str | None = None):
        loss = 0.5 * (a * theta.square()).sum()
        if not backward:
            return loss
        theta.grad = None
        loss.backward()
        return loss.detach()

    optimizer = SophiaH([theta], lr=0.01, betas=(0.9, 0.99), rho=0.5, hvp=hvp, hvp_radius=1e-4)
    optimizer.step(closure)
    h = optimizer.state[theta]["hessian"]
    torch.testing.assert_close(h, 0.01 * a, rtol=1e-9, atol=0)
    # m = 0.1·a·θ = 0.1·a; ratio m/(ρh) = 0.1·a / (0.005·a) = 20: all clipped at step 1.
    torch.testing.assert_close(theta.detach(), torch.full((4,), 0.99, dtype=torch.float64))
    assert optimizer.last_unclipped_fraction == 0.0

    # Same optimizer, fresh curvature: with h large (β₂ = 0) the ratio falls inside (−1, 1).
    optimizer = SophiaH([theta], lr=0.01, betas=(0.9, 0.0), rho=0.5, hvp=hvp, hvp_radius=1e-4)
    before = theta.detach().clone()
    optimizer.step(closure)
    m = 0.1 * a * before
    ratio = (m / (0.5 * a)).clamp(-1, 1)  # = 0.2·θ: no clipping
    torch.testing.assert_close(theta.detach(), before - 0.01 * ratio, rtol=1e-9, atol=0)
    assert optimizer.last_unclipped_fraction == 1.0


def test_sophia_g_uses_b_times_squared_sampled_gradient_every_k_steps():
    sampled_gradient = torch.tensor([0.5, -2.0], dtype=torch.float64)
    theta = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    calls = []

    def closure(backward: bool = True, *, sample_labels: bool = False, term: str | None = None):
        calls.append(sample_labels)
        slope = sampled_gradient if sample_labels else torch.tensor([1.0, 1.0], dtype=torch.float64)
        loss = (slope * theta).sum()
        theta.grad = None
        loss.backward()
        return loss.detach()

    optimizer = SophiaG([theta], lr=0.01, betas=(0.9, 0.5), hessian_period=3, batch_size=7)
    hessians = []
    for _ in range(7):
        optimizer.step(closure)
        hessians.append(optimizer.state[theta]["hessian"].clone())
        assert torch.equal(theta.grad, torch.ones(2, dtype=torch.float64))  # the true gradient
    estimate = 7 * sampled_gradient.square()
    torch.testing.assert_close(hessians[0], 0.5 * estimate)
    torch.testing.assert_close(hessians[3], 0.75 * estimate)
    torch.testing.assert_close(hessians[6], 0.875 * estimate)
    assert all(torch.equal(hessians[i], hessians[i - 1]) for i in (1, 2, 4, 5))
    assert calls.count(True) == 3  # refreshed at steps 1, 4 and 7 only


def hutchinson_estimates(model: nn.Module, closure, hvp: str, radius: float = 1e-5) -> list[torch.Tensor]:
    """SophiaH's first ĥ (β₂ = 0 makes h = ĥ; lr = 0 leaves θ alone), probes seeded with 3."""
    params = list(model.parameters())
    optimizer = SophiaH(params, lr=0.0, betas=(0.9, 0.0), hvp=hvp, hvp_radius=radius)
    torch.manual_seed(3)
    optimizer.step(closure)
    return [optimizer.state[p]["hessian"] for p in params]


def reference_estimates(model: nn.Module, loss_fn) -> list[torch.Tensor]:
    params = list(model.parameters())
    torch.manual_seed(3)
    probes = rademacher_like(params)
    return [u * hu for u, hu in zip(probes, double_backward_hvp(loss_fn(), params, probes))]


@pytest.mark.parametrize("hvp, rtol", [("autograd", 1e-10), ("finite-difference", 1e-6)])
def test_hutchinson_hvp_agrees_with_double_backward_on_a_float64_mlp(hvp, rtol):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    inputs = torch.randn(32, 5, dtype=torch.float64)
    labels = torch.randint(0, 3, (32,))

    def loss_fn():
        return F.cross_entropy(model(inputs), labels)

    closure = closure_for(model, loss_fn)
    before = [p.detach().clone() for p in model.parameters()]
    expected = reference_estimates(model, loss_fn)
    for got, want in zip(hutchinson_estimates(model, closure, hvp), expected):
        torch.testing.assert_close(got, want, rtol=rtol, atol=1e-12)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # θ restored exactly


def test_hutchinson_hvp_runs_on_a_tiny_llama_with_sdpa_attention(tiny_llama, lm_closure):
    # The fused CPU SDPA kernel has no double backward: the plain reference fails ...
    model = tiny_llama(dtype=torch.float64, attention="sdpa")
    input_ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    closure = lm_closure(model, input_ids)
    with pytest.raises(RuntimeError, match="not implemented"):
        reference_estimates(model, lambda: closure(backward=False))
    # ... SophiaH's own two routes both work and agree with the reference on the math kernel.
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        expected = reference_estimates(model, lambda: closure(backward=False))
    for got, want in zip(hutchinson_estimates(model, closure, "autograd"), expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # HF's RMSNorm computes in float32 even in a float64 model, so differences of gradients carry
    # float32 rounding: the O(r²) error meets the rounding floor near r = 1e-4, at ~1e-4 relative.
    for got, want in zip(hutchinson_estimates(model, closure, "finite-difference", 1e-4), expected):
        assert (got - want).abs().max() <= 1e-3 * want.abs().max()


def test_autograd_hvp_explains_a_closure_without_a_graph():
    model = SampledQuadratic()

    def detached(backward: bool = True, *, sample_labels: bool = False, term: str | None = None):
        return model.closure()(backward=True)

    with pytest.raises(RuntimeError, match="finite-difference"):
        SophiaH([model.theta]).step(detached)


def test_state_dict_resumes_the_identical_trajectory_of_sophia_g(tiny_llama, lm_closure):
    input_ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    options = {"hessian_period": 2, "batch_size": 18}

    def run(model, optimizer, steps):
        for step in steps:
            optimizer.step(lm_closure(model, input_ids, seed=step))

    straight = tiny_llama(dtype=torch.float64, attention="sdpa")
    run(straight, SPECS["sophia-g"].build(straight, list(straight.parameters()), 1e-3, options), range(6))

    first = tiny_llama(dtype=torch.float64, attention="sdpa")
    optimizer = SPECS["sophia-g"].build(first, list(first.parameters()), 1e-3, options)
    run(first, optimizer, range(3))
    saved = saved_and_loaded({"model": first.state_dict(), "optimizer": optimizer.state_dict()})

    resumed = tiny_llama(dtype=torch.float64, attention="sdpa")
    resumed.load_state_dict(saved["model"])
    optimizer = SPECS["sophia-g"].build(resumed, list(resumed.parameters()), 1e-3, options)
    optimizer.load_state_dict(saved["optimizer"])
    run(resumed, optimizer, range(3, 6))
    for p, q in zip(resumed.parameters(), straight.parameters()):
        assert torch.equal(p, q)


def test_invalid_arguments_name_the_value():
    param = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="hvp 'exact'"):
        SophiaH([param], hvp="exact")
    with pytest.raises(ValueError, match="hessian_period 0"):
        SophiaG([param], hessian_period=0)
    with pytest.raises(ValueError, match="needs a closure"):
        SophiaG([param]).step()
