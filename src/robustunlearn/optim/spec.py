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
class OptimizerMemory:
    """What an optimizer holds besides the weights, counted in copies of its trainable parameters
    (each copy in the parameters' dtype), for ``robustunlearn plan``'s estimate
    (:mod:`robustunlearn.train.plan`). ``state`` is checked against the tensors each registered
    optimizer really keeps (tests/test_optim_memory.py); the temporaries are read off the code.

    * ``state``: tensors kept from step to step per trainable parameter (Adam: m and v, 2).
    * ``backward_graphs``: forward graphs a step keeps for backward at once: 1 for gradient
      steps, 2 for Sophia-H (its Hessian-vector product differentiates the backward pass again),
      0 for zeroth-order steps, which only evaluate the loss: no ``.grad``, no activations kept.
    * ``closure_copies``: whole-model copies held while the closure runs, beside its activations
      (SAM's and fo-rs's weights at θ, to return to).
    * ``update_copies``: whole-model temporaries outside the closure, when activations are freed
      (torch's foreach Adam on GPUs: sqrt(v); Sophia's curvature estimates; fo-rs's and SAM's
      saved weights during the base step).
    * ``tensor_copies``: temporaries the size of one parameter tensor during its update (signs,
      ratios; a zeroth-order step's direction and its rounding noise), counted for the largest.
    """

    state: float
    backward_graphs: int = 1
    closure_copies: float = 0.0
    update_copies: float = 0.0
    tensor_copies: float = 0.0

    @property
    def gradients(self) -> bool:
        """Whether a step holds ``.grad`` for every trainable parameter."""
        return self.backward_graphs > 0


@dataclass(frozen=True)
class OptimizerSpec:
    """How to build one named optimizer.

    ``build(model, params, lr, options)`` returns the optimizer; ``params`` are the trainable
    parameters (those with ``requires_grad``, e.g. only LoRA adapters), ``model`` is there for
    optimizers that need its structure (``hybrid-depth`` splits it by block). ``memory`` is what it
    holds with its default options (:class:`OptimizerMemory`)."""

    name: str
    grade: str
    default_lr: float
    description: str
    build: Callable[[nn.Module, list[nn.Parameter], float, dict[str, Any]], torch.optim.Optimizer]
    default_options: dict[str, Any] = field(default_factory=dict)
    memory: OptimizerMemory = field(kw_only=True)


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
