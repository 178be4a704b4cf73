"""The optimizer registry: :class:`OptimizerSpec` says how to build one named optimizer, and
``OPTIMIZERS`` maps every CLI name to its spec. Each grade module declares its specs in ``SPECS``;
the package's ``__init__`` puts them all here, so importing :mod:`robustunlearn.optim` fills it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

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


# Filled by robustunlearn.optim's __init__ from every grade module's SPECS.
OPTIMIZERS: dict[str, OptimizerSpec] = {}


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
