"""Unlearning objectives: each turns (model, batch, frozen reference outputs) into a loss.

Objectives know nothing about optimizers. The engine builds each batch with the parts the
objective reads (``objective.batch_parts``), then calls, per batch::

    reference = objective.reference_outputs(reference_model, batch)  # once, under torch.no_grad()
    out = objective.loss(model, batch, reference)   # any number of times (a ZO step: several)
    out["loss"] == out["forget"] + out["retain"]     # the LOSS_TERMS a closure(term=...) evaluates

An objective whose ``sequence_reference`` is true reads the reference only as the summed
log-probabilities of the token batches ``reference_sequences(batch)`` names, which hold fixed
forget-side examples: the engine may then look those up in a cache built before the first step
(robustunlearn.train.reference) instead of calling ``reference_outputs``.

Formulas, defaults and sources: each class's docstring and docs/objectives.md.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Protocol

import torch
from torch import nn

from robustunlearn.core.batching import TokenBatch, UnlearnBatch
from robustunlearn.objectives.ga import GradDiff, GradientAscent
from robustunlearn.objectives.idk import Idk, IdkDPO
from robustunlearn.objectives.npo import NPO, SimNPO
from robustunlearn.objectives.rmu import RMU

LOSS_TERMS = ("forget", "retain")  # the named terms of every objective's loss; "loss" is their sum


class Objective(Protocol):
    name: str
    needs_reference: bool  # True: the engine must pass a frozen reference model's outputs
    # The parts of an UnlearnBatch the objective reads: "forget" (batch.forget, always built),
    # "retain" (batch.retain), "refusal" (batch.forget_refusal and batch.forget_answered, for idk).
    # The engine builds only these; the others stay None.
    batch_parts: frozenset[str]
    # Forward passes of the trained model, each over one batch of sequences, in one evaluation of
    # the loss with its default options (what memory planning counts activations for).
    forward_passes: int
    # What the loss is computed on: "outputs" (token log-probabilities) or "activations" (hidden
    # states, rmu); curvature estimated from sampled output labels (Sophia-G) is unrelated to the latter.
    loss_on: str

    # True: reference_outputs(ref, batch) is exactly {name: log π_ref of tokens} over
    # reference_sequences(batch).items(), each tokens a batch of forget-side examples (forget
    # records, refusals of forget questions): nothing the cache cannot hold (no retain term's KL).
    sequence_reference: bool

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter] | None:
        """The parameters to train, or None to leave ``requires_grad`` as it is."""

    def reference_outputs(self, reference_model: nn.Module, batch: UnlearnBatch) -> dict[str, torch.Tensor]:
        """What the loss needs from the frozen reference on this batch ({} if nothing)."""

    def reference_sequences(self, batch: UnlearnBatch) -> dict[str, TokenBatch]:
        """With ``sequence_reference``: the token batches whose summed reference log-probabilities
        ``reference_outputs`` returns, under the same names."""

    def loss(
        self, model: nn.Module, batch: UnlearnBatch, reference: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """``loss`` = ``forget`` + ``retain``, those two terms, and detached scalars to log."""


OBJECTIVES: dict[str, type] = {cls.name: cls for cls in (GradientAscent, GradDiff, NPO, SimNPO, RMU, Idk, IdkDPO)}


def build_objective(name: str, model: nn.Module | None = None, **hparams: Any) -> Objective:
    """Build the objective called ``name``. Hyperparameters not given take the class defaults,
    or for ``rmu`` with a ``model``, defaults scaled to its size (:meth:`RMU.defaults_for`)."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; accepted: {', '.join(OBJECTIVES)}")
    cls = OBJECTIVES[name]
    accepted = [f.name for f in fields(cls)]
    unknown = sorted(set(hparams) - set(accepted))
    if unknown:
        raise ValueError(
            f"unknown hyperparameter(s) {', '.join(unknown)} for objective {name!r}; "
            f"accepted: {', '.join(accepted) or 'none'}"
        )
    defaults = cls.defaults_for(model) if model is not None and hasattr(cls, "defaults_for") else {}
    return cls(**{**defaults, **hparams})


__all__ = [
    "GradDiff",
    "GradientAscent",
    "Idk",
    "IdkDPO",
    "LOSS_TERMS",
    "NPO",
    "OBJECTIVES",
    "Objective",
    "RMU",
    "SimNPO",
    "build_objective",
]
