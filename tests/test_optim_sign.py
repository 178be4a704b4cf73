"""Compressed first-order optimizers: signSGD, Signum, signAdam, Lion, QAdam-N, 1-bit Adam."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import closure_for, saved_and_loaded
from robustunlearn.optim.sign import (
    SPECS,
    Lion,
    OneBitAdam,
    QAdam,
    SignAdam,
    SignSGD,
    Signum,
    quantize,
)


def feed(optimizer: torch.optim.Optimizer, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Step on a given gradient; return the change of ``param``."""
    before = param.detach().clone()
    param.grad = grad.clone()
    optimizer.step()
    return param.detach() - before


def adam_directions(grads: list[torch.Tensor], betas=(0.9, 0.999), eps=1e-8) -> list[torch.Tensor]:
    """Adam's direction m̂/(√v̂+ε) after each gradient, read from torch.optim.Adam's own moments."""
    shadow = nn.Parameter(torch.zeros_like(grads[0]))
    adam = torch.optim.Adam([shadow], lr=0.0, betas=betas, eps=eps)
    directions = []
    for t, grad in enumerate(grads, start=1):
        feed(adam, shadow, grad)
        state = adam.state[shadow]
        m_hat = state["exp_avg"] / (1 - betas[0] ** t)
        v_hat = state["exp_avg_sq"] / (1 - betas[1] ** t)
        directions.append(m_hat / (v_hat.sqrt() + eps))
    return directions


def random_grads(steps: int = 6, shape=(5, 7), seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(steps)]


def test_specs_cover_the_issue(quadratic):
    expected = {"signsgd", "signum", "signadam", "lion", "qadam-1", "qadam-2", "qadam-4", "qadam-8"}
    assert set(SPECS) == expected | {"onebit-adam"}
    for name, spec in SPECS.items():
        assert spec.name == name and spec.grade == "compressed-first-order" and spec.default_lr > 0
    model = quadratic()
    optimizer = SPECS["qadam-2"].build(model, [model.theta], 1e-3, {"error_feedback": True})
    assert isinstance(optimizer, QAdam)
    assert optimizer.defaults["bits"] == 2 and optimizer.defaults["error_feedback"]


@pytest.mark.parametrize("name", sorted(SPECS))
def test_decreases_a_convex_quadratic(name, quadratic):
    model = quadratic()
    options = {"warmup_steps": 5} if name == "onebit-adam" else {}
    optimizer = SPECS[name].build(model, [model.theta], 0.05, options)
    closure = closure_for(model, model.loss)
    initial = model.loss().item()
    for _ in range(60):
        optimizer.step(closure)
    assert model.loss().item() < 0.1 * initial


@pytest.mark.parametrize("name", sorted(SPECS))
def test_decreases_a_tiny_llama_loss(name, tiny_llama, lm_closure):
    model = tiny_llama()
    input_ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    params = [p for p in model.parameters() if p.requires_grad]
    options = {"warmup_steps": 2} if name == "onebit-adam" else {}
    optimizer = SPECS[name].build(model, params, 1e-3, options)
    closure = lm_closure(model, input_ids)
    losses = [optimizer.step(closure).item() for _ in range(6)]
    with torch.no_grad():
        final = closure(backward=False).item()
    assert final < losses[0] - 0.05


def test_signsgd_steps_by_lr_times_sign_of_the_gradient():
    param = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    optimizer = SignSGD([param], lr=0.1)
    delta = feed(optimizer, param, torch.tensor([3.0, -1e-9, 0.0, -2.0], dtype=torch.float64))
    assert torch.equal(delta, torch.tensor([-0.1, 0.1, 0.0, 0.1], dtype=torch.float64))


def test_signadam_steps_by_the_sign_of_adams_direction_and_equals_signum():
    grads = random_grads()
    a = nn.Parameter(torch.zeros(5, 7, dtype=torch.float64))
    b = nn.Parameter(torch.zeros(5, 7, dtype=torch.float64))
    signadam, signum = SignAdam([a], lr=0.01), Signum([b], lr=0.01, beta=0.9)
    for grad, direction in zip(grads, adam_directions(grads)):
        delta = feed(signadam, a, grad)
        feed(signum, b, grad)
        torch.testing.assert_close(delta, -0.01 * direction.sign(), rtol=0, atol=1e-15)
    assert torch.equal(a, b)


def test_qadam_1_steps_by_max_abs_direction_times_sign_of_momentum():
    grads = random_grads()
    a = nn.Parameter(torch.zeros(5, 7, dtype=torch.float64))
    b = nn.Parameter(torch.zeros(5, 7, dtype=torch.float64))
    qadam, signum = QAdam([a], lr=0.01, bits=1), Signum([b], lr=0.01, beta=0.9)
    for grad, direction in zip(grads, adam_directions(grads)):
        delta = feed(qadam, a, grad)
        signum_delta = feed(signum, b, grad)
        scale = direction.abs().max()
        torch.testing.assert_close(delta, -0.01 * scale * direction.sign(), rtol=1e-12, atol=0)
        # Q(d; 1) is signum's (= signAdam's) step times the per-tensor scale max|d|.
        torch.testing.assert_close(delta, scale * signum_delta, rtol=1e-12, atol=0)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_quantize_codes_take_at_most_2_to_the_n_values(bits):
    x = torch.linspace(-3.0, 2.0, 4096, dtype=torch.float64)
    codes, step = quantize(x, bits)
    levels = 2 ** (bits - 1)
    assert codes.unique().numel() <= 2**bits
    assert set(codes.abs().unique().tolist()) == {float(k) for k in range(1, levels + 1)}
    assert torch.equal(codes.sign(), x.sign())
    assert step.item() == pytest.approx(x.abs().max().item() / levels)
    # The largest coordinate is represented exactly; no error exceeds one step.
    assert (step * codes)[x.abs().argmax()] == x[x.abs().argmax()]
    assert ((step * codes - x).abs() <= step).all()


def test_quantize_error_shrinks_as_bits_grow_and_zeros_stay_zero():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x[::10] = 0.0
    errors = []
    for bits in (1, 2, 4, 8):
        codes, step = quantize(x, bits)
        assert (codes[::10] == 0).all()
        errors.append(torch.linalg.vector_norm(step * codes - x).item())
    assert errors == sorted(errors, reverse=True) and len(set(errors)) == 4
    assert errors[-1] < 0.01 * errors[0]
    codes, step = quantize(x, 1)
    assert torch.equal(step * codes, x.abs().max() * x.sign())


def test_quantize_of_zeros_is_zero_and_bad_bits_are_rejected():
    codes, step = quantize(torch.zeros(3), 4)
    assert torch.equal(step * codes, torch.zeros(3))
    with pytest.raises(ValueError, match="accepted: 1, 2, 4, 8"):
        quantize(torch.ones(3), 3)
    with pytest.raises(ValueError, match="bits"):
        QAdam([nn.Parameter(torch.ones(2))], bits=16)


def test_qadam_error_feedback_carries_what_quantization_dropped():
    grads = random_grads(steps=8)
    param = nn.Parameter(torch.zeros(5, 7, dtype=torch.float64))
    optimizer = QAdam([param], lr=0.01, bits=1, error_feedback=True)
    applied = torch.zeros_like(param)
    for grad in grads:
        applied += -feed(optimizer, param, grad) / 0.01
    # Σ Q(c_t) = Σ d_t − e_T: the steps add up to the unquantized directions minus the residual.
    unquantized = torch.stack(adam_directions(grads)).sum(0)
    torch.testing.assert_close(applied + optimizer.state[param]["error"], unquantized)
    assert optimizer.state[param]["error"].abs().sum() > 0
    plain = QAdam([nn.Parameter(torch.zeros(2))], bits=1)
    feed(plain, plain.param_groups[0]["params"][0], torch.ones(2))
    assert "error" not in plain.state[plain.param_groups[0]["params"][0]]


def test_onebit_adam_is_adam_during_warmup(quadratic):
    a, b = quadratic(), quadratic()
    onebit = OneBitAdam([a.theta], lr=0.05, warmup_steps=5)
    adam = torch.optim.Adam([b.theta], lr=0.05)
    for _ in range(5):
        onebit.step(closure_for(a, a.loss))
        adam.step(closure_for(b, b.loss))
        torch.testing.assert_close(a.theta, b.theta, rtol=1e-12, atol=1e-14)
    onebit.step(closure_for(a, a.loss))
    adam.step(closure_for(b, b.loss))
    assert not torch.allclose(a.theta, b.theta)


def test_onebit_adam_freezes_v_and_compresses_momentum_to_a_scaled_sign():
    grads = random_grads(steps=9)
    param = nn.Parameter(torch.zeros(5, 7, dtype=torch.float64))
    optimizer = OneBitAdam([param], lr=0.01, warmup_steps=3)
    state = optimizer.state[param]
    for grad in grads[:3]:
        feed(optimizer, param, grad)
    frozen = state["exp_avg_sq"].clone()
    assert frozen.abs().sum() > 0
    for grad in grads[3:]:
        feed(optimizer, param, grad)
        assert torch.equal(state["exp_avg_sq"], frozen)
        momentum, error = state["exp_avg"], state["error"]
        assert momentum.abs().unique().numel() == 1  # one scale per tensor times ±1
        # C(c) = (‖c‖₂/√d)·sign(c) with c = m + e keeps the norm of c.
        torch.testing.assert_close(torch.linalg.vector_norm(momentum), torch.linalg.vector_norm(momentum + error))


def test_lion_interpolates_with_beta1_and_tracks_with_beta2():
    param = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    optimizer = Lion([param], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    first = feed(optimizer, param, torch.tensor([1.0], dtype=torch.float64))
    torch.testing.assert_close(first, torch.tensor([-0.05 - 0.1], dtype=torch.float64))
    # m = 0.01 after step 1. Step 2 with g = −0.5: c = 0.9·0.01 + 0.1·(−0.5) < 0, so θ rises
    # (interpolating with β₂ instead would give c = 0.99·0.01 − 0.01·0.5 > 0).
    before = param.item()
    second = feed(optimizer, param, torch.tensor([-0.5], dtype=torch.float64))
    torch.testing.assert_close(second.item(), -0.05 * before + 0.1)
    torch.testing.assert_close(optimizer.state[param]["momentum"].item(), 0.99 * 0.01 - 0.01 * 0.5)


@pytest.mark.parametrize("name", ["signum", "lion", "qadam-4", "onebit-adam"])
def test_state_dict_resumes_the_identical_trajectory(name, quadratic):
    options = {"warmup_steps": 2} if name == "onebit-adam" else {}
    straight = quadratic()
    optimizer = SPECS[name].build(straight, [straight.theta], 0.05, options)
    for _ in range(6):
        optimizer.step(closure_for(straight, straight.loss))

    first = quadratic()
    optimizer = SPECS[name].build(first, [first.theta], 0.05, options)
    for _ in range(3):
        optimizer.step(closure_for(first, first.loss))
    saved = saved_and_loaded({"model": first.state_dict(), "optimizer": optimizer.state_dict()})

    resumed = quadratic(seed=5)
    resumed.load_state_dict(saved["model"])
    optimizer = SPECS[name].build(resumed, [resumed.theta], 0.05, options)
    optimizer.load_state_dict(saved["optimizer"])
    for _ in range(3):
        optimizer.step(closure_for(resumed, resumed.loss))
    assert torch.equal(resumed.theta, straight.theta)


def test_invalid_hyperparameters_name_the_value():
    param = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="beta 1.0"):
        Signum([param], beta=1.0)
    with pytest.raises(ValueError, match="learning rate -1"):
        Lion([param], lr=-1)
    with pytest.raises(ValueError, match="warmup_steps 0"):
        OneBitAdam([param], warmup_steps=0)
