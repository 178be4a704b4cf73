"""The one closure protocol every optimizer grade in this package speaks.

An optimizer's ``step(closure)`` receives a callable with this signature::

    closure(backward: bool = True, *, sample_labels: bool = False, term: str | None = None) -> Tensor

* ``backward=True`` (the default, so torch's own optimizers work unchanged): the closure zeroes
  the gradients it is about to compute (``model.zero_grad(set_to_none=True)``, torch's
  convention), computes the loss with autograd, calls ``loss.backward()`` and returns the loss
  detached. First-order and second-order optimizers call it this way.
* ``backward=False``: the closure only evaluates the loss and returns it, in the caller's grad
  mode. Zeroth-order optimizers call it this way under ``torch.no_grad()`` at perturbed weights;
  Sophia-H calls it under ``torch.enable_grad()`` and gets the loss *with its graph*, to take
  Hessian-vector products.
* ``sample_labels=True`` (with ``backward=True``): the loss is the model's negative
  log-likelihood of labels *sampled from its own predictive distribution* at the same inputs,
  so that the squared gradient is a Gauss-Newton-Bartlett Hessian estimate (Sophia-G). Closures
  that cannot do this raise ``NotImplementedError``.
* ``term``: evaluate only the named part of a composite loss (``"forget"`` or ``"retain"``);
  ``None`` is the total. Used by ``hybrid-objective`` (ZO on the forget term, FO on the retain term).
  Closures without named terms raise ``KeyError`` for any other value than ``None``.

Per-batch work that does not depend on the weights being optimized (a frozen reference
model's outputs, tokenization) is done once per step by whoever builds the closure, not once
per call: a ZO step calls its closure two or more times on the same batch.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Closure(Protocol):
    def __call__(
        self, backward: bool = True, *, sample_labels: bool = False, term: str | None = None
    ) -> torch.Tensor: ...


def check_beta(name: str, beta: float) -> None:
    """A moment decay rate must lie in [0, 1)."""
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"invalid {name} {beta!r}; accepted: 0 <= {name} < 1")


def check_betas(betas: tuple[float, float]) -> None:
    check_beta("betas[0]", betas[0])
    check_beta("betas[1]", betas[1])
