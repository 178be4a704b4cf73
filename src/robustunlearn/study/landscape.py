"""The loss landscape around unlearned models: linear mode connectivity and sharpness.

* Linear mode connectivity (Frankle et al., "Linear Mode Connectivity and the Lottery Ticket
  Hypothesis", ICML 2020): evaluate the straight path θ(α) = (1-α)·θ_a + α·θ_b between two
  models; a bump above the chord of the endpoints (a *barrier*) means they sit in different
  basins. Between two unlearned models, a bump in a forget metric means knowledge resurfaces
  between them.
* Sharpness: how much the loss rises under random Gaussian weight noise, on the same weights
  and with the same noise as the weight-noise attack
  (:func:`robustunlearn.attacks.noise.gaussian_noise_attack`). A sharp minimum is one a small
  perturbation (quantization is one) climbs out of.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable, Sequence

import torch
from torch import nn

from robustunlearn.attacks.noise import gaussian_noise_attack


def linear_interpolation(
    model_a: nn.Module,
    model_b: nn.Module,
    evaluate: Callable[[nn.Module], dict[str, float]],
    points: int = 11,
) -> list[dict[str, float]]:
    """``evaluate`` along θ(α) = (1-α)·θ_a + α·θ_b at ``points`` evenly spaced α in [0, 1].

    Returns ``[{"alpha": α, **evaluate(θ(α))}, ...]``. Every floating-point parameter and buffer
    is interpolated (on ``model_a``'s device, in its dtype); other buffers are ``model_a``'s. The
    weights live in one scratch copy of ``model_a``; neither input is modified. The endpoints are
    exactly θ_a and θ_b. ``evaluate`` runs in the caller's grad mode."""
    if points < 2:
        raise ValueError(f"points must be >= 2 (the two endpoints), got {points}")
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    if state_a.keys() != state_b.keys():
        only = sorted(state_a.keys() ^ state_b.keys())
        raise ValueError(f"the models differ in architecture: tensors {only[:5]} are in only one of them")
    for name, tensor in state_a.items():
        if tensor.shape != state_b[name].shape:
            raise ValueError(
                f"the models differ in architecture: {name} is {tuple(tensor.shape)} vs {tuple(state_b[name].shape)}"
            )
    scratch = copy.deepcopy(model_a)
    targets = {name: tensor for name, tensor in scratch.state_dict().items() if tensor.is_floating_point()}
    curve = []
    for index in range(points):
        alpha = index / (points - 1)
        with torch.no_grad():
            for name, target in targets.items():
                # lerp is exact at both ends: a + 0·(b-a) = a and b - 0·(b-a) = b.
                target.copy_(torch.lerp(state_a[name], state_b[name].to(state_a[name]), alpha))
        curve.append({"alpha": alpha, **evaluate(scratch)})
    return curve


def lmc_barrier(curve: Sequence[dict[str, float]], key: str, *, higher_is_worse: bool = True) -> float:
    """The barrier on ``key`` along a :func:`linear_interpolation` curve (Frankle et al. 2020)::

        B = max_α [ v(α) - ((1-t)·v(α_0) + t·v(α_1)) ],   t = (α - α_0) / (α_1 - α_0)

    where α_0, α_1 are the smallest and largest α of the curve. ``B >= 0``: 0 for a path no
    worse than the chord. For a metric where lower is worse (accuracy, ROUGE on retained
    knowledge) pass ``higher_is_worse=False``: the barrier is then the dip below the chord."""
    points = sorted((float(point["alpha"]), float(point[key])) for point in curve)
    if len(points) < 2 or points[0][0] == points[-1][0]:
        raise ValueError(f"a barrier needs points at two different alphas, got {len(points)} point(s)")
    (alpha_0, value_0), (alpha_1, value_1) = points[0], points[-1]
    sign = 1.0 if higher_is_worse else -1.0
    excess = []
    for alpha, value in points:
        t = (alpha - alpha_0) / (alpha_1 - alpha_0)
        excess.append(sign * (value - ((1 - t) * value_0 + t * value_1)))
    return max(excess)


def sharpness(
    model: nn.Module,
    loss_fn: Callable[[nn.Module], float],
    scales: Sequence[float] = (1e-3, 1e-2, 3e-2),
    samples: int = 3,
    seed: int = 0,
    relative: bool = True,
    *,
    include_lm_head: bool = False,
) -> list[dict[str, float]]:
    """Mean loss increase under Gaussian weight noise, per noise scale::

        S(σ) = mean_k [ L(θ + ε_k) - L(θ) ],   ε_k from gaussian_noise_attack(θ, σ, seed=seed+k)

    with ``std`` the sample standard deviation over the ``samples`` draws (0 for one draw).
    ``relative``: σ is a fraction of each weight matrix's RMS. Sample k uses the same seed at
    every scale, so the scales probe the same directions at growing distances. ``model`` is
    not modified (each draw is a noisy copy)."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    base = float(loss_fn(model))
    results = []
    for scale in scales:
        increases = []
        for k in range(samples):
            noisy = gaussian_noise_attack(
                model, scale, relative=relative, seed=seed + k, include_lm_head=include_lm_head
            )
            increases.append(float(loss_fn(noisy)) - base)
            del noisy  # one noisy copy alive at a time
        std = statistics.stdev(increases) if samples > 1 else 0.0
        results.append({"scale": float(scale), "mean_loss_increase": statistics.fmean(increases), "std": std})
    return results
