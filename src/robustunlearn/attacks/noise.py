"""Weight perturbation attacks: Gaussian noise and magnitude pruning.

Both touch the same weights as quantization (:func:`robustunlearn.attacks.quant.core.quantizable_linears`:
the ``nn.Linear`` weights of the transformer blocks, plus the output head if
``include_lm_head``); like quantization they are perturbations a model may meet after release,
and an unlearning that sits in a sharp minimum can be undone by them.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from robustunlearn.attacks.quant.core import quantizable_linears
from robustunlearn.attacks.spec import PERTURBATION, AttackContext, AttackOutcome, AttackSpec, real_number

PRUNE_SCOPES = ("per-layer", "global")


@torch.no_grad()
def gaussian_noise_attack(
    model: nn.Module, scale: float, *, relative: bool = True, seed: int = 0, include_lm_head: bool = False
) -> nn.Module:
    """A copy of ``model`` with independent Gaussian noise added to each weight::

        W <- W + ε,   ε_ij ~ N(0, σ²),   σ = scale · RMS(W) = scale · sqrt(mean W²)   (relative)
                                         σ = scale                                  (absolute)

    so ``scale=0.01`` perturbs each weight matrix by 1% of its typical magnitude. The noise is
    drawn on the CPU from ``seed`` (same seed, same noise on any device)."""
    if scale < 0:
        raise ValueError(f"scale must be >= 0, got {scale}")
    noisy = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    for _, linear in quantizable_linears(noisy, include_lm_head):
        weight = linear.weight
        dtype = torch.promote_types(weight.dtype, torch.float32)
        std = scale * weight.to(dtype).pow(2).mean().sqrt().item() if relative else scale
        noise = torch.randn(weight.shape, generator=generator, dtype=dtype) * std
        weight.copy_((weight.to(dtype) + noise.to(weight.device)).to(weight.dtype))
    return noisy


@torch.no_grad()
def magnitude_prune_attack(
    model: nn.Module, sparsity: float, *, scope: str = "per-layer", include_lm_head: bool = False
) -> nn.Module:
    """A copy of ``model`` with the ``sparsity`` fraction of smallest-magnitude weights set to 0.

    ``scope="per-layer"``: round(sparsity · n) weights of each matrix of n weights;
    ``"global"``: round(sparsity · N) of all N targeted weights together, wherever they are (this
    holds every magnitude in memory at once). Ties are broken by position, so exactly that many
    weights are zeroed (counting any that were already 0)."""
    if not 0 <= sparsity <= 1:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    if scope not in PRUNE_SCOPES:
        raise ValueError(f"unknown pruning scope {scope!r}; accepted: {', '.join(PRUNE_SCOPES)}")
    pruned = copy.deepcopy(model)
    weights = [linear.weight for _, linear in quantizable_linears(pruned, include_lm_head)]
    if scope == "per-layer":
        for weight in weights:
            flat = weight.view(-1)
            flat[torch.topk(flat.abs(), round(sparsity * flat.numel()), largest=False).indices] = 0
        return pruned
    magnitudes = torch.cat([weight.detach().abs().flatten().float().cpu() for weight in weights])
    prune = torch.zeros(magnitudes.numel(), dtype=torch.bool)
    prune[torch.topk(magnitudes, round(sparsity * magnitudes.numel()), largest=False).indices] = True
    for weight, mask in zip(weights, prune.split([w.numel() for w in weights]), strict=True):
        weight.view(-1)[mask.to(weight.device)] = 0
    return pruned


def _noise(model: nn.Module, scale: float, context: AttackContext) -> AttackOutcome:
    config = {"scale": scale, "strength": scale, "relative_to": "each weight matrix's RMS", "seed": context.seed}
    return AttackOutcome(gaussian_noise_attack(model, scale, seed=context.seed), None, config)


def _prune(model: nn.Module, sparsity: float, context: AttackContext) -> AttackOutcome:
    return AttackOutcome(magnitude_prune_attack(model, sparsity), None, {"sparsity": sparsity, "scope": "per-layer"})


SPECS = (
    AttackSpec(
        "noise-", PERTURBATION, "Gaussian noise, scale x each weight matrix's RMS", _noise, real_number("scale", 0)
    ),
    AttackSpec(
        "prune-",
        PERTURBATION,
        "zero that fraction of each weight matrix, smallest magnitudes first",
        _prune,
        real_number("sparsity", 0, 1),  # sparsity 1 would zero every weight: no model left to attack
    ),
)
