"""Optimizer grades, all shaped like ``torch.optim.Optimizer``, driven through one closure
protocol and asked for more through one set of hooks (:mod:`robustunlearn.optim.base`).
``OPTIMIZERS`` maps each CLI name to its spec (:mod:`robustunlearn.optim.spec`); importing this
package registers every grade module's specs."""

from __future__ import annotations

import torch

from robustunlearn.optim import hybrid, sign, smoothing, sophia, zo
from robustunlearn.optim.base import Closure, OptimizerHooks, hooks, make_closure
from robustunlearn.optim.spec import GRADES, OPTIMIZERS, OptimizerMemory, OptimizerSpec, build_optimizer


def _plain(cls):
    return lambda model, params, lr, options: cls(params, lr=lr, **options)


# torch's own: SGD without momentum keeps nothing; Adam(W) keeps m and v, and on GPUs (its foreach
# path) its update computes sqrt(v) for all parameters at once (on the CPU one tensor at a time).
_ADAM_MEMORY = OptimizerMemory(state=2, update_copies=1)
OPTIMIZERS.update(
    {
        "sgd": OptimizerSpec(
            "sgd", "first-order", 1e-2, "torch.optim.SGD", _plain(torch.optim.SGD), memory=OptimizerMemory(state=0)
        ),
        "adam": OptimizerSpec(
            "adam", "first-order", 1e-4, "torch.optim.Adam", _plain(torch.optim.Adam), memory=_ADAM_MEMORY
        ),
        "adamw": OptimizerSpec(
            "adamw", "first-order", 1e-4, "torch.optim.AdamW", _plain(torch.optim.AdamW), memory=_ADAM_MEMORY
        ),
    }
)
for _module in (zo, sign, sophia, smoothing, hybrid):
    OPTIMIZERS.update(_module.SPECS)

__all__ = [
    "Closure",
    "GRADES",
    "OPTIMIZERS",
    "OptimizerHooks",
    "OptimizerMemory",
    "OptimizerSpec",
    "build_optimizer",
    "hooks",
    "make_closure",
]
