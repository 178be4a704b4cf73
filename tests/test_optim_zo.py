import copy
import math

import pytest
import torch
from torch import nn

from helpers import closure_for
from robustunlearn.optim import OPTIMIZERS, build_optimizer
from robustunlearn.optim.zo import DIRECTIONS, SPECS, ZOSGD, ZOAdam, ZOAdaZO, ZOSign

ZO_NAMES = sorted(SPECS)


def batch(seed=1, shape=(4, 16)):
    return torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(seed))


class Smooth(nn.Module):
    """A smooth, non-quadratic function of a vector, with its exact gradient by autograd."""

    def __init__(self, dim=8, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.x = nn.Parameter(torch.randn(dim, generator=g, dtype=dtype) / 4)
        self.a = torch.randn(dim, dim, generator=g, dtype=dtype) / dim

    def forward(self):
        return torch.sin(self.a @ self.x).sum() + (self.x**4).sum() + self.x.sum()

    def closure(self, backward=True, *, sample_labels=False, term=None):
        return self()


class Quadratic(nn.Module):
    """0.5·xᵀAx − bᵀx with A positive definite; x starts on a dyadic grid (so the ZO grid does
    not move it)."""

    def __init__(self, dim=20, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        m = torch.randn(dim, dim, generator=g, dtype=dtype)
        self.a = m @ m.T / dim + torch.eye(dim, dtype=dtype)
        self.b = torch.randn(dim, generator=g, dtype=dtype)
        self.x = nn.Parameter(torch.zeros(dim, dtype=dtype))

    def forward(self):
        return 0.5 * self.x @ self.a @ self.x - self.b @ self.x

    def gradient(self):
        return self.a @ self.x.detach() - self.b

    @property
    def closure(self):
        return closure_for(self, self)


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def bitwise_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


# -- the estimator ---------------------------------------------------------------------------------


@pytest.mark.parametrize("directions", DIRECTIONS)
def test_projected_gradient_tends_to_directional_derivative(directions):
    model = Smooth()
    model.x.grad = None
    loss = model()
    (gradient,) = torch.autograd.grad(loss, [model.x])
    errors = []
    for eps in (1e-2, 1e-3, 1e-4):
        opt = ZOSGD(model.parameters(), lr=0.0, eps=eps, directions=directions, seed=7)
        opt.step(model.closure)
        z = opt.direction(0)
        exact = float(gradient @ z)
        errors.append(abs(opt.projected_grads[0] - exact) / abs(exact))
    # central differences: the error falls like eps², so 100x per factor 10 (rounding aside)
    assert errors[0] < 1e-2
    assert errors[1] < errors[0] / 50
    assert errors[2] < errors[1] / 50


def test_one_sided_projected_gradient_error_falls_like_eps():
    model = Smooth()
    (gradient,) = torch.autograd.grad(model(), [model.x])
    errors = []
    for eps in (1e-3, 1e-4, 1e-5):
        opt = ZOSGD(model.parameters(), lr=0.0, eps=eps, two_sided=False, directions="gaussian", seed=3)
        opt.step(model.closure)
        exact = float(gradient @ opt.direction(0))
        errors.append(abs(opt.projected_grads[0] - exact))
    assert errors[1] < errors[0] / 5 and errors[2] < errors[1] / 5


def test_sphere_directions_have_norm_sqrt_d(tiny_llama, lm_closure):
    model = tiny_llama(dtype=torch.float64)
    opt = ZOSGD(model.parameters(), lr=0.0, directions="sphere", seed=1)
    opt.step(lm_closure(model, batch(), model_loss=True))
    d = sum(p.numel() for p in model.parameters())
    norm = math.sqrt(sum(float(opt.direction(i).square().sum()) for i in range(len(list(model.parameters())))))
    assert norm == pytest.approx(math.sqrt(d), rel=1e-9)


@pytest.mark.parametrize("samples", [100, 2500])
def test_mean_of_gaussian_estimates_tends_to_gradient(samples):
    model = Quadratic(dim=10)
    with torch.no_grad():
        model.x.copy_(torch.arange(10, dtype=torch.float64) / 8)  # dyadic: already on the grid
    start, gradient = model.x.detach().clone(), model.gradient()
    # q directions averaged in one step, lr = 1: the step is exactly minus the estimate
    opt = ZOSGD(model.parameters(), lr=1.0, q=samples, directions="gaussian", eps=1e-3, seed=11)
    opt.step(model.closure)
    estimate = start - model.x.detach()
    error = float((estimate - gradient).norm())
    # E|ĝ − ∇L|² = (d + 1)|∇L|² / q for Gaussian directions (central differences are exact
    # on a quadratic)
    expected = math.sqrt(11 / samples) * float(gradient.norm())
    assert error < 2.5 * expected
    if samples == 2500:
        assert error < 0.25 * float(gradient.norm())


# -- exactness -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "options",
    [{}, {"directions": "gaussian"}, {"directions": "sphere", "two_sided": False}, {"q": 3}],
    ids=["rademacher", "gaussian", "sphere-one-sided", "q3"],
)
def test_round_trip_restores_weights_bit_exactly(dtype, options, tiny_llama, lm_closure):
    model = tiny_llama(dtype=dtype)
    closure = lm_closure(model, batch(), model_loss=True)
    opt = ZOSGD(model.parameters(), lr=0.0, seed=5, **options)
    opt.step(closure)  # the first step rounds the weights onto their grids
    before = weights(model)
    for _ in range(3):
        opt.step(closure)
    assert bitwise_equal(before, weights(model))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_plain_arithmetic_round_trip_is_not_exact(dtype, tiny_llama):
    """Control for the test above: MeZO's θ + εz − 2εz + εz on the same weights drifts."""
    model = tiny_llama(dtype=dtype)
    generator = torch.Generator().manual_seed(0)
    drifted = 0
    for p in model.parameters():
        z = torch.randn(p.shape, generator=generator, dtype=dtype)
        q = p.detach().clone()
        q.add_(z, alpha=1e-3).add_(z, alpha=-2e-3).add_(z, alpha=1e-3)
        drifted += int((q != p).sum())
    assert drifted > 0


def test_first_step_rounds_weights_by_at_most_half_a_grid_step(tiny_llama, lm_closure):
    model = tiny_llama(dtype=torch.float32)
    before = weights(model)
    ZOSGD(model.parameters(), lr=0.0, seed=5).step(lm_closure(model, batch(), model_loss=True))
    for old, new in zip(before, model.parameters()):
        bound = (float(old.abs().max()) + 1e-3) * 2.0**-23  # half of h = 2**(e - 24), 2**(e - 2) <= bound
        assert float((new.detach() - old).abs().max()) <= bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "name,options",
    [
        ("zo-sgd", {}),
        ("zo-sgd", {"directions": "gaussian", "q": 2}),
        ("zo-sgd", {"weight_decay": 0.1, "momentum": 0.5}),
        ("zo-sgd", {"two_sided": False}),
        ("zo-adam", {}),
        ("zo-adazo", {}),
        ("zo-sign", {}),
        ("zo-sign-elementwise", {}),
    ],
)
def test_fused_restore_and_update_equals_unfused(dtype, name, options, tiny_llama, lm_closure):
    results = []
    for fuse in (True, False):
        model = tiny_llama(dtype=dtype)
        opt = build_optimizer(name, model, lr=1e-3, seed=2, fuse=fuse, **options)
        closure = lm_closure(model, batch(), model_loss=True)
        for _ in range(3):
            opt.step(closure)
        results.append(weights(model))
    assert bitwise_equal(*results)
    assert not bitwise_equal(results[0], weights(tiny_llama(dtype=dtype)))  # it did move


@pytest.mark.parametrize("two_sided,fused,draws", [(True, True, 3), (True, False, 4), (False, True, 2)])
def test_draws_per_step(two_sided, fused, draws, tiny_llama, lm_closure):
    model = tiny_llama()
    opt = ZOSGD(model.parameters(), lr=1e-3, two_sided=two_sided, fuse=fused, seed=0)
    counts = {}
    noise = opt._noise

    def counting(slot, k, step=None):
        counts[slot.index] = counts.get(slot.index, 0) + 1
        return noise(slot, k, step)

    opt._noise = counting
    opt.step(lm_closure(model, batch(), model_loss=True))
    assert set(counts.values()) == {draws}


def test_rademacher_signs_are_fair_at_every_bit_position():
    layer = nn.Linear(64, 2000, bias=False)
    opt = ZOSGD(layer.parameters(), lr=0.0, seed=9)
    opt.step(lambda backward=True, **_: layer.weight.sum())
    z = opt.direction(0)
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    # 64 signs come from each random word: each bit position must be fair (sign bit included)
    per_position = z.reshape(-1, 64).mean(0)
    assert float(per_position.abs().max()) < 0.12  # 8 standard deviations of a mean of 2000 signs


# -- reproducibility -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["zo-sgd", "zo-adazo"])
def test_same_seed_same_trajectory_and_default_generator_untouched(name, tiny_llama, lm_closure):
    runs = []
    for default_seed in (0, 1):
        model = tiny_llama()
        closure = lm_closure(model, batch(), model_loss=True)
        opt = build_optimizer(name, model, lr=1e-3, seed=42)
        torch.manual_seed(default_seed)
        state = torch.get_rng_state()
        for _ in range(3):
            opt.step(closure)
        assert torch.equal(state, torch.get_rng_state())
        runs.append(weights(model))
    assert bitwise_equal(*runs)
    model = tiny_llama()
    opt = build_optimizer(name, model, lr=1e-3, seed=43)
    for _ in range(3):
        opt.step(lm_closure(model, batch(), model_loss=True))
    assert not bitwise_equal(runs[0], weights(model))


@pytest.mark.parametrize("name", ["zo-sgd", "zo-adam", "zo-adazo"])
def test_state_dict_resume_gives_identical_trajectory(name, tiny_llama, lm_closure):
    closure_batch = batch()
    model = tiny_llama()
    opt = build_optimizer(name, model, lr=1e-3, seed=4)
    for _ in range(3):
        opt.step(lm_closure(model, closure_batch, model_loss=True))
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = copy.deepcopy(opt.state_dict())  # state_dict() shares the live tensors
    for _ in range(3):
        opt.step(lm_closure(model, closure_batch, model_loss=True))
    straight = weights(model)

    resumed = tiny_llama(seed=123)
    resumed.load_state_dict(saved_model)
    opt2 = build_optimizer(name, resumed, lr=1e-3, seed=999)  # the saved seed wins
    opt2.load_state_dict(saved_opt)
    assert opt2.steps_taken == 3
    for _ in range(3):
        opt2.step(lm_closure(resumed, closure_batch, model_loss=True))
    assert bitwise_equal(straight, weights(resumed))


def test_reduce_projected_grad_sees_all_directions_and_drives_the_update(tiny_llama, lm_closure):
    seen = []

    def double(projected):
        seen.append(projected.clone())
        return projected * 2

    results = []
    for lr, hook in ((1e-3, double), (2e-3, None)):
        model = tiny_llama(dtype=torch.float64)
        opt = ZOSGD(model.parameters(), lr=lr, q=3, seed=8, reduce_projected_grad=hook)
        opt.step(lm_closure(model, batch(), model_loss=True))
        results.append(weights(model))
    assert seen[0].shape == (3,) and seen[0].dtype == torch.float64
    assert bitwise_equal(*results)


# -- behaviour ------------------------------------------------------------------------------------


def test_zo_never_allocates_grad_and_calls_closure_without_backward_under_no_grad(tiny_llama, lm_closure):
    model = tiny_llama()
    calls = []
    opt = ZOSGD(model.parameters(), lr=1e-3, term="forget", seed=0)
    closure = lm_closure(model, batch(), model_loss=True, calls=calls)
    for _ in range(2):
        opt.step(closure)
    assert all(p.grad is None for p in model.parameters())
    assert calls and all(c == (False, "forget", False) for c in calls)


@pytest.mark.parametrize("name", ZO_NAMES)
def test_every_zo_optimizer_decreases_a_convex_quadratic(name):
    model = Quadratic()
    start = float(model())
    optimum = float(-0.5 * model.b @ torch.linalg.solve(model.a, model.b))
    lr = {
        "zo-sgd": 2e-2,
        "zo-adam": 2e-2,
        "zo-adazo": 2e-3,
        "zo-sign": 5e-3,
        "zo-sign-elementwise": 5e-3,
    }[name]
    opt = build_optimizer(name, model, lr=lr, seed=0)
    for _ in range(400):
        opt.step(model.closure)
    # at least half of the way to the optimum
    assert float(model()) - optimum < 0.5 * (start - optimum)


@pytest.mark.parametrize("name", ZO_NAMES)
def test_every_zo_optimizer_decreases_a_tiny_lm_loss_at_its_default_lr(name, tiny_llama, lm_closure):
    model = tiny_llama()
    closure = lm_closure(model, batch(shape=(8, 16)), model_loss=True)
    with torch.no_grad():
        start = float(closure(backward=False))
    opt = build_optimizer(name, model, seed=0)
    for _ in range(60):
        opt.step(closure)
    with torch.no_grad():
        assert float(closure(backward=False)) < start - 0.01


def test_weight_decay_shrinks_matrices_only(tiny_llama, lm_closure):
    model = tiny_llama(dtype=torch.float64)
    opt = ZOSGD(model.parameters(), lr=0.1, weight_decay=0.5, seed=0, reduce_projected_grad=torch.zeros_like)
    closure = lm_closure(model, batch(), model_loss=True)
    opt.step(closure)  # rounds onto the grid
    before = weights(model)
    opt.step(closure)
    for old, new in zip(before, model.parameters()):
        expected = old * (1 - 0.05) if old.ndim >= 2 else old
        torch.testing.assert_close(new.detach(), expected, rtol=0, atol=1e-15)


def test_momentum_accumulates_the_estimates():
    model = Quadratic(dim=4)
    with torch.no_grad():
        model.x.copy_(torch.tensor([0.5, -0.25, 1.0, 0.125], dtype=torch.float64))
    opt = ZOSGD(model.parameters(), lr=1e-2, momentum=0.9, directions="gaussian", seed=1)
    steps = []
    for _ in range(2):
        before = model.x.detach().clone()
        opt.step(model.closure)
        steps.append(before - model.x.detach())
        estimate = opt.projected_grads[0] * opt.direction(0)
        if len(steps) == 1:
            first = estimate
    # second step: lr·(0.9·ĝ₁ + ĝ₂)
    torch.testing.assert_close(steps[1], 1e-2 * (0.9 * first + estimate), rtol=1e-9, atol=1e-14)


def test_bfloat16_uses_plain_arithmetic_and_still_learns(tiny_llama, lm_closure):
    model = tiny_llama(dtype=torch.bfloat16)
    closure = lm_closure(model, batch(shape=(8, 16)), model_loss=True)
    with torch.no_grad():
        start = float(closure(backward=False))
    opt = ZOSGD(model.parameters(), lr=3e-3, eps=1e-2, seed=0)
    for _ in range(40):
        opt.step(closure)
    with torch.no_grad():
        assert float(closure(backward=False)) < start


def test_registered_with_grade_and_description():
    for name in ZO_NAMES:
        spec = OPTIMIZERS[name]
        assert spec.grade == "zeroth-order" and spec.description and spec.default_lr > 0
    assert {"zo-sgd", "zo-adam", "zo-adazo", "zo-sign", "zo-sign-elementwise"} <= set(ZO_NAMES)
    assert OPTIMIZERS["zo-sign-elementwise"].default_options["elementwise"] is True


@pytest.mark.parametrize(
    "cls,kwargs,match",
    [
        (ZOSGD, {"directions": "cauchy"}, "rademacher, gaussian, sphere"),
        (ZOSGD, {"q": 0}, "q must"),
        (ZOSGD, {"eps": 0.0}, "eps must"),
        (ZOSGD, {"momentum": 1.0}, "momentum"),
        (ZOAdam, {"betas": (0.9, 1.0)}, "betas"),
        (ZOAdaZO, {"zeta": 0.0}, "zeta"),
        (ZOSign, {"lr": -1.0}, "lr must"),
    ],
)
def test_invalid_options_are_rejected(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls([nn.Parameter(torch.zeros(3))], **kwargs)


def test_step_needs_a_closure():
    opt = ZOSGD([nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="closure"):
        opt.step(None)
