"""Optimizer grades, all shaped like ``torch.optim.Optimizer`` and driven through one closure
protocol (:mod:`robustunlearn.optim.base`). ``OPTIMIZERS`` maps each CLI name to its spec."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from robustunlearn.optim.base import Closure

GRADES = (
    "zeroth-order",
    "compressed-first-order",
    "first-order",
    "second-order",
    "hybrid",
    "smoothing",
)


@dataclass(frozen=True)
class OptimizerSpec:
    """How to build one named optimizer.

    ``build(model, params, lr, options)`` returns the optimizer; ``params`` are the trainable
    parameters (those with ``requires_grad``, e.g. only LoRA adapters), ``model`` is there for
    optimizers that need its structure (``hybrid-depth`` splits it by block)."""

    name: str
    grade: str
    default_lr: float
    description: str
    build: Callable[[nn.Module, list[nn.Parameter], float, dict[str, Any]], torch.optim.Optimizer]
    default_options: dict[str, Any] = field(default_factory=dict)


def _torch_specs() -> dict[str, OptimizerSpec]:
    def plain(cls):
        return lambda model, params, lr, options: cls(params, lr=lr, **options)

    return {
        "sgd": OptimizerSpec("sgd", "first-order", 1e-2, "torch.optim.SGD", plain(torch.optim.SGD)),
        "adam": OptimizerSpec("adam", "first-order", 1e-4, "torch.optim.Adam", plain(torch.optim.Adam)),
        "adamw": OptimizerSpec("adamw", "first-order", 1e-4, "torch.optim.AdamW", plain(torch.optim.AdamW)),
    }


def _collect_specs() -> dict[str, OptimizerSpec]:
    from robustunlearn.optim import hybrid, sign, smoothing, sophia, zo

    specs = _torch_specs()
    for module in (zo, sign, sophia, smoothing, hybrid):
        specs.update(module.SPECS)
    return specs


OPTIMIZERS: dict[str, OptimizerSpec] = _collect_specs()


def build_optimizer(
    name: str, model: nn.Module, lr: float | None = None, *, total_steps: int | None = None, **options: Any
) -> torch.optim.Optimizer:
    """Build the optimizer called ``name`` over ``model``'s trainable parameters.

    ``total_steps`` reaches only the hybrid grade, whose schedule must end on a ZO block."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; accepted: {', '.join(sorted(OPTIMIZERS))}")
    spec = OPTIMIZERS[name]
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    merged = {**spec.default_options, **options}
    if spec.grade == "hybrid" and total_steps is not None:
        merged.setdefault("total_steps", total_steps)
    return spec.build(model, params, spec.default_lr if lr is None else lr, merged)


__all__ = ["Closure", "GRADES", "OPTIMIZERS", "OptimizerSpec", "build_optimizer"]
